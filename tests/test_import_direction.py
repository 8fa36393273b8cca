"""The layers import downwards only: chief -> worker/shared -> protos, ps -> shared -> protos.

Every module of every role folder is parsed with `ast` (module-level and function-level
imports both count: a deferred import is still a dependency) and mapped to its layer through
setup.py's package_dir table. An arrow against the direction fails, except from the public
facade modules of the shared package listed in FACADES.
"""
from __future__ import annotations

import ast
import collections
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _role_dirs() -> dict[str, str]:
    """setup.py's ROLE_DIRS (package -> folder), read from setup.py itself, never copied."""
    tree = ast.parse((ROOT / "setup.py").read_text(), "setup.py")
    return next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                and any(getattr(t, "id", None) == "ROLE_DIRS" for t in node.targets))


ROLE_DIRS = _role_dirs()

# Which layers each layer may import (itself always). cli is the top: it wires every role.
ALLOWED = {
    "protos": {"protos"},
    "shared": {"shared", "protos"},
    "ps": {"ps", "shared", "protos"},
    "worker": {"worker", "shared", "protos"},
    "chief": {"chief", "worker", "shared", "protos"},
    "cli": {"cli", "chief", "worker", "ps", "shared", "protos"},
}

# Public facades of the package `asyncps` (common/): the Python API a user imports. They sit in
# common/ so that `asyncps.<name>` is the public name, but they re-export or drive the roles
# above the shared layer. Each is named with the layers it may reach and why.
FACADES = {
    "asyncps.api": {"cli"},  # `asyncps.train`/`asyncps.launch`: the CLI's train and launch as functions
    "asyncps.autodiff": {"worker"},  # re-exports the worker's autodiff engine under its public name
    "asyncps.models": {"worker"},  # re-exports the worker's model registry
    "asyncps.data": {"worker"},  # re-exports the worker's datasets
}


def _layer(module: str) -> str | None:
    """The layer of a dotted module name inside asyncps, or None outside it."""
    if module != "asyncps" and not module.startswith("asyncps."):
        return None
    for package, folder in ROLE_DIRS.items():
        if package != "asyncps" and (module == package or module.startswith(package + ".")):
            return folder
    return "shared"


def _modules():
    for package, folder in ROLE_DIRS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")) or "__pycache__" in path.parts:
                continue
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            yield ".".join([package, *parts]), path.name == "__init__.py", path


def _imports(name: str, is_pkg: bool, path: Path, known: frozenset = frozenset()):
    """Absolute dotted module names this module imports (relative imports resolved; in
    ``from X import y`` the module X.y when it is one of `known`, else X)."""
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                stem = base[: len(base) - node.level + 1]
                target = ".".join(stem + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            submodules = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
            yield from submodules or [target]  # `from asyncps import ps` imports asyncps.ps


def import_graph():
    """(counts of module -> module arrows between layers, by layer pair; the arrows against the
    direction as (module, imported module, "layer -> layer"), facades excepted)."""
    modules = list(_modules())
    known = frozenset(name for name, _, _ in modules)
    counts: collections.Counter = collections.Counter()
    against = []
    for name, is_pkg, path in modules:
        src = _layer(name)
        for target in sorted(set(_imports(name, is_pkg, path, known))):
            dst = _layer(target)
            if dst is None or dst == src:
                continue
            counts[(src, dst)] += 1
            if dst in ALLOWED[src] or dst in FACADES.get(name, ()):
                continue
            against.append((name, target, f"{src} -> {dst}"))
    return counts, against


def test_no_import_against_the_direction():
    _, against = import_graph()
    assert not against, "imports against the layer direction:\n" + "\n".join(map(str, against))


def test_facades_exist():
    names = {name for name, _, _ in _modules()}
    assert set(FACADES) <= names, set(FACADES) - names


def test_the_checker_sees_an_arrow_against_the_direction(tmp_path):
    # A protos module importing the shared layer, inside a function, must be found.
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from asyncps.sparse import SparseRows\n    return SparseRows\n")
    targets = list(_imports("asyncps.protos.bad", False, bad))
    assert targets == ["asyncps.sparse"] and _layer(targets[0]) not in ALLOWED["protos"]


if __name__ == "__main__":
    graph, bad = import_graph()
    for (a, b), n in sorted(graph.items()):
        print(f"{a:>7} -> {b:<7} {n}")  # noqa: T201  (a report run by hand)
    print("against:", len(bad))
    for row in bad:
        print(" ", row)
