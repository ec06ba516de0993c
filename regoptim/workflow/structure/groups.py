"""Structured (group-lasso) parameter groups: one group per removable channel set."""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor, nn

from regoptim.workflow.groups import _check_strength, param_groups
from regoptim.workflow.structure.graph import ChannelSet, analyze

__all__ = ["structured_groups"]


def _ungrouped_reason(channel_set: ChannelSet) -> str | None:
    """Why ``channel_set`` is left ungrouped; ``None`` for the model's output layer (by design)."""
    if channel_set.reasons:
        return "; ".join(dict.fromkeys(channel_set.reasons))
    if channel_set.reaches_output:
        return None
    if not channel_set.consumers:
        return "its output is read by no layer"
    return None


def structured_groups(
    model: nn.Module,
    example_inputs: Tensor | Sequence[Tensor],
    *,
    group_l1: float,
    l1: float = 0.0,
    weight_decay: float = 0.0,
    exclude: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """Param groups with one group lasso group per prunable channel set of ``model``.

    The model is traced with :mod:`torch.fx` (see :func:`regoptim.workflow.structure.analyze`).
    Every removable channel set becomes one param group: the producers' weights and biases
    (``nn.Linear`` rows, ``nn.Conv*`` filters) and the affine entries of the BatchNorms that
    follow them, with ``group_axes`` 0 for each, so that channel ``c`` of every tensor is group
    ``c``. The producers feeding a residual add share one param group: a channel of the sum can
    go only if it is zero in every branch. A group that is exactly zero makes the channel's
    output exactly zero, and :func:`regoptim.slim` removes it.

    Left ungrouped, and placed by :func:`regoptim.param_groups` like every other parameter:

    * the model's output layer (its output reaches the model's output);
    * a set whose channels are normalised by a LayerNorm/GroupNorm (which mixes the features, so
      no feature can be removed exactly), read by an unsupported op, added to a tensor that no
      prunable layer produces, or produced by a module called twice. Each such set is reported
      in one ``UserWarning`` that names its layers and the reason;
    * a set with a parameter that is frozen or matched by ``exclude``.

    Args:
        model: an fx-traceable module.
        example_inputs: a tensor or tuple of tensors ``model`` accepts (for shape propagation).
        group_l1: the group lasso strength of every structured group.
        l1: the elementwise L1 strength of the structured groups and of the weight matrices
            placed by :func:`regoptim.param_groups`.
        weight_decay: as ``l1``: structured groups and the other weight matrices; biases, norms
            and embeddings outside structured groups get 0.
        exclude: parameter names or ``fnmatch`` patterns exempted as in
            :func:`regoptim.param_groups` (a channel set holding one stays ungrouped).

    Returns:
        The structured groups (``params``, ``group_l1``, ``group_axes``, ``l1``,
        ``weight_decay``), then :func:`regoptim.param_groups`' groups for the remaining
        parameters. ``torch.optim`` optimizers accept (and ignore) the extra keys.

    Raises:
        TypeError / ValueError: a bad strength, model or ``exclude`` entry (as ``param_groups``).
        regoptim.workflow.structure.UntraceableModelError: ``model`` cannot be traced.
    """
    _check_strength("group_l1", group_l1)
    if group_l1 is None:
        raise TypeError("structured_groups: group_l1 must be a float, got None")
    patterns = [exclude] if isinstance(exclude, str) else list(exclude)
    rest = param_groups(model, weight_decay, l1, exclude=patterns)  # validates model & exclude
    analysis = analyze(model, example_inputs)
    named = dict(model.named_parameters())

    structured: list[dict[str, Any]] = []
    skipped: list[str] = []
    for channel_set in analysis.sets:
        layers = ", ".join(f"'{p}'" for p in channel_set.producers + channel_set.followers)
        reason = _ungrouped_reason(channel_set)
        if reason is not None:
            skipped.append(f"{layers}: {reason}")
            continue
        if not channel_set.removable:
            continue
        names = channel_set.param_names(model)
        excluded = [n for n in names if any(n == p or fnmatch.fnmatchcase(n, p) for p in patterns)]
        if excluded or not all(named[n].requires_grad for n in names):
            continue
        structured.append(
            {
                "params": [named[n] for n in names],
                "group_l1": float(group_l1),
                "group_axes": [0] * len(names),
                "l1": float(l1),
                "weight_decay": float(weight_decay),
            }
        )
    if skipped:
        warnings.warn(
            "structured_groups: these channel sets stay ungrouped (their channels cannot be "
            "removed exactly):\n  " + "\n  ".join(skipped),
            UserWarning,
            stacklevel=2,
        )
    taken = {id(p) for group in structured for p in group["params"]}
    for group in rest:
        group["params"] = [p for p in group["params"] if id(p) not in taken]
    return structured + [group for group in rest if group["params"]]
