"""The package's import graph follows the pipeline: a lower layer never imports a higher one.

Every ``import`` in ``medunet/`` counts, including those inside functions and under
``TYPE_CHECKING``: a lazy import is still a dependency. The layer table below is the one drawn in
docs/architecture.md; change both together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "medunet"

#: Bottom to top. A unit may import itself and any unit of an earlier row; units in one row are
#: siblings and may not import each other.
LAYERS: list[tuple[str, ...]] = [
    ("_version",),
    ("errors",),
    ("io",),
    ("config", "runtime", "net"),
    ("synthetic", "visualize"),
    ("transforms", "postprocessing"),
    ("model",),
    ("check", "planning", "qc"),
    ("training", "inference"),
    ("evaluation", "export"),
    ("workflows",),
    ("cli",),
    ("__main__",),
]
#: ``medunet/__init__.py`` is the public API: it may re-export from any layer.
TOP = "__init__"


def _unit(module: str) -> str:
    """The layer unit of a dotted module name inside medunet (``medunet.io.nifti`` -> ``io``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else TOP


def _module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1] if len(parts) > 1 else parts
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The medunet modules ``path`` imports (absolute and relative, at any depth of the file)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "medunet")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"{path}: relative import; medunet uses absolute imports")
            if node.module and node.module.split(".")[0] == "medunet":
                if node.module == "medunet":  # ``from medunet import x``: x is a subpackage or a public name
                    found.update(f"medunet.{alias.name}" for alias in node.names)
                else:
                    found.add(node.module)
    return found


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def _rank() -> dict[str, int]:
    return {unit: row for row, units in enumerate(LAYERS) for unit in units}


def test_every_unit_has_a_layer() -> None:
    units = {_unit(m) for m in _graph()} - {TOP}
    missing = sorted(units - set(_rank()))
    assert not missing, f"add {missing} to LAYERS (and to docs/architecture.md)"


def test_lower_layers_never_import_higher_ones() -> None:
    rank = _rank()
    public_names = {"medunet.__version__", "medunet.Segmenter", "medunet.load_config"}
    violations = []
    for module, imported in _graph().items():
        source = _unit(module)
        if source == TOP:
            continue
        for target_module in sorted(imported):
            if target_module in public_names:  # medunet/__init__.py imports the config: an upward import for a low layer
                violations.append(f"{module} imports the public API {target_module}; import from its module")
                continue
            target = _unit(target_module)
            if target == TOP or target == source:
                continue
            if rank[target] >= rank[source]:
                how = "a sibling" if rank[target] == rank[source] else "a higher layer"
                violations.append(f"{module} ({source}) imports {target_module} ({target}), {how}")
    assert not violations, "\n".join(violations)


def test_no_import_cycles_between_modules() -> None:
    graph = _graph()
    known = set(graph)

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    edges = {m: {t for t in (resolve(i) for i in imported) if t and t != m and t != "medunet"} for m, imported in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_the_version_module_imports_nothing() -> None:
    """Every layer reads ``medunet._version``, so it must stay at the very bottom: no imports at all."""
    tree = ast.parse((PACKAGE / "_version.py").read_text())
    assert not [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]


def test_the_check_catches_an_upward_import(tmp_path: Path) -> None:
    """The parser sees lazy imports inside functions, the kind that let layers knot unnoticed."""
    source = tmp_path / "mod.py"
    source.write_text("def f():\n    from medunet.training.trainer import train\n    return train\n")
    assert _imports(source) == {"medunet.training.trainer"}


def test_architecture_doc_names_every_module() -> None:
    """docs/architecture.md's module table lists every package module, so the map stays true."""
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent)
        if path.name in ("__init__.py", "__main__.py") or relative.parts[1] == "cli":
            continue  # packages are described by their folder; the CLI as one row
        folder = f"`{relative.parent.as_posix()}/`"
        if f"`{relative.as_posix()}`" not in doc and not (folder in doc and path.stem in doc):
            missing.append(relative.as_posix())
    assert not missing, f"docs/architecture.md does not describe {missing}"
