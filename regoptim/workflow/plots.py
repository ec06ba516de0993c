"""Plots of what regularization did: weight distributions, per-layer sparsity, strength paths.

matplotlib is an optional extra (``pip install 'regoptim[plots]'``); it is imported when a plot
function is called, not when regoptim is. Figures are built with ``matplotlib.figure.Figure``
directly (no pyplot, no global state, no display needed: they render headless through Agg).
Every function returns the ``Figure`` (Jupyter shows it inline) and, given ``path``, also writes
it there as a PNG (or any format matplotlib infers from the suffix).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .sparsity import ModelOrParams, SparsityReport, _named_tensors

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .structure import SlimReport

__all__ = [
    "plot_channels",
    "plot_regularization_path",
    "plot_sparsity",
    "plot_weight_distributions",
]

PathLike = str | os.PathLike[str]


def _figure(**kwargs: Any) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            "regoptim.workflow.plots needs matplotlib, which is an optional extra: "
            "pip install 'regoptim[plots]'"
        ) from exc
    return Figure(**kwargs)


def _save(fig: Figure, path: PathLike | None) -> Figure:
    if path is not None:
        fig.savefig(os.fspath(path), dpi=fig.dpi, bbox_inches="tight")
    return fig


def _flatten(obj: ModelOrParams) -> Tensor:
    named = _named_tensors(obj)
    if not named:
        return torch.zeros(0, dtype=torch.float64)
    parts = []
    for _, t in named:
        t = t.detach().flatten().cpu()
        parts.append((t.abs() if t.is_complex() else t).double())
    return torch.cat(parts)


def plot_weight_distributions(
    before: ModelOrParams,
    after: ModelOrParams | Mapping[str, ModelOrParams],
    *,
    bins: int = 101,
    path: PathLike | None = None,
    title: str | None = None,
    before_label: str = "before",
) -> Figure:
    """Histogram the weights before vs after training, on shared bins with log counts.

    Args:
        before: the reference weights (a module, a state_dict-like mapping, tensors or
            ``(name, tensor)`` pairs, as :func:`regoptim.sparsity` takes). Drawn in grey behind
            every panel.
        after: the trained weights, or a mapping ``{label: weights}`` to draw one panel per
            label (all panels share x and y). A mapping whose values are all tensors is taken
            as one ``state_dict``, not as labels.
        bins: number of bins (odd numbers put 0 at the centre of a bin), spanning
            ``[-m, m]`` with ``m`` the largest magnitude over all inputs.
        path: where to write the figure, if given.
        title: the figure's title.
        before_label: the legend label of ``before``.

    Exact zeros are drawn apart, as a red line at 0 whose height is their count (the nonzero
    weights go in the histogram): only a proximal L1 step produces that line, an L1 term in the
    loss only crowds the bins around 0. Complex entries are histogrammed by modulus.
    """
    if not isinstance(bins, int) or bins < 1:
        raise ValueError(f"plot_weight_distributions: bins must be a positive int, got {bins!r}")
    if (
        isinstance(after, Mapping)
        and after
        and all(not isinstance(v, Tensor) for v in after.values())
    ):
        panels = {str(k): _flatten(v) for k, v in after.items()}
    else:
        panels = {"after": _flatten(after)}  # type: ignore[arg-type]
    ref = _flatten(before)
    every = [ref, *panels.values()]
    m = max((float(t.abs().max()) for t in every if t.numel()), default=1.0) or 1.0
    edges = torch.linspace(-m, m, bins + 1, dtype=torch.float64).numpy()

    n = len(panels)
    ncols = 1 if n == 1 else 2
    nrows = math.ceil(n / ncols)
    fig = _figure(figsize=(5.2 * ncols, 2.4 * nrows + 0.6), dpi=100, layout="constrained")
    axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False).flatten()

    def nonzero(t: Tensor) -> Tensor:
        return t[t != 0]

    def pct_zero(t: Tensor) -> float:
        return 100 * float((t == 0).double().mean()) if t.numel() else 0.0

    ref_nz = nonzero(ref).numpy()
    for ax, (name, values) in zip(axes, panels.items(), strict=False):
        ax.hist(ref_nz, bins=edges, color="0.78", log=True, label=before_label)
        ax.hist(
            nonzero(values).numpy(),
            bins=edges,
            histtype="step",
            lw=1.4,
            color="C0",
            log=True,
            label=f"{name}, nonzero",
        )
        zeros = int((values == 0).sum())
        if zeros:
            ax.vlines(
                0.0,
                0.5,
                zeros,
                color="C3",
                lw=2.5,
                label=f"{name}: {pct_zero(values):.1f}% exactly 0",
            )
        else:
            ax.plot([], [], " ", label="no exact zeros")
        ax.legend(fontsize=8, loc="upper right", frameon=False)
        ax.grid(alpha=0.3)
    for ax in axes[n:]:
        ax.set_visible(False)
    for ax in axes[(nrows - 1) * ncols :]:
        ax.set_xlabel("weight value")
    for ax in axes[::ncols]:
        ax.set_ylabel("count (log)")
    fig.suptitle(title or "Weight distribution, shared bins")
    return _save(fig, path)


def _group_labels(report: SparsityReport) -> list[str]:
    return [f"groups: {', '.join(r.params)}" for r in report.groups]


def plot_sparsity(
    reports: SparsityReport | Mapping[str, SparsityReport],
    *,
    path: PathLike | None = None,
    title: str | None = None,
    near: bool = True,
) -> Figure:
    """Per-layer fraction of exact zeros as horizontal bars, one bar per report and layer.

    Args:
        reports: a :class:`regoptim.SparsityReport`, or ``{label: report}`` to compare runs
            side by side (each layer gets a bar per label).
        path: where to write the figure, if given.
        title: the figure's title.
        near: also draw the near-zero fraction (``|w| <= atol``) as a hatched outline behind.

    Reports made with ``sparsity(..., optimizer=opt)`` also get a bar per param group with group
    lasso (labelled ``groups: <its parameters>``): the fraction of its groups exactly 0.
    """
    if isinstance(reports, SparsityReport):
        reports = {"": reports}
    if not reports:
        raise ValueError("plot_sparsity: reports is empty")
    labels = list(reports)
    layers: list[str] = []
    for rep in reports.values():
        layers += [r.name for r in rep.rows if r.name not in layers]
    group_layers: list[str] = []
    for rep in reports.values():
        group_layers += [n for n in _group_labels(rep) if n not in group_layers]
    layers += group_layers
    layers.append("total")
    k = len(labels)
    height = 0.8 / k
    fig = _figure(figsize=(7.5, 0.5 + 0.28 * k * len(layers) + 0.4), dpi=100, layout="constrained")
    ax = fig.subplots()
    for j, (lab, rep) in enumerate(reports.items()):
        rows = {r.name: r for r in rep.rows}
        groups = dict(zip(_group_labels(rep), rep.groups, strict=True))
        exact = [
            rows[n].fraction if n in rows else groups[n].fraction if n in groups else 0.0
            for n in layers[:-1]
        ] + [rep.fraction]
        approx = [rows[n].near_fraction if n in rows else 0.0 for n in layers[:-1]]
        approx.append(rep.near_fraction)
        ys = [i + (j - (k - 1) / 2) * height for i in range(len(layers))]
        color = f"C{j % 10}"
        if near:
            ax.barh(
                ys,
                [100 * a for a in approx],
                height=height * 0.9,
                fill=False,
                edgecolor=color,
                hatch="///",
                lw=0.8,
            )
        ax.barh(ys, [100 * e for e in exact], height=height * 0.9, color=color, label=lab or None)
    ax.set_yticks(range(len(layers)), layers)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    atol = next(iter(reports.values())).atol
    xlabel = (
        "% of weights (of groups: groups bars) exactly 0"
        if group_layers
        else "% of weights exactly 0"
    )
    if near:
        xlabel += f"  (hatched outline: |w| <= {atol:g})"
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    if k > 1:
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.suptitle(title or "Sparsity per layer")
    return _save(fig, path)


def plot_regularization_path(
    strengths: Sequence[float],
    accuracy: Mapping[str, Sequence[float]],
    sparsity: Sequence[float] | None = None,
    *,
    best: float | None = None,
    xlabel: str = "regularization strength",
    path: PathLike | None = None,
    title: str | None = None,
) -> Figure:
    """Accuracy (top) and exact-zero fraction (bottom) against strength, log x axis.

    Args:
        strengths: the strengths, ``>= 0``. A ``0`` is drawn on a symlog axis.
        accuracy: ``{label: accuracies}`` in ``[0, 1]`` (e.g. train and validation), each the
            length of ``strengths``.
        sparsity: the exact-zero fraction in ``[0, 1]`` at each strength, or ``None``.
        best: the chosen strength, marked with a vertical line.
        xlabel: the x-axis label (e.g. ``"l1"``).
        path: where to write the figure, if given.
        title: the figure's title.
    """
    xs = [float(s) for s in strengths]
    if not xs:
        raise ValueError("plot_regularization_path: strengths is empty")
    if any(not s >= 0 for s in xs):
        raise ValueError("plot_regularization_path: strengths must be >= 0")
    for lab, ys in accuracy.items():
        if len(ys) != len(xs):
            raise ValueError(f"plot_regularization_path: accuracy[{lab!r}] has the wrong length")
    if sparsity is not None and len(sparsity) != len(xs):
        raise ValueError("plot_regularization_path: sparsity has the wrong length")
    order = sorted(range(len(xs)), key=xs.__getitem__)
    xs_sorted = [xs[i] for i in order]
    nrows = 2 if sparsity is not None else 1
    fig = _figure(figsize=(6.4, 2.3 * nrows + 0.6), dpi=100, layout="constrained")
    axes = fig.subplots(nrows, 1, sharex=True, squeeze=False)[:, 0]
    positive = [x for x in xs if x > 0]
    for ax in axes:
        if positive and min(xs) == 0:
            ax.set_xscale("symlog", linthresh=min(positive))
        elif positive:
            ax.set_xscale("log")
        if best is not None:
            ax.axvline(best, color="0.4", ls="--", lw=1)
        ax.grid(alpha=0.3)
    for lab, ys in accuracy.items():
        axes[0].plot(xs_sorted, [100 * ys[i] for i in order], "o-", label=lab, ms=4)
    axes[0].set_ylabel("accuracy (%)")
    axes[0].legend(fontsize=8, frameon=False)
    if sparsity is not None:
        axes[1].plot(xs_sorted, [100 * sparsity[i] for i in order], "o-", color="C3", ms=4)
        axes[1].set_ylabel("% weights exactly 0")
        axes[1].set_ylim(-2, 102)
    axes[-1].set_xlabel(xlabel)
    if best is not None:
        axes[0].set_title(f"best {xlabel} = {best:.3g}", fontsize=9)
    fig.suptitle(title or "Regularization path")
    return _save(fig, path)


def plot_channels(
    report: SlimReport, *, path: PathLike | None = None, title: str | None = None
) -> Figure:
    """Output channels per layer before and after :func:`regoptim.slim`, as horizontal bars.

    Args:
        report: the :class:`regoptim.SlimReport` that ``slim(..., report=True)`` returned.
        path: where to write the figure, if given.
        title: the figure's title.

    Each layer gets a grey bar (channels before) with the kept channels in colour over it,
    labelled ``kept / before``.
    """
    rows = report.rows
    if not rows:
        raise ValueError("plot_channels: the report has no layers")
    fig = _figure(figsize=(6.4, 0.9 + 0.45 * len(rows)), dpi=100, layout="constrained")
    ax = fig.subplots()
    ys = range(len(rows))
    ax.barh(ys, [r.before for r in rows], height=0.6, color="0.85", label="before")
    ax.barh(ys, [r.after for r in rows], height=0.6, color="C0", label="kept")
    widest = max(r.before for r in rows)
    for y, r in zip(ys, rows, strict=True):
        ax.text(r.before + 0.01 * widest, y, f"{r.after} / {r.before}", va="center", fontsize=8)
    ax.set_yticks(list(ys), [f"{r.layer} ({r.kind})" for r in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, 1.15 * widest)
    ax.set_xlabel("output channels")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, frameon=False, loc="lower right")
    share = report.params_after / report.params_before if report.params_before else 1.0
    ax.set_title(
        f"parameters {report.params_before:,} -> {report.params_after:,} ({share:.1%})",
        fontsize=9,
    )
    fig.suptitle(title or "Channels kept per layer")
    return _save(fig, path)
