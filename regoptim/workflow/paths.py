r"""Regularization paths: one model trained along a sequence of strengths.

* :func:`regularization_path`: the library function. It goes along the strengths strongest first
  and, by default, starts each point from the previous point's solution (a *warm start*, as
  glmnet and scikit-learn's ``lasso_path`` do); ``warm_start=False`` restarts every point from the
  model's initial weights. For each point it reports the prox-gradient residual on the full
  objective (how far from stationary the solution is) and the wall time spent on it.
* :func:`digits_path`: the experiment of ``regoptim path`` (the MLP of
  :mod:`regoptim.workflow.train` on scikit-learn's digits), which picks the strength by validation
  accuracy.

The residual of a ProxSGD problem ``min f(p) + wd/2 ‖p‖² + l1 ‖p‖₁`` at step size ``lr`` is the
norm of the gradient mapping

.. math::
    G(p) = \bigl(p - \operatorname{prox}_{lr\,l1\|\cdot\|_1}(p - lr\,(\nabla f(p) + wd\,p))\bigr)
    / lr,

over all parameters together; ``G(p) = 0`` exactly at a minimizer of a convex problem (and at a
stationary point otherwise), and for ``l1 = 0`` it is the gradient's norm.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from regoptim.regularizers.l1 import soft_threshold
from regoptim.sgd import ProxSGD

from .groups import param_groups
from .sparsity import SparsityReport, sparsity
from .train import (
    COMPARE_DEFAULTS,
    MLP,
    NEAR_ZERO_ATOL,
    Digits,
    _format_table,
    accuracy,
    load_digits_split,
    run_epoch,
    weights,
)

__all__ = ["PathPoint", "PathResult", "PathStep", "digits_path", "regularization_path"]

Reg = Literal["l1", "weight_decay"]


@dataclass(frozen=True)
class PathStep:
    """One point of :func:`regularization_path`, yielded while the model holds its solution."""

    strength: float
    #: the prox-gradient residual ``‖G(p)‖`` on ``objective`` after this point's training
    residual: float
    #: wall time of this point's training and residuals (not your code between the points)
    seconds: float
    #: epochs run at this point (fewer than ``epochs`` when ``tol`` was reached)
    epochs: int


def _residual(optimizer: torch.optim.Optimizer, loss: Tensor) -> float:
    """``‖G(p)‖`` over all of ``optimizer``'s parameters (see the module docstring)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grads = iter(torch.autograd.grad(loss, params, allow_unused=True))
    total = 0.0
    with torch.no_grad():
        for group in optimizer.param_groups:
            lr, wd, l1 = float(group["lr"]), group["weight_decay"], group["l1"]
            for p in group["params"]:
                g = next(grads)
                g = torch.zeros_like(p) if g is None else g
                if wd:
                    g = g + wd * p
                moved = p - lr * g
                if l1:
                    moved = soft_threshold(moved, lr * l1)
                total += float(((p - moved) / lr).double().square().sum())
    return math.sqrt(total)


def regularization_path(
    model: nn.Module,
    strengths: Sequence[float],
    train_epoch: Callable[[nn.Module, torch.optim.Optimizer, int], object],
    objective: Callable[[nn.Module], Tensor],
    *,
    lr: float,
    reg: Reg = "l1",
    momentum: float = 0.0,
    epochs: int = 1,
    tol: float | None = None,
    warm_start: bool = True,
) -> Iterator[PathStep]:
    """Train ``model`` with :class:`~regoptim.ProxSGD` at each strength, strongest first.

    At each strength ``s`` a fresh ``ProxSGD(param_groups(model, **{reg: s}), lr=lr,
    momentum=momentum)`` (weights regularized, biases and 1-D parameters exempt) is handed to
    ``train_epoch(model, optimizer, epoch)`` for ``epoch = 0, 1, ...`` up to ``epochs`` times.
    Then the point is yielded, with the model holding its solution: evaluate it, copy what you
    need, and iterate on.

    Args:
        model: trained in place; its weights at the call are the start of the first point.
        strengths: the strengths (``>= 0``, finite), visited in decreasing order.
        train_epoch: one epoch of your training loop (any number of ``optimizer.step()`` calls;
            ``epoch`` restarts at 0 at every point, e.g. to reseed the batch order).
        objective: the full training objective without the regularizer (e.g. the mean loss on
            the whole training set), for the residual; called with gradients enabled.
        lr: ProxSGD's learning rate, also the step of the residual.
        reg: ``"l1"`` (proximal L1) or ``"weight_decay"`` (coupled L2).
        momentum: ProxSGD's momentum (its buffer starts afresh at every point).
        epochs: the most epochs per point; all of them when ``tol`` is ``None``.
        tol: stop a point once its residual is ``<= tol``, checked after every epoch.
        warm_start: start each point from the previous point's solution (default); ``False``
            restarts every point from the model's weights at the call.

    Yields:
        a :class:`PathStep` per strength: ``strength``, ``residual``, ``seconds``, ``epochs``.

    With full-batch steps in ``train_epoch``, ``momentum=0`` and ``lr = 1/L`` (``L`` the
    Lipschitz constant of the objective's gradient) this is ISTA along the path, which
    ``tests/test_paths.py`` checks against scikit-learn's ``lasso_path`` (README, section 4)::

        for point in regoptim.regularization_path(
            model, alphas, train_epoch, objective, lr=1 / L, epochs=100_000, tol=1e-9
        ):
            coefs.append(model.weight.detach().clone())
    """
    if reg not in ("l1", "weight_decay"):
        raise ValueError(f"regularization_path: reg must be 'l1' or 'weight_decay', got {reg!r}")
    if len(strengths) == 0:
        raise ValueError("regularization_path: strengths is empty")
    for s in strengths:
        if not (math.isfinite(s) and s >= 0):
            raise ValueError(f"regularization_path: strengths must be finite and >= 0, got {s}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"regularization_path: lr must be finite and > 0, got {lr}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"regularization_path: epochs must be an integer >= 1, got {epochs!r}")
    if tol is not None and not tol >= 0:
        raise ValueError(f"regularization_path: tol must be >= 0 or None, got {tol}")
    order = sorted((float(s) for s in strengths), reverse=True)
    initial = None if warm_start else {k: v.clone() for k, v in model.state_dict().items()}
    return _path(model, order, train_epoch, objective, lr, reg, momentum, epochs, tol, initial)


def _path(
    model: nn.Module,
    strengths: list[float],
    train_epoch: Callable[[nn.Module, torch.optim.Optimizer, int], object],
    objective: Callable[[nn.Module], Tensor],
    lr: float,
    reg: Reg,
    momentum: float,
    epochs: int,
    tol: float | None,
    initial: dict[str, Tensor] | None,  # cold starts: the weights to restart every point from
) -> Iterator[PathStep]:
    for s in strengths:
        if initial is not None:
            model.load_state_dict(initial)
        optimizer = ProxSGD(param_groups(model, **{reg: s}), lr=lr, momentum=momentum)
        start, residual = time.perf_counter(), math.nan
        for epoch in range(epochs):
            train_epoch(model, optimizer, epoch)
            if tol is not None or epoch == epochs - 1:
                residual = _residual(optimizer, objective(model))
                if tol is not None and residual <= tol:
                    break
        seconds = time.perf_counter() - start
        yield PathStep(strength=s, residual=residual, seconds=seconds, epochs=epoch + 1)


# ----------------------------------------------------------------------------- regoptim path


@dataclass
class PathPoint:
    """One strength of :func:`digits_path`."""

    strength: float
    train_accuracy: float
    val_accuracy: float
    sparsity: SparsityReport
    residual: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "strength": self.strength,
            "train_accuracy": self.train_accuracy,
            "val_accuracy": self.val_accuracy,
            "zero_fraction": self.sparsity.fraction,
            "near_zero_fraction": self.sparsity.near_fraction,
            "residual": self.residual,
            "seconds": self.seconds,
        }


@dataclass
class PathResult:
    """The points of :func:`digits_path` in the order trained (strongest first) and the pick."""

    reg: str
    points: list[PathPoint]
    best: PathPoint
    test_accuracy: float
    settings: dict[str, Any]

    def table(self) -> str:
        header = (self.reg, "train acc", "val acc", "exact zeros", "residual", "time (s)", "")
        body = [
            (
                f"{p.strength:.2e}",
                f"{100 * p.train_accuracy:.1f}%",
                f"{100 * p.val_accuracy:.1f}%",
                f"{100 * p.sparsity.fraction:.1f}%",
                f"{p.residual:.2e}",
                f"{p.seconds:.2f}",
                "<- best" if p is self.best else "",
            )
            for p in self.points
        ]
        return _format_table(header, body, left=0)

    def summary(self) -> str:
        start = "warm-started" if self.settings["warm_start"] else "cold-started"
        total = sum(p.seconds for p in self.points)
        return (
            f"path {start}, strongest first: {total:.1f} s of training in all\n"
            f"best {self.reg}={self.best.strength:.2e} by validation accuracy "
            f"({100 * self.best.val_accuracy:.1f}%, {100 * self.best.sparsity.fraction:.1f}% "
            f"exact zeros); its test accuracy: {100 * self.test_accuracy:.1f}%"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "reg": self.reg,
            "settings": self.settings,
            "points": [p.to_dict() for p in self.points],
            "best": self.best.to_dict(),
            "test_accuracy": self.test_accuracy,
        }


def digits_path(
    strengths: Sequence[float],
    *,
    reg: Reg = "l1",
    epochs: int = int(COMPARE_DEFAULTS["epochs"]),
    seed: int = 0,
    warm_start: bool = True,
    progress: bool = True,
    data: Digits | None = None,
    hp: dict[str, float | int] | None = None,
) -> PathResult:
    """``regoptim path``: the MLP along ``strengths`` on the train split, picked by validation.

    ``reg="l1"`` sweeps the proximal ``l1``; ``reg="weight_decay"`` sweeps coupled L2
    ``weight_decay`` (exactly ``torch.optim.SGD``'s). Every point trains ``epochs`` epochs with
    ProxSGD (lr and momentum of ``compare``) in the same batch order; ``warm_start=False``
    reinitializes the model (seed ``seed``) at every point. Ties in validation accuracy go to
    the larger strength (the simpler model). The test set is scored once, for the best strength.
    """
    data = load_digits_split() if data is None else data
    h = {**COMPARE_DEFAULTS, **(hp or {})}
    torch.manual_seed(seed)
    model = MLP()
    gen = torch.Generator()

    from tqdm import tqdm

    bar = tqdm(total=len(strengths) * epochs, disable=not progress, unit="epoch", file=sys.stderr)

    def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int) -> None:
        if epoch == 0:
            gen.manual_seed(seed)  # every point sees the same batch order
            bar.set_description(f"{reg}={optimizer.param_groups[0][reg]:.3g}")
        run_epoch(
            model,
            optimizer,
            data.x_train,
            data.y_train,
            batch_size=int(h["batch_size"]),
            generator=gen,
        )
        bar.update(1)

    def objective(model: nn.Module) -> Tensor:
        return nn.functional.cross_entropy(model(data.x_train), data.y_train)

    path = regularization_path(
        model,
        strengths,
        train_epoch,
        objective,
        lr=float(h["sgd_lr"]),
        reg=reg,
        momentum=float(h["momentum"]),
        epochs=epochs,
        warm_start=warm_start,
    )
    points: list[PathPoint] = []
    best: PathPoint | None = None
    best_state: dict[str, Tensor] = {}
    try:
        for step in path:
            point = PathPoint(
                strength=step.strength,
                train_accuracy=accuracy(model, data.x_train, data.y_train),
                val_accuracy=accuracy(model, data.x_val, data.y_val),
                sparsity=sparsity(weights(model), atol=NEAR_ZERO_ATOL),
                residual=step.residual,
                seconds=step.seconds,
            )
            points.append(point)
            if best is None or point.val_accuracy > best.val_accuracy:  # ties: the stronger
                best = point
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    finally:
        bar.close()
    assert best is not None
    model.load_state_dict(best_state)
    test_acc = accuracy(model, data.x_test, data.y_test)
    settings = {
        **h,
        "epochs": epochs,
        "seed": seed,
        "warm_start": warm_start,
        "threads": torch.get_num_threads(),
    }
    return PathResult(reg, points, best, test_acc, settings)
