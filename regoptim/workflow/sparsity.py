"""Count exact zeros (and near-zeros) per parameter and overall.

``regoptim.sparsity(model)`` returns a :class:`SparsityReport`: a small table that prints well
and whose numbers are plain attributes. After ``regoptim compare``'s ProxSGD run with ``l1=4e-3``
(weights only: ``sparsity([(n, p) for n, p in model.named_parameters() if p.ndim > 1])``)::

    >>> print(report)
    parameter   shape      numel  zeros  zero %  |w|<=0.001  near %
    fc1.weight  (256, 64)  16384  14262   87.0%       14713   89.8%
    fc2.weight  (10, 256)   2560   1992   77.8%        2062   80.5%
    total                  18944  16254   85.8%       16775   88.6%
    >>> report
    SparsityReport(tensors=2, numel=18944, zeros=16254 (85.8%), near_zeros=16775 (88.6%), atol=0.001)
    >>> report.fraction, report["fc1.weight"].zeros
    (0.858..., 14262)

With ``optimizer=`` it also reports structured sparsity: for each param group with group lasso
(``group_l1 > 0``), how many of its groups (see :func:`regoptim.count_zero_groups`) are exactly
zero, in ``report.groups`` and, when printed, as a second table with the columns
``param group  parameters  groups  zero groups  zero %``.

"Exact zero" means ``w == 0`` (``-0.0`` included). "Near zero" means ``|w| <= atol`` and
includes the exact zeros, so ``near_zeros >= zeros``; the gap between the two is what an L1
term in the loss leaves behind (tiny, never exactly zero, weights). NaN counts as neither.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .sparsity_target import _group_axes, count_zero_groups

__all__ = ["GroupSparsityRow", "SparsityReport", "SparsityRow", "sparsity"]

ModelOrParams = nn.Module | Tensor | Mapping[str, Tensor] | Iterable[Tensor | tuple[str, Tensor]]


@dataclass(frozen=True)
class SparsityRow:
    """The counts of one tensor."""

    name: str
    shape: tuple[int, ...]
    numel: int
    zeros: int
    near_zeros: int

    @property
    def fraction(self) -> float:
        """Exact zeros / numel (``0.0`` for an empty tensor)."""
        return self.zeros / self.numel if self.numel else 0.0

    @property
    def near_fraction(self) -> float:
        """Near zeros (``|w| <= atol``) / numel."""
        return self.near_zeros / self.numel if self.numel else 0.0


@dataclass(frozen=True)
class GroupSparsityRow:
    """The zero groups of one param group with group lasso."""

    index: int  # in ``optimizer.param_groups``
    params: tuple[str, ...]  # the parameters' names (``param_groups[i][j]`` when unnamed)
    groups: int
    zero_groups: int

    @property
    def fraction(self) -> float:
        """Zero groups / groups (``0.0`` without groups)."""
        return self.zero_groups / self.groups if self.groups else 0.0


@dataclass(frozen=True)
class SparsityReport:
    """Per-tensor rows and global totals; iterate it, index it by name, print it. ``groups``: one
    row per param group with group lasso, when ``sparsity`` was given the optimizer."""

    rows: tuple[SparsityRow, ...]
    atol: float
    groups: tuple[GroupSparsityRow, ...] = ()

    @property
    def numel(self) -> int:
        return sum(r.numel for r in self.rows)

    @property
    def zeros(self) -> int:
        return sum(r.zeros for r in self.rows)

    @property
    def near_zeros(self) -> int:
        return sum(r.near_zeros for r in self.rows)

    @property
    def fraction(self) -> float:
        """Global exact-zero fraction (over all entries of all tensors)."""
        n = self.numel
        return self.zeros / n if n else 0.0

    @property
    def near_fraction(self) -> float:
        """Global near-zero fraction (``|w| <= atol``)."""
        n = self.numel
        return self.near_zeros / n if n else 0.0

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[SparsityRow]:
        return iter(self.rows)

    def __getitem__(self, name: str) -> SparsityRow:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: totals, ``atol`` and one entry per tensor."""
        return {
            "atol": self.atol,
            "numel": self.numel,
            "zeros": self.zeros,
            "near_zeros": self.near_zeros,
            "fraction": self.fraction,
            "near_fraction": self.near_fraction,
            "params": [
                {
                    "name": r.name,
                    "shape": list(r.shape),
                    "numel": r.numel,
                    "zeros": r.zeros,
                    "near_zeros": r.near_zeros,
                    "fraction": r.fraction,
                    "near_fraction": r.near_fraction,
                }
                for r in self.rows
            ],
            "groups": [
                {
                    "index": r.index,
                    "params": list(r.params),
                    "groups": r.groups,
                    "zero_groups": r.zero_groups,
                    "fraction": r.fraction,
                }
                for r in self.groups
            ],
        }

    def __str__(self) -> str:
        header = ("parameter", "shape", "numel", "zeros", "zero %", f"|w|<={self.atol:g}", "near %")
        body = [
            (
                r.name,
                str(tuple(r.shape)),
                str(r.numel),
                str(r.zeros),
                f"{100 * r.fraction:.1f}%",
                str(r.near_zeros),
                f"{100 * r.near_fraction:.1f}%",
            )
            for r in self.rows
        ]
        total = (
            "total",
            "",
            str(self.numel),
            str(self.zeros),
            f"{100 * self.fraction:.1f}%",
            str(self.near_zeros),
            f"{100 * self.near_fraction:.1f}%",
        )
        table = [header, *body, total]
        widths = [max(len(line[i]) for line in table) for i in range(len(header))]

        def fmt(line: tuple[str, ...]) -> str:
            cells = [line[0].ljust(widths[0]), line[1].ljust(widths[1])]
            cells += [cell.rjust(w) for cell, w in zip(line[2:], widths[2:], strict=True)]
            return "  ".join(cells).rstrip()

        text = "\n".join(fmt(line) for line in table)
        return text + ("\n\n" + self._groups_table() if self.groups else "")

    def _groups_table(self) -> str:
        header = ("param group", "parameters", "groups", "zero groups", "zero %")
        table = [header] + [
            (
                str(r.index),
                ", ".join(r.params),
                str(r.groups),
                str(r.zero_groups),
                f"{100 * r.fraction:.1f}%",
            )
            for r in self.groups
        ]
        widths = [max(len(line[i]) for line in table) for i in range(len(header))]
        lines = []
        for line in table:
            cells = [line[0].ljust(widths[0]), line[1].ljust(widths[1])]
            cells += [cell.rjust(w) for cell, w in zip(line[2:], widths[2:], strict=True)]
            lines.append("  ".join(cells).rstrip())
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"SparsityReport(tensors={len(self.rows)}, numel={self.numel}, "
            f"zeros={self.zeros} ({100 * self.fraction:.1f}%), "
            f"near_zeros={self.near_zeros} ({100 * self.near_fraction:.1f}%), atol={self.atol:g})"
        )


def _named_tensors(obj: ModelOrParams) -> list[tuple[str, Tensor]]:
    if isinstance(obj, nn.Module):
        return list(obj.named_parameters())
    if isinstance(obj, Tensor):
        return [("0", obj)]
    if isinstance(obj, Mapping):
        items = list(obj.items())
    else:
        try:
            items = list(obj)
        except TypeError:
            raise TypeError(
                "sparsity: model_or_params must be an nn.Module, a tensor, a mapping of names to "
                f"tensors or an iterable of tensors or (name, tensor) pairs, got {type(obj).__name__}"
            ) from None
        items = [
            item if isinstance(item, tuple) else (str(i), item) for i, item in enumerate(items)
        ]
    out: list[tuple[str, Tensor]] = []
    for name, t in items:
        if not isinstance(t, Tensor):
            raise TypeError(f"sparsity: expected tensors, got {type(t).__name__} for {name!r}")
        # a state_dict also holds integer buffers (BatchNorm's num_batches_tracked): skip them
        if t.is_floating_point() or t.is_complex():
            out.append((str(name), t))
    return out


@torch.no_grad()
def sparsity(
    model_or_params: ModelOrParams, atol: float = 1e-3, *, optimizer: Optimizer | None = None
) -> SparsityReport:
    """Count exact zeros and near zeros (``|w| <= atol``) per tensor and overall.

    Args:
        model_or_params: an ``nn.Module`` (its ``named_parameters()``), a ``state_dict``-like
            mapping of names to tensors, an iterable of ``(name, tensor)`` pairs (e.g. a
            filtered ``named_parameters()``), an iterable of tensors (named ``"0"``, ``"1"``, ...)
            or one tensor. Non-floating tensors in a mapping are skipped.
        atol: the near-zero tolerance, ``>= 0`` (default ``1e-3``). ``atol=0`` makes
            near-zeros the exact zeros.
        optimizer: if given, also count the zero groups of each of its param groups with
            ``group_l1 > 0`` (axes from ``group_axes``) into ``report.groups``; parameters are
            named after ``model_or_params`` where they are found there.

    Returns:
        A :class:`SparsityReport`.
    """
    if isinstance(atol, bool) or not isinstance(atol, (int, float)) or not atol >= 0.0:
        raise ValueError(f"sparsity: atol must be a number >= 0, got {atol!r}")
    named = _named_tensors(model_or_params)
    counts: list[Tensor] = []
    for _, t in named:
        t = t.detach()
        mag = t.abs()
        counts.append(torch.stack([(mag == 0).sum(), (mag <= atol).sum()]).cpu())
    flat = torch.stack(counts).tolist() if counts else []
    rows = tuple(
        SparsityRow(name, tuple(t.shape), t.numel(), int(z), int(nz))
        for (name, t), (z, nz) in zip(named, flat, strict=True)
    )
    groups = () if optimizer is None else _group_rows(optimizer, named)
    return SparsityReport(rows=rows, atol=float(atol), groups=groups)


def _group_rows(
    optimizer: Optimizer, named: list[tuple[str, Tensor]]
) -> tuple[GroupSparsityRow, ...]:
    names = {id(t): name for name, t in named}
    out = []
    for i, group in enumerate(optimizer.param_groups):
        if not group.get("group_l1", 0.0):
            continue
        params = group["params"]
        axes = _group_axes(group, len(params), f"sparsity: param_groups[{i}]")
        zero, n = count_zero_groups(params, axes)
        labels = tuple(names.get(id(p), f"param_groups[{i}][{j}]") for j, p in enumerate(params))
        out.append(GroupSparsityRow(i, labels, n, zero))
    return tuple(out)
