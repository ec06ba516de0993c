"""Schedules for the regularization strengths: any torch LR scheduler on ``l1``, ``weight_decay``, ...

:func:`schedule` runs an unmodified ``torch.optim.lr_scheduler`` class on one param-group key
instead of ``lr`` (:class:`regoptim.SparsityTarget`, in ``sparsity_target.py``, steers a strength to
a fraction of zeros instead). Both follow torch's LR-scheduler protocol: ``step()`` after
``optimizer.step()``, ``state_dict()`` / ``load_state_dict()``. They are clients of the optimizers
(they only read and write ``param_groups``) and work with any ``torch.optim.Optimizer``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any, SupportsFloat

from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

__all__ = ["ParamGroupSchedule", "schedule"]


# --- schedule: torch's LR schedulers on another key -----------------------------------------------


class _KeyView(MutableMapping[str, Any]):
    """A param group (or ``defaults``) as an LR scheduler sees it when it drives ``key``.

    ``"lr"`` is ``group[key]``; every other ``"<name>_lr"`` the scheduler keeps in the group
    (``initial_lr``, OneCycleLR's ``max_lr``/``min_lr``) is ``group["<name>_<key>"]``, so it never
    collides with an LR scheduler on the same optimizer. Any other key (momentum cycling) is refused.
    """

    __slots__ = ("_group", "_key")

    def __init__(self, group: dict[str, Any], key: str) -> None:
        self._group = group
        self._key = key

    def _name(self, name: str) -> str:
        if name == "lr":
            return self._key
        if name.endswith("_lr"):
            return f"{name[:-3]}_{self._key}"
        raise TypeError(
            f"schedule(key={self._key!r}): the scheduler reads or writes the param-group key "
            f"{name!r}; a schedule drives {self._key!r} only (for CyclicLR and OneCycleLR pass "
            "cycle_momentum=False)"
        )

    def __getitem__(self, name: str) -> Any:
        return self._group[self._name(name)]

    def __setitem__(self, name: str, value: Any) -> None:
        self._group[self._name(name)] = value

    def __delitem__(self, name: str) -> None:
        del self._group[self._name(name)]

    def __iter__(self) -> Iterator[str]:
        # torch's schedulers never iterate a group; list the names they are known to keep
        for name in ("lr", "initial_lr", "max_lr", "min_lr"):
            if self._name(name) in self._group:
                yield name

    def __len__(self) -> int:
        return sum(1 for _ in self)


class _KeyOptimizer(Optimizer):
    """``optimizer`` as torch's LR schedulers see it when they drive ``key``: its ``lr`` is ``key``.

    An ``Optimizer`` only so that the schedulers' ``isinstance`` check passes; it holds no
    parameters or state (``Optimizer.__init__`` is not called) and every group is a live view of
    the real optimizer's group. ``step`` is the real optimizer's; ``_opt_called`` is set by a hook
    on the real optimizer, so torch's "scheduler stepped before the optimizer" warning still works.
    """

    def __init__(self, optimizer: Optimizer, key: str) -> None:
        self._optimizer = optimizer
        self._key = key
        self._opt_called = False
        self.defaults = _KeyView(optimizer.defaults, key)  # type: ignore[assignment]
        this = weakref.ref(self)

        def mark_called(*_: Any) -> None:
            view = this()
            if view is not None:
                view._opt_called = True

        handle = optimizer.register_step_post_hook(mark_called)
        weakref.finalize(self, handle.remove)

    @property  # type: ignore[override]
    def param_groups(self) -> list[_KeyView]:  # type: ignore[override]
        return [_KeyView(group, self._key) for group in self._optimizer.param_groups]

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        return self._optimizer.step(closure)

    def __repr__(self) -> str:
        return f"{type(self._optimizer).__name__}[lr -> {self._key!r}]"


class ParamGroupSchedule:
    """A torch LR scheduler driving ``param_group[key]`` instead of ``param_group["lr"]``.

    Made by :func:`schedule`. ``scheduler`` is the torch scheduler itself (running on a view of
    the optimizer whose ``lr`` is ``key``); this object adds nothing to its arithmetic.
    """

    def __init__(self, optimizer: Optimizer, key: str, scheduler: LRScheduler) -> None:
        self.optimizer = optimizer
        self.key = key
        self.scheduler = scheduler

    def step(self, metrics: SupportsFloat | None = None) -> None:
        """Advance the schedule; call it after ``optimizer.step()``.

        Args:
            metrics: the monitored quantity, for ``ReduceLROnPlateau`` only (its ``step(metrics)``).
        """
        if isinstance(self.scheduler, ReduceLROnPlateau):
            if metrics is None:
                raise TypeError("step(): ReduceLROnPlateau needs the metric: step(metrics)")
            self.scheduler.step(metrics)
        elif metrics is not None:
            raise TypeError(
                f"step(): metrics is for ReduceLROnPlateau, not {type(self.scheduler).__name__}"
            )
        else:
            self.scheduler.step()

    def get_last_values(self) -> list[float]:
        """The values of ``key`` this schedule set last, one per param group (as ``get_last_lr``)."""
        return list(self.scheduler.get_last_lr())

    def state_dict(self) -> dict[str, Any]:
        """The key and the torch scheduler's own ``state_dict()``."""
        return {"key": self.key, "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` taken from a schedule of the same key and scheduler."""
        if state_dict.get("key") != self.key:
            raise ValueError(
                f"load_state_dict: the state is of a schedule on {state_dict.get('key')!r}, "
                f"this one drives {self.key!r}"
            )
        self.scheduler.load_state_dict(state_dict["scheduler"])

    def __repr__(self) -> str:
        return f"ParamGroupSchedule(key={self.key!r}, scheduler={type(self.scheduler).__name__})"


def _check_key(optimizer: Optimizer, key: Any, caller: str) -> None:
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"{caller}: optimizer must be a torch.optim.Optimizer, got {optimizer!r}")
    if not isinstance(key, str):
        raise TypeError(f"{caller}: key must be a param-group key (a str), got {key!r}")
    if key == "lr" or key.endswith("_lr"):
        raise ValueError(
            f"{caller}: key {key!r} is the learning rate's; schedule lr with "
            "torch.optim.lr_scheduler on the optimizer itself"
        )
    for i, group in enumerate(optimizer.param_groups):
        if key not in group:
            raise ValueError(f"{caller}: param_groups[{i}] has no key {key!r}")
        value = group[key]
        if isinstance(value, Tensor):
            raise TypeError(
                f"{caller}: param_groups[{i}][{key!r}] is a Tensor; only float values are "
                "supported (a Tensor lr is torch's LR schedulers' own business)"
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{caller}: param_groups[{i}][{key!r}] must be a number, got {value!r}")


def schedule(
    optimizer: Optimizer,
    key: str,
    scheduler_cls: Callable[..., LRScheduler],
    *args: Any,
    **kwargs: Any,
) -> ParamGroupSchedule:
    """Drive ``param_group[key]`` with the factors ``scheduler_cls`` would apply to ``lr``.

    ``scheduler_cls(view, *args, **kwargs)`` is built on a view of ``optimizer`` whose ``lr`` is
    ``key`` (``initial_lr`` is ``initial_<key>``, OneCycleLR's ``max_lr`` is ``max_<key>``, ...),
    so every torch scheduler runs unmodified and the values of ``key`` are, bit for bit, those it
    gives ``lr`` from the same base. ``lr`` itself is never touched, and an LR scheduler on the
    same optimizer keeps its own keys. Two schedules on one key compose as two chained LR
    schedulers do.

    The base value is ``group[key]`` when the first schedule on ``key`` is created, kept as
    ``group["initial_<key>"]`` (as torch keeps ``initial_lr``: it travels in the optimizer's
    ``state_dict``). As with LR schedulers, building the schedule applies its first factor.

    Example::

        opt = regoptim.ProxSGD(model.parameters(), lr=0.1, l1=1e-4)
        warmup = regoptim.schedule(opt, "l1", torch.optim.lr_scheduler.LinearLR, 0.01, 1.0, 20)
        for x, y in loader:
            ...
            opt.step()
            warmup.step()

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        key: the param-group key to drive (``"l1"``, ``"weight_decay"``, ``"group_l1"``, ...): a
            float in every group. Not ``"lr"``.
        scheduler_cls: an LR scheduler class, or any callable that builds one from the optimizer
            it is given: ``lambda o: SequentialLR(o, [LinearLR(o, ...), CosineAnnealingLR(o,
            ...)], milestones=[10])`` (build the children on ``o``). ``ReduceLROnPlateau`` works
            (``step(metrics)``); CyclicLR and OneCycleLR need ``cycle_momentum=False``.
            Schedulers that set absolute values (OneCycleLR's and CyclicLR's ``max_lr``,
            ``base_lr``) set them in every group, as they do for ``lr``: give a list with ``0.0``
            for the groups that must stay unregularized (``param_groups``' exempt group).
        *args, **kwargs: the scheduler's own arguments after the optimizer.

    Returns:
        A :class:`ParamGroupSchedule` with ``step()``, ``get_last_values()``, ``state_dict()``
        and ``load_state_dict()``.
    """
    _check_key(optimizer, key, "schedule")
    scheduler = scheduler_cls(_KeyOptimizer(optimizer, key), *args, **kwargs)
    if not isinstance(scheduler, LRScheduler):
        raise TypeError(
            f"schedule: scheduler_cls must build a torch.optim.lr_scheduler.LRScheduler, "
            f"got {type(scheduler).__name__}"
        )
    return ParamGroupSchedule(optimizer, key, scheduler)
