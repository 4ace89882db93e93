"""The layering of bita_jax (docs/architecture.md, "Layering"): every import, at module level or
inside a function (or under TYPE_CHECKING), goes to the importer's own layer or one below it, and no
modules import each other in a cycle. Read from the source with `ast`; nothing is imported."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = "bita_jax"
ROOT = pathlib.Path(__file__).resolve().parent.parent / PACKAGE

# Bottom to top; a module may import its own layer and the layers before it. Each entry names the
# modules or sub-packages (as prefixes) of one layer; docs/architecture.md gives the reasons.
LAYERS: list[tuple[str, ...]] = [
    ("bita_jax.errors",),
    ("bita_jax.config",),
    ("bita_jax.sharding",),
    ("bita_jax.models",),
    ("bita_jax.bita",),
    ("bita_jax.decoding",),
    ("bita_jax.io",),
    ("bita_jax.training",),
    ("bita_jax.tuning",),
    ("bita_jax.demo",),
    ("bita_jax.api", "bita_jax"),  # the package's __init__ is the API's front door
    # bita_jax/tune.py and bita_jax/aot.py: the shells of `python -m bita_jax.tune` and `-m bita_jax.aot`
    ("bita_jax.cli", "bita_jax.tune", "bita_jax.aot"),
    ("bita_jax.recipe",),
]


def module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    """bita_jax/cli/decode.py -> bita_jax.cli.decode; a package's __init__.py is the package."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str, layers: list[tuple[str, ...]] = LAYERS) -> tuple[int, str]:
    """(layer index, the unit: the longest prefix in `layers` naming the module); KeyError if none."""
    best = None
    for index, units in enumerate(layers):
        for unit in units:
            if module == unit or module.startswith(unit + "."):
                if best is None or len(unit) > len(best[1]):
                    best = (index, unit)
    if best is None:
        raise KeyError(module)
    return best


def imports_of(module: str, source: str, is_package: bool, known: set[str]) -> list[tuple[str, int]]:
    """(imported bita_jax module, line) for every import statement anywhere in `source`.

    `from X import name` names the module X.name when that is a module in `known`, else X."""
    here = module if is_package else module.rpartition(".")[0]
    tree = ast.parse(source)
    # A module's `if __name__ == "__main__":` block runs it as a script, the top of any stack: its
    # imports are the command's, not the module's (e.g. `python -m bita_jax.io.gguf` runs cli.gguf).
    script = {id(n) for guard in ast.walk(tree) if is_main_guard(guard) for n in ast.walk(guard)}
    found = []
    for node in ast.walk(tree):
        if id(node) in script:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package, level - 1 packages up
                base = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub if sub in known else target, node.lineno))
    return [(name, line) for name, line in found if name == PACKAGE or name.startswith(PACKAGE + ".")]


def is_main_guard(node: ast.AST) -> bool:
    """`if __name__ == "__main__":`"""
    if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare):
        return False
    test = node.test
    return (isinstance(test.left, ast.Name) and test.left.id == "__name__" and len(test.comparators) == 1
            and isinstance(test.comparators[0], ast.Constant) and test.comparators[0].value == "__main__")


def import_graph(sources: dict[str, tuple[str, bool]]) -> dict[str, list[tuple[str, int]]]:
    """Module -> its bita_jax imports (module, line), from {module: (source, is_package)}."""
    known = set(sources)
    return {m: imports_of(m, src, is_pkg, known) for m, (src, is_pkg) in sources.items()}


def climbing_imports(graph: dict[str, list[tuple[str, int]]], layers=LAYERS) -> list[str]:
    """Each import into a higher layer, as 'importer:line -> imported (unit > unit)'."""
    bad = []
    for module, targets in graph.items():
        own, own_unit = layer_of(module, layers)
        for target, line in targets:
            layer, unit = layer_of(target, layers)
            if layer > own:
                bad.append(f"{module}:{line} -> {target} ({own_unit} is below {unit})")
    return bad


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def module_cycles(graph: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """Modules that import each other, directly or through others (self-imports ignored)."""
    return cycles({m: {t for t, _ in targets if t != m} for m, targets in graph.items()})


def unit_cycles(graph: dict[str, list[tuple[str, int]]], layers=LAYERS) -> list[list[str]]:
    """Sub-packages (layer units) that import each other, directly or through others."""
    edges: dict[str, set[str]] = {}
    for module, targets in graph.items():
        unit = layer_of(module, layers)[1]
        edges.setdefault(unit, set()).update(
            other for other in (layer_of(t, layers)[1] for t, _ in targets) if other != unit
        )
    return cycles(edges)


def package_sources(root: pathlib.Path = ROOT) -> dict[str, tuple[str, bool]]:
    """{module: (source, is_package)} of every .py file under the package."""
    return {
        module_name(path, root): (path.read_text(encoding="utf-8"), path.name == "__init__.py")
        for path in sorted(root.rglob("*.py"))
    }


@pytest.fixture(scope="module")
def graph():
    return import_graph(package_sources())


def test_every_module_has_a_layer(graph):
    missing = []
    for module in graph:
        try:
            layer_of(module)
        except KeyError:
            missing.append(module)
    assert not missing, f"modules in no layer (add them to LAYERS and docs/architecture.md): {missing}"


def test_the_graph_sees_function_level_imports(graph):
    # cli/decode.py imports the demo inside main() (only `python decode.py` with no arguments needs it)
    assert "bita_jax.cli.demo" in {t for t, _ in graph["bita_jax.cli.decode"]}
    assert len(graph) > 50


def test_no_import_climbs(graph):
    bad = climbing_imports(graph)
    assert not bad, "imports into a higher layer:\n" + "\n".join(bad)


def test_no_import_cycles(graph):
    assert not module_cycles(graph), f"modules importing each other: {module_cycles(graph)}"
    assert not unit_cycles(graph), f"sub-packages importing each other: {unit_cycles(graph)}"


def test_the_checks_catch_a_climb_and_a_cycle():
    """The checker itself: a function-level import of the CLI from io (a climb, and with the CLI's
    import of io a cycle of modules and of sub-packages), and two modules of one layer importing
    each other (one relatively), are each reported."""
    sources = {
        "bita_jax": ("", True),
        "bita_jax.io": ("", True),
        "bita_jax.io.gguf": ("def main():\n    from bita_jax.cli import run_main\n", False),
        "bita_jax.cli": ("from bita_jax.io import gguf\n", True),
        "bita_jax.cli.decode": ("from bita_jax.cli import demo\n", False),
        "bita_jax.cli.demo": ("from . import decode\n", False),
    }
    graph = import_graph(sources)
    assert climbing_imports(graph) == [
        "bita_jax.io.gguf:2 -> bita_jax.cli (bita_jax.io is below bita_jax.cli)"
    ]
    assert sorted(module_cycles(graph)) == [
        ["bita_jax.cli", "bita_jax.io.gguf"],
        ["bita_jax.cli.decode", "bita_jax.cli.demo"],
    ]
    assert unit_cycles(graph) == [["bita_jax.cli", "bita_jax.io"]]


def test_a_script_entry_is_not_a_dependency():
    """Imports under `if __name__ == "__main__":` are the command's (io/gguf.py runs cli.gguf's
    main for `python -m bita_jax.io.gguf`); the same import anywhere else still counts."""
    entry = 'if __name__ == "__main__":\n    from bita_jax.cli.gguf import main\n'
    sources = {
        "bita_jax.io.gguf": (entry, False),
        "bita_jax.io.tokenizer": ("if True:\n    from bita_jax.cli.gguf import main\n", False),
        "bita_jax.cli.gguf": ("from bita_jax.io.gguf import convert\n", False),
    }
    graph = import_graph(sources)
    assert graph["bita_jax.io.gguf"] == []
    assert graph["bita_jax.io.tokenizer"] == [("bita_jax.cli.gguf", 2)]
