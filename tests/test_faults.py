"""One bad step, one bad value or one bad argument must not break a run (or pass silently).

Each test plants the fault deterministically: a NaN loss at a chosen step on a chosen rank,
a parameter set to 3e38, two ranks configured differently.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import pytest
import torch

from lowcomm import DiLoCo, Int8, LocalBackend, TopK
from lowcomm.comm import ConsistencyError, reduce
from lowcomm.comm.base import DoneWork
from lowcomm.optim.diloco import MAX_SKIPPED_ROUNDS
from lowcomm.testing import run_ranks

from .oracle import batch, loss_fn, make_model


def _inner(kind: str, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=0.01)
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def _finite(obj: object) -> bool:
    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, dict):
        return all(_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_finite(v) for v in obj)
    return True


def _nan_once(rank: int, world: int, kind: str, overlap: int, nan_at: tuple[int, int]) -> dict:
    model = make_model(0)
    params = list(model.parameters())
    opt = DiLoCo(
        model,
        _inner(kind, params),
        sync_every=4,
        fragments=[params[:2], params[2:]],
        overlap_steps=overlap,
    )
    peers = []
    for step in range(1, 25):
        x, y = batch(0, rank, step)
        loss = loss_fn(params, x, y)
        if (rank, step) == nan_at:
            loss = loss * float("nan")  # one NaN loss: NaN gradients, NaN step
        loss.backward()
        syncs = opt.stats.fragment_syncs
        opt.step()
        opt.zero_grad()
        if opt.stats.fragment_syncs != syncs:
            peers.append(opt.stats.num_peers)
    opt.flush()
    out = {
        "theta": [g.clone() for g in opt.global_tensors()],
        "peers": peers,
        "nonfinite_rounds": opt.stats.nonfinite_rounds,
        "finite_state": _finite(opt.state_dict()),
        "finite_local": all(bool(torch.isfinite(p).all()) for p in params),
    }
    opt.close()
    return out


@pytest.mark.dist
@pytest.mark.parametrize("kind", ["adamw", "sgd-momentum"])
@pytest.mark.parametrize("overlap", [0, 1])
def test_one_nan_step_leaves_one_round_out_not_the_rest_of_the_run(kind, overlap):
    results = run_ranks(_nan_once, 2, kind, overlap, (1, 3), timeout=60)
    r0, r1 = results
    assert r1["nonfinite_rounds"] == 1 and r0["nonfinite_rounds"] == 0
    # Fragments sync every 2 steps; the NaN at step 3 spoils rank 1's syncs from step 4
    # until it lands and is repaired (step 4 + overlap); every later round has both ranks.
    assert r0["peers"][-6:] == [2] * 6 and r1["peers"][-6:] == [2] * 6
    assert 1 in r0["peers"]
    assert r1["finite_state"] and r1["finite_local"]
    for a, b in zip(r0["theta"], r1["theta"], strict=True):
        assert torch.equal(a, b) and bool(torch.isfinite(a).all())


def test_a_worker_alone_is_repaired_too_and_its_checkpoint_is_finite(caplog):
    with caplog.at_level(logging.WARNING):
        out = _nan_once(0, 1, "adamw", 1, (0, 5))
    assert out["nonfinite_rounds"] == 1
    assert out["finite_state"] and out["finite_local"]
    assert "reset to the global parameters" in caplog.text


def test_weights_cannot_push_a_large_finite_contribution_past_fp32():
    # A worker at 3e38 with a round of 25 steps: 25 * 3e38 overflows if weights multiply
    # before the division.
    big = torch.full((6,), 3e38)
    small = torch.ones(6)
    mean, _, _, _ = reduce.sparse_average(
        small,
        [25.0, 25.0],
        0,
        reduce.Identity(),
        lambda buf: torch.cat([buf, big.view(torch.uint8)]),
    )
    assert bool(torch.isfinite(mean).all())
    torch.testing.assert_close(mean, (small + big) / 2)


def test_an_average_that_is_not_finite_counts_as_no_contribution(caplog):
    mean = torch.tensor([float("inf"), 1.0])
    with caplog.at_level(logging.WARNING):
        result = reduce.average_result(mean, mean, [1.0, 1.0], 0, 8, 8)
    assert result.total_weight == 0 and result.num_peers == 0 and result.own_weight == 1.0
    assert "not finite" in caplog.text


def test_training_that_diverged_everywhere_stops_instead_of_exiting_clean():
    model = make_model(0)
    params = list(model.parameters())
    opt = DiLoCo(model, torch.optim.SGD(params, lr=0.1), sync_every=1)
    with pytest.raises(FloatingPointError, match=f"{MAX_SKIPPED_ROUNDS} syncs of fragment 0"):
        for step in range(1, 10):
            x, y = batch(0, 0, step)
            (loss_fn(params, x, y) * float("nan")).backward()
            opt.step()
            opt.zero_grad()
    assert opt.stats.skipped_outer_steps == MAX_SKIPPED_ROUNDS


def test_skipped_rounds_must_come_in_a_row_to_stop_training():
    # A NaN step every other round: each is skipped and repaired, the rounds between land,
    # so the count of skips in a row never reaches the limit.
    model = make_model(0)
    params = list(model.parameters())
    opt = DiLoCo(model, torch.optim.SGD(params, lr=0.1), sync_every=1)
    for step in range(1, 2 * MAX_SKIPPED_ROUNDS + 3):
        x, y = batch(0, 0, step)
        loss = loss_fn(params, x, y)
        (loss * float("nan") if step % 2 else loss).backward()
        opt.step()
        opt.zero_grad()
    assert opt.stats.skipped_outer_steps == MAX_SKIPPED_ROUNDS + 1
    opt.close()


class _NoFiniteAverage(LocalBackend):
    """A round in which no finite contribution arrived (the others' were NaN)."""

    def average(self, flat, *, weight=1.0, compressor=None, step=None):  # type: ignore[no-untyped-def]
        result = super().average(flat, weight=weight, compressor=compressor, step=step).wait()
        nan = torch.full_like(result.mean, float("nan"))
        return DoneWork(dataclasses.replace(result, mean=nan, num_peers=0, total_weight=0.0))


def test_a_skipped_round_puts_the_local_parameters_back_on_theta():
    # This worker's own steps were finite; the round had no finite average. θ is kept, and
    # the worker starts its next round from θ like every other worker, not from its own.
    model = make_model(0)
    params = list(model.parameters())
    start = [p.detach().clone() for p in params]
    opt = DiLoCo(model, torch.optim.SGD(params, lr=0.1), sync_every=2, backend=_NoFiniteAverage())
    for step in (1, 2):
        x, y = batch(0, 0, step)
        loss_fn(params, x, y).backward()
        opt.step()
        opt.zero_grad()
    assert opt.stats.skipped_outer_steps == 1
    for p, g, s in zip(params, opt.global_tensors(), start, strict=True):
        assert torch.equal(g, s) and torch.equal(p.detach(), g)
    opt.close()


# -- arguments ---------------------------------------------------------------------------------


def test_compression_must_be_an_object_not_a_string_or_anything():
    model = make_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"parse_compression\('int8'\)"):
        DiLoCo(model, inner, sync_every=2, compression="int8")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Compressor"):
        DiLoCo(model, inner, sync_every=2, compression=object())  # type: ignore[arg-type]


def test_overlap_steps_must_be_an_integer_not_a_bool():
    model = make_model()
    with pytest.raises(ValueError, match="overlap_steps"):
        DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), sync_every=4, overlap_steps=True)


def test_step_after_close_raises():
    model = make_model()
    params = list(model.parameters())
    opt = DiLoCo(model, torch.optim.SGD(params, lr=0.1), sync_every=2)
    opt.close()
    x, y = batch(0, 0, 1)
    loss_fn(params, x, y).backward()
    with pytest.raises(RuntimeError, match="after close"):
        opt.step()


class DenseOnlyBackend(LocalBackend):
    """A transport that can only sum dense slices (as hivemind's)."""

    def check_compressor(self, compressor):  # type: ignore[no-untyped-def]
        if compressor is not None and not compressor.dense:
            raise ValueError("sparse compressor refused")


def test_a_compressor_the_backend_cannot_carry_is_refused_at_construction():
    model = make_model()
    with pytest.raises(ValueError, match="sparse compressor refused"):
        DiLoCo(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            sync_every=2,
            compression=TopK(0.1),
            backend=DenseOnlyBackend(),
        )


def _configured(rank: int, world: int, what: str) -> str:
    model = make_model(0)
    params = list(model.parameters())
    frags = [params[:2], params[2:]]
    outer_lr = 0.7
    if rank == 1 and what == "fragments":
        frags = [[params[0], params[2]], [params[1], params[3]]]  # same counts, other members
    if rank == 1 and what == "outer_lr":
        outer_lr = 0.3
    try:
        DiLoCo(
            model,
            torch.optim.SGD(params, lr=0.1),
            sync_every=4,
            fragments=frags,
            outer_optimizer=functools.partial(torch.optim.SGD, lr=outer_lr, momentum=0.9),
            compression=Int8(),
        )
    except ConsistencyError as e:
        return str(e)
    return "accepted"


@pytest.mark.dist
@pytest.mark.parametrize("what", ["fragments", "outer_lr"])
def test_ranks_with_other_fragment_members_or_outer_settings_are_refused(what):
    for message in run_ranks(_configured, 2, what, timeout=30):
        assert "differ from rank 0" in message
