"""The training loop and experiments behind the ``regoptim`` command.

Everything here runs on the CPU in a few seconds per model: a 64-256-10 MLP on scikit-learn's
bundled handwritten digits (1797 8x8 images, shipped with scikit-learn, no download).

* :func:`load_digits_split`: a fixed, stratified 60/20/20 train/validation/test split (the split
  never depends on the training seed, so every run and both commands see the same test set).
* :func:`train_model`: one deterministic training run (seeded init and batch order);
  :func:`run_epoch`, one epoch of it, is what :mod:`regoptim.workflow.paths` calls.

The comparison of ``regoptim compare`` lives in :mod:`regoptim.workflow.compare`, the strength
sweep of ``regoptim path`` in :mod:`regoptim.workflow.paths`.

scikit-learn is imported only inside :func:`load_digits_split`; matplotlib never here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .penalties import l1_penalty

__all__ = ["COMPARE_DEFAULTS", "Digits", "MLP", "load_digits_split", "run_epoch", "train_model"]

NEAR_ZERO_ATOL = 1e-3

#: hyperparameters of ``regoptim compare`` (also used by ``regoptim path``)
COMPARE_DEFAULTS: dict[str, float | int] = {
    "epochs": 60,
    "batch_size": 64,
    "sgd_lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "l1": 4e-3,
    "adam_lr": 1e-3,
    "adamw_weight_decay": 1e-2,
    "adam_l1": 1e-4,
    # group lasso on the hidden neurons (measured, seed 0: 114 and 106 of 256 neurons zero)
    "group_l1": 1e-2,
    "adam_group_l1": 5e-3,
}


# ----------------------------------------------------------------------------- data and model


@dataclass(frozen=True)
class Digits:
    """Float32 features in ``[0, 1]`` and int64 labels of the fixed split."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor

    def train_and_val(self) -> tuple[Tensor, Tensor]:
        """Train and validation sets together (``compare`` trains on both: it tunes nothing)."""
        return torch.cat([self.x_train, self.x_val]), torch.cat([self.y_train, self.y_val])


def load_digits_split(split_seed: int = 0) -> Digits:
    """Load scikit-learn's digits and split them 60/20/20, stratified, with ``split_seed``."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits experiments need scikit-learn: pip install 'regoptim[examples]'"
        ) from exc
    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=split_seed
    )
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=0.25, stratify=y_rest, random_state=split_seed
    )

    def f(a: Any) -> Tensor:
        return torch.as_tensor(a, dtype=torch.float32)

    def i(a: Any) -> Tensor:
        return torch.as_tensor(a, dtype=torch.int64)

    return Digits(f(x_train), i(y_train), f(x_val), i(y_val), f(x_test), i(y_test))


class MLP(nn.Module):
    """``Linear(64, 256) -> ReLU -> Linear(256, 10)``."""

    def __init__(self, n_in: int = 64, hidden: int = 256, n_out: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(n_in, hidden)
        self.fc2 = nn.Linear(hidden, n_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x)))


def weights(model: nn.Module) -> list[tuple[str, Tensor]]:
    """The regularized tensors (``ndim >= 2``), named: what the sparsity columns count."""
    return [(n, p) for n, p in model.named_parameters() if p.ndim >= 2]


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    acc = (model(x).argmax(dim=1) == y).float().mean().item()
    model.train()
    return acc


@dataclass
class TrainStats:
    step_times: list[float] = field(default_factory=list)
    final_loss: float = math.nan

    @property
    def mean_step_s(self) -> float:
        return sum(self.step_times) / len(self.step_times) if self.step_times else math.nan


def run_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int,
    generator: torch.Generator,
    loss_l1: float = 0.0,
    loss_l1_params: Sequence[Tensor] = (),
    stats: TrainStats | None = None,
) -> None:
    """One pass over ``(x, y)`` in ``generator``'s batch order; ``stats`` gets step times."""
    n = x.shape[0]
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        if loss_l1:
            loss = loss + loss_l1 * l1_penalty(loss_l1_params)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t0 = time.perf_counter()
        optimizer.step()
        if stats is not None:
            stats.step_times.append(time.perf_counter() - t0)
            stats.final_loss = loss.item()


def train_model(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    loss_l1: float = 0.0,
    loss_l1_params: Sequence[Tensor] = (),
    on_epoch: Callable[[], None] | None = None,
) -> TrainStats:
    """Minibatch training with a seeded batch order; times ``optimizer.step()`` alone.

    ``loss_l1 > 0`` adds ``loss_l1 * l1_penalty(loss_l1_params)`` to the loss (the common L1
    recipe, kept for comparison).
    """
    gen = torch.Generator().manual_seed(seed)
    stats = TrainStats()
    model.train()
    for _ in range(epochs):
        run_epoch(
            model,
            optimizer,
            x,
            y,
            batch_size=batch_size,
            generator=gen,
            loss_l1=loss_l1,
            loss_l1_params=loss_l1_params,
            stats=stats,
        )
        if on_epoch is not None:
            on_epoch()
    return stats


def _format_table(header: Sequence[str], body: Iterable[Sequence[str]], *, left: int) -> str:
    lines = [tuple(header), *[tuple(b) for b in body]]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]

    def fmt(line: tuple[str, ...]) -> str:
        cells = [
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    rule = "  ".join(("-" if h else " ") * w for h, w in zip(header, widths, strict=True))
    return "\n".join([fmt(lines[0]), rule.rstrip(), *(fmt(line) for line in lines[1:])])
