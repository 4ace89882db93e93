"""Every shell command in README.md and docs/*.md names a script or module that exists, and every
--flag it gives is one that program takes (its argparse parser, or for benchmarks/ and scripts/ a
flag named in its source). Commands are not run: they load models and take minutes."""

import glob
import importlib
import importlib.util
import os
import re
import shlex

import pytest

DOCS = ["README.md", *sorted(glob.glob("docs/*.md"))]
# Program (script, module, console script) -> the module whose build_parser() or source has its flags.
PROGRAMS = {
    "decode.py": "bita_jax.cli.decode", "bita-decode": "bita_jax.cli.decode",
    "train.py": "bita_jax.cli.train", "bita-train": "bita_jax.cli.train",
    "bita_jax.tune": "bita_jax.cli.tune", "bita-tune": "bita_jax.cli.tune",
    "bita_jax.cli.bench": "bita_jax.cli.bench", "bita_jax.recipe": "bita_jax.recipe.__main__",
    "bita_jax.cli.gguf": "bita_jax.cli.gguf", "bita_jax.io.gguf": "bita_jax.cli.gguf",
    "bita_jax.aot": "bita_jax.cli.aot",
}  # fmt: skip
SEPARATORS = {";", "&&", "||", "|", "&"}
COMMAND = re.compile(r"(\w+=\S*\s+)*(python\b|bita-)")  # optional VAR=value prefixes


def commands_in(text: str) -> list[list[str]]:
    """The commands of a shell line as token lists: split at ; && || | & outside quotes (a
    "$(...)" substitution counts as one argument), comments dropped."""
    lexer = shlex.shlex(re.sub(r'"\$\(.*?\)"', "X", text), posix=True, punctuation_chars=";&|")
    lexer.commenters, lexer.wordchars = "#", lexer.wordchars + "-./:=,[]+*$(){}"
    out = [[]]
    for token in lexer:
        if token in SEPARATORS:
            out.append([])
        else:
            out[-1].append(token)
    return [c for c in out if c]


def shell_commands(path: str) -> list[list[str]]:
    """The commands of a page, as token lists: from its bash (or unlabelled) code blocks, with
    continuation lines joined, and its inline `python ...` / `bita-...` spans."""
    lines, block, lang = [], None, ""
    for line in open(path).read().splitlines():
        if line.startswith("```"):
            if block is None:
                block, lang = [], line[3:].strip()
                continue
            if lang in ("bash", ""):
                lines += re.sub(r"\\\n\s*", " ", "\n".join(block)).splitlines()
            block = None
        elif block is not None:
            block.append(line)
        else:
            lines += re.findall(r"`((?:python|bita-)[^`]*)`", line)
    # Prose in unlabelled blocks may not tokenize (an apostrophe); a line that starts a command must.
    return [c for line in lines if COMMAND.match(line.strip()) or parses(line) for c in commands_in(line)]


def parses(line: str) -> bool:
    try:
        return bool(commands_in(line))
    except ValueError:
        return False


def program_and_flags(tokens: list[str]) -> tuple[str, list[str]] | None:
    """(the program, its --flags) of a command that runs python or a console script; None for
    others, `python -c`, `python -m pytest` and the interpreter alone."""
    while tokens and re.match(r"\w+=", tokens[0]):  # VAR=value prefixes
        tokens = tokens[1:]
    if not tokens or not (tokens[0] == "python" or tokens[0].startswith("bita-")):
        return None
    if tokens[0] == "python":
        tokens = tokens[1:]
        if not tokens or tokens[0] == "-c" or tokens[:2] == ["-m", "pytest"]:
            return None
        if tokens[0] == "-m":
            tokens = tokens[1:]
    flags = [t.strip("[]").split("=")[0] for t in tokens[1:] if t.strip("[").startswith("--")]
    return tokens[0], flags


CASES = [
    (page, shlex.join(c)) for page in DOCS for c in shell_commands(page) if program_and_flags(c) is not None
]


def test_the_pages_have_commands():
    assert len(CASES) > 40 and {page for page, _ in CASES} >= {"README.md", "docs/decoding.md"}


@pytest.mark.parametrize("page,command", CASES, ids=[f"{p}:{c[:60]}" for p, c in CASES])
def test_command_names_a_program_and_its_flags(page, command):
    program, flags = program_and_flags(shlex.split(command))
    if program in PROGRAMS:
        module = importlib.import_module(PROGRAMS[program])
        if hasattr(module, "build_parser"):
            known = set(module.build_parser()._option_string_actions)
        else:  # a parser built inside main
            known = set(re.findall(r'"(--[\w-]+)"', open(module.__file__).read()))
    elif program.endswith(".py"):
        assert os.path.isfile(program), f"{page}: no file {program}"
        known = set(re.findall(r"""["'](--[\w-]+)["']""", open(program).read()))
    else:
        assert importlib.util.find_spec(program) is not None, f"{page}: no module {program}"
        known = set()
    missing = [flag for flag in flags if flag not in known]
    assert not missing, f"{page}: {program} takes no {missing}"
