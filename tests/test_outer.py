"""The outer optimizers: the averaging-to-Nesterov warm-up against an independent replay."""

from __future__ import annotations

import pytest
import torch

from lowcomm.config import load_config
from lowcomm.optim.outer import OuterWarmup


def _replay(grads: list[torch.Tensor], lr: float, momentum: float, warmup: int) -> torch.Tensor:
    """Nesterov SGD written out, with the ramp: buffer b, update g + m_t b, step lr_t."""
    theta = torch.zeros_like(grads[0])
    buf = None
    for t, g in enumerate(grads):
        f = min(1.0, t / warmup) if warmup else 1.0
        m_t, lr_t = f * momentum, 1.0 + f * (lr - 1.0)
        if m_t > 0:
            buf = g.clone() if buf is None else m_t * buf + g
            g = g + m_t * buf
        theta = theta - lr_t * g
    return theta


@pytest.mark.parametrize("warmup", [0, 1, 5])
def test_warmup_starts_as_averaging_and_ends_as_nesterov_sgd(warmup: int) -> None:
    torch.manual_seed(0)
    grads = [torch.randn(7) for _ in range(9)]
    p = torch.nn.Parameter(torch.zeros(7))
    opt = OuterWarmup([p], lr=0.7, momentum=0.9, warmup=warmup)
    for i, g in enumerate(grads):
        p.grad = g.clone()
        opt.step()
        if i == 0 and warmup:
            assert torch.equal(p.detach(), -grads[0])  # plain averaging: theta - delta
    assert torch.allclose(p.detach(), _replay(grads, 0.7, 0.9, warmup), atol=1e-6)
    if warmup == 0:  # no ramp: torch's own Nesterov SGD, bit for bit
        q = torch.nn.Parameter(torch.zeros(7))
        ref = torch.optim.SGD([q], lr=0.7, momentum=0.9, nesterov=True)
        for g in grads:
            q.grad = g.clone()
            ref.step()
        assert torch.equal(p.detach(), q.detach())


def test_warmup_resumes_from_its_state_dict() -> None:
    torch.manual_seed(1)
    grads = [torch.randn(5) for _ in range(8)]
    a = torch.nn.Parameter(torch.zeros(5))
    whole = OuterWarmup([a], 0.7, 0.9, warmup=6)
    for g in grads:
        a.grad = g.clone()
        whole.step()
    b = torch.nn.Parameter(torch.zeros(5))
    first = OuterWarmup([b], 0.7, 0.9, warmup=6)
    for g in grads[:3]:
        b.grad = g.clone()
        first.step()
    again = OuterWarmup([b], 0.7, 0.9, warmup=6)
    again.load_state_dict(first.state_dict())
    assert again.param_groups[0]["outer_step"] == 3
    for g in grads[3:]:
        b.grad = g.clone()
        again.step()
    assert torch.equal(a.detach(), b.detach())


def test_warmup_settings_are_checked_here_and_in_the_recipe_config() -> None:
    p = [torch.nn.Parameter(torch.zeros(1))]
    for bad in ({"lr": 0.0}, {"momentum": 0.0}, {"momentum": 1.0}, {"warmup": -1}):
        with pytest.raises(ValueError):
            OuterWarmup(p, **bad)  # type: ignore[arg-type]
    assert load_config(["--outer-warmup=30", "--steps=100"]).outer_warmup == 30
    with pytest.raises(ValueError, match="outer_warmup"):
        load_config(["--outer-warmup=30", "--outer-momentum=0", "--steps=100"])
