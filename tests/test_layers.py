"""The house rules, checked over the source: every import inside ``ds_burst`` points to the same package or a lower
layer (docs/ARCHITECTURE.md), kernels and dist do not import each other, only ``ds_burst.dist`` (and the
command-line layer) imports ``torch.distributed``, and the module import graph has no cycle. Imports inside
functions count like any other: a lazy import that only dodges a cycle is a cycle. Every registered kernel takes
the tile contract's signatures (``ds_burst/kernels/contract.py``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from ds_burst.kernels import registry
from ds_burst.kernels.contract import Binder, TileKernel, WholeBlock, conformance

ROOT = Path(__file__).resolve().parents[1] / "ds_burst"

#: package -> layer (lower imports nothing higher). The facade modules (ds_burst/__init__.py, hf.py, plan.py)
#: sit on top.
LAYERS = {"core": 0, "kernels": 1, "dist": 1, "ring": 2, "attention": 3, "training": 4, "integrations": 5, "cli": 6}
FACADE = 7
DIST_USERS = ("dist", "cli")


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def _layer(module: str) -> int:
    pkg = _package(module)
    return FACADE if pkg is None else LAYERS[pkg]


def _imports(path: Path) -> list[tuple[str, int]]:
    """``(imported module, line)`` for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    me = _module(path)
    base = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                mod = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((mod, node.lineno))
            # `from ds_burst.kernels import reference` imports the module ds_burst.kernels.reference
            out += [(f"{mod}.{a.name}", node.lineno) for a in node.names if (ROOT.parent / f"{mod}.{a.name}"
                    .replace(".", "/")).with_suffix(".py").exists()]
    return out


FILES = sorted(ROOT.rglob("*.py"))


def _graph() -> dict[str, set[str]]:
    known = {_module(p) for p in FILES}
    graph: dict[str, set[str]] = {}
    for p in FILES:
        me = _module(p)
        graph[me] = set()
        for mod, _ in _imports(p):
            if mod in known and mod != me and not me.startswith(mod + "."):  # a module's own package __init__
                graph[me].add(mod)
    return graph


def test_the_tree_has_every_layer():
    assert {p.parent.name for p in FILES if p.parent != ROOT} == set(LAYERS)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_imports_point_down(path: Path):
    me = _module(path)
    bad = []
    for mod, line in _imports(path):
        if mod.startswith("torch.distributed") or mod == "torch.distributed":
            if _package(me) not in DIST_USERS:
                bad.append(f"line {line}: {mod} (only ds_burst.dist and the cli use torch.distributed)")
            continue
        if not mod.startswith("ds_burst.") or mod == "ds_burst":
            if mod == "ds_burst" and _layer(me) < FACADE:
                bad.append(f"line {line}: the ds_burst facade from inside a layer")
            continue
        if _package(mod) == _package(me):
            continue
        if _layer(mod) > _layer(me) or (_layer(mod) == _layer(me) and _layer(me) < FACADE):
            bad.append(f"line {line}: {mod} (layer {_layer(mod)}) from layer {_layer(me)}")
    assert not bad, f"{me} imports against the layering:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checker_catches_an_upward_import(tmp_path: Path):
    """A test that cannot fail is a defect: an upward import and a cycle in a fake tree are found."""
    fake = tmp_path / "ds_burst"
    (fake / "core").mkdir(parents=True)
    (fake / "ring").mkdir()
    (fake / "core" / "x.py").write_text("from ds_burst.ring import y\n")
    (fake / "ring" / "y.py").write_text("import ds_burst.core.x\n")
    global ROOT, FILES
    old = ROOT, FILES
    ROOT, FILES = fake, sorted(fake.rglob("*.py"))
    try:
        with pytest.raises(AssertionError, match="layer 2"):
            test_imports_point_down(fake / "core" / "x.py")
        with pytest.raises(AssertionError, match="cycle"):
            test_no_import_cycles()
    finally:
        ROOT, FILES = old


@pytest.mark.parametrize("name", registry.names()[1:])
def test_registered_kernels_match_the_contract(name: str):
    """Every registered kernel's step functions and announced one-rank entry points take the contract's calls."""
    try:
        spec = registry.get(name)
    except ValueError as exc:  # triton not installed
        pytest.skip(str(exc))
    assert spec.name == name
    assert conformance(spec.impl, TileKernel, *[WholeBlock] * spec.whole, *[Binder] * spec.binds) == []
