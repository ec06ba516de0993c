"""Structured pruning on the digits: group lasso, then :func:`regoptim.slim` (``regoptim prune``).

:func:`prune_digits` trains a 64-256-128-10 MLP with row group lasso on its two hidden layers
(:func:`regoptim.structured_groups`: a neuron's weight row and bias form one group) under
:class:`regoptim.ProxSGD`, slims it (:func:`regoptim.slim`: the neurons whose group is exactly 0
are removed), checks that the slim model predicts exactly what the trained one does, and measures
both: parameters, test accuracy and CPU inference latency (median of many forward passes, at
batch 1 and on the whole test set, with torch's current thread count).

A client of the optimizers, like :mod:`regoptim.workflow.train`; matplotlib is imported only by
:func:`write_outputs` when asked for the plot.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from regoptim.sgd import ProxSGD

from .structure import SlimReport, slim, structured_groups
from .train import Digits, _format_table, load_digits_split, train_model

__all__ = [
    "PRUNE_DEFAULTS",
    "DigitsMLP",
    "Latency",
    "PruneResult",
    "prune_digits",
    "run_command",
    "write_outputs",
]

#: the settings of ``regoptim prune`` (issue 13's probe)
PRUNE_DEFAULTS: dict[str, Any] = {
    "epochs": 30,
    "group_l1": 0.05,
    "lr": 0.1,
    "momentum": 0.9,
    "batch_size": 64,
    "hidden": (256, 128),
    "repeats": 500,
}


class DigitsMLP(nn.Module):
    """``Linear(64, h1) -> ReLU -> Linear(h1, h2) -> ReLU -> Linear(h2, 10)``."""

    def __init__(
        self, hidden: tuple[int, int] = (256, 128), n_in: int = 64, n_out: int = 10
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(n_in, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[1], n_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


@dataclass(frozen=True)
class Latency:
    """Median seconds of one forward pass at ``batch`` rows, trained model vs slim model."""

    batch: int
    before_s: float
    after_s: float
    repeats: int

    @property
    def speedup(self) -> float:
        """``before_s / after_s``."""
        return self.before_s / self.after_s if self.after_s > 0 else float("inf")


@dataclass
class PruneResult:
    """What :func:`prune_digits` trained, removed and measured (both models in eval mode)."""

    model: nn.Module
    slim_model: nn.Module
    report: SlimReport
    accuracy_before: float
    accuracy_after: float
    latencies: list[Latency]
    settings: dict[str, Any]

    @property
    def params_before(self) -> int:
        return self.report.params_before

    @property
    def params_after(self) -> int:
        return self.report.params_after

    def table(self) -> str:
        """Parameters, test accuracy and latency before and after slim, then the layers."""
        share = self.params_after / self.params_before if self.params_before else 1.0
        body = [
            (
                "parameters",
                f"{self.params_before:,}",
                f"{self.params_after:,}",
                f"{share:.1%} kept",
            ),
            (
                "test accuracy",
                f"{100 * self.accuracy_before:.1f}%",
                f"{100 * self.accuracy_after:.1f}%",
                "same predictions",
            ),
        ]
        for lat in self.latencies:
            body.append(
                (
                    f"latency, batch {lat.batch} (us, median of {lat.repeats})",
                    f"{1e6 * lat.before_s:.1f}",
                    f"{1e6 * lat.after_s:.1f}",
                    f"{lat.speedup:.2f}x faster",
                )
            )
        table = _format_table(("", "trained", "slim", "change"), body, left=1)
        return table + "\n\n" + str(self.report)

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "test_accuracy_before": self.accuracy_before,
            "test_accuracy_after": self.accuracy_after,
            "latency": [
                {
                    "batch": lat.batch,
                    "repeats": lat.repeats,
                    "before_us": 1e6 * lat.before_s,
                    "after_us": 1e6 * lat.after_s,
                }
                for lat in self.latencies
            ],
            "layers": [
                {"layer": r.layer, "type": r.kind, "before": r.before, "kept": r.after}
                for r in self.report.rows
            ],
            "notes": list(self.report.notes),
        }


@torch.inference_mode()
def _latencies(a: nn.Module, b: nn.Module, x: Tensor, repeats: int) -> tuple[float, float]:
    """Median seconds per forward pass of ``a`` and of ``b`` on ``x``, timed alternately (a
    load spike on a shared machine then hits both), after a few untimed warm-up passes."""
    for _ in range(min(10, repeats)):
        a(x)
        b(x)
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for model, out in ((a, times[0]), (b, times[1])):
            t0 = time.perf_counter()
            model(x)
            out.append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


@torch.no_grad()
def _predictions(model: nn.Module, x: Tensor) -> Tensor:
    return model(x).argmax(dim=1)


def prune_digits(
    *,
    epochs: int = PRUNE_DEFAULTS["epochs"],
    group_l1: float = PRUNE_DEFAULTS["group_l1"],
    seed: int = 0,
    lr: float = PRUNE_DEFAULTS["lr"],
    momentum: float = PRUNE_DEFAULTS["momentum"],
    batch_size: int = PRUNE_DEFAULTS["batch_size"],
    hidden: tuple[int, int] = PRUNE_DEFAULTS["hidden"],
    repeats: int = PRUNE_DEFAULTS["repeats"],
    progress: bool = True,
    data: Digits | None = None,
) -> PruneResult:
    """Train with row group lasso on the hidden layers, slim, and measure before and after.

    The MLP (:class:`DigitsMLP`, seeded init and batch order) trains on the train and
    validation splits of :func:`regoptim.workflow.train.load_digits_split` (nothing is tuned
    here) with ``ProxSGD(structured_groups(model, x, group_l1=group_l1), lr=lr,
    momentum=momentum)``; the output layer is not grouped. Test accuracy is scored on the test split. Latency is the
    median of ``repeats`` forward passes in inference mode at batch 1 and on the whole test set,
    with ``torch.get_num_threads()`` threads; the two models are timed alternately.

    Args:
        epochs: training epochs.
        group_l1: the group lasso strength of every hidden neuron's group (row and bias).
        seed: the initialization and batch-order seed.
        lr, momentum, batch_size: ProxSGD's step size and momentum, and the minibatch size.
        hidden: the two hidden widths.
        repeats: timed forward passes per model and batch size.
        progress: a tqdm bar over the epochs on stderr.
        data: the digits split (default: :func:`regoptim.workflow.train.load_digits_split`).

    Raises:
        RuntimeError: the slim model's test predictions differ from the trained model's (a bug
            in :func:`regoptim.slim`).
    """
    data = load_digits_split() if data is None else data
    x, y = data.train_and_val()
    torch.manual_seed(seed)
    model = DigitsMLP(hidden)
    groups = structured_groups(model, x[:2], group_l1=group_l1)
    optimizer = ProxSGD(groups, lr=lr, momentum=momentum)
    from tqdm import tqdm

    with tqdm(total=epochs, disable=not progress, unit="epoch", file=sys.stderr) as bar:
        bar.set_description(f"group lasso {group_l1:g}")
        train_model(
            model,
            optimizer,
            x,
            y,
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
            on_epoch=lambda: bar.update(1),
        )
    model.eval()
    slim_model, report = slim(model, data.x_test, report=True)
    slim_model.eval()
    before = _predictions(model, data.x_test)
    after = _predictions(slim_model, data.x_test)
    if not torch.equal(before, after):
        n = int((before != after).sum())
        raise RuntimeError(f"prune_digits: the slim model changed {n} test predictions")
    latencies = []
    for batch in (1, data.x_test.shape[0]):
        t_before, t_after = _latencies(model, slim_model, data.x_test[:batch], repeats)
        latencies.append(Latency(batch, t_before, t_after, repeats))
    settings = {
        "model": f"MLP 64-{hidden[0]}-{hidden[1]}-10",
        "epochs": epochs,
        "group_l1": group_l1,
        "seed": seed,
        "lr": lr,
        "momentum": momentum,
        "batch_size": batch_size,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
    }
    return PruneResult(
        model,
        slim_model,
        report,
        (before == data.y_test).double().mean().item(),
        (after == data.y_test).double().mean().item(),
        latencies,
        settings,
    )


def write_outputs(result: PruneResult, out: Path, *, argv: list[str], plots: bool) -> list[Path]:
    """Write prune.txt, prune.json (the settings and the command's arguments) and, with
    ``plots``, prune_channels.png into ``out``; returns the paths written."""
    (out / "prune.txt").write_text(result.table() + "\n")
    record = {"argv": argv, **result.to_dict()}
    (out / "prune.json").write_text(json.dumps(record, indent=2) + "\n")
    written = [out / "prune.txt", out / "prune.json"]
    if plots:
        from .plots import plot_channels

        s = result.settings
        fig = plot_channels(
            result.report,
            path=out / "prune_channels.png",
            title=f"{s['model']}, group lasso {s['group_l1']:g}, {s['epochs']} epochs: "
            "channels kept",
        )
        fig.clear()
        written.append(out / "prune_channels.png")
    return written


def run_command(args: argparse.Namespace, out: Path, *, argv: list[str], plots: bool) -> list[Path]:
    """``regoptim prune``: print the settings, run :func:`prune_digits` with the parsed flags,
    print the table and write the outputs (:func:`write_outputs`)."""
    print(
        f"MLP 64-256-128-10 on scikit-learn digits, ProxSGD lr {PRUNE_DEFAULTS['lr']:g} "
        f"momentum {PRUNE_DEFAULTS['momentum']:g}, row group lasso {args.group_l1:g} on the "
        f"hidden layers, {args.epochs} epochs, batch {PRUNE_DEFAULTS['batch_size']}, seed "
        f"{args.seed}, {torch.get_num_threads()} thread(s)",
        flush=True,
    )
    result = prune_digits(
        epochs=args.epochs,
        group_l1=args.group_l1,
        seed=args.seed,
        repeats=args.repeats,
        progress=not args.no_progress,
    )
    print(result.table(), flush=True)
    return write_outputs(result, out, argv=argv, plots=plots)
