"""DiLoCo over the hivemind backend: a volunteer joins mid-run and continues bit-exactly."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

pytest.importorskip("hivemind")
pytest.importorskip("psutil")

from lowcomm.optim.diloco import DiLoCo  # noqa: E402

from .test_hivemind import CTX, Peers, _backend, bootstrap, peers, reap  # noqa: E402, F401

pytestmark = [pytest.mark.hivemind, pytest.mark.timeout(150)]


def _snapshot(opt: DiLoCo) -> dict[str, Any]:
    outer = opt.outer_optimizers[0]
    return {
        "global": [g.clone().numpy() for g in opt.global_tensors()],
        "momentum": [
            outer.state[g]["momentum_buffer"].clone().numpy() for g in opt.global_tensors()
        ],
        "inner_steps": opt.stats.inner_steps,
        # The default outer step's ramp (OuterWarmup): where a peer is on it.
        "outer_step": outer.param_groups[0]["outer_step"],
    }


def _volunteer(index: int, maddrs: list[str], rounds: int, h: int, joined: Any) -> dict:
    joiner = index == 3
    torch.manual_seed(100 if joiner else 0)  # the joiner starts from another init
    model = torch.nn.Linear(8, 4)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    backend = _backend("swarm-diloco", maddrs)
    try:
        if joiner:
            joined.wait(90)
        opt = DiLoCo(model, inner, sync_every=h, backend=backend)
        synced = {"version": opt.stats.fragment_syncs, **_snapshot(opt)}
        history = {opt.stats.fragment_syncs: _snapshot(opt)}
        peers_seen = []
        g = torch.Generator().manual_seed(index)
        while opt.stats.inner_steps < rounds * h:
            x, y = torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            if opt.stats.inner_steps % h == 0:
                history[opt.stats.fragment_syncs] = {
                    **_snapshot(opt),
                    "peers": opt.stats.num_peers,
                }
                peers_seen.append(opt.stats.num_peers)
                if index == 0 and opt.stats.fragment_syncs == 2:
                    joined.set()
                time.sleep(0.3)  # "training"
        return {"synced": synced, "history": history, "peers": peers_seen}
    finally:
        backend.close()


def test_volunteer_joins_mid_run_with_theta_momentum_and_step(
    bootstrap: list[str],  # noqa: F811
    peers: Peers,  # noqa: F811
) -> None:
    rounds, h = 7, 2
    joined = CTX.Event()
    for i in range(4):
        peers.start(_volunteer, i, bootstrap, rounds, h, joined)
    results = peers.collect([0, 1, 2, 3], timeout=140)
    joiner = results[3]["synced"]
    assert joiner["version"] >= 2 and joiner["inner_steps"] == joiner["version"] * h
    version = joiner["version"]

    def equal(a: dict[str, Any], b: dict[str, Any], keys: tuple[str, ...]) -> bool:
        return all(
            torch.equal(torch.from_numpy(x), torch.from_numpy(y))
            for key in keys
            for x, y in zip(a[key], b[key])
        )

    def all_full(upto: int) -> bool:
        # Every round up to version ``upto`` had everyone: the three originals, then four.
        return all(
            snap["peers"] == (3 if v <= version else 4)
            for r in results.values()
            for v, snap in r["history"].items()
            if "peers" in snap and v <= upto
        )

    # Right after construction the joiner holds the swarm's θ, outer momentum and step: what
    # every original held there, unless a round before it lacked one of them (under load a
    # sender can time out; the peer left out averages alone and resyncs later).
    originals = {
        i: results[i]["history"][version] for i in range(3) if version in results[i]["history"]
    }
    same = [i for i, o in originals.items() if equal(joiner, o, ("global", "momentum"))]
    assert same, f"no original held the joiner's state at version {version}"
    # ... and the point of the outer step's warm-up they had reached, which the joiner
    # continues from (a joiner that restarted it would step the same averages differently).
    assert joiner["outer_step"] > 0
    assert all(originals[i]["outer_step"] == joiner["outer_step"] for i in same)
    assert len(same) == len(originals) or not all_full(version), same
    # From then on it trains with the others: same θ at every round all recorded.
    later = [v for v in results[3]["history"] if v > version]
    assert later and 4 in results[3]["peers"]
    matched = 0
    for v in later:
        for i in range(3):
            if v in results[i]["history"]:
                ok = equal(results[3]["history"][v], results[i]["history"][v], ("global",))
                matched += ok
                assert ok or not all_full(v), (i, v)
    assert matched
