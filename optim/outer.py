"""The outer optimizers: DiLoCo's default, and their state made ready for a swarm.

The outer optimizer is any ``torch.optim.Optimizer`` stepping the global parameters with the
pseudo-gradient in ``.grad``; nothing here is a new interface.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "WARMUP_INNER_STEPS",
    "OuterWarmup",
    "check_outer_kind",
    "default_outer_optimizer",
    "outer_warmup_for",
    "prime_outer_state",
    "sync_outer_counts",
]


#: Inner steps the default outer step's warm-up spans (:func:`default_outer_optimizer`).
WARMUP_INNER_STEPS = 750


def default_outer_optimizer(
    params: Sequence[torch.Tensor], sync_every: int = 25
) -> torch.optim.Optimizer:
    """DiLoCo's default outer step: :class:`OuterWarmup` to the paper's Nesterov SGD (lr 0.7,
    momentum 0.9) over the outer steps of the first :data:`WARMUP_INNER_STEPS` (750) inner
    steps, ``ceil(750 / sync_every)`` of them (30 at ``H=25``, 8 at ``H=100``).

    Measured (BENCHMARKS.md; the 0.87M-parameter byte GPT, M=2, H=25, int8, inner AdamW at
    its tuned lr 0.004): on the tuning grid's unreported seed at 1,800 steps, against DP at
    the same lr and batch (16 per worker), this warm-up ended at 1.0116x DP's eval loss, the
    paper's Nesterov SGD from the first outer step at 1.2562x, plain averaging throughout at
    1.0927x; at 600 steps (24 outer steps) 1.07x against 1.31x. The length, on that seed:
    15 outer steps 1.0353x, 30 1.0116x, 60 1.0281x (grid ``tune-long``). At H=100 only 8
    outer steps were measured (the same 750 inner steps); that the best length is a count of
    inner steps rather than of outer steps is an assumption between those two points. On the
    headline profile's three reported seeds (1,800 steps): 0.9947 +- 0.0101x DP at batch 16
    per worker, 1.0083 +- 0.0103x the best DP on those seeds (batch 8, twice the steps), and
    0.9937 +- 0.0201x with both at batch 8, all at 97x fewer bytes than DP at DiLoCo's batch.
    With M=4 at H=50 (15 outer steps, both at batch 8, grid ``tune-m4``) it ends at 1.0719
    +- 0.0180x: there the gap opens during the averaging (+20%) and Nesterov closes it slowly.
    """
    return OuterWarmup(params, lr=0.7, momentum=0.9, warmup=outer_warmup_for(sync_every))


def outer_warmup_for(sync_every: int) -> int:
    """The default warm-up at ``H = sync_every``: ``ceil(WARMUP_INNER_STEPS / H)`` outer steps.

    Raises:
        ValueError: ``sync_every`` is not an int >= 1.
    """
    if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
        raise ValueError(f"sync_every ({sync_every!r}) must be an int >= 1")
    return -(-WARMUP_INNER_STEPS // sync_every)


class OuterWarmup(torch.optim.SGD):
    """Outer SGD that starts as plain averaging and reaches Nesterov SGD after ``warmup`` steps.

    At its ``t``-th step (from 0) with ``f = min(1, t / warmup)``: learning rate
    ``1 + f * (lr - 1)`` and Nesterov momentum ``f * momentum``; the first step is exactly
    parameter averaging (lr 1, no momentum), every step from ``warmup`` on is
    ``SGD(lr, momentum, nesterov=True)``. Why: outer momentum amplifies a run of aligned
    pseudo-gradients up to ``lr / (1 - momentum)`` times (7x at the paper's 0.7 and 0.9), which
    early rounds, whose pseudo-gradients are large and aligned, overshoot with. Measured: see
    :func:`default_outer_optimizer`, which uses it.

    Call protocol: a ``torch.optim.SGD``; DiLoCo steps it once per sync of its fragment. The
    step count ``t`` is per-parameter state (``state[p]["step"]``, a float32 scalar on the
    CPU, as Adam keeps its own), so it travels with the rest of the outer state: in
    ``state_dict`` / ``load_state_dict`` and in the state a swarm joiner downloads, which
    carries tensors only (a count kept in the param groups would restart a joiner's ramp
    from 0 while its peers are past it). ``param_groups[i]["outer_step"]`` mirrors it, and
    is what a state dict from before the per-parameter count (which has none) resumes from.

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

    def outer_step(self, group: dict[str, Any]) -> int:
        """The group's step count ``t`` as its parameters' ``step`` state holds it (a host
        read), else the mirror in the group (before the first step, or from a state dict
        without the per-parameter count)."""
        for p in group["params"]:
            count = self.state.get(p, {}).get("step")
            if count is not None:
                return int(count.item())
        return int(group["outer_step"])

    def sync_counts(self) -> None:
        """Set each group's mirror from its parameters' ``step`` state, after that state was
        loaded from elsewhere (a swarm peer's download: :func:`sync_outer_counts`). ``step``
        reads only the mirror, so a step adds no host read."""
        for group in self.param_groups:
            group["outer_step"] = self.outer_step(group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``torch.optim.SGD.load_state_dict``, then :meth:`sync_counts`."""
        super().load_state_dict(state_dict)
        self.sync_counts()

    def prime(self) -> None:
        """Create the per-parameter count now (a swarm peer's state needs the same keys on
        every peer before its first step: :func:`prime_outer_state`)."""
        for group in self.param_groups:
            t = self.outer_step(group)
            for p in group["params"]:
                self.state[p].setdefault("step", torch.tensor(float(t)))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One outer step at this step's point of the ramp."""
        for group in self.param_groups:
            t, warmup = int(group["outer_step"]), group["warmup"]
            f = min(1.0, t / warmup) if warmup else 1.0
            # torch's SGD skips the momentum buffer entirely while momentum is 0.
            group["momentum"] = f * group["target_momentum"]
            group["lr"] = 1.0 + f * (group["target_lr"] - 1.0)
            group["outer_step"] = t + 1
            for p in group["params"]:
                count = self.state[p].get("step")
                if count is None:
                    self.state[p]["step"] = torch.tensor(float(t + 1))
                else:
                    count.fill_(t + 1)
        return super().step(closure)


#: The param-group keys only an :class:`OuterWarmup` has.
_RAMP_KEYS = frozenset({"outer_step", "target_lr", "target_momentum", "warmup"})


def check_outer_kind(
    outer_optimizers: Sequence[torch.optim.Optimizer], extras: Sequence[dict[str, Any]]
) -> None:
    """Refuse to resume a ramp from a state saved without one, or the reverse.

    ``extras`` are the saved param groups (:func:`lowcomm.optim.state.outer_extras`). A run
    saved with plain SGD (the default before :class:`OuterWarmup`) and resumed with the
    warm-up would restart the ramp at plain averaging in mid-training; one saved with the
    warm-up and resumed with plain SGD would drop it. Neither may happen silently.

    Raises:
        ValueError: the saved and the live outer optimizers differ in that respect.
    """
    for f, (outer, extra) in enumerate(zip(outer_optimizers, extras)):
        saved = [set(g) for g in extra.get("param_groups", [])]
        if not saved:
            continue
        was, now = saved[0] >= _RAMP_KEYS, isinstance(outer, OuterWarmup)
        if was != now:
            kinds = ("an OuterWarmup (averaging ramping to Nesterov SGD)", "no warm-up")
            raise ValueError(
                f"the checkpoint's outer optimizer of fragment {f} had "
                f"{kinds[0] if was else kinds[1]}, this run's has "
                f"{kinds[0] if now else kinds[1]} ({type(outer).__name__}). Resume with the "
                "outer optimizer the run was saved with. lowcomm's default outer step is now "
                "OuterWarmup; a run saved before that change used "
                "partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True) "
                "(the recipe: --outer-warmup 0)."
            )


def sync_outer_counts(outer_optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """After the outer state was loaded as tensors (``sync_state``): let every
    :class:`OuterWarmup` take its step count from them."""
    for outer in outer_optimizers:
        if isinstance(outer, OuterWarmup):
            outer.sync_counts()


def prime_outer_state(outer_optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """Create the outer optimizers' state now, so every swarm peer has the same keys.

    torch creates it lazily at the first step; a joiner downloading a peer's state needs
    the tensors to exist. Zeros give the same numbers as the lazy start for SGD without
    dampening and for Adam/AdamW.
    """
    for outer in outer_optimizers:
        if isinstance(outer, OuterWarmup):
            outer.prime()
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
