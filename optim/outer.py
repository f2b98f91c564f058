"""The outer optimizers: DiLoCo's default, and their state made ready for a swarm.

The outer optimizer is any ``torch.optim.Optimizer`` stepping the global parameters with the
pseudo-gradient in ``.grad``; nothing here is a new interface.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["default_outer_optimizer", "prime_outer_state"]


def default_outer_optimizer(params: Sequence[torch.Tensor]) -> torch.optim.Optimizer:
    """The outer optimizer of the DiLoCo paper: SGD, lr 0.7, Nesterov momentum 0.9."""
    return torch.optim.SGD(params, lr=0.7, momentum=0.9, nesterov=True)


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
