"""The outer optimizers: the averaging-to-Nesterov warm-up against an independent replay, its
count in the state a joiner downloads, and the default outer step of the library and recipe."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

from lowcomm import DiLoCo
from lowcomm.comm import LocalBackend
from lowcomm.config import load_config
from lowcomm.optim.outer import (
    OuterWarmup,
    outer_warmup_for,
    prime_outer_state,
    sync_outer_counts,
)
from lowcomm.optim.state import load_shared, shared_tensors

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "train_lm.py"


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


def test_a_joiner_that_downloads_the_shared_state_continues_the_ramp() -> None:
    # A swarm joiner receives the outer state as tensors only (lowcomm.optim.state): the ramp's
    # count must be one of them, or the joiner would restart at plain averaging while its
    # peers are past it, and step the same average differently.
    torch.manual_seed(2)
    grads = [torch.randn(6) for _ in range(7)]
    a = torch.nn.Parameter(torch.zeros(6))
    served = OuterWarmup([a], 0.7, 0.9, warmup=5)
    prime_outer_state([served])
    for g in grads[:3]:
        a.grad = g.clone()
        served.step()
    shared = shared_tensors(["w"], [[0]], [a], [served], 3, 30)
    assert shared["outer.0.w.step"].item() == 3
    b = torch.nn.Parameter(torch.ones(6))
    joiner = OuterWarmup([b], 0.7, 0.9, warmup=5)
    prime_outer_state([joiner])  # the keys exist before the download, as on a swarm peer
    load_shared(shared, ["w"], [[0]], [b], [joiner])
    sync_outer_counts([joiner])  # as DiLoCo does after sync_state
    assert joiner.param_groups[0]["outer_step"] == 3
    for g in grads[3:]:
        a.grad, b.grad = g.clone(), g.clone()
        served.step()
        joiner.step()
    assert torch.equal(a.detach(), b.detach())


def test_a_state_dict_from_before_the_per_parameter_count_resumes_from_its_groups() -> None:
    a = torch.nn.Parameter(torch.zeros(3))
    old = OuterWarmup([a], 0.7, 0.9, warmup=4)
    a.grad = torch.ones(3)
    old.step()
    sd = old.state_dict()
    for st in sd["state"].values():
        st.pop("step")  # what an OuterWarmup of the previous release saved
    sd["param_groups"][0]["outer_step"] = 2
    again = OuterWarmup([torch.nn.Parameter(torch.zeros(3))], 0.7, 0.9, warmup=4)
    again.load_state_dict(sd)
    assert again.outer_step(again.param_groups[0]) == 2


@pytest.mark.parametrize(("sync_every", "warmup"), [(25, 30), (100, 8), (50, 15), (1, 750)])
def test_the_default_outer_step_warms_up_over_750_inner_steps(sync_every: int, warmup: int) -> None:
    assert outer_warmup_for(sync_every) == warmup
    model = torch.nn.Linear(3, 2)
    opt = DiLoCo(
        model, torch.optim.SGD(model.parameters(), lr=0.1), sync_every=sync_every,
        backend=LocalBackend(),
    )  # fmt: skip
    (outer,) = opt.outer_optimizers
    assert isinstance(outer, OuterWarmup)
    group = outer.param_groups[0]
    assert (group["warmup"], group["target_lr"], group["target_momentum"]) == (warmup, 0.7, 0.9)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="sync_every"):
            outer_warmup_for(bad)  # type: ignore[arg-type]


def test_the_recipe_follows_the_library_default_unless_told_otherwise() -> None:
    spec = importlib.util.spec_from_file_location("lowcomm_recipe_outer", RECIPE)
    assert spec is not None and spec.loader is not None
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)

    def outer(*argv: str) -> torch.optim.Optimizer:
        cfg = load_config(["--steps=100", "--sync-every=25", *argv])
        model = torch.nn.Linear(3, 2)
        opt = recipe.make_optimizer(
            cfg, model, torch.optim.SGD(model.parameters(), lr=0.1), None, LocalBackend()
        )
        return opt.outer_optimizers[0]

    auto = outer()
    assert isinstance(auto, OuterWarmup) and auto.param_groups[0]["warmup"] == 30
    assert outer("--outer-warmup=0").param_groups[0]["momentum"] == 0.9  # Nesterov from step 1
    assert not isinstance(outer("--outer-warmup=0"), OuterWarmup)
    # Nothing to ramp to: plain averaging stays plain averaging.
    plain = outer("--outer-lr=1", "--outer-momentum=0")
    assert not isinstance(plain, OuterWarmup) and plain.param_groups[0]["momentum"] == 0
    assert outer("--outer-warmup=12").param_groups[0]["warmup"] == 12
    with pytest.raises(ValueError, match="outer_warmup"):
        load_config(["--outer-warmup=-2", "--steps=100"])


def test_a_checkpoint_resumes_only_with_the_outer_step_it_was_saved_with() -> None:
    # A run saved with the paper's SGD (the default before OuterWarmup) must not restart a
    # ramp mid-run when resumed with today's default, nor drop one the other way round.
    nesterov = functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True)

    def trained(outer: Any) -> dict[str, Any]:
        model = torch.nn.Linear(3, 2)
        opt = DiLoCo(
            model, torch.optim.SGD(model.parameters(), lr=0.1), sync_every=2,
            outer_optimizer=outer, backend=LocalBackend(),
        )  # fmt: skip
        for _ in range(4):
            model(torch.ones(1, 3)).sum().backward()
            opt.step()
            opt.zero_grad()
        return opt.state_dict()

    def fresh(outer: Any) -> DiLoCo:
        model = torch.nn.Linear(3, 2)
        return DiLoCo(
            model, torch.optim.SGD(model.parameters(), lr=0.1), sync_every=2,
            outer_optimizer=outer, backend=LocalBackend(),
        )  # fmt: skip

    old, new = trained(nesterov), trained(None)
    with pytest.raises(ValueError, match="outer-warmup 0"):
        fresh(None).load_state_dict(old)
    with pytest.raises(ValueError, match="OuterWarmup"):
        fresh(nesterov).load_state_dict(new)
    fresh(nesterov).load_state_dict(old)  # the same kind loads
    resumed = fresh(None)
    resumed.load_state_dict(new)
    assert resumed.outer_optimizers[0].param_groups[0]["outer_step"] == 2
