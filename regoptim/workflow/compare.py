"""The comparison of ``regoptim compare``: one MLP, many optimizer/regularization set-ups.

:func:`compare` trains :class:`regoptim.workflow.train.MLP` on the digits once per
:class:`Method`, each from the same initialization and in the same batch order, and returns a
:class:`CompareResult` (test accuracy, sparsity and mean ``optimizer.step()`` time per set-up; a
table, a JSON-ready dict). :func:`compare_methods` lists the set-ups, :func:`run_command` is the command. A tqdm bar
goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from regoptim.adamw import ProxAdamW
from regoptim.sgd import ProxSGD

from .groups import param_groups
from .sparsity import SparsityReport, sparsity
from .structure import structured_groups
from .train import (
    COMPARE_DEFAULTS,
    MLP,
    NEAR_ZERO_ATOL,
    Digits,
    _format_table,
    accuracy,
    load_digits_split,
    train_model,
    weights,
)

__all__ = ["CompareResult", "CompareRow", "Method", "compare", "compare_methods", "run_command"]


@dataclass(frozen=True)
class Method:
    """One line of the comparison: how to build the optimizer, and an optional loss-L1 term."""

    name: str
    regularization: str
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    loss_l1: float = 0.0


def _neuron_groups(
    model: nn.Module, group_l1: float, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """:func:`regoptim.structured_groups` of the MLP, as ``regoptim prune`` builds them: one group
    per hidden neuron (its weight row and its bias entry; ``weight_decay`` covers both), the
    output layer placed by :func:`regoptim.param_groups` (its bias exempt)."""
    example = torch.zeros(2, model.fc1.in_features)
    return structured_groups(model, example, group_l1=group_l1, weight_decay=weight_decay)


def compare_methods(hp: dict[str, float | int] | None = None) -> list[Method]:
    """The nine configurations of ``regoptim compare``. Biases and 1-D params are exempt, except
    in the group-lasso rows, where each hidden neuron's bias is in its neuron's group."""
    h = {**COMPARE_DEFAULTS, **(hp or {})}
    lr, mom, wd, l1 = float(h["sgd_lr"]), float(h["momentum"]), float(h["weight_decay"]), h["l1"]
    alr, awd, al1 = float(h["adam_lr"]), float(h["adamw_weight_decay"]), float(h["adam_l1"])
    gl1, agl1 = float(h["group_l1"]), float(h["adam_group_l1"])
    sgd = torch.optim.SGD
    return [
        Method("SGD", "none", lambda m: sgd(param_groups(m), lr=lr, momentum=mom)),
        Method(
            "SGD + weight_decay",
            f"coupled L2 weight_decay={wd:g}",
            lambda m: sgd(param_groups(m, weight_decay=wd), lr=lr, momentum=mom),
        ),
        Method(
            "ProxSGD decoupled",
            f"decoupled weight_decay={wd:g}",
            lambda m: ProxSGD(
                param_groups(m, weight_decay=wd), lr=lr, momentum=mom, decoupled_weight_decay=True
            ),
        ),
        Method(
            "SGD + L1 in loss",
            f"loss += {l1:g} * l1_penalty",
            lambda m: sgd(param_groups(m), lr=lr, momentum=mom),
            loss_l1=float(l1),
        ),
        Method(
            "ProxSGD l1",
            f"proximal l1={l1:g}",
            lambda m: ProxSGD(param_groups(m, l1=float(l1)), lr=lr, momentum=mom),
        ),
        Method(
            "ProxSGD group_l1",
            f"group_l1={gl1:g} on hidden neurons",
            lambda m: ProxSGD(_neuron_groups(m, gl1), lr=lr, momentum=mom),
        ),
        Method(
            "AdamW",
            f"decoupled weight_decay={awd:g}",
            lambda m: torch.optim.AdamW(param_groups(m, weight_decay=awd), lr=alr),
        ),
        Method(
            "ProxAdamW l1",
            f"weight_decay={awd:g}, proximal l1={al1:g}",
            lambda m: ProxAdamW(param_groups(m, weight_decay=awd, l1=al1), lr=alr),
        ),
        Method(
            "ProxAdamW group_l1",
            f"weight_decay={awd:g}, group_l1={agl1:g}",
            lambda m: ProxAdamW(_neuron_groups(m, agl1, weight_decay=awd), lr=alr),
        ),
    ]


@dataclass
class CompareRow:
    name: str
    regularization: str
    test_accuracy: float
    sparsity: SparsityReport
    mean_step_s: float
    final_loss: float

    @property
    def zero_groups(self) -> tuple[int, int] | None:
        """(zero groups, groups) over the param groups with group lasso (here: hidden neurons
        exactly zero, and hidden neurons); ``None`` for a set-up without group lasso."""
        rows = self.sparsity.groups
        if not rows:
            return None
        return sum(r.zero_groups for r in rows), sum(r.groups for r in rows)

    def to_dict(self) -> dict[str, Any]:
        zero_groups, groups = self.zero_groups or (None, None)
        return {
            "name": self.name,
            "regularization": self.regularization,
            "test_accuracy": self.test_accuracy,
            "zero_fraction": self.sparsity.fraction,
            "near_zero_fraction": self.sparsity.near_fraction,
            "zero_groups": zero_groups,
            "groups": groups,
            "mean_step_us": 1e6 * self.mean_step_s,
            "final_loss": self.final_loss,
            "sparsity": self.sparsity.to_dict(),
        }


@dataclass
class CompareResult:
    rows: list[CompareRow]
    initial_weights: dict[str, Tensor]
    final_weights: dict[str, dict[str, Tensor]]
    settings: dict[str, Any]

    def table(self) -> str:
        atol = self.rows[0].sparsity.atol if self.rows else NEAR_ZERO_ATOL
        header = (
            "method",
            "regularization",
            "test acc",
            "exact zeros",
            f"|w|<={atol:g}",
            "zero neurons",
            "step (us)",
        )
        body = [
            (
                r.name,
                r.regularization,
                f"{100 * r.test_accuracy:.1f}%",
                f"{100 * r.sparsity.fraction:.1f}%",
                f"{100 * r.sparsity.near_fraction:.1f}%",
                "-" if r.zero_groups is None else "{}/{}".format(*r.zero_groups),
                f"{1e6 * r.mean_step_s:.0f}",
            )
            for r in self.rows
        ]
        return _format_table(header, body, left=2)

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "rows": [r.to_dict() for r in self.rows]}


def _sparsity(model: nn.Module, optimizer: torch.optim.Optimizer) -> SparsityReport:
    """Zeros over the weight matrices; zero groups (named after the whole model, biases
    included) of the param groups with group lasso."""
    report = sparsity(weights(model), atol=NEAR_ZERO_ATOL)
    groups = sparsity(model, atol=NEAR_ZERO_ATOL, optimizer=optimizer).groups
    return replace(report, groups=groups)


def compare(
    *,
    epochs: int = int(COMPARE_DEFAULTS["epochs"]),
    seed: int = 0,
    progress: bool = True,
    methods: Sequence[Method] | None = None,
    data: Digits | None = None,
    hp: dict[str, float | int] | None = None,
) -> CompareResult:
    """Train the MLP once per method from the same initialization and batch order."""
    data = load_digits_split() if data is None else data
    methods = compare_methods(hp) if methods is None else list(methods)
    h = {**COMPARE_DEFAULTS, **(hp or {})}
    batch_size = int(h["batch_size"])
    x, y = data.train_and_val()
    from tqdm import tqdm

    bar = tqdm(total=len(methods) * epochs, disable=not progress, unit="epoch", file=sys.stderr)
    rows: list[CompareRow] = []
    finals: dict[str, dict[str, Tensor]] = {}
    initial: dict[str, Tensor] = {}
    try:
        for method in methods:
            torch.manual_seed(seed)
            model = MLP()
            if not initial:
                initial = {n: p.detach().clone() for n, p in weights(model)}
            optimizer = method.make_optimizer(model)
            l1_params = optimizer.param_groups[0]["params"] if method.loss_l1 else ()
            bar.set_description(method.name)
            stats = train_model(
                model,
                optimizer,
                x,
                y,
                epochs=epochs,
                batch_size=batch_size,
                seed=seed,
                loss_l1=method.loss_l1,
                loss_l1_params=l1_params,
                on_epoch=lambda: bar.update(1),
            )
            rows.append(
                CompareRow(
                    name=method.name,
                    regularization=method.regularization,
                    test_accuracy=accuracy(model, data.x_test, data.y_test),
                    sparsity=_sparsity(model, optimizer),
                    mean_step_s=stats.mean_step_s,
                    final_loss=stats.final_loss,
                )
            )
            finals[method.name] = {n: p.detach().clone() for n, p in weights(model)}
    finally:
        bar.close()
    # the arguments last: COMPARE_DEFAULTS' "epochs" must not overwrite the epochs run
    settings = {**h, "epochs": epochs, "seed": seed, "threads": torch.get_num_threads()}
    return CompareResult(rows, initial, finals, settings)


def run_command(args: argparse.Namespace, out: Path, *, plots: bool) -> list[Path]:
    """``regoptim compare``: print the set-up, run :func:`compare` with the parsed flags, print
    the table and write compare.txt, compare.json and, with ``plots``, weights.png and
    sparsity.png into ``out``; returns the paths written."""
    data = load_digits_split()
    n_train = data.x_train.shape[0] + data.x_val.shape[0]
    print(
        f"MLP 64-256-10 on scikit-learn digits ({n_train} train / {data.x_test.shape[0]} test), "
        f"{args.epochs} epochs, batch 64, seed {args.seed}, {args.threads} thread(s); "
        "biases and 1-D params exempt (group_l1 rows: a hidden neuron's row and bias, one group)",
        flush=True,
    )
    result = compare(epochs=args.epochs, seed=args.seed, progress=not args.no_progress, data=data)
    table = result.table()
    print(table)
    (out / "compare.txt").write_text(table + "\n")
    (out / "compare.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    written = [out / "compare.txt", out / "compare.json"]
    if plots:
        from .plots import plot_sparsity, plot_weight_distributions

        reports = {r.name: r.sparsity for r in result.rows}
        fig = plot_weight_distributions(
            result.initial_weights,
            result.final_weights,
            before_label="init",
            path=out / "weights.png",
            title=f"Weights after {args.epochs} epochs vs init (shared bins, log counts)",
        )
        fig.clear()
        title = "Exact zeros per layer; hidden neurons exactly zero (groups)"
        fig = plot_sparsity(reports, path=out / "sparsity.png", title=title)
        fig.clear()
        written += [out / "weights.png", out / "sparsity.png"]
    return written
