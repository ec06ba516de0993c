"""The workflow (regoptim.workflow) is a client of the optimizers: they never import it.

``import regoptim`` imports both (its ``__init__`` re-exports the workflow's names), so the
direction is checked without it: statically, on every import statement of the optimizer modules
and the kernels, and at run time, with the package's ``__init__`` stubbed out.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules(base: Path, package: str) -> dict[str, Path]:
    """Every module under ``base`` by dotted name (a package by its ``__init__.py``)."""
    found = {}
    for path in sorted(base.rglob("*.py")):
        parts = path.relative_to(base).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        found[".".join((package, *parts))] = path
    return found


#: the optimizer side: regoptim's modules but the workflow, the package's own __init__ (it
#: re-exports the workflow) and __main__ (the command); the kernels, installed as regoptim._kernels
CORE = {
    name: path
    for name, path in _modules(ROOT / "regoptim", "regoptim").items()
    if name not in ("regoptim", "regoptim.__main__") and not name.startswith("regoptim.workflow")
}
CORE |= _modules(ROOT / "kernels", "regoptim._kernels")
#: what ``from regoptim import X`` may name on the optimizer side
CORE_TOP = {name.split(".")[1] for name in CORE}


def _violations(path: Path, module: str) -> list[str]:
    """Imports in ``path`` (module ``module``; lazy ones inside functions included) that reach
    the workflow, relative ones resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        where = f"{module}:{node.lineno}"
        if isinstance(node, ast.Import):
            targets = [(a.name, None) for a in node.names]
        else:
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            target = ".".join(filter(None, (base, node.module)))
            targets = [(target, a.name) for a in node.names]
        for target, name in targets:
            reached = f"{target}.{name}" if target == "regoptim" and name else target
            if reached == "regoptim.workflow" or reached.startswith("regoptim.workflow."):
                found.append(f"{where} {reached}")
            elif target == "regoptim" and name and name not in CORE_TOP:
                found.append(f"{where} regoptim.{name}")  # a name regoptim/__init__ re-exports
    return found


def test_optimizer_modules_never_import_the_workflow():
    for name in ("sgd", "adam", "adamw", "optimizer", "backends.dispatch", "backends.cpu.plan"):
        assert f"regoptim.{name}" in CORE
    assert "regoptim._kernels" in CORE and "workflow" not in CORE_TOP
    assert [v for name, path in CORE.items() for v in _violations(path, name)] == []


def test_the_check_sees_a_violation(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from regoptim import backends, param_groups\n"
        "from . import group_lasso\n"
        "def f():\n"
        "    from regoptim.workflow.sparsity import sparsity\n"
        "    from ..workflow import plots\n"
        "    from .. import adam, workflow\n"
        "    import regoptim.workflow.cli\n"
    )
    assert [v.split(" ")[1] for v in _violations(probe, "regoptim.regularizers.probe")] == [
        "regoptim.param_groups",
        "regoptim.workflow.sparsity",
        "regoptim.workflow",
        "regoptim.workflow",
        "regoptim.workflow.cli",
    ]


_STUBBED = """
import importlib, importlib.util, sys, types
spec = importlib.util.find_spec("regoptim")  # locates the package without running its __init__
stub = types.ModuleType("regoptim")
stub.__path__ = list(spec.submodule_search_locations)
sys.modules["regoptim"] = stub
import torch
for name in sys.argv[1:]:
    importlib.import_module("regoptim." + name)
from regoptim.adam import ProxAdam
from regoptim.adamw import ProxAdamW
from regoptim.sgd import ProxSGD

for cls, kw in [(ProxSGD, {"momentum": 0.9}), (ProxAdam, {}), (ProxAdamW, {})]:
    for impl in ({}, {"foreach": False}, {"foreach": True}):
        torch.manual_seed(0)
        fc = torch.nn.Linear(8, 4)
        groups = [{"params": [fc.weight, fc.bias], "group_l1": 1e-2, "l1": 1e-3}]
        opt = cls(groups, lr=1e-2, weight_decay=1e-2, **kw, **impl)
        for _ in range(2):
            opt.zero_grad()
            fc(torch.randn(16, 8)).square().mean().backward()
            opt.step()
        opt.load_state_dict(opt.state_dict())
assert "regoptim.workflow" not in sys.modules, sorted(sys.modules)
print(sorted(m for m in sys.modules if m.startswith("regoptim")))
"""


def test_optimizers_run_without_the_workflow():
    """Import every optimizer module and step each optimizer (l1 + group lasso + decay, every
    eager path and the default one) with ``regoptim/__init__.py`` stubbed: no workflow module
    gets imported, lazily or not."""
    names = [name.removeprefix("regoptim.") for name in CORE if "_kernels" not in name]
    res = subprocess.run(
        [sys.executable, "-c", _STUBBED, *names], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    loaded = res.stdout.strip()
    assert "regoptim.sgd" in loaded and "regoptim.regularizers.group_lasso" in loaded
    assert "workflow" not in loaded


def test_the_workflow_modules_live_only_in_regoptim_workflow():
    """No aliases at the old flat paths (``regoptim.plots``, ...): each module has one name."""
    import importlib
    import importlib.util
    import types

    old = ["groups", "penalties", "sparsity", "sparsity_target", "plots", "schedules", "paths"]
    old += ["train", "cli", "prune", "compare", "structure"]
    for name in old:
        assert importlib.util.find_spec(f"regoptim.{name}") is None, name
        module = importlib.import_module(f"regoptim.workflow.{name}")
        assert isinstance(module, types.ModuleType)
    import regoptim

    assert callable(regoptim.sparsity)  # the function; its module is regoptim.workflow.sparsity
    assert importlib.import_module("regoptim.workflow.sparsity").sparsity is regoptim.sparsity
