"""The training loop and experiments behind the ``regoptim`` command.

Everything here runs on the CPU in a few seconds per model: a 64-256-10 MLP on scikit-learn's
bundled handwritten digits (1797 8x8 images, shipped with scikit-learn, no download).

* :func:`load_digits_split`: a fixed, stratified 60/20/20 train/validation/test split (the split
  never depends on the training seed, so every run and both commands see the same test set).
* :func:`train_model`: one deterministic training run (seeded init and batch order);
  :func:`run_epoch`, one epoch of it, is what :mod:`regoptim.paths` calls.
* :func:`compare`: the seven-way comparison of ``regoptim compare`` (tqdm bar on stderr).

The strength sweep of ``regoptim path`` lives in :mod:`regoptim.paths`.

scikit-learn is imported only inside :func:`load_digits_split`; matplotlib never here.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .groups import param_groups
from .penalties import l1_penalty
from .sparsity import SparsityReport, sparsity

__all__ = [
    "COMPARE_DEFAULTS",
    "CompareResult",
    "Digits",
    "MLP",
    "Method",
    "compare",
    "compare_methods",
    "load_digits_split",
    "run_epoch",
    "train_model",
]

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


# ----------------------------------------------------------------------------- compare


@dataclass(frozen=True)
class Method:
    """One line of the comparison: how to build the optimizer, and an optional loss-L1 term."""

    name: str
    regularization: str
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    loss_l1: float = 0.0


def compare_methods(hp: dict[str, float | int] | None = None) -> list[Method]:
    """The seven configurations of ``regoptim compare``; biases and 1-D params are exempt."""
    from . import ProxAdamW, ProxSGD  # the core optimizers (imported late: no import cycle)

    h = {**COMPARE_DEFAULTS, **(hp or {})}
    lr, mom, wd, l1 = float(h["sgd_lr"]), float(h["momentum"]), float(h["weight_decay"]), h["l1"]
    alr, awd, al1 = float(h["adam_lr"]), float(h["adamw_weight_decay"]), float(h["adam_l1"])
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
            "AdamW",
            f"decoupled weight_decay={awd:g}",
            lambda m: torch.optim.AdamW(param_groups(m, weight_decay=awd), lr=alr),
        ),
        Method(
            "ProxAdamW l1",
            f"weight_decay={awd:g}, proximal l1={al1:g}",
            lambda m: ProxAdamW(param_groups(m, weight_decay=awd, l1=al1), lr=alr),
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

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "regularization": self.regularization,
            "test_accuracy": self.test_accuracy,
            "zero_fraction": self.sparsity.fraction,
            "near_zero_fraction": self.sparsity.near_fraction,
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
            "step (us)",
        )
        body = [
            (
                r.name,
                r.regularization,
                f"{100 * r.test_accuracy:.1f}%",
                f"{100 * r.sparsity.fraction:.1f}%",
                f"{100 * r.sparsity.near_fraction:.1f}%",
                f"{1e6 * r.mean_step_s:.0f}",
            )
            for r in self.rows
        ]
        return _format_table(header, body, left=2)

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "rows": [r.to_dict() for r in self.rows]}


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
                    sparsity=sparsity(weights(model), atol=NEAR_ZERO_ATOL),
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
