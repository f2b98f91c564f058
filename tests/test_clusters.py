"""Clusters: replicas of several ranks (DDP, FSDP2), the user's own collectives, GradScaler.

Every multi-rank test runs forked gloo ranks (``lowcomm.testing.run_ranks``) and compares
against a reference computed another way: two single-rank workers fed the same data, or the
same run without the disturbance.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lowcomm import DiLoCo, Int8, LocalBackend, TorchDistBackend
from lowcomm.comm import ConsistencyError, init_replica_mesh
from lowcomm.optim.params import local_view
from lowcomm.testing import run_ranks

from .oracle import batch, loss_fn, make_model

REPO = Path(__file__).resolve().parent.parent

# -- replicas --------------------------------------------------------------------------------
#
# The model's every tensor, whole or as a half shard, is a multiple of 4 elements, and int8
# uses blocks of 4: sharded and unsharded encodings then cut the same blocks, so even the
# compressed runs must agree to float rounding.
REPLICA_KW = {
    "plain": {},
    "streaming-int8": {"fragments": 2, "overlap_steps": 1, "compression": "int8:4"},
}
STEPS = 10


def _replica_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8))


def _replica_batch(replica: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * replica + step)
    return torch.randn(8, 4, generator=g), torch.randn(8, 8, generator=g)


def _options(kw: dict) -> dict:
    kw = dict(kw)
    if kw.get("compression") == "int8:4":
        kw["compression"] = Int8(4)
    return kw


def _run_worker(model, train_model, opt, replica, rows, start, stop):  # type: ignore[no-untyped-def]
    for step in range(start + 1, stop + 1):
        x, y = _replica_batch(replica, step)
        loss = ((train_model(x[rows]) - y[rows]) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()


def _single_worker(rank: int, world: int, kw: dict) -> list[torch.Tensor]:
    model = _replica_model()
    opt = DiLoCo(
        model, torch.optim.AdamW(model.parameters(), lr=0.01), sync_every=4, **_options(kw)
    )
    _run_worker(model, model, opt, rank, slice(0, 8), 0, STEPS)
    opt.flush()
    out = [g.clone() for g in opt.global_tensors()]
    opt.close()
    return out


def _build_replica(shard: str, kw: dict):  # type: ignore[no-untyped-def]
    rm = init_replica_mesh(2)
    model = _replica_model()
    if shard == "fsdp":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=rm.mesh["shard"])
        train_model = model
    else:
        train_model = nn.parallel.DistributedDataParallel(model, process_group=rm.shard_group)
    inner = torch.optim.AdamW(model.parameters(), lr=0.01)
    opt = DiLoCo(
        train_model,
        inner,
        sync_every=4,
        backend=TorchDistBackend(group=rm.replicate_group),
        **_options(kw),
    )
    rows = slice(4 * rm.shard_rank, 4 * rm.shard_rank + 4)
    return rm, model, train_model, opt, rows


def _replica_worker(rank: int, world: int, shard: str, kw: dict, resume_at: int | None):
    rm, model, train_model, opt, rows = _build_replica(shard, kw)
    if resume_at is not None:
        _run_worker(model, train_model, opt, rm.replica, rows, 0, resume_at)
        saved_model = {n: local_view(p).detach().clone() for n, p in model.named_parameters()}
        saved_opt = copy.deepcopy(opt.state_dict())
        opt.close()
        # A fresh process's view: new model, wrapping and optimizer, then load.
        rm, model, train_model, opt, rows = _build_replica(shard, kw)
        with torch.no_grad():
            for n, p in model.named_parameters():
                local_view(p).copy_(saved_model[n])
        opt.load_state_dict(saved_opt)
    start = resume_at or 0
    _run_worker(model, train_model, opt, rm.replica, rows, start, STEPS)
    opt.flush()
    glob = [g.clone() for g in opt.global_tensors()]
    local = [local_view(p).detach().clone() for p in model.parameters()]
    peers = opt.stats.num_peers
    opt.close()
    return rm.replica, rm.shard_rank, glob, local, peers


def _full(results: list, replica: int, shard: str) -> list[torch.Tensor]:
    """Replica ``replica``'s global θ, whole (FSDP2 shards dim 0 across its two ranks)."""
    mine = [r for r in results if r[0] == replica]
    mine.sort(key=lambda r: r[1])
    if shard == "ddp":
        return mine[0][2]
    return [torch.cat([a, b]) for a, b in zip(mine[0][2], mine[1][2])]


@pytest.mark.dist
@pytest.mark.parametrize("shard", ["ddp", "fsdp"])
@pytest.mark.parametrize("variant", sorted(REPLICA_KW))
def test_two_replicas_of_two_ranks_reach_the_theta_of_two_single_rank_workers(shard, variant):
    kw = REPLICA_KW[variant]
    reference = run_ranks(_single_worker, 2, kw, timeout=120)
    results = run_ranks(_replica_worker, 4, shard, kw, None, timeout=120)
    for r in results:
        assert r[4] == 2  # the average was over the two replicas
    for replica in range(2):
        for a, b in zip(_full(results, replica, shard), reference[replica], strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # Both replicas hold bit-identical θ (they all computed the same sums in rank order).
    for a, b in zip(_full(results, 0, shard), _full(results, 1, shard), strict=True):
        assert torch.equal(a, b)


@pytest.mark.dist
@pytest.mark.parametrize("shard", ["ddp", "fsdp"])
def test_replica_resume_is_bit_exact(shard):
    kw = REPLICA_KW["streaming-int8"]
    straight = run_ranks(_replica_worker, 4, shard, kw, None, timeout=120)
    # Stop at step 5: a fragment sync launched at step 4 (τ=1) is in flight... and landed at
    # 5; stop at 6 leaves the sync launched at 6 in flight when the state is saved.
    resumed = run_ranks(_replica_worker, 4, shard, kw, 6, timeout=120)
    for a, b in zip(straight, resumed, strict=True):
        for x, y in zip(a[2] + a[3], b[2] + b[3], strict=True):
            assert torch.equal(x, y)


def _spans_shards(rank: int, world: int) -> str:
    rm = init_replica_mesh(2)
    from torch.distributed.fsdp import fully_shard

    model = _replica_model()
    fully_shard(model, mesh=rm.mesh["shard"])
    try:
        # The default group holds both shards of every replica: must be refused.
        DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), sync_every=2)
    except ConsistencyError as e:
        return str(e)
    return "accepted"


@pytest.mark.dist
def test_sharded_parameters_on_a_group_that_spans_shards_are_refused():
    messages = run_ranks(_spans_shards, 4, timeout=60)
    for m in messages:
        assert "different shards" in m and "replicate" in m


@pytest.mark.dist
def test_replica_mesh_needs_a_divisor_of_the_world():
    def body(rank: int, world: int) -> str:
        try:
            init_replica_mesh(2)
        except ValueError as e:
            return str(e)
        return "accepted"

    assert all("must divide the world size (3)" in m for m in run_ranks(body, 3, timeout=60))


# -- the user's own collectives ----------------------------------------------------------------


def _logging_loop(rank: int, world: int, log: bool) -> list[torch.Tensor]:
    model = make_model(0)
    params = list(model.parameters())
    opt = DiLoCo(
        model,
        torch.optim.SGD(params, lr=0.1),
        sync_every=8,
        fragments=[params[:2], params[2:]],
        overlap_steps=2,
    )
    for step in range(1, 25):
        x, y = batch(0, rank, step)
        loss = loss_fn(params, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if log:
            # The most common logging pattern: average the loss over ranks every step, on
            # the default group, while overlapped syncs are on the wire.
            avg = loss.detach().clone()
            dist.all_reduce(avg)
    opt.flush()
    out = [g.clone() for g in opt.global_tensors()]
    opt.close()
    return out


@pytest.mark.dist
def test_logging_all_reduce_beside_overlapped_syncs_finishes_with_the_same_theta():
    logged = run_ranks(_logging_loop, 2, True, timeout=60)
    quiet = run_ranks(_logging_loop, 2, False, timeout=60)
    for a, b, c in zip(logged[0], logged[1], quiet[0], strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def _private_group(rank: int, world: int) -> bool:
    backend = TorchDistBackend()
    try:
        return backend.group is not None and backend.group != dist.group.WORLD
    finally:
        backend.close()


@pytest.mark.dist
def test_backend_averages_on_a_group_of_its_own():
    assert run_ranks(_private_group, 2, timeout=30) == [True, True]


# -- GradScaler ---------------------------------------------------------------------------------


def _scaled_loop(rank: int, world: int, poison: tuple[int, int] | None) -> dict:
    model = make_model(0)
    params = list(model.parameters())
    inner = torch.optim.SGD(params, lr=0.1)
    calls = []
    inner.register_step_post_hook(lambda *_: calls.append(1))
    opt = DiLoCo(model, inner, sync_every=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for step in range(1, 9):
        x, y = batch(0, rank, step)
        scaler.scale(loss_fn(params, x, y)).backward()
        if poison == (rank, step):
            params[0].grad[0, 0] = float("inf")  # an overflow on this rank only
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    out = {
        "theta": [g.clone() for g in opt.global_tensors()],
        "inner_steps": opt.stats.inner_steps,
        "outer_steps": opt.stats.outer_steps,
        "inner_calls": len(calls),
    }
    opt.close()
    return out


@pytest.mark.dist
def test_gradscaler_skip_on_one_rank_keeps_every_rank_on_the_same_schedule():
    results = run_ranks(_scaled_loop, 2, (1, 3), timeout=60)
    for r in results:
        assert r["inner_steps"] == 8 and r["outer_steps"] == 4
    # Rank 1 skipped its inner update at step 3; rank 0 did not.
    assert [r["inner_calls"] for r in results] == [8, 7]
    for a, b in zip(results[0]["theta"], results[1]["theta"], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("unscale_first", [False, True])
def test_gradscaler_through_diloco_steps_like_through_the_inner_optimizer(unscale_first):
    # H larger than the run: no sync, so DiLoCo's inner steps must equal plain SGD's.
    def run(wrap: bool) -> list[torch.Tensor]:
        model = make_model(0)
        params = list(model.parameters())
        inner = torch.optim.SGD(params, lr=0.1, momentum=0.9)
        opt = DiLoCo(model, inner, sync_every=100, backend=LocalBackend()) if wrap else inner
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        for step in range(1, 7):
            x, y = batch(0, 0, step)
            scaler.scale(loss_fn(params, x, y)).backward()
            if step == 4:
                params[2].grad[0, 0] = float("nan")
            if unscale_first:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        return [p.detach().clone() for p in params]

    for a, b in zip(run(True), run(False), strict=True):
        assert torch.equal(a, b)


# -- torchrun without a process group -------------------------------------------------------------


def _readme_dropin() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Drop-in usage") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]


@pytest.mark.dist
def test_readme_dropin_snippet_under_torchrun_averages_across_both_ranks(tmp_path):
    prelude = (
        "import json, os, torch\n"
        "class MyModel(torch.nn.Sequential):\n"
        "    def __init__(self):\n"
        "        super().__init__(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))\n"
        "_g = torch.Generator().manual_seed(int(os.environ['RANK']))\n"
        "loader = [(torch.randn(4, 8, generator=_g), torch.randint(0, 4, (4,), generator=_g))\n"
        "          for _ in range(520)]\n"
    )
    # One file per rank: torchrun interleaves its workers' stdout, so two printed lines can
    # arrive as one (CI saw exactly that).
    epilogue = (
        "\nopen(f\"stats{os.environ['RANK']}.json\", 'w').write(json.dumps({"
        "'rank': int(os.environ['RANK']), 'peers': opt.stats.max_peers, "
        "'sent': opt.stats.bytes_sent, 'outer': opt.stats.outer_steps}))\n"
    )
    script = tmp_path / "dropin.py"
    script.write_text(prelude + _readme_dropin() + epilogue)
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=170,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    stats = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("stats*.json"))]
    assert sorted(s["rank"] for s in stats) == [0, 1]
    for s in stats:
        assert s["peers"] == 2 and s["sent"] > 0 and s["outer"] >= 1, stats
