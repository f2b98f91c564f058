"""Rounds cut by a shared clock: slow workers contribute less but are never left out.

A fake clock drives :class:`DeadlineSchedule` and DiLoCo on deadlines, so every test is
exact and instant.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import pytest
import torch

from lowcomm import DeadlineSchedule, DiLoCo, LocalBackend
from lowcomm.comm.base import DoneWork

from .oracle import batch, loss_fn, make_model


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _run(schedule: DeadlineSchedule, clock: Clock, times: list[float]) -> list[tuple]:
    """(step, fragments due, keys) for inner steps ending at ``times``."""
    out = []
    for step, t in enumerate(times, start=1):
        clock.t = t
        due = schedule.due(step)
        out.append((step, due, [schedule.key(f, step) for f in due]))
    return out


def test_fragments_sync_at_the_clocks_slots_whatever_the_pace():
    clock = Clock(1000.2)
    sched = DeadlineSchedule(10.0, num_fragments=2, sync_every=8, clock=clock)
    # Slots of 5 s: 1000-1005 is slot 200 (fragment 0), 1005-1010 slot 201 (fragment 1).
    fast = _run(sched, clock, [1000.2 + 0.5 * i for i in range(1, 41)])
    syncs = [(s, d, k) for s, d, k in fast if d]
    assert [d for _, d, _ in syncs] == [[1], [0], [1], [0]]
    assert [k for _, _, k in syncs] == [[201], [202], [203], [204]]
    # A worker at a fifth of the pace syncs at the same slots, with the same keys.
    slow_clock = Clock(1000.2)
    slow = DeadlineSchedule(10.0, num_fragments=2, sync_every=8, clock=slow_clock)
    slow_syncs = [
        r for r in _run(slow, slow_clock, [1000.2 + 2.5 * i for i in range(1, 9)]) if r[1]
    ]
    assert [k for _, _, k in slow_syncs] == [[201], [202], [203], [204]]


def test_a_worker_that_slept_through_rounds_syncs_once_and_is_stale():
    clock = Clock(1000.0)
    sched = DeadlineSchedule(10.0, clock=clock)
    _run(sched, clock, [1001.0, 1011.0])  # one round: fragment 0 synced at slot 101
    clock.t = 1045.0  # stalled for three rounds
    assert sched.due(3) == [0] and sched.key(0, 3) == 104 and sched.stale(0)
    clock.t = 1051.0
    assert sched.due(4) == [0] and not sched.stale(0)
    # After the swarm's state was downloaded, counting restarts: nothing is stale.
    clock.t = 1095.0
    assert sched.last_sync_step(0, 40) == 40
    clock.t = 1101.0
    assert sched.due(5) == [0] and not sched.stale(0)


def test_a_worker_never_syncs_for_a_round_beyond_the_next_one():
    # The last soak's incident: back from a stall, a peer's step timings said its steps were
    # longer than a slot, so every step synced early, alone, for a round further ahead.
    clock = Clock(1000.0)
    sched = DeadlineSchedule(10.0, clock=clock)
    _run(sched, clock, [1000.0, 1030.0, 1060.0, 1090.0])  # steps timed at 30 s
    keys = []
    for step, t in enumerate([1090.1, 1090.2, 1090.3, 1090.4, 1101.0], start=5):
        clock.t = t
        keys += [(t, sched.key(f, step)) for f in sched.due(step)]
    # One early sync for the round at 1100 (the next step would end past it), then nothing
    # until that round has started; then its successor.
    assert keys == [(1090.1, 110), (1101.0, 111)]


def _sync_times(step_seconds: float, sync_seconds: float, until: float, keep: bool = False) -> Any:
    """(time the sync started, key) for a worker whose inner steps take ``step_seconds``
    and whose syncs block it ``sync_seconds``, on rounds of 10 s from t = 1000.3 (and the
    schedule, with ``keep``)."""
    clock = Clock(1000.3)
    sched = DeadlineSchedule(10.0, clock=clock)
    out, step = [], 0
    while clock.t < until:
        clock.t += step_seconds
        step += 1
        for f in sched.due(step):
            out.append((round(clock.t, 6), sched.key(f, step)))
            clock.t += sync_seconds
    return (out, sched) if keep else out


def test_every_worker_reaches_the_round_before_it_starts_whatever_its_pace():
    # The round of slot 101 starts at 1010. A worker syncs at its last step that ends before
    # a round starts (the next would end after it), not at the first that ends after: a slow
    # machine would otherwise come up to one of its steps late, and find the group formed.
    for step_seconds in (0.5, 1.3, 3.0):
        syncs = _sync_times(step_seconds, 2.0, 1060.0)
        assert [k for _, k in syncs] == list(range(101, 101 + len(syncs)))
        late = [(t, k) for t, k in syncs if t > 10.0 * k]
        # Only the first sync, before the worker has timed a step, may be late.
        assert late in ([], syncs[:1]), (step_seconds, syncs)
        early = [10.0 * k - t for t, k in syncs[1:]]
        assert all(0 <= e < step_seconds + 1e-9 for e in early), (step_seconds, syncs)
    # The time a sync blocks the worker never counts as an inner step's: 3 s steps and 6 s
    # syncs alternate, and counted together their median would be 9 s.
    syncs, sched = _sync_times(3.0, 6.0, 1100.0, keep=True)
    assert sched.step_seconds() == 3.0 and len(syncs) >= 8


def test_missing_exactly_one_round_is_stale():
    for fragments in (1, 2):
        clock = Clock(1000.0)
        sched = DeadlineSchedule(10.0, num_fragments=fragments, sync_every=4, clock=clock)
        slot = 10.0 / fragments
        _run(sched, clock, [1001.0, 1000.0 + slot + 1.0])  # fragment 1 % P synced once
        # Its next slot comes P slots later; one round later than that is one missed.
        clock.t = 1000.0 + (2 * fragments + 1) * slot + 1.0
        (frag,) = sched.due(3)
        assert frag == 1 % fragments and sched.stale(frag)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True])
def test_round_seconds_must_be_a_positive_number(bad):
    with pytest.raises(ValueError, match="round_seconds"):
        DeadlineSchedule(bad)


class Recording(LocalBackend):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int | None, float]] = []

    def average(self, flat, *, weight=1.0, compressor=None, step=None):  # type: ignore[no-untyped-def]
        self.calls.append((step, weight))
        return super().average(flat, weight=weight, compressor=compressor, step=step)


def test_diloco_on_deadlines_weighs_each_round_by_the_steps_taken(monkeypatch):
    clock = Clock(1000.0)
    monkeypatch.setattr(time, "time", clock)
    model = make_model(0)
    params = list(model.parameters())
    backend = Recording()
    opt = DiLoCo(
        model, torch.optim.SGD(params, lr=0.1), sync_every=4, backend=backend, round_seconds=10.0
    )
    # 4 steps in the first round, 7 in the second (a machine that sped up), then a stall.
    times = [1002, 1004, 1006, 1011] + [1012 + i for i in range(6)] + [1021, 1055, 1061]
    for step, t in enumerate(times, start=1):
        clock.t = float(t)
        x, y = batch(0, 0, step)
        loss_fn(params, x, y).backward()
        opt.step()
        opt.zero_grad()
    assert backend.calls == [(101, 4.0), (102, 7.0), (105, 0.0), (106, 1.0)]
    # The stale round sat out (weight 0) and left theta alone; the others stepped it.
    assert opt.stats.fragment_syncs == 4 and opt.stats.skipped_outer_steps == 1
    opt.close()


class Scripted(Recording):
    """A swarm peer whose rounds hold the scripted number of peers, and whose state is found
    to differ from the swarm's after the rounds listed in ``resync_after``."""

    def __init__(self, peers: list[int], resync_after: set[int]) -> None:
        super().__init__()
        self.peers, self.resync_after, self.resync = peers, resync_after, False
        self.elastic = True

    def average(self, flat, *, weight=1.0, compressor=None, step=None):  # type: ignore[no-untyped-def]
        result = super().average(flat, weight=weight, compressor=compressor, step=step).wait()
        n = len(self.calls)
        self.resync = n in self.resync_after
        return DoneWork(dataclasses.replace(result, num_peers=self.peers[n - 1]))

    def sync_state(self, tensors):  # type: ignore[no-untyped-def]
        pass

    def publish_state(self, tensors):  # type: ignore[no-untyped-def]
        pass

    def needs_resync(self) -> bool:
        return self.resync

    def set_round_seconds(self, round_seconds):  # type: ignore[no-untyped-def]
        pass

    def bound_weights(self, max_weight):  # type: ignore[no-untyped-def]
        pass


def test_the_steps_a_worker_loses_are_counted(monkeypatch):
    # Steps of 2.5 s, rounds of 10 s: a sync every 4 steps (the first after 3). Met the
    # others in round 101; alone in 102 while they moved on, so its state is replaced
    # after it (those steps lost); met them in 103; stalled 30 s into round 105, stale (its
    # one step since sat out: lost); alone in 106 and 107 with nobody else there (kept: its
    # state is the swarm's), then met the others again.
    clock = Clock(1000.0)
    monkeypatch.setattr(time, "time", clock)
    model = make_model(0)
    params = list(model.parameters())
    backend = Scripted([2, 1, 2, 2, 1, 1, 2, 2], resync_after={2})
    opt = DiLoCo(
        model, torch.optim.SGD(params, lr=0.1), sync_every=4, backend=backend, round_seconds=10.0
    )
    times = [1000.0 + 2.5 * i for i in range(1, 12)] + [1058.0]
    times += [1058.0 + 2.5 * i for i in range(1, 13)]
    for step, t in enumerate(times, start=1):
        clock.t = t
        x, y = batch(0, 0, step)
        loss_fn(params, x, y).backward()
        opt.step()
        opt.zero_grad()
    # The download after round 102 (synced before it started) does not make it due again.
    assert backend.calls[:4] == [(101, 3.0), (102, 4.0), (103, 4.0), (105, 0.0)]
    weights = [w for _, w in backend.calls]
    assert len(weights) == 8
    assert opt.stats.averaged_steps == weights[0] + weights[2] + weights[6] + weights[7]
    assert opt.stats.discarded_steps == 4.0 + 1.0  # the lone round 102, the stale step
    opt.close()
