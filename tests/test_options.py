"""One set of decoding options: decode.py, the tuner and bench parse them with one helper
(cli/options.py), under the same flags and defaults, which are the API's (api.DecodingOptions)."""

import argparse
import inspect

import pytest

from bita_jax import api
from bita_jax.cli import UserError, bench, decode, tune
from bita_jax.cli.options import add_decoding_flags, decoding_options

# Each command's parser and the arguments it requires.
COMMANDS = {
    "decode.py": (decode.build_parser, []),
    "python -m bita_jax.tune": (tune.build_parser, ["--model", "M", "--adapter", "A", "--data", "D"]),
    "python -m bita_jax.cli.bench": (bench.build_parser, []),
}
# Flags every decoding command takes: the tuner and bench pick their own modes, trees, batch sizes
# (--batch-sizes) and decode greedily.
EVERYWHERE = {"--chat", "--dtype", "--precision", "--mesh"}


def option_flags(parser: argparse.ArgumentParser) -> dict[str, tuple]:
    """flag -> (dest, default, choices, type, action class, help) of every option."""
    return {
        flag: (a.dest, a.default, a.choices, a.type, type(a), a.help)
        for a in parser._actions
        for flag in a.option_strings
    }


@pytest.mark.parametrize("command", COMMANDS)
def test_defaults_are_the_apis(command):
    build, required = COMMANDS[command]
    assert decoding_options(build().parse_args(required)) == api.DecodingOptions()


def test_load_and_run_take_the_same_fields_and_defaults():
    defaults = api.DecodingOptions()
    load = inspect.signature(api.load).parameters
    assert {name: load[name].default for name in defaults.load_options()} == defaults.load_options()
    assert {name: getattr(api.GenerateOptions(), name) for name in defaults.run_options()} == (
        defaults.run_options()
    )


def test_a_flag_is_the_same_in_every_command():
    """Every decoding option a command takes is the shared definition (name, default, choices,
    type, help), and every command takes --chat, --dtype, --precision and --mesh."""
    shared = argparse.ArgumentParser()
    add_decoding_flags(shared)
    definitions = option_flags(shared)
    del definitions["-h"], definitions["--help"]
    assert EVERYWHERE <= set(definitions)
    for command, (build, _) in COMMANDS.items():
        own = option_flags(build())
        assert EVERYWHERE <= set(own), command
        for flag in set(own) & set(definitions):
            assert own[flag] == definitions[flag], (command, flag)
    assert set(option_flags(decode.build_parser())) >= set(definitions)  # decode.py takes them all


@pytest.mark.parametrize("command", COMMANDS)
def test_chat_precision_and_mesh_reach_the_options(command):
    build, required = COMMANDS[command]
    argv = [*required, "--chat", "--dtype", "bfloat16", "--precision", "fast", "--mesh", "tensor=2"]
    expected = api.DecodingOptions(chat=True, dtype="bfloat16", precision="fast", mesh="tensor=2")
    assert decoding_options(build().parse_args(argv)) == expected


def test_decode_options_and_refusals():
    parser = decode.build_parser()
    argv = ["--tree", "upper:3", "--batch-size", "4", "--temperature", "0.7", "--top-k", "5", "--seed", "9"]
    options = decoding_options(parser.parse_args(["--mode", "bita", *argv]))
    assert options == api.DecodingOptions(
        mode="bita", tree="upper:3", batch_size=4, temperature=0.7, top_k=5, seed=9
    )
    assert options.run_options()["tree"] == "upper:3" and "dtype" not in options.run_options()
    with pytest.raises(UserError, match="--top-k is for sampling"):
        decoding_options(parser.parse_args(["--top-k", "5"]))
    with pytest.raises(UserError, match="--temperature must be a finite number"):
        decoding_options(parser.parse_args(["--temperature", "nan"]))
