"""An optimizer that is a view of another: the torch.optim contract of a wrapper.

:class:`WrappingOptimizer` subclasses ``torch.optim.Optimizer`` but owns no state of its
own: ``param_groups``, ``state`` and ``defaults`` are the inner optimizer's, so LR
schedulers, step hooks, grad scalers, accelerate and ``isinstance`` checks that work on the
inner optimizer work on the wrapper too.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["WrappingOptimizer"]


class WrappingOptimizer(torch.optim.Optimizer):
    """Shares ``param_groups``, ``state`` and ``defaults`` with ``inner``.

    Subclasses implement ``step``; ``zero_grad`` delegates; adding parameter groups after
    construction is refused (a wrapper's own structures are built over the inner's groups).

    Args:
        inner: the optimizer being wrapped.
    """

    _inner: torch.optim.Optimizer

    def __init__(self, inner: torch.optim.Optimizer) -> None:
        # Optimizer.__init__ assigns state/param_groups/defaults and adds groups; those must
        # not touch the inner optimizer, so they go to a scratch space until it returns.
        self.__dict__["_inner"] = inner
        self.__dict__["_scratch"] = {}
        super().__init__([p for g in inner.param_groups for p in g["params"]], {})
        del self.__dict__["_scratch"]

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        scratch = self.__dict__.get("_scratch")
        if scratch is not None:
            return scratch.setdefault("param_groups", [])
        return self._inner.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        scratch = self.__dict__.get("_scratch")
        if scratch is not None:
            scratch["param_groups"] = value
        else:
            self._inner.param_groups = value

    @property  # type: ignore[override]
    def state(self) -> Any:
        scratch = self.__dict__.get("_scratch")
        if scratch is not None:
            return scratch.setdefault("state", {})
        return self._inner.state

    @state.setter
    def state(self, value: Any) -> None:
        scratch = self.__dict__.get("_scratch")
        if scratch is not None:
            scratch["state"] = value
        else:
            self._inner.state = value

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        scratch = self.__dict__.get("_scratch")
        if scratch is not None:
            return scratch.setdefault("defaults", {})
        return self._inner.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        scratch = self.__dict__.get("_scratch")
        if scratch is not None:
            scratch["defaults"] = value
        else:
            self._inner.defaults = value

    @property
    def inner_optimizer(self) -> torch.optim.Optimizer:
        """The wrapped optimizer."""
        return self._inner

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the inner optimizer's gradients."""
        self._inner.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Refused once constructed: the set of synced parameters is fixed at start."""
        scratch = self.__dict__.get("_scratch")
        if scratch is not None:
            return  # Optimizer.__init__ adding the inner's groups again: they exist already.
        raise RuntimeError(
            f"{type(self).__name__} cannot add parameter groups after construction: what it "
            f"built over the inner optimizer's groups is fixed; build a new one"
        )
