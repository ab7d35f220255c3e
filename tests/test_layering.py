"""The import graph of sparse_nlp points one way: no cycles, no hidden imports in functions, errors at the bottom.

The graph is read from the source with `ast` (nothing is imported): an edge A -> B for each ``import`` of
module B in module A, at module level or inside a function (``from .pkg import name`` counts as an import of
``pkg.name`` when that is a module, else of ``pkg``). ``if TYPE_CHECKING:`` blocks are not imports at run time.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "sparse_nlp"
PACKAGE = "sparse_nlp"

# Imports inside functions that are deliberate: (importing module, imported module) -> why it is lazy.
LAZY_IMPORTS = {
    ("sparse_nlp.attention.hook", "sparse_nlp.attention.registration"): (
        "registration imports torch and transformers' model code; the hook runs once transformers has loaded it"
    ),
    ("sparse_nlp.pruning.calibration", "sparse_nlp.evaluation.data"): (
        "only for calibration data given as a source name; the data module pulls in datasets/pandas on use"
    ),
    **{
        ("sparse_nlp.recipes", target): "run_recipe's training and evaluation stack (datasets, evaluate, "
        "Trainer) loads only when a recipe runs, not when one is loaded or validated"
        for target in (
            "sparse_nlp.checkpoint",
            "sparse_nlp.evaluation.causal",
            "sparse_nlp.evaluation.data",
            "sparse_nlp.evaluation.tasks",
            "sparse_nlp.sparsify",
            "sparse_nlp.training.callback",
            "sparse_nlp.training.distillation",
            "sparse_nlp.training.pruner",
            "sparse_nlp.training.resume",
            "sparse_nlp.training.structured",
        )
    },
}
# Each CLI command imports what it runs inside its `run`, so `sparse-nlp --help` does not load torch.
LAZY_PACKAGES = {"sparse_nlp.commands": "a command loads its implementation when it runs, not for --help"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _package_of(name: str, path: Path) -> list[str]:
    parts = name.split(".")
    return parts if path.name == "__init__.py" else parts[:-1]


def _targets(node: ast.Import | ast.ImportFrom, package: list[str]) -> Iterator[str]:
    """The sparse_nlp modules an import statement loads."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name.split(".")[0] == PACKAGE:
                yield alias.name
        return
    if node.level:
        base = package[: len(package) - node.level + 1]
        module = ".".join(base + ([node.module] if node.module else []))
    else:
        module = node.module or ""
    if module.split(".")[0] != PACKAGE:
        return
    for alias in node.names:
        sub = f"{module}.{alias.name}"
        yield sub if sub in MODULES else module


def _imports(name: str) -> tuple[set[str], list[tuple[str, int]]]:
    """(modules imported at module level, [(module, line)] imported inside functions) by module `name`."""
    path = MODULES[name]
    package = _package_of(name, path)
    top: set[str] = set()
    inner: list[tuple[str, int]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            for target in _targets(node, package):
                if in_function:
                    inner.append((target, node.lineno))
                else:
                    top.add(target)
        inside = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(ast.parse(path.read_text()), False)
    return top, inner


def _graph() -> dict[str, set[str]]:
    """Module -> the modules it imports, leaving out the listed lazy imports (they run after both modules loaded)."""
    graph = {}
    for name in MODULES:
        top, inner = _imports(name)
        lazy = {target for target, _ in inner if (name, target) not in LAZY_IMPORTS}
        graph[name] = (top | lazy) - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_the_graph_is_read():
    graph = _graph()
    assert "sparse_nlp.checkpoint" in graph["sparse_nlp.hub"]
    assert "sparse_nlp.formats.compact" in graph["sparse_nlp.checkpoint"]
    assert "sparse_nlp.evaluation.metrics" in graph["sparse_nlp.evaluation.tasks"]


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_no_imports_inside_functions_except_the_listed_lazy_ones():
    hidden = []
    used = set()
    for name in MODULES:
        if any(name == p or name.startswith(p + ".") for p in LAZY_PACKAGES):
            continue
        for target, line in _imports(name)[1]:
            if (name, target) in LAZY_IMPORTS:
                used.add((name, target))
            else:
                hidden.append(f"{MODULES[name].relative_to(ROOT.parent)}:{line} imports {target}")
    assert hidden == [], "imports inside functions (move them to the top, or list them with a reason)"
    assert set(LAZY_IMPORTS) - used == set(), "allow-list entries that no longer match an import"


def test_errors_module_imports_nothing_of_ours():
    top, inner = _imports("sparse_nlp.errors")
    assert top == set() and inner == []


def test_import_sparse_nlp_loads_no_model_code(tmp_path):
    code = (
        "import sys, sparse_nlp\n"
        "heavy = sorted(m for m in sys.modules if m == 'torch' or m == 'transformers.modeling_utils' "
        "or m.startswith('transformers.models.'))\n"
        "print(heavy)\n"
        "assert not heavy, heavy\n"
        "assert sparse_nlp.SparsityConfig.from_dict({}).weights == []\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("name", ["sparsify", "SparsityConfig", "SparseNLPError", "CheckpointError", "NM"])
def test_public_names_resolve(name):
    import sparse_nlp

    assert getattr(sparse_nlp, name) is not None


def test_verbs_stay_functions_when_their_module_is_imported():
    import sparse_nlp
    import sparse_nlp.report
    import sparse_nlp.sparsify  # noqa: F401  (sets the package attribute of the same name)

    assert callable(sparse_nlp.sparsify) and sparse_nlp.sparsify.__name__ == "sparsify"
    assert callable(sparse_nlp.report) and sparse_nlp.report.__name__ == "report"


def test_unknown_name_is_an_attribute_error():
    import sparse_nlp

    with pytest.raises(AttributeError, match="no_such_name"):
        sparse_nlp.no_such_name  # noqa: B018
