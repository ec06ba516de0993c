"""Worker for tests/test_memory_safety.py: runs malformed-state cases in its own process.

Reads a JSON list of cases on stdin, prints one JSON list of outcomes on stdout. A case:
``{"opt": "sgd"|"adam"|"adamw", "path": "loop"|"foreach"|"default"|"fused_cpp"|"fused_triton",
"bad": <kind, see malform>, "index": <param index>, "key": <state key>, "via": "load"|"assign",
"warm": <bool: with "assign", a step on the case's path before the state is malformed>}``.
Each case takes one well-formed step on the for-loop path, puts the malformed state into a fresh
optimizer of the case's path (``load_state_dict`` of a malformed state dict, or assignment into
``opt.state``), takes a step, and does the same with the for-loop path as the reference. A crash
of this process (segfault, abort) is what the calling test looks for first.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported; fused_cpp sets "0" per case

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from tolerances import TOL  # noqa: E402

from regoptim import ProxAdam, ProxAdamW, ProxSGD  # noqa: E402

SHAPES = [(4, 5), (7,), (3, 2)]
PATHS: dict[str, dict[str, Any]] = {
    "loop": {"foreach": False},
    "foreach": {"foreach": True},
    "default": {},
    "fused_cpp": {"fused": True},
    "fused_triton": {"fused": True},
}


def make(opt: str, path: str, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    kw = PATHS[path]
    if opt == "sgd":
        return ProxSGD(params, lr=0.1, momentum=0.9, weight_decay=0.01, l1=0.001, **kw)
    if opt == "adam":
        return ProxAdam(params, lr=0.01, weight_decay=0.01, l1=0.001, **kw)
    return ProxAdamW(params, lr=0.01, amsgrad=True, l1=0.001, **kw)


def malform(t: torch.Tensor | None, kind: str) -> torch.Tensor | None:
    """The malformed stand-in for state tensor ``t`` (``None``: drop the key)."""
    if kind == "missing":
        return None
    assert t is not None
    if kind == "nan_step":
        return torch.full_like(t, float("nan"))
    if kind == "neg_step":
        return torch.full_like(t, -3.0)
    flat = t.detach().reshape(-1)
    if kind == "short":
        return flat[: max(flat.numel() - 1, 0)].clone()
    if kind == "long":
        return torch.cat([flat, flat[:2]])
    if kind == "reshaped":  # same numel, another shape
        return flat.clone() if t.dim() != 1 else flat.reshape(1, -1).clone()
    if kind in ("bfloat16", "float64", "int32"):
        return t.to(getattr(torch, kind))
    if kind == "meta":
        return t.to("meta")
    if kind == "transposed" and t.dim() == 2:
        return t.t().contiguous().t()
    if kind in ("transposed", "strided"):  # every other element of a larger buffer
        wide = torch.zeros((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype)
        view = wide[..., ::2]
        view.copy_(t)
        return view
    raise ValueError(kind)


def first_state(opt_name: str, seed: int) -> tuple[list[torch.Tensor], dict[str, Any]]:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in SHAPES]
    opt = make(opt_name, "loop", params)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    return [p.detach().clone() for p in params], opt.state_dict()


def load(opt: torch.optim.Optimizer, sd: dict[str, Any], path: str) -> None:
    """``load_state_dict``, then the path's flags again (the state dict brings the loop's)."""
    opt.load_state_dict(sd)
    for group in opt.param_groups:
        group.update({"foreach": None, "fused": None, **PATHS[path]})


def run_path(case: dict[str, Any], path: str) -> dict[str, Any]:
    os.environ["TRITON_INTERPRET"] = "0" if path == "fused_cpp" else "1"
    start, sd = first_state(case["opt"], 0)
    params = [p.clone().requires_grad_() for p in start]
    opt = make(case["opt"], path, params)
    gen = torch.Generator().manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    try:
        i, key = case["index"], case["key"]
        if case["via"] == "load":
            state = sd["state"][i]
            new = malform(state.get(key), case["bad"]) if key != "extra" else torch.zeros(3)
            state.pop(key, None)
            if new is not None:
                state[key] = new
            load(opt, sd, path)
        else:
            load(opt, sd, path)
            if case.get("warm"):  # a step on this path first: its caches are built
                opt.step()
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen)
            state = opt.state[params[i]]
            new = malform(state.get(key), case["bad"]) if key != "extra" else torch.zeros(3)
            state.pop(key, None)
            if new is not None:
                state[key] = new
        opt.step()
    except Exception as exc:  # noqa: BLE001 - the outcome is what is reported
        clear = isinstance(exc, (ValueError, TypeError, RuntimeError)) and bool(str(exc))
        return {"outcome": "exc", "type": type(exc).__name__, "msg": str(exc), "clear": clear}
    out = [p.detach().double() for p in params]
    for p in params:
        for k in sorted(opt.state[p]):
            v = opt.state[p][k]
            if isinstance(v, torch.Tensor) and v.device.type != "meta" and k != "step":
                out.append(v.detach().double().reshape(-1))
    return {"outcome": "ok", "values": out}


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    got = run_path(case, case["path"])
    ref = run_path(case, "loop")
    got["loop"] = ref["outcome"]
    if got["outcome"] == "ok":
        values = got.pop("values")
        equal = ref["outcome"] == "ok" and len(values) == len(ref["values"])
        # a state stored in bfloat16 rounds like one (torch's foreach and loop differ by that)
        tol = TOL[torch.bfloat16 if case["bad"] == "bfloat16" else torch.float32]
        if equal:
            try:
                for a, b in zip(values, ref["values"], strict=True):
                    torch.testing.assert_close(a, b, **tol, equal_nan=True)
            except AssertionError as exc:
                equal = False
                got["mismatch"] = str(exc)[:300]
        got["equal"] = equal
    return got


def main() -> None:
    cases = json.load(sys.stdin)
    json.dump([run_case(c) for c in cases], sys.stdout)


if __name__ == "__main__":
    main()
