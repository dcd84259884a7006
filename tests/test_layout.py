"""The package's shape: a light import, no import cycles, and one resolver that every
public entry point goes through."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import torch

import fastmf
from fastmf import ops

PACKAGE = Path(fastmf.__file__).resolve().parent


def test_import_fastmf_is_light():
    code = ("import fastmf, sys; heavy = {'pandas', 'scipy', 'numba'} & set(sys.modules); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_lazy_names_resolve_and_stay_bound():
    assert callable(fastmf.evaluate) and callable(fastmf.fit) and callable(fastmf.load)
    import fastmf.evaluate as evaluate_module  # noqa: F401  (binds the submodule name)

    assert callable(fastmf.evaluate), "the submodule shadowed fastmf.evaluate"
    assert fastmf.retrieval.topk_scores is not None
    assert fastmf.data.Interactions is not None


def _module_imports(path: Path) -> set[str]:
    """fastmf modules imported anywhere in ``path`` (module level and inside functions)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fastmf")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("fastmf"):
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def test_no_import_cycle_between_modules():
    """Module-level imports between fastmf modules form no cycle (package __init__ files
    re-exporting their children are not edges back)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        deps = set()
        for node in tree.body:  # module level only: function-level imports are deliberate
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            deps |= {t for t in targets if t in modules and t != name
                     and not name.startswith(t + ".")}
        graph[name] = deps
    seen, stack = set(), []

    def visit(node):
        if node in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(node):]
                                                                + [node]))
        if node in seen:
            return
        stack.append(node)
        for dep in graph.get(node, ()):
            visit(dep)
        stack.pop()
        seen.add(node)

    for node in graph:
        visit(node)


def test_checkpoint_does_not_import_the_model_modules():
    imports = _module_imports(PACKAGE / "checkpoint.py")
    assert "fastmf.layers" not in imports and not any(i.startswith("fastmf.layers.")
                                                      for i in imports)


def test_only_the_resolver_picks_kernels():
    """No module outside fastmf/ops chooses among the backend modules itself."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if "ops" in path.relative_to(PACKAGE).parts[:1]:
            continue
        imports = _module_imports(path)
        if imports & {"fastmf.ops.reference", "fastmf.ops.numba", "fastmf.ops.numba.pointwise",
                      "fastmf.ops.reference.pointwise"}:
            offenders.append(str(path.relative_to(PACKAGE)))
    assert offenders == []


def test_resolver_returns_the_backend_modules():
    cpu = torch.device("cpu")
    assert ops.kernels("reference", cpu) is ops.reference
    for name in ops.available_backends():
        module = ops.kernels(name, cpu)
        assert module.NAME == name
        for fn in ("mf_forward", "mf_backward", "mf_backward_dense", "sparse_adagrad_update",
                   "sparse_sgd_update",
                   "train_step", "train_step_pairwise", "topk_scores", "embedding_bag_forward",
                   "embedding_bag_backward", "scatter_rows", "sparse_update", "sample_negatives",
                   "permutation",
                   "embedding_bag_backward_update", "embedding_bag_backward_update_pair",
                   "unique_bags"):
            assert callable(getattr(module, fn)), (name, fn)
    assert ops.kernels("auto", cpu).NAME == ops.available_backends()[-1]
    assert ops.kernels("auto", torch.device("meta")).NAME == "reference"


def test_resolver_rejects_unknown_backends():
    import pytest

    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        ops.kernels("gpu")
    with pytest.raises(ValueError, match="unknown backend"):
        fastmf.MF(3, 3, dim=2, backend="fast")
