"""Where a worker's time goes: the timeline's spans, and the blocked seconds DiLoCo and DDP count."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lowcomm.comm.base import AverageWork, WireStats
from lowcomm.comm.compression import Int8
from lowcomm.comm.local import LocalBackend
from lowcomm.comm.timeline import KINDS, TIMELINE, Timeline
from lowcomm.optim.diloco import DiLoCo
from lowcomm.testing import run_ranks


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _train(opt: torch.optim.Optimizer, model: nn.Module, steps: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, 8, generator=g)
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def test_disabled_timeline_records_nothing_and_enabled_one_writes_what_it_timed(
    tmp_path: Path,
) -> None:
    tl = Timeline(enabled=False)
    with tl.span("compute"):
        pass
    tl.add("wait", 1.0, 2.0)
    assert tl.spans() == []
    tl.enable()
    before = time.time()
    with tl.span("compute"):
        time.sleep(0.01)
    tl.add("wait", time.perf_counter(), time.perf_counter() + 0.5)
    spans = tl.spans()
    assert [s["kind"] for s in spans] == ["compute", "wait"]
    # On time.time()'s scale, so that processes on one machine line up.
    assert before <= spans[0]["start"] < spans[0]["end"] <= time.time()
    assert spans[0]["end"] - spans[0]["start"] >= 0.01
    assert spans[1]["end"] - spans[1]["start"] == pytest.approx(0.5)
    assert spans[0]["thread"] == "MainThread"
    path = tl.write(tmp_path / "t" / "timeline.rank3.jsonl", rank=3)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[0]["header"] and lines[0]["rank"] == 3
    assert lines[1:] == spans


class _SlowBackend(LocalBackend):
    """A single-process backend whose hand-off and state calls take time on the caller's
    thread, as a swarm's DHT calls do."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def average(self, flat: torch.Tensor, **kw: Any) -> AverageWork:
        time.sleep(self.seconds)
        return super().average(flat, **kw)


def test_comm_seconds_count_time_spent_handing_an_average_to_the_backend() -> None:
    model = _model()
    backend = _SlowBackend(0.05)
    opt = DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), sync_every=2, backend=backend)
    _train(opt, model, 6)  # three syncs
    assert isinstance(backend.stats, WireStats)
    assert opt.stats.comm_seconds >= 3 * 0.05


@pytest.fixture
def timeline_on() -> Any:
    TIMELINE.clear()
    TIMELINE.enable()
    yield TIMELINE
    TIMELINE.enable(False)
    TIMELINE.clear()


def test_diloco_records_its_spans_on_the_training_thread(timeline_on: Timeline) -> None:
    model = _model()
    opt = DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), sync_every=2)
    _train(opt, model, 4)
    kinds = [s["kind"] for s in timeline_on.spans()]
    assert kinds.count("compute") == 4  # one inner step each
    assert kinds.count("prepare") == 2  # one per sync
    assert kinds.count("wait") >= 2 and kinds.count("apply") == 2
    assert set(kinds) <= set(KINDS)


def _two_rank_sync(rank: int, world_size: int) -> list[tuple[str, str]]:
    TIMELINE.clear()
    TIMELINE.enable()
    model = _model()
    opt = DiLoCo(
        model, torch.optim.SGD(model.parameters(), lr=0.1), sync_every=2, compression=Int8()
    )
    _train(opt, model, 2, seed=rank)
    opt.close()
    return [(s["kind"], s["thread"]) for s in TIMELINE.spans()]


@pytest.mark.dist
def test_torch_dist_backend_records_encode_wire_and_decode_on_its_comm_thread() -> None:
    for spans in run_ranks(_two_rank_sync, 2):
        comm = {k for k, t in spans if t.startswith("lowcomm-comm")}
        main = {k for k, t in spans if t == "MainThread"}
        assert comm == {"encode", "wire", "decode"}
        assert main == {"compute", "prepare", "wait", "apply"}


def _ddp_wait(rank: int, world_size: int, delay: float) -> tuple[float, float]:
    from lowcomm.comm.ddp_wait import DDPWaitClock

    model = nn.parallel.DistributedDataParallel(_model())
    clock = DDPWaitClock(model)
    waits = []
    for step in range(3):
        loss = model(torch.randn(4, 8)).pow(2).mean()
        if rank == 1 and step == 1:
            time.sleep(delay)  # rank 0's all-reduce cannot finish before rank 1 joins it
        loss.backward()
        waits.append(clock.backward_done())
    return waits[1], clock.seconds


@pytest.mark.dist
def test_ddp_wait_clock_counts_the_wait_for_a_late_worker() -> None:
    delay = 0.5
    (waited0, total0), (waited1, _) = run_ranks(_ddp_wait, 2, delay)
    assert waited0 >= delay  # rank 0 launched its buckets, then waited for rank 1
    assert total0 >= waited0
    assert waited1 < delay  # the late worker itself did not wait for anyone
