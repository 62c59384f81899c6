"""The package's import graph follows the pipeline: a lower layer never imports a higher one.

Every ``import`` in ``medunet/`` counts, including those inside functions and under
``TYPE_CHECKING``: a lazy import is still a dependency. The layer table below is the one drawn in
docs/architecture.md; change both together.
"""

from __future__ import annotations

import ast
import re
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
    ("transforms", "postprocessing", "qc"),
    ("model",),
    ("check", "planning"),
    ("training", "inference"),
    ("evaluation", "export"),
    ("workflows",),
    ("serve",),
    ("cli",),
    ("__main__",),
]
#: ``medunet/__init__.py`` is the public API: it may re-export from any layer.
TOP = "__init__"

#: Inside these units the modules are layered too, bottom to top, with the same rule (a module imports only modules of
#: earlier rows of its unit; siblings in a row never import each other). Every module of the unit must be listed.
#: ``model``: the layout (file names) at the bottom, the loader on top. ``inference``: the stages and their typed hand-offs,
#: the writers of every output format on them, the Segmenter (a facade over both), the batch runner on top.
INSIDE: dict[str, list[tuple[str, ...]]] = {
    "model": [("layout",), ("engine", "networks", "sliding", "checkpoint"), ("package",), ("loader",)],
    "inference": [("pipeline", "statistics", "stages"), ("outputs",), ("segmenter",), ("batch", "dicom_seg")],
}
#: The one module that spells the run-folder and package file names (see :func:`test_only_the_layout_spells_file_names`).
LAYOUT = "medunet.model.layout"
#: Names of the files and folders medunet writes for a model (constants of LAYOUT).
LAYOUT_NAMES = ("best.pt", "last.pt", "qc.json", "postprocessing.json", "splits.json", "split.json", "crossval.json",
                "config.yaml", "pipeline.json", "model_card.json", "MODEL_CARD.md")
#: Modules still spelling them, to switch to the layout's constants: the trainer (its own refactoring is under way).
LAYOUT_PENDING = {"medunet/training/trainer.py"}


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


def test_modules_inside_a_unit_follow_its_order() -> None:
    graph = _graph()
    violations = []
    for unit, rows in INSIDE.items():
        rank = {f"medunet.{unit}.{name}": row for row, names in enumerate(rows) for name in names}
        present = {m for m in graph if _unit(m) == unit and m != f"medunet.{unit}"}
        unlisted = sorted(present - set(rank))
        assert not unlisted, f"add {unlisted} to INSIDE[{unit!r}] (and to docs/architecture.md)"
        for module in sorted(present):
            for target in sorted(graph[module]):
                if target in rank and target != module and rank[target] >= rank[module]:
                    how = "a sibling" if rank[target] == rank[module] else "a higher module"
                    violations.append(f"{module} imports {target}, {how} in {unit}")
    assert not violations, "\n".join(violations)


def test_the_layout_imports_nothing_of_medunet() -> None:
    """The file names sit below everything that reads or writes the files, so every layer from ``model`` up can use them."""
    assert _imports(PACKAGE / "model" / "layout.py") == set()


def _code_strings(tree: ast.AST) -> list[tuple[int, str]]:
    """String constants of code: not docstrings, not a click option's ``help=`` text (prose for users)."""
    prose: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            prose.add(id(node.value))
        if isinstance(node, ast.keyword) and node.arg == "help":
            prose.update(id(n) for n in ast.walk(node.value))
    return [(n.lineno, n.value) for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in prose]


def test_only_the_layout_spells_file_names() -> None:
    """``best.pt``, ``qc.json``, ``fold_<k>``... are spelled in medunet/model/layout.py only; code uses its constants."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).as_posix()
        if _module_name(path) == LAYOUT or relative in LAYOUT_PENDING:
            continue
        for line, text in _code_strings(ast.parse(path.read_text(), filename=str(path))):
            if any(name in text for name in LAYOUT_NAMES) or re.search(r"(^|[/ (])fold_(<k>|\d|$)", text):
                found.append(f"{relative}:{line}: {text[:60]!r}")
    assert not found, "use the constants of medunet.model.layout:\n" + "\n".join(found)


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
