"""Physically remove the channels whose coupled group is zero (or constant), exactly."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import torch
from torch import Tensor, fx, nn

from regoptim.workflow.structure.graph import ChannelGraph, Consumer, _as_tuple, analyze

__all__ = ["SlimReport", "SlimRow", "slim"]


@dataclass(frozen=True)
class SlimRow:
    """One producer layer: its output channels before and after :func:`slim`."""

    layer: str
    kind: str
    before: int
    after: int

    @property
    def removed(self) -> int:
        """The number of output channels removed."""
        return self.before - self.after


@dataclass
class SlimReport:
    """What :func:`slim` did: one row per producer layer, the parameter counts, and notes on
    channels that were constant but had to stay (or sets that could not be touched)."""

    rows: list[SlimRow]
    params_before: int
    params_after: int
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        width = max([len("layer"), *(len(r.layer) for r in self.rows)])
        kind_width = max([len("type"), *(len(r.kind) for r in self.rows)])
        lines = [f"{'layer':<{width}}  {'type':<{kind_width}}  {'before':>7}  {'kept':>7}  removed"]
        for r in self.rows:
            lines.append(
                f"{r.layer:<{width}}  {r.kind:<{kind_width}}  {r.before:>7}  {r.after:>7}  "
                f"{r.removed:>7}"
            )
        share = self.params_after / self.params_before if self.params_before else 1.0
        lines.append(f"parameters: {self.params_before:,} -> {self.params_after:,} ({share:.1%})")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


class _Capture(fx.Interpreter):
    """Runs the traced copy and keeps (copies of) the values of the named nodes."""

    def __init__(self, gm: fx.GraphModule, names: set[str]) -> None:
        super().__init__(gm)
        self.names = names
        self.values: dict[str, Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.names:
            self.values[n.name] = out.detach().clone()  # an in-place op may change it later
        return out


def _constant_masks(analysis: ChannelGraph) -> dict[str, Tensor]:
    """Per carrying node: which channels are constant over inputs and positions (structurally)."""
    modules = dict(analysis.graph_module.named_modules())
    const: dict[str, Tensor] = {}
    for name, (kind, _, inputs, path) in analysis.rules.items():
        if kind == "produce":
            weight = modules[path].weight.detach()
            const[name] = (weight.flatten(1) == 0).all(1)
        elif kind == "bn":
            bn_weight = modules[path].weight
            gamma_zero = (bn_weight.detach() == 0) if bn_weight is not None else False
            const[name] = const[inputs[0]] | gamma_zero
        elif kind == "merge":
            const[name] = const[inputs[0]] & const[inputs[1]]
        else:
            const[name] = const[inputs[0]]
    return const


def _channel(value: Tensor, consumer: Consumer, c: int) -> Tensor:
    if consumer.kind == "conv":
        return value.select(1, c)
    return value[..., c * consumer.block : (c + 1) * consumer.block]


def _foldable(module: nn.Module, consumer: Consumer) -> bool:
    if consumer.kind == "linear":
        return True
    padding = module.padding
    return padding == "valid" or (not isinstance(padding, str) and all(p == 0 for p in padding))


def _replace(module: nn.Module, name: str, value: Tensor) -> None:
    old = getattr(module, name)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(value.detach().clone(), old.requires_grad))
    else:
        module.register_buffer(name, value.detach().clone())


def _fold(module: nn.Module, consumer: Consumer, c: int, k: Tensor) -> None:
    """Add the contribution of constant input channel ``c`` (value ``k``) to ``module``'s bias."""
    weight = module.weight.detach()
    if consumer.kind == "conv":
        column = weight[:, c].flatten(1).sum(1)
    else:
        column = weight[:, c * consumer.block : (c + 1) * consumer.block].sum(1)
    if module.bias is None:
        module.bias = nn.Parameter(torch.zeros_like(column), module.weight.requires_grad)
    with torch.no_grad():
        module.bias.add_(column * k)


def _slice_out(module: nn.Module, keep: Tensor) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        if getattr(module, name, None) is not None:
            _replace(module, name, getattr(module, name)[keep])
    count = int(keep.numel())
    for attr in ("out_features", "out_channels", "num_features"):
        if hasattr(module, attr):
            setattr(module, attr, count)


def _slice_in(module: nn.Module, keep: Tensor, block: int) -> None:
    columns = (keep[:, None] * block + torch.arange(block, device=keep.device)).flatten()
    _replace(module, "weight", module.weight[:, columns])
    if isinstance(module, nn.Linear):
        module.in_features = int(columns.numel())
    else:
        module.in_channels = int(keep.numel())


def _tolerance(reference: Any) -> dict[str, float]:
    """Norm-wise: the layers after a removed channel sum fewer terms, in another order, so the
    outputs differ by rounding that scales with the largest terms, not with each output."""
    if not isinstance(reference, Tensor) or not reference.is_floating_point():
        return {}
    rtol = min(100 * torch.finfo(reference.dtype).eps, 1e-2)
    scale = float(reference.detach().abs().max()) if reference.numel() else 0.0
    return {"rtol": rtol, "atol": rtol * max(scale, 1.0)}


def _check(model: nn.Module, slimmed: nn.Module, inputs: tuple[Any, ...], reference: Any) -> None:
    """Raise if ``slimmed`` (in eval mode) does not reproduce ``reference``."""
    modes = {name: m.training for name, m in slimmed.named_modules()}
    slimmed.eval()
    try:
        with torch.no_grad():
            torch.testing.assert_close(slimmed(*inputs), reference, **_tolerance(reference))
    except AssertionError as error:
        raise RuntimeError(
            f"slim: the slimmed {type(model).__name__} does not reproduce the original's "
            f"outputs; this is a bug in regoptim.slim, please report it.\n{error}"
        ) from error
    finally:
        for name, m in slimmed.named_modules():
            m.training = modes[name]


def _device(module: nn.Module) -> torch.device:
    tensor = next(iter([*module.parameters(), *module.buffers()]), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@overload
def slim(
    model: nn.Module, example_inputs: Tensor | Sequence[Tensor], *, report: Literal[False] = ...
) -> nn.Module: ...
@overload
def slim(
    model: nn.Module, example_inputs: Tensor | Sequence[Tensor], *, report: Literal[True]
) -> tuple[nn.Module, SlimReport]: ...
def slim(
    model: nn.Module, example_inputs: Tensor | Sequence[Tensor], *, report: bool = False
) -> nn.Module | tuple[nn.Module, SlimReport]:
    """A copy of ``model`` without the channels that cannot affect its outputs.

    The channel sets are those of :func:`regoptim.workflow.structure.analyze` (exactly what
    :func:`regoptim.structured_groups` groups). A channel goes when its value where the next
    layers read it is constant (its producers' weight rows are zero, or a BatchNorm on it has
    ``gamma = 0``): its producers' rows, bias entries and BatchNorm entries (running statistics
    included) and its consumers' input slices (``Linear`` columns, ``h*w`` columns per channel
    after a ``Flatten``, ``Conv`` input channels) are removed. A constant of 0 (a zero group)
    needs nothing more. A nonzero constant (a bias through an activation, a BatchNorm's ``beta``,
    ``sigmoid(0)``) is folded into the consumers' biases when that is exact: a ``Linear``, or a
    ``Conv`` without padding; with zero padding the border outputs would change, so the channel
    stays. ``model`` is not modified; the copy keeps its module classes and training flags.

    The copy's outputs are checked against ``model``'s on ``example_inputs`` in eval mode (float
    tolerances); a mismatch is a bug in slim and raises ``RuntimeError``.

    Args:
        model: an fx-traceable module.
        example_inputs: a tensor or tuple of tensors ``model`` accepts.
        report: also return a :class:`SlimReport` (``print`` it for a table).

    Raises:
        regoptim.workflow.structure.UntraceableModelError: ``model`` cannot be traced.
    """
    inputs = _as_tuple(example_inputs)
    slimmed = copy.deepcopy(model)
    analysis = analyze(slimmed, inputs)
    gm_modules = dict(analysis.graph_module.named_modules())
    const = _constant_masks(analysis)
    wanted = {c.node for s in analysis.sets if s.removable for c in s.consumers}
    capture = _Capture(analysis.graph_module, wanted)
    with torch.no_grad():
        reference = capture.run(*inputs)

    modules = dict(slimmed.named_modules())
    notes: list[str] = []
    out_keep: dict[str, Tensor] = {}
    in_keep: list[tuple[str, Tensor, int]] = []
    for channel_set in analysis.sets:
        if not channel_set.removable:
            continue
        candidates = torch.ones(channel_set.channels, dtype=torch.bool)
        for consumer in channel_set.consumers:
            candidates &= const[consumer.node].cpu()
        removed: list[int] = []
        folds: list[tuple[int, list[Tensor]]] = []
        layers = "/".join(channel_set.producers)
        for c in candidates.nonzero().flatten().tolist():
            values = []
            for consumer in channel_set.consumers:
                entries = _channel(capture.values[consumer.node], consumer, c).flatten()
                values.append(entries[0] if bool((entries == entries[0]).all()) else None)
            if any(v is None for v in values):
                notes.append(f"{layers} channel {c}: not constant where it is read; kept")
            elif all(bool(v == 0) for v in values):
                removed.append(c)
            elif all(_foldable(gm_modules[s.module], s) for s in channel_set.consumers):
                folds.append((c, values))
                removed.append(c)
            else:
                notes.append(
                    f"{layers} channel {c}: constant but nonzero, read by a padded conv; kept"
                )
        if len(removed) == channel_set.channels:  # keep one channel: no zero-width layers
            last = removed.pop()
            folds = [(c, values) for c, values in folds if c != last]
        for c, values in folds:
            for consumer, k in zip(channel_set.consumers, values, strict=True):
                _fold(modules[consumer.module], consumer, c, k)
        gone = set(removed)
        keep = torch.tensor([c for c in range(channel_set.channels) if c not in gone])
        for path in channel_set.producers + channel_set.followers:
            out_keep[path] = keep
        in_keep += [(c.module, keep, c.block) for c in channel_set.consumers]
    for path, keep in out_keep.items():
        _slice_out(modules[path], keep.to(_device(modules[path])))
    for path, keep, block in in_keep:
        _slice_in(modules[path], keep.to(_device(modules[path])), block)

    for channel_set in analysis.sets:
        if channel_set.reasons:
            reasons = "; ".join(dict.fromkeys(channel_set.reasons))
            notes.append(f"{'/'.join(channel_set.producers)} untouched: {reasons}")
    _check(model, slimmed, inputs, reference)
    if not report:
        return slimmed
    rows = [
        SlimRow(
            path,
            type(modules[path]).__name__,
            channel_set.channels,
            int(out_keep[path].numel()) if path in out_keep else channel_set.channels,
        )
        for channel_set in analysis.sets
        for path in channel_set.producers
    ]
    return slimmed, SlimReport(rows, _count(model), _count(slimmed), notes)
