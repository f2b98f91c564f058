"""An independent replay of the DiLoCo algorithm of DESIGN.md, for tests to compare against.

It simulates M workers in one process with hand-written inner SGD and outer Nesterov SGD,
ramped from plain averaging as DiLoCo's default outer step is (no torch.optim, no backend, no lowcomm code), on a tiny two-layer model whose gradient comes
from autograd on plain tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def batch(seed: int, worker: int, step: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The data worker ``worker`` sees at inner step ``step`` (1-based)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + worker * 10_007 + step)
    x = torch.randn(n, 3, generator=g)
    y = torch.stack([x.sum(1), x[:, 0] * x[:, 1]], 1) + 0.1 * torch.randn(n, 2, generator=g)
    return x, y


def loss_fn(params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    w1, b1, w2, b2 = params
    h = torch.tanh(x @ w1.T + b1)
    return ((h @ w2.T + b2 - y) ** 2).mean()


@dataclass
class Config:
    workers: int = 2
    steps: int = 8
    sync_every: int = 4
    inner_lr: float = 0.1
    outer_lr: float = 0.7
    momentum: float = 0.9
    nesterov: bool = True
    fragments: tuple[tuple[int, ...], ...] = ((0, 1, 2, 3),)
    overlap_steps: int = 0
    mix: float = 0.5
    same_data: bool = False
    seed: int = 0
    flush: bool = False  # land the syncs still in flight after the last step
    # What the wire does to a flat fp32 vector (decode(encode(x))); None: lossless.
    roundtrip: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)
    ef_decay: float | None = None  # error feedback with this residual decay; None: none
    weights: tuple[float, ...] | None = None  # per-worker weight in the mean; None: equal
    # Outer steps over which the outer step ramps from plain averaging (lr 1, no momentum) to
    # (outer_lr, Nesterov momentum), as OuterWarmup does; 0: no ramp (the SGD a test passes
    # as outer_optimizer); None: DiLoCo's default outer step, the outer steps of the first 750
    # inner steps. Only Nesterov momentum in (0, 1) ramps (plain SGD has nothing to ramp to).
    warmup: int | None = 0

    def ramp(self, t: int) -> tuple[float, float]:
        """(lr, momentum) of a fragment's ``t``-th outer step (from 0)."""
        if not (self.nesterov and 0 < self.momentum < 1):
            return self.outer_lr, self.momentum
        warmup = -(-750 // self.sync_every) if self.warmup is None else self.warmup
        f = min(1.0, t / warmup) if warmup else 1.0
        return 1.0 + f * (self.outer_lr - 1.0), f * self.momentum


def _wire(cfg: Config, flat: torch.Tensor) -> torch.Tensor:
    return flat if cfg.roundtrip is None else cfg.roundtrip(flat)


def _mean(cfg: Config, contributions: list[torch.Tensor]) -> torch.Tensor:
    """The weighted mean the backends compute: each contribution as decoded, summed in worker
    order with weights scaled by the largest, divided, then encoded for the trip back."""
    weights = list(cfg.weights or [1.0] * len(contributions))
    top = max(weights)
    scaled = [w / top for w in weights]
    acc = torch.zeros_like(contributions[0])
    for w, x in zip(scaled, contributions):
        if w:
            acc = acc + _wire(cfg, x) * w
    return _wire(cfg, acc / sum(scaled))


def replay(
    init: list[torch.Tensor], cfg: Config
) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Run the algorithm; return (global θ, each worker's local θ)."""
    glob = [t.detach().clone().float() for t in init]
    local = [[t.detach().clone().float() for t in init] for _ in range(cfg.workers)]
    bufs: list[torch.Tensor | None] = [None] * len(init)
    num_frags = len(cfg.fragments)
    spacing = cfg.sync_every // num_frags
    pending: list[tuple[int, int, list[torch.Tensor]]] = []
    residuals: dict[tuple[int, int], torch.Tensor] = {}

    counts = [0] * num_frags  # outer steps taken per fragment

    def outer(frag: int, mean: list[torch.Tensor]) -> None:
        lr, momentum = cfg.ramp(counts[frag])
        counts[frag] += 1
        for i, g in zip(cfg.fragments[frag], mean):
            if momentum:
                bufs[i] = g.clone() if bufs[i] is None else momentum * bufs[i] + g
                update = g + momentum * bufs[i] if cfg.nesterov else bufs[i]
            else:
                update = g
            glob[i] = glob[i] - lr * update
        for m in range(cfg.workers):
            for i in cfg.fragments[frag]:
                if cfg.overlap_steps:
                    local[m][i] = cfg.mix * local[m][i] + (1 - cfg.mix) * glob[i]
                else:
                    local[m][i] = glob[i].clone()

    for step in range(1, cfg.steps + 1):
        for m in range(cfg.workers):
            x, y = batch(cfg.seed, 0 if cfg.same_data else m, step)
            params = [t.clone().requires_grad_(True) for t in local[m]]
            grads = torch.autograd.grad(loss_fn(params, x, y), params)
            local[m] = [p.detach() - cfg.inner_lr * g for p, g in zip(params, grads)]
        for frag, land, mean in [p for p in pending if p[1] == step]:
            pending.remove((frag, land, mean))
            outer(frag, mean)
        if step % spacing == 0:
            frag = (step % cfg.sync_every) // spacing
            idx = cfg.fragments[frag]
            sent = []
            for m in range(cfg.workers):
                x = torch.cat([(glob[i] - local[m][i]).reshape(-1) for i in idx])
                if cfg.ef_decay is not None:
                    e = residuals.get((m, frag))
                    x = x if e is None else x + cfg.ef_decay * e
                    residuals[(m, frag)] = x - _wire(cfg, x)
                sent.append(x)
            flat = _mean(cfg, sent)
            mean, offset = [], 0
            for i in idx:
                mean.append(flat[offset : offset + glob[i].numel()].view_as(glob[i]))
                offset += glob[i].numel()
            if cfg.overlap_steps:
                pending.append((frag, step + cfg.overlap_steps, mean))
            else:
                outer(frag, mean)
    if cfg.flush:
        for frag, _, mean in pending:
            outer(frag, mean)
    return glob, local


def replay_overlapped(
    init: list[torch.Tensor], cfg: Config, mode: str
) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """Eager (Kale et al. 2025) or one-step-delayed DiLoCo; return (each worker's θ, local θ).

    Each worker keeps its own global copy and outer momentum (eager lets them differ).
    """
    workers = range(cfg.workers)
    glob = [[t.detach().clone().float() for t in init] for _ in workers]
    local = [[t.detach().clone().float() for t in init] for _ in workers]
    bufs: list[list[torch.Tensor | None]] = [[None] * len(init) for _ in workers]
    num_frags = len(cfg.fragments)
    spacing = cfg.sync_every // num_frags
    last: dict[int, tuple[list[list[torch.Tensor]], list[torch.Tensor]]] = {}

    counts = {(m, f): 0 for m in workers for f in range(num_frags)}

    def outer(m: int, frag: int, grads: list[torch.Tensor]) -> None:
        lr, momentum = cfg.ramp(counts[(m, frag)])
        counts[(m, frag)] += 1
        for i, g in zip(cfg.fragments[frag], grads):
            if momentum:
                b = bufs[m][i]
                bufs[m][i] = g.clone() if b is None else momentum * b + g
                g = g + momentum * bufs[m][i]
            glob[m][i] = glob[m][i] - lr * g

    for step in range(1, cfg.steps + 1):
        for m in workers:
            x, y = batch(cfg.seed, m, step)
            params = [t.clone().requires_grad_(True) for t in local[m]]
            grads = torch.autograd.grad(loss_fn(params, x, y), params)
            local[m] = [p.detach() - cfg.inner_lr * g for p, g in zip(params, grads)]
        if step % spacing:
            continue
        frag = (step % cfg.sync_every) // spacing
        idx = cfg.fragments[frag]
        deltas = [[glob[m][i] - local[m][i] for i in idx] for m in workers]
        mean = []
        for j in range(len(idx)):
            acc = torch.zeros_like(deltas[0][j])
            for m in workers:
                acc = acc + deltas[m][j]
            mean.append(acc / cfg.workers)
        prev = last.get(frag)
        for m in workers:
            if prev is None:
                if mode == "eager":
                    outer(m, frag, deltas[m])
            elif mode == "delayed":
                outer(m, frag, prev[1])
            else:
                own_old = prev[0][m]
                outer(
                    m,
                    frag,
                    [pm + (d - o) / cfg.workers for pm, d, o in zip(prev[1], deltas[m], own_old)],
                )
            for i in idx:
                local[m][i] = glob[m][i].clone()
        last[frag] = (deltas, mean)
    if cfg.flush:
        # Delayed applies the last mean; eager the part of it not applied yet (the others').
        for frag, (deltas, mean) in last.items():
            for m in workers:
                if mode == "delayed":
                    outer(m, frag, mean)
                else:
                    outer(m, frag, [pm - d / cfg.workers for pm, d in zip(mean, deltas[m])])
                for i in cfg.fragments[frag]:
                    local[m][i] = glob[m][i].clone()
    return glob, local
