"""Parameter groups that regularize the weights and exempt everything else.

:func:`param_groups` splits a model's trainable parameters into (at most) two optimizer groups:

* **regularized**: weight matrices and convolution kernels (every parameter with ``ndim >= 2``
  that is not exempt below). It gets the ``weight_decay`` and ``l1`` you pass.
* **exempt**: gets ``weight_decay=0.0`` and ``l1=0.0`` explicitly, so an optimizer-level default
  (``ProxAdamW``'s ``weight_decay=1e-2``, ``ProxSGD(..., l1=...)``) cannot leak into it. By default
  it holds

  - every bias (a parameter whose own name is ``bias`` or ends in ``_bias``, as
    ``nn.MultiheadAttention``'s ``in_proj_bias``), whatever its shape;
  - every parameter with ``ndim <= 1``: norm-layer scales and shifts (BatchNorm, LayerNorm,
    GroupNorm, RMSNorm), learned scalars, per-channel gains. Shrinking a norm layer's scale
    towards 0 does not simplify the model, it only rescales the next layer;
  - the weight of every ``nn.Embedding`` / ``nn.EmbeddingBag``. An embedding is a lookup
    table, not a linear map: an L1 prox or a decay step shrinks *every* row on every step
    (the rows of tokens absent from the batch included), which drives the vectors of rare
    tokens to zero. This follows minGPT; pass ``exempt_embeddings=False`` to regularize
    embeddings like any other matrix (nanoGPT's choice);
  - the names returned by ``no_weight_decay()`` on the model or on any submodule (the ``timm``
    convention: a set of parameter names relative to the module that defines the method,
    e.g. ``{"pos_embed", "cls_token"}``). Names there that match no parameter are ignored, as
    timm does;
  - the names listed in ``exclude`` (exact names or ``fnmatch`` patterns such as
    ``"*.pos_embed"``). An ``exclude`` entry that matches no parameter is an error: it is
    almost always a typo.

Parameters with ``requires_grad=False`` are left out. Tied parameters appear once.

The groups are plain dicts (``{"params": [...], "weight_decay": ..., "l1": ...}``) that every
regoptim optimizer and every ``torch.optim`` optimizer accepts. ``torch.optim`` optimizers keep
the ``l1`` key in ``param_groups`` and ``state_dict()`` but **ignore** it: only regoptim's
optimizers apply L1.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

__all__ = ["param_groups"]


def _check_strength(name: str, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"param_groups: {name} must be a float or None, got {type(value).__name__}")
    if not (value >= 0.0 and math.isfinite(value)):  # also rejects NaN
        raise ValueError(f"param_groups: {name} must be a finite number >= 0, got {value}")


def _no_weight_decay_names(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for prefix, module in model.named_modules():
        method = getattr(module, "no_weight_decay", None)
        if not callable(method):
            continue
        result = method()
        if isinstance(result, str):
            result = {result}
        for name in result:
            names.add(f"{prefix}.{name}" if prefix else str(name))
    return names


def _is_bias(name: str) -> bool:
    own = name.rsplit(".", 1)[-1]
    return own == "bias" or own.endswith("_bias")  # e.g. MultiheadAttention's in_proj_bias


def _embedding_weights(model: nn.Module) -> set[int]:
    return {
        id(m.weight)
        for m in model.modules()
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and isinstance(m.weight, Tensor)
    }


def param_groups(
    model: nn.Module,
    weight_decay: float | None = None,
    l1: float | None = None,
    *,
    exclude: Iterable[str] = (),
    exempt_1d: bool = True,
    exempt_embeddings: bool = True,
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into a regularized group and an exempt group.

    Args:
        model: the module whose ``named_parameters()`` are grouped.
        weight_decay: the weight decay of the regularized group. ``None`` (default) leaves the
            key out of that group, so the optimizer's own default applies to it.
        l1: the L1 strength of the regularized group; ``None`` leaves the key out, as above.
        exclude: parameter names (or ``fnmatch`` patterns) to exempt as well. Each entry must
            match at least one parameter.
        exempt_1d: exempt every parameter with ``ndim <= 1`` (default ``True``). Biases are
            exempt regardless.
        exempt_embeddings: exempt ``nn.Embedding``/``nn.EmbeddingBag`` weights (default
            ``True``).

    Returns:
        ``[regularized, exempt]`` as ``{"params": [...], ...}`` dicts, an empty group omitted.
        Pass the list straight to an optimizer::

            opt = regoptim.ProxSGD(regoptim.param_groups(model, weight_decay=5e-4, l1=1e-4),
                                   lr=0.1, momentum=0.9)

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or a strength is not a number.
        ValueError: a strength is negative or not finite, an ``exclude`` entry matches no
            parameter, or the model has no trainable parameter.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"param_groups: model must be an nn.Module, got {type(model).__name__}")
    _check_strength("weight_decay", weight_decay)
    _check_strength("l1", l1)
    if isinstance(exclude, str):
        exclude = [exclude]
    patterns = list(exclude)
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(
                f"param_groups: exclude must hold parameter names, got {type(pattern).__name__}"
            )

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("param_groups: model has no trainable parameters")

    unmatched = [
        pattern
        for pattern in patterns
        if not any(n == pattern or fnmatch.fnmatchcase(n, pattern) for n, _ in named)
    ]
    if unmatched:
        raise ValueError(f"param_groups: exclude entries match no parameter: {unmatched}")

    no_wd = _no_weight_decay_names(model)
    embeddings = _embedding_weights(model) if exempt_embeddings else set()

    def exempt(name: str, p: Tensor) -> bool:
        return (
            _is_bias(name)
            or (exempt_1d and p.ndim <= 1)
            or id(p) in embeddings
            or name in no_wd
            or any(name == pat or fnmatch.fnmatchcase(name, pat) for pat in patterns)
        )

    regularized: dict[str, Any] = {"params": [p for n, p in named if not exempt(n, p)]}
    if weight_decay is not None:
        regularized["weight_decay"] = float(weight_decay)
    if l1 is not None:
        regularized["l1"] = float(l1)
    exempted: dict[str, Any] = {
        "params": [p for n, p in named if exempt(n, p)],
        "weight_decay": 0.0,
        "l1": 0.0,
    }
    return [group for group in (regularized, exempted) if group["params"]]
