"""The outer optimizers: DiLoCo's default, and their state made ready for a swarm.

The outer optimizer is any ``torch.optim.Optimizer`` stepping the global parameters with the
pseudo-gradient in ``.grad``; nothing here is a new interface.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["OuterWarmup", "default_outer_optimizer", "prime_outer_state"]


def default_outer_optimizer(params: Sequence[torch.Tensor]) -> torch.optim.Optimizer:
    """The outer optimizer of the DiLoCo paper: SGD, lr 0.7, Nesterov momentum 0.9."""
    return torch.optim.SGD(params, lr=0.7, momentum=0.9, nesterov=True)


class OuterWarmup(torch.optim.SGD):
    """Outer SGD that starts as plain averaging and reaches Nesterov SGD after ``warmup`` steps.

    At its ``t``-th step (from 0) with ``f = min(1, t / warmup)``: learning rate
    ``1 + f * (lr - 1)`` and Nesterov momentum ``f * momentum``; the first step is exactly
    parameter averaging (lr 1, no momentum), every step from ``warmup`` on is
    ``SGD(lr, momentum, nesterov=True)``. Why: outer momentum amplifies a run of aligned
    pseudo-gradients up to ``lr / (1 - momentum)`` times (7x at the paper's 0.7 and 0.9), which
    early rounds, whose pseudo-gradients are large and aligned, overshoot with. Measured
    (BENCHMARKS.md, tuning grid ``tune``: 600 steps, H=25, 24 outer steps): plain averaging
    reached eval loss 1.90 where the paper's Nesterov SGD (0.7, 0.9) reached 2.23. Whether
    Nesterov wins back over more outer steps, and which warm-up length is best, is not
    measured yet (the grid's ``ow30`` and ``tune-long`` runs did not run).

    Call protocol: a ``torch.optim.SGD``; DiLoCo steps it once per sync of its fragment. The
    step count lives in each param group (``outer_step``), so ``state_dict`` /
    ``load_state_dict`` resume it exactly.

    Args:
        params: the global parameters (or param groups) it steps.
        lr: outer learning rate after the warm-up, > 0.
        momentum: Nesterov momentum after the warm-up, in ``(0, 1)``.
        warmup: outer steps of the ramp (0: Nesterov SGD from the first step).

    Raises:
        ValueError: a setting outside its range.
    """

    def __init__(
        self, params: Any, lr: float = 0.7, momentum: float = 0.9, warmup: int = 0
    ) -> None:
        if not lr > 0:
            raise ValueError(f"lr ({lr}) must be > 0")
        if not 0 < momentum < 1:
            raise ValueError(f"momentum ({momentum}) must be in (0, 1)")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup ({warmup!r}) must be an int >= 0 (outer steps)")
        super().__init__(params, lr=lr, momentum=momentum, nesterov=True)
        for group in self.param_groups:
            group.update(outer_step=0, target_lr=lr, target_momentum=momentum, warmup=warmup)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One outer step at this step's point of the ramp."""
        for group in self.param_groups:
            t, warmup = group["outer_step"], group["warmup"]
            f = min(1.0, t / warmup) if warmup else 1.0
            # torch's SGD skips the momentum buffer entirely while momentum is 0.
            group["momentum"] = f * group["target_momentum"]
            group["lr"] = 1.0 + f * (group["target_lr"] - 1.0)
            group["outer_step"] = t + 1
        return super().step(closure)


def prime_outer_state(outer_optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """Create the outer optimizers' state now, so every swarm peer has the same keys.

    torch creates it lazily at the first step; a joiner downloading a peer's state needs
    the tensors to exist. Zeros give the same numbers as the lazy start for SGD without
    dampening and for Adam/AdamW.
    """
    for outer in outer_optimizers:
        for group in outer.param_groups:
            for g in group["params"]:
                st = outer.state[g]
                if isinstance(outer, torch.optim.SGD):
                    if group.get("momentum", 0) and group.get("dampening", 0):
                        raise ValueError(
                            "an elastic backend needs SGD outer momentum without dampening "
                            f"(dampening={group['dampening']}) so its state can be primed"
                        )
                    if group.get("momentum", 0):
                        st["momentum_buffer"] = torch.zeros_like(g)
                elif isinstance(outer, torch.optim.Adam | torch.optim.AdamW):
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(g)
                    st["exp_avg_sq"] = torch.zeros_like(g)
                    if group.get("amsgrad"):
                        st["max_exp_avg_sq"] = torch.zeros_like(g)
                else:
                    raise ValueError(
                        f"outer optimizer {type(outer).__name__} cannot be used with an "
                        f"elastic backend: joiners could not download its state; use SGD, "
                        f"Adam or AdamW"
                    )
