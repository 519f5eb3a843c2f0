"""The import graph: no circle, no upward import between layers, and no torch where none belongs.

Every import counts, also those inside functions or under ``TYPE_CHECKING``: a circle a type
checker walks is a circle.
"""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import ROOT

#: The layers, lowest first: a module may import its own layer and those below it.
LAYERS = {"config": 0, "capture": 1, "inference": 2, "service": 3, "server": 4, "benchmark": 5, "cli": 6}
#: Must import without torch: the engine interface, the vocabulary of asking, the service, and the server's adapters.
TORCH_FREE = [
    "streamer.inference.engine",
    "streamer.inference.questions",
    "streamer.inference.policy",
    "streamer.inference.registry",
    "streamer.service",
    "streamer.server.protocol",
    "streamer.server.connection",
    "streamer.server.app",
]


def _modules() -> dict[str, ast.Module]:
    found = {}
    for path in (ROOT / "streamer").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text(), str(path))
    return found


def _imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The streamer modules ``name`` imports (``from a import b`` counts as ``a.b`` when that is a module)."""
    package = name if name in known and any(k.startswith(name + ".") for k in known) else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            out |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
    return {m for m in out if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, tree, set(modules)) for name, tree in modules.items()}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else 0


def test_the_import_graph_has_no_circle() -> None:
    """No module imports, through any chain, a module that imports it."""
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                raise AssertionError("import circle: " + " -> ".join([*path[path.index(dep) :], dep]))
            if dep not in state:
                visit(dep)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_no_module_imports_from_a_layer_above_its_own() -> None:
    """config < capture < inference < service < server < benchmark < cli: imports only run downwards."""
    upward = [
        f"{module} imports {dep}"
        for module, deps in _graph().items()
        for dep in deps
        if (mine := _layer(module)) is not None and (theirs := _layer(dep)) is not None and theirs > mine
    ]
    assert not upward, "\n".join(sorted(upward))
    assert {m.split(".")[1] for m in _graph() if "." in m} - set(LAYERS) <= {"web"}, "a package with no layer"


def test_the_vocabulary_the_service_and_the_adapters_import_no_torch() -> None:
    """Importing them (in a fresh interpreter) leaves torch out of sys.modules."""
    heavy = "sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))"
    code = f"import sys\nfor m in {TORCH_FREE!r}: __import__(m)\nprint({heavy})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert done.stdout.strip() == "[]", done.stdout
