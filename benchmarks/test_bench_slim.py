"""CPU inference latency of a slimmed MLP against the original (timings reported, not asserted).

    pytest benchmarks/test_bench_slim.py --benchmark-only

The model is the README's MLP, 64-256-128-10, with about 85% of the hidden neurons zeroed by hand
(weight row and bias entry), as a group-lasso run would leave it; ``regoptim.slim`` removes them.
Both rows run the same batch in eval mode under ``torch.inference_mode``; the group name holds the
batch size, so pytest-benchmark's table compares the two directly. ``--bench-rounds`` (or
``REGOPTIM_BENCH_ROUNDS``) sets the timed rounds; the thread count is the suite's.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks.conftest import bench_option
from regoptim.workflow.structure import slim

ZEROED_SHARE = 0.85
BATCH_SIZES = (1, 256)


def _models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)
    ).eval()
    with torch.no_grad():
        for layer in (model[0], model[2]):
            rows = torch.randperm(layer.out_features)[: int(ZEROED_SHARE * layer.out_features)]
            layer.weight[rows] = 0.0
            layer.bias[rows] = 0.0
    return model, slim(model, torch.randn(8, 64)).eval()


@pytest.mark.parametrize("batch", BATCH_SIZES, ids=lambda b: f"batch{b}")
@pytest.mark.parametrize("which", ["original", "slimmed"])
def test_slim_mlp_inference(benchmark, pytestconfig, which, batch):
    original, slimmed = _models()
    model = original if which == "original" else slimmed
    x = torch.randn(batch, 64)
    benchmark.group = f"slim MLP 64-256-128-10, {ZEROED_SHARE:.0%} hidden zeroed, batch {batch}"
    benchmark.extra_info["params"] = sum(p.numel() for p in model.parameters())
    with torch.inference_mode():
        model(x)  # warmup
        benchmark.pedantic(
            model,
            args=(x,),
            rounds=int(bench_option(pytestconfig, "rounds")),
            iterations=100,
            warmup_rounds=1,
        )
