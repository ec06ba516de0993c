"""The one graph analysis behind :func:`structured_groups` and :func:`slim`.

:func:`analyze` traces a model with :mod:`torch.fx`, propagates the example inputs' shapes
(:class:`~torch.fx.passes.shape_prop.ShapeProp`) and follows every *channel set*: the output
channels of a producer (``nn.Linear``, or ``nn.Conv1d/2d/3d`` with ``groups=1``), through the ops
that keep channels apart (BatchNorm, elementwise activations, dropout, pooling, flatten, scalar
arithmetic) to its consumers (the next ``nn.Linear``/``nn.Conv*``). A residual ``a + b`` merges
the sets of ``a`` and ``b``: a channel of the sum can go only if it goes in every branch.

A set is *removable* when every use of every tensor that carries it is understood. Anything else
(a LayerNorm/GroupNorm, which mixes the features it normalises; the model's output; an
unsupported op; a module called twice; an add with an untracked tensor) records a reason and
leaves the set alone, both for grouping and for slimming.
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

__all__ = ["ChannelGraph", "ChannelSet", "Consumer", "UntraceableModelError", "analyze", "trace"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_MIXING_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm)
_ELEMENTWISE_MODULES = (
    *(nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish),
    *(nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign),
    *(nn.Tanhshrink, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d),
)
_POOL_MODULES = (
    *(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d),
    *(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d),
    *(nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d),
)
_ELEMENTWISE_FUNCTIONS = {
    *(F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardtanh),
    *(F.hardswish, F.hardsigmoid, F.softplus, F.softsign, F.dropout, F.dropout1d, F.dropout2d),
    *(torch.relu, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh),
}
_POOL_FUNCTIONS = {
    *(F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d),
    *(F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d),
    *(F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d),
}
_ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone"}  # not in place
_SCALAR_OPS = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.mul}
_MERGE_OPS = {operator.add, operator.sub, operator.iadd, torch.add}


class UntraceableModelError(RuntimeError):
    """``torch.fx`` could not trace the model; the message names the module that stopped it."""


@dataclass(frozen=True)
class Consumer:
    """A layer that reads a channel set: its input slices go when a channel goes.

    ``block`` is the number of input columns per channel: ``h*w`` for a ``Flatten -> Linear``,
    1 otherwise. ``node`` names the fx node whose value the layer reads.
    """

    module: str
    kind: str  # "linear" or "conv"
    node: str
    block: int = 1


@dataclass
class ChannelSet:
    """One coupled set of channels: removing channel ``c`` edits every layer listed here."""

    channels: int
    producers: list[str] = field(default_factory=list)
    followers: list[str] = field(default_factory=list)  # BatchNorm layers on the channels
    consumers: list[Consumer] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)  # why it cannot be removed
    reaches_output: bool = False

    @property
    def removable(self) -> bool:
        """Whether every use of the set is understood (so it may be grouped and slimmed)."""
        return not self.reasons and not self.reaches_output and bool(self.consumers)

    def param_names(self, model: nn.Module) -> list[str]:
        """The names of the parameters of the producers and followers, in that order."""
        names = []
        for path in self.producers + self.followers:
            module = model.get_submodule(path)
            for own in ("weight", "bias"):
                if isinstance(getattr(module, own, None), nn.Parameter):
                    names.append(f"{path}.{own}" if path else own)
        return names


@dataclass
class ChannelGraph:
    """The result of :func:`analyze`.

    ``rules`` maps each fx node that carries a set to ``(kind, set index, inputs, module)``:
    kind ``"produce"`` (a producer's output), ``"bn"``, ``"pass"`` (channels unchanged) or
    ``"merge"`` (a residual add); ``inputs`` are the names of the carrying input nodes.
    """

    graph_module: fx.GraphModule
    sets: list[ChannelSet]
    rules: dict[str, tuple[str, int, tuple[str, ...], str | None]]


class _PathTracer(fx.Tracer):
    """A tracer that remembers the innermost module whose tracing failed."""

    def __init__(self) -> None:
        super().__init__()
        self.failed_in: str | None = None

    def call_module(
        self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        path = self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = f"'{path}' ({type(m).__name__})"
            raise


def trace(model: nn.Module) -> fx.GraphModule:
    """Trace ``model`` with :mod:`torch.fx`; on failure name the module that stopped the trace.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        UntraceableModelError: the trace failed (data-dependent control flow, iteration over a
            tensor, ...); the message names the innermost module being traced.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    tracer = _PathTracer()
    try:
        graph = tracer.trace(model)
    except Exception as error:
        where = tracer.failed_in or f"the forward of {type(model).__name__} itself"
        raise UntraceableModelError(
            f"torch.fx cannot trace {type(model).__name__}: module {where} stopped the trace "
            f"({type(error).__name__}: {error}). Make that module traceable (no control flow on "
            "tensor values) to use structured_groups/slim."
        ) from error
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _as_tuple(example_inputs: Tensor | Sequence[Tensor]) -> tuple[Any, ...]:
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise TypeError(
        f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}"
    )


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


class _Sets:
    """Union-find over channel sets, each root holding the merged :class:`ChannelSet`."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.data: list[ChannelSet] = []

    def new(self, channels: int) -> int:
        self.parent.append(len(self.parent))
        self.data.append(ChannelSet(channels))
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def get(self, i: int) -> ChannelSet:
        return self.data[self.find(i)]

    def union(self, i: int, j: int) -> None:
        i, j = self.find(i), self.find(j)
        if i == j:
            return
        a, b = self.data[i], self.data[j]
        a.producers += b.producers
        a.followers += b.followers
        a.consumers += b.consumers
        a.reasons += b.reasons
        a.reaches_output |= b.reaches_output
        self.parent[j] = i


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"module '{node.target}' ({type(modules[str(node.target)]).__name__})"
    target = getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {target}"


def _flatten_args(node: fx.Node) -> tuple[int, int] | None:
    """(start_dim, end_dim) if ``node`` flattens (or views as ``(N, -1)``) its input, else None."""
    args = list(node.args[1:])
    kwargs = node.kwargs
    if (node.op == "call_function" and node.target is torch.flatten) or (
        node.op == "call_method" and node.target == "flatten"
    ):
        start = kwargs.get("start_dim", args[0] if args else 0)
        end = kwargs.get("end_dim", args[1] if len(args) > 1 else -1)
        return (start, end) if isinstance(start, int) and isinstance(end, int) else None
    if node.op == "call_method" and node.target in ("view", "reshape") and not kwargs:
        shape = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
        if len(shape) == 2 and shape[1] == -1:
            return (1, -1)
    return None


def analyze(model: nn.Module, example_inputs: Tensor | Sequence[Tensor]) -> ChannelGraph:
    """Trace a copy of ``model`` and find its channel sets (``model`` itself is not run).

    Args:
        model: an fx-traceable module.
        example_inputs: a tensor or a tuple of tensors, as ``model(*example_inputs)`` takes;
            used for shape propagation in eval mode, without gradients.

    Raises:
        UntraceableModelError: see :func:`trace`.
    """
    inputs = _as_tuple(example_inputs)
    gm = trace(copy.deepcopy(model))
    gm.eval()
    with torch.no_grad():
        ShapeProp(gm).propagate(*inputs)
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    sets = _Sets()
    tags: dict[fx.Node, tuple[int, int, int | None]] = {}  # node -> (set, channel dim, block)
    rules: dict[str, tuple[str, int, tuple[str, ...], str | None]] = {}

    def block(tag: tuple[int, int, int | None], reason: str) -> None:
        sets.get(tag[0]).reasons.append(reason)

    def pass_through(node: fx.Node, tag: tuple[int, int, int | None], kind: str = "pass") -> None:
        tags[node] = tag
        rules[node.name] = (kind, tag[0], (node.all_input_nodes[0].name,), None)

    for node in gm.graph.nodes:
        tagged = [a for a in node.all_input_nodes if a in tags]
        if node.op == "output":
            for a in tagged:
                sets.get(tags[a][0]).reaches_output = True
            continue
        if node.op in ("placeholder", "get_attr"):
            continue
        module = modules[node.target] if node.op == "call_module" else None
        path = str(node.target)
        first = node.args[0] if node.args else None
        tag = tags.get(first) if isinstance(first, fx.Node) else None
        only_first = tag is not None and tagged == [first]
        shape = _shape(node)
        in_shape = _shape(first) if isinstance(first, fx.Node) else None
        what = _describe(node, modules)
        twice = module is not None and calls[path] > 1

        if isinstance(module, (nn.Linear, *_CONV)):
            is_conv = isinstance(module, _CONV)
            if only_first:
                ndim = len(in_shape) if in_shape else 0
                if twice:
                    block(tag, f"read by {what}, which is called more than once")
                elif is_conv and (module.groups != 1 or tag[1] != 1 or tag[2] is not None):
                    block(tag, f"read by {what} in a way slim cannot slice (groups or layout)")
                elif not is_conv and tag[1] != ndim - 1:
                    block(tag, f"read by {what} along a dimension that is not the channels")
                else:
                    kind = "conv" if is_conv else "linear"
                    sets.get(tag[0]).consumers.append(Consumer(path, kind, first.name, tag[2] or 1))
            else:
                for a in tagged:
                    block(tags[a], f"used by {what}")
            if shape is None or (is_conv and module.groups != 1):
                continue
            index = sets.new(shape[1] if is_conv else shape[-1])
            sets.get(index).producers.append(path)
            if twice:
                block((index, 0, None), f"produced by {what}, which is called more than once")
            tags[node] = (index, 1 if is_conv else len(shape) - 1, None)
            rules[node.name] = ("produce", index, (), path)
        elif not tagged:
            continue
        elif node.target in _MERGE_OPS and all(isinstance(a, fx.Node) for a in node.args[:2]):
            if len(node.args) == 2 and len(tagged) == 2:
                a, b = node.args
                ta, tb = tags[a], tags[b]
                if ta[1:] == tb[1:] and ta[2] is None and _shape(a) == _shape(b) == shape:
                    sets.union(ta[0], tb[0])
                    tags[node] = ta
                    rules[node.name] = ("merge", ta[0], (a.name, b.name), None)
                    continue
            other = (
                "a tensor of another layout"
                if len(tagged) == 2
                else "a tensor that no prunable layer produces"
            )
            for a in tagged:
                block(tags[a], f"combined by {what} with {other}")
        elif not only_first:
            for a in tagged:
                block(tags[a], f"used by {what}")
        elif isinstance(module, _BN):
            if twice or tag[1] != 1 or tag[2] is not None:
                block(tag, f"normalised by {what} in a way slim cannot slice")
            else:
                sets.get(tag[0]).followers.append(path)
                pass_through(node, tag, "bn")
                rules[node.name] = ("bn", tag[0], (first.name,), path)
        elif isinstance(module, _MIXING_NORMS):
            block(tag, f"normalised by {what}, which mixes the channels (cannot remove exactly)")
        elif (
            isinstance(module, _ELEMENTWISE_MODULES)
            or (node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS)
            or (node.op == "call_method" and node.target in _ELEMENTWISE_METHODS)
        ):
            pass_through(node, tag)
        elif isinstance(module, _POOL_MODULES) or (
            node.op == "call_function" and node.target in _POOL_FUNCTIONS
        ):
            if tag[1] == 1 and tag[2] is None and shape is not None and shape[1] == in_shape[1]:
                pass_through(node, tag)
            else:
                block(tag, f"pooled by {what} across the channels")
        elif node.op == "call_function" and node.target in _SCALAR_OPS and len(node.args) == 2:
            if isinstance(node.args[1], (int, float)) and shape == in_shape:
                pass_through(node, tag)
            else:
                block(tag, f"used by {what}")
        elif node.op == "call_method" and node.target == "size" and node.args[1:] == (0,):
            continue
        elif isinstance(module, nn.Flatten) or _flatten_args(node) is not None:
            start, end = (
                (module.start_dim, module.end_dim) if module is not None else _flatten_args(node)
            )
            ndim = len(in_shape) if in_shape else 0
            whole = start in (1, 1 - ndim) and end in (-1, ndim - 1)  # (N, ...) -> (N, -1)
            if ndim >= 2 and whole and tag[1] == 1 and (ndim == 2 or not tag[2]):
                hw = math.prod(in_shape[2:]) if ndim > 2 else tag[2]
                pass_through(node, (tag[0], 1, hw))
            else:
                block(tag, f"reshaped by {what}")
        else:
            block(tag, f"used by {what}")

    roots = sorted({sets.find(i) for i in range(len(sets.parent))})
    index_of = {root: k for k, root in enumerate(roots)}
    final_rules = {
        name: (kind, index_of[sets.find(s)], ins, mod)
        for name, (kind, s, ins, mod) in rules.items()
    }
    return ChannelGraph(gm, [sets.data[r] for r in roots], final_rules)
