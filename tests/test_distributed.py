"""DDP, ZeroRedundancyOptimizer and FSDP2 with regoptim: 2 real processes, gloo on 127.0.0.1.

Every run is compared with a single process trained on the same global batches (each rank takes
half of every batch; the loss is a mean, so the averaged gradients are the full-batch gradient up
to rounding). float64 models keep that rounding far below the L1 thresholds, so the exact zeros
must agree too. The FSDP2 run also saves its sharded optimizer state with
torch.distributed.checkpoint and resumes from it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import torch
import torch.distributed as dist

import regoptim
from tests._stack_helpers import (
    WORLD,
    assert_params_equal,
    loss_fn,
    make_batches,
    make_model,
    params_of,
    run_distributed,
)
from tests.tolerances import TOL

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

DTYPE = torch.float64
N_STEPS = 4
BATCH = 8

CONFIGS: dict[str, tuple[type, dict[str, Any]]] = {
    "ProxSGD-default": (
        regoptim.ProxSGD,
        {
            "lr": 0.1,
            "momentum": 0.9,
            "weight_decay": 1e-2,
            "decoupled_weight_decay": True,
            "l1": 0.2,
        },
    ),
    "ProxSGD-loop": (
        regoptim.ProxSGD,
        {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2, "l1": 0.2, "foreach": False},
    ),
    "ProxAdamW-default": (regoptim.ProxAdamW, {"lr": 2e-2, "weight_decay": 1e-2, "l1": 0.5}),
    "ProxAdamW-foreach": (
        regoptim.ProxAdamW,
        {"lr": 2e-2, "weight_decay": 1e-2, "l1": 0.5, "foreach": True},
    ),
}


def _single_process(cls: type, kwargs: dict[str, Any]) -> list[torch.Tensor]:
    model = make_model(dtype=DTYPE)
    opt = cls(model.parameters(), **kwargs)
    for x, y in make_batches(N_STEPS, batch=BATCH, dtype=DTYPE):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
    return params_of(model)


def _local(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t.chunk(WORLD)[rank]


def _train_local(rank: int, model: torch.nn.Module, opt: Any) -> None:
    for x, y in make_batches(N_STEPS, batch=BATCH, dtype=DTYPE):
        opt.zero_grad()
        loss_fn(model, _local(x, rank), _local(y, rank)).backward()
        opt.step()


def _assert_same_on_all_ranks(params: list[torch.Tensor]) -> None:
    for p in params:
        gathered = [torch.empty_like(p) for _ in range(WORLD)]
        dist.all_gather(gathered, p.contiguous())
        for g in gathered[1:]:
            assert torch.equal(g, gathered[0]), "ranks disagree"


def _assert_matches_single(params: list[torch.Tensor], ref: list[torch.Tensor]) -> None:
    for p, r in zip(params, ref, strict=True):
        torch.testing.assert_close(p, r, **TOL[DTYPE])
        assert torch.equal(p == 0, r == 0), "exact zeros differ from the single process"
    assert sum(int((p == 0).sum()) for p in params) > 0, "l1 produced no exact zeros"


# --- DDP -----------------------------------------------------------------------------------------


def _ddp_worker(rank: int) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    for cls, kwargs in CONFIGS.values():
        model = make_model(dtype=DTYPE)
        ddp = DDP(model)
        opt = cls(ddp.parameters(), **kwargs)
        _train_local(rank, ddp, opt)
        params = params_of(model)
        _assert_same_on_all_ranks(params)
        _assert_matches_single(params, _single_process(cls, kwargs))


def test_ddp_matches_single_process(tmp_path: Any) -> None:
    run_distributed(_ddp_worker, tmp_path=tmp_path)


# --- ZeroRedundancyOptimizer ---------------------------------------------------------------------


def _zero_worker(rank: int) -> None:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    for name in ("ProxSGD-default", "ProxAdamW-default"):
        cls, kwargs = CONFIGS[name]
        model = make_model(dtype=DTYPE)
        zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls, **kwargs)
        ddp = DDP(model)
        _train_local(rank, ddp, zero)
        # the unsharded optimizer on the same DDP gradients
        ref_model = make_model(dtype=DTYPE)
        ref_ddp = DDP(ref_model)
        _train_local(rank, ref_ddp, cls(ref_ddp.parameters(), **kwargs))
        params = params_of(model)
        _assert_same_on_all_ranks(params)
        assert_params_equal(params, params_of(ref_model))  # same ops on the same gradients
        assert sum(int((p == 0).sum()) for p in params) > 0
        # each rank owns part of the state only
        owned = sum(len(s) > 0 for s in zero.optim.state.values())
        assert 0 < owned < len(params)


def test_zero_redundancy_optimizer_equals_unsharded(tmp_path: Any) -> None:
    run_distributed(_zero_worker, tmp_path=tmp_path)


# --- FSDP2 ---------------------------------------------------------------------------------------


def _fsdp2_worker(rank: int, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (WORLD,))
    results: dict[str, str] = {}
    for name, (cls, kwargs) in CONFIGS.items():
        model = _sharded(mesh, 0)
        assert all(isinstance(p, DTensor) for p in model.parameters())
        opt = cls(model.parameters(), **kwargs)
        try:
            _train_local(rank, model, opt)
        except NotImplementedError as exc:  # both ranks raise alike; reported by the test
            results[name] = f"NotImplementedError: {exc}"
            continue
        assert all(isinstance(s.get("exp_avg", s.get("momentum_buffer")), DTensor)
                   for s in opt.state.values())  # fmt: skip
        params = [p.full_tensor().detach() for p in model.parameters()]
        _assert_same_on_all_ranks(params)
        _assert_matches_single(params, _single_process(cls, kwargs))
        results[name] = "ok"
    _fsdp2_dcp_resume(rank, mesh, out_dir)
    results["dcp-resume"] = "ok"
    if rank == 0:
        with open(os.path.join(out_dir, "fsdp2.json"), "w") as f:
            json.dump(results, f)


def _sharded(mesh: Any, seed: int) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = make_model(seed=seed, dtype=DTYPE)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _fsdp2_dcp_resume(rank: int, mesh: Any, out_dir: str) -> None:
    """Sharded optimizer state through torch.distributed.checkpoint: resuming from the
    checkpoint continues exactly as the uninterrupted run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    cls, kwargs = CONFIGS["ProxAdamW-default"]
    ckpt = os.path.join(out_dir, "ckpt")
    batches = make_batches(2 * N_STEPS, batch=BATCH, dtype=DTYPE)

    def steps(model: torch.nn.Module, opt: Any, bs: list[Any]) -> None:
        for x, y in bs:
            opt.zero_grad()
            loss_fn(model, _local(x, rank), _local(y, rank)).backward()
            opt.step()

    model = _sharded(mesh, 0)
    opt = cls(model.parameters(), **kwargs)
    steps(model, opt, batches[:N_STEPS])
    dcp.save(
        {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
        checkpoint_id=ckpt,
    )
    steps(model, opt, batches[N_STEPS:])

    resumed = _sharded(mesh, 123)
    ropt = cls(resumed.parameters(), **kwargs)
    state = {
        "model": get_model_state_dict(resumed),
        "optim": get_optimizer_state_dict(resumed, ropt),
    }
    dcp.load(state, checkpoint_id=ckpt)
    set_model_state_dict(resumed, state["model"])
    set_optimizer_state_dict(resumed, ropt, state["optim"])
    steps(resumed, ropt, batches[N_STEPS:])
    full = [p.full_tensor() for p in resumed.parameters()]
    assert_params_equal(full, [p.full_tensor() for p in model.parameters()])
    assert sum(int((p == 0).sum()) for p in full) > 0


@pytest.fixture(scope="module")
def fsdp2_results(tmp_path_factory: Any) -> dict[str, str]:
    """One 2-process FSDP2 run for the tests below: outcome per config, and of the DCP resume."""
    tmp = tmp_path_factory.mktemp("fsdp2")
    run_distributed(_fsdp2_worker, str(tmp), tmp_path=tmp)
    with open(tmp / "fsdp2.json") as f:
        return json.load(f)


def test_fsdp2_matches_single_process_and_resumes_from_dcp(fsdp2_results: dict[str, str]) -> None:
    assert set(fsdp2_results) == {*CONFIGS, "dcp-resume"}
    for name, outcome in fsdp2_results.items():
        assert outcome == "ok", (name, outcome)


def test_fsdp2_prox_sgd_default_path(fsdp2_results: dict[str, str]) -> None:
    # the default path must not hand DTensors to torch's fused CPU SGD (no sharding strategy)
    assert fsdp2_results["ProxSGD-default"] == "ok"


# --- FSDP2 with group lasso ----------------------------------------------------------------------

# (optimizer, kwargs, group_l1 of the row groups of layer 0, of the column groups of layer 2):
# strengths that zero some groups and keep others, in both layers
GROUP_STEPS = 6
GROUP_CONFIGS: dict[str, tuple[type, dict[str, Any], float, float]] = {
    "ProxSGD": (regoptim.ProxSGD, {"lr": 0.1, "momentum": 0.9}, 0.9, 0.5),
    "ProxAdamW": (regoptim.ProxAdamW, {"lr": 5e-2, "l1": 0.05}, 0.02, 0.02),
}


def _group_lasso_groups(model: torch.nn.Module, rows: float, cols: float) -> list[dict[str, Any]]:
    """Rows of layer 0 with their bias entries (whole on each rank under dim-0 sharding) and
    columns of layer 2 (split across the ranks: their norms need the other rank's part)."""
    return [
        {"params": [model[0].weight, model[0].bias], "group_l1": rows},
        {"params": [model[2].weight], "group_l1": cols, "group_axes": [1]},
        {"params": [model[2].bias]},
    ]


def _group_lasso_worker(rank: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    for cls, kwargs, rows, cols in GROUP_CONFIGS.values():
        model = _sharded(mesh, 0)
        opt = cls(_group_lasso_groups(model, rows, cols), **kwargs)
        for x, y in make_batches(GROUP_STEPS, batch=BATCH, dtype=DTYPE):
            opt.zero_grad()
            loss_fn(model, _local(x, rank), _local(y, rank)).backward()
            opt.step()
        params = [p.full_tensor().detach() for p in model.parameters()]
        _assert_same_on_all_ranks(params)
        single = make_model(dtype=DTYPE)
        ref_opt = cls(_group_lasso_groups(single, rows, cols), **kwargs)
        for x, y in make_batches(GROUP_STEPS, batch=BATCH, dtype=DTYPE):
            ref_opt.zero_grad()
            loss_fn(single, x, y).backward()
            ref_opt.step()
        _assert_matches_single(params, params_of(single))
        w0, w2 = params[0], params[2]
        zero_rows = (w0 == 0).all(dim=1)
        zero_cols = (w2 == 0).all(dim=0)
        assert 0 < int(zero_rows.sum()) < w0.shape[0], "no partly zero layer-0 rows"
        assert 0 < int(zero_cols.sum()) < w2.shape[1], "no partly zero layer-2 columns"


def test_fsdp2_group_lasso_matches_single_process(tmp_path: Any) -> None:
    """Group norms over sharded slices (layer 2's columns under dim-0 sharding) are reduced
    across the ranks: the same zero groups and values as one process."""
    run_distributed(_group_lasso_worker, tmp_path=tmp_path)
