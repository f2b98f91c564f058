"""The reliability harness (``scripts/reliability``): its schedule and invariant checker on
made-up records (fast), a short churn soak of real swarm peers (``hivemind``), torchrun
restarts against an uninterrupted run (``dist``); and the swarm bugs the soak found, each
with the test that failed until it was fixed."""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import pytest
import torch

from scripts.reliability.events import Event, plan_events
from scripts.reliability.invariants import RoundRecord, SoakChecker
from scripts.reliability.soak import compare_loss

# -- the fault schedule ------------------------------------------------------------------------


def _replay(events: list[Event], num_slots: int) -> tuple[int, Counter[str]]:
    """The fewest slots up and not stalled at any event, replaying the schedule."""
    up = dict.fromkeys(range(num_slots), True)
    stalled_until = dict.fromkeys(range(num_slots), -1.0)
    fewest = num_slots
    for e in events:
        if e.kind == "join":
            assert not up[e.slot], f"join of slot {e.slot}, which is up"
            up[e.slot] = True
            continue
        assert up[e.slot] and stalled_until[e.slot] <= e.at, f"{e} hits a slot not running"
        if e.kind == "stall":
            stalled_until[e.slot] = e.at + e.seconds
        else:
            up[e.slot] = False
        running = sum(1 for s in up if up[s] and stalled_until[s] <= e.at)
        fewest = min(fewest, running)
    return fewest, Counter(e.kind for e in events)


def test_schedule_is_seeded_valid_and_long_enough_for_the_full_soak():
    events = plan_events(1, 1800, mean_gap=20, round_seconds=5)
    assert events == plan_events(1, 1800, mean_gap=20, round_seconds=5)
    assert events != plan_events(2, 1800, mean_gap=20, round_seconds=5)
    fewest, kinds = _replay(events, 4)
    assert fewest >= 2  # min_live
    assert len(events) >= 100 and set(kinds) == {"kill", "leave", "stall", "join"}
    # Every kill and leave brings its slot back, and no event starts in the quiet tail.
    assert kinds["join"] == kinds["kill"] + kinds["leave"]
    assert max(e.at for e in events) <= 1800 - 30
    stalls = [e.seconds for e in events if e.kind == "stall"]
    assert min(stalls) < 5 < max(stalls)  # inside one round, and across several


def test_schedule_refuses_a_floor_it_cannot_keep():
    with pytest.raises(ValueError, match="min_live"):
        plan_events(0, 100, num_slots=2, min_live=2)


# -- the invariant checker ---------------------------------------------------------------------


def _rec(peer: str, t: float, version: int, theta: str, **kw: Any) -> RoundRecord:
    fields: dict[str, Any] = {
        "step": int(t * 10),
        "peers": 3,
        "sat_out": False,
        "state_bytes": 0,
        "comm_s": 0.5 * version,
        "wait_timeout_s": 18.0,
    }
    fields.update(kw)
    return RoundRecord(peer, t, version=version, theta=theta, **fields)


def _checker(*peers: str) -> SoakChecker:
    checker = SoakChecker(recover_rounds=2, progress_bound=30.0, startup_bound=60.0)
    for p in peers:
        checker.peer_started(p, 0.0)
    return checker


def _kinds(checker: SoakChecker, now: float, final: bool = False) -> list[tuple[str, str]]:
    return sorted((v.kind, v.peer) for v in checker.check(now, final=final))


def test_agreeing_peers_and_a_peer_back_in_agreement_within_the_bound_pass():
    checker = _checker("a", "b", "c")
    for v in range(1, 7):
        for p in "abc":
            # c averaged alone at version 2, and agrees again at version 3.
            theta = "solo" if (p, v) == ("c", 2) else f"t{v}"
            checker.add(_rec(p, 4.0 * v, v, theta, peers=1 if theta == "solo" else 3))
    assert checker.swarm_theta(2) == "t2"
    assert _kinds(checker, 25.0, final=True) == []
    assert checker.recovery_lags() == [1]


def test_a_tie_goes_to_the_state_the_peers_themselves_keep():
    # Two groups of 2 in one round: the peers keep the larger group's state, then the one
    # holding the highest peer id (_resync_plan); the checker's swarm state must be that
    # one, not merely the larger digest.
    checker = _checker("a", "b", "c", "d", "e")
    holders = (("a", "zz", "Qm1"), ("b", "zz", "Qm2"), ("c", "aa", "Qm9"), ("d", "aa", "Qm3"))
    for p, theta, pid in holders:
        checker.add(_rec(p, 4.0, 1, theta, peers=2, peer_id=pid))
    assert checker.swarm_theta(1) == "aa"
    checker.add(_rec("e", 4.0, 1, "zz", peers=3, peer_id="Qm0"))
    assert checker.swarm_theta(1) == "zz"  # most holders first


def test_a_peer_that_stays_apart_is_found_live_once_the_swarm_moved_on():
    checker = _checker("a", "b", "c")
    for v in range(1, 4):
        for p in "abc":
            checker.add(_rec(p, 4.0 * v, v, f"{p}{v}" if p == "c" else f"t{v}"))
        if v < 3:
            # Not yet: c has rounds left to agree in, and version 1 is not settled.
            assert _kinds(checker, 4.0 * v) == []
    assert _kinds(checker, 12.0) == [("diverged", "c")]
    assert _kinds(checker, 12.0) == []  # each violation is reported once


def test_a_peer_killed_before_it_could_agree_again_is_not_counted_but_one_at_the_end_is():
    checker = _checker("a", "b", "c")
    for p in "abc":
        checker.add(_rec(p, 4.0, 1, "odd" if p == "c" else "t1"))
    checker.update_peer("c", ended=5.0, cause="kill")
    assert _kinds(checker, 6.0, final=True) == []
    checker = _checker("a", "b", "c")
    for p in "abc":
        checker.add(_rec(p, 4.0, 1, "odd" if p == "c" else "t1"))
    for p in "abc":
        checker.update_peer(p, ended=5.0, cause="end", returncode=143)
    assert _kinds(checker, 6.0, final=True) == [("diverged", "c")]


def test_a_peer_that_goes_back_to_an_older_version_regressed():
    checker = _checker("a", "b")
    for v, t in ((5, 4.0), (6, 8.0), (4, 12.0)):
        checker.add(_rec("a", t, v, f"t{v}"))
        checker.add(_rec("b", t, 4 if v == 4 else v, f"t{v}"))
    assert ("regressed", "a") in _kinds(checker, 13.0)


def test_a_peer_that_averaged_alone_may_rejoin_the_majoritys_older_state():
    # c averaged alone (nobody else came) to versions 5 and 6 while a and b held 4, then
    # rejoins their version 4: its solo rounds were never the swarm's. Had it met someone
    # in one of them, that round of the swarm would be lost.
    for solo_peers, expected in ((1, []), (2, [("regressed", "c")])):
        checker = _checker("a", "b", "c")
        for p in "abc":
            checker.add(_rec(p, 4.0, 4, "t4"))
        checker.add(_rec("c", 6.0, 5, "c5", peers=1))
        checker.add(_rec("c", 8.0, 6, "c6", peers=solo_peers))
        checker.add(_rec("c", 10.0, 4, "t4", state_bytes=100))
        assert [k for k in _kinds(checker, 11.0) if k[0] == "regressed"] == expected
        assert checker.solo_rounds_given_up() == (2 if solo_peers == 1 else 0)


def test_a_round_blocked_past_its_bound_stalled_unless_the_harness_stopped_the_peer():
    checker = _checker("a", "b")
    checker.add(_rec("a", 5.0, 1, "t1", comm_s=1.0))
    checker.add(_rec("a", 30.0, 2, "t2", comm_s=26.0))  # 25 s blocked, bound 18 (+1)
    checker.add(_rec("b", 5.0, 1, "t1", comm_s=1.0))
    checker.add(_rec("b", 30.0, 2, "t2", comm_s=26.0))
    checker.update_peer("b", stalls=[[10.0, 20.0]])  # 10 s of it stopped: 15 s counted
    assert _kinds(checker, 31.0) == [("stalled", "a")]
    # A round that downloaded the swarm's state may also take the download's bound.
    bounds = {"round_bound_s": 18.0, "download_bound_s": 30.0}
    checker = _checker("c", "d")
    for name, state_bytes in (("c", 0), ("d", 1000)):
        checker.add(_rec(name, 5.0, 1, "t1", comm_s=1.0, **bounds))
        checker.add(_rec(name, 30.0, 2, "t2", comm_s=26.0, state_bytes=state_bytes, **bounds))
    assert _kinds(checker, 31.0) == [("stalled", "c")]


def test_no_progress_exits_hung_leaves_and_orphans_are_violations():
    checker = _checker("quiet", "late", "crash", "hung", "kid")
    checker.add(_rec("quiet", 5.0, 1, "t1"))
    # "late" never logs a round (80 s, bound 60); "quiet" none for 75 s (bound 30).
    checker.update_peer("crash", ended=3.0, cause="exit", returncode=1)
    checker.update_peer("hung", ended=3.0, cause="leave", returncode=None)
    checker.update_peer("kid", ended=3.0, cause="kill", orphans=[123], returncode=-9)
    found = _kinds(checker, 80.0)
    assert found == [
        ("exited", "crash"),
        ("leave_hung", "hung"),
        ("no_progress", "late"),
        ("no_progress", "quiet"),
        ("orphans", "kid"),
    ]
    # Time the harness had a peer stopped does not count against it.
    checker = _checker("late")
    checker.update_peer("late", stalls=[[0.0, 30.0]])
    assert _kinds(checker, 80.0) == []  # 50 s running of a 60 s startup bound


def test_the_round_bound_the_soak_checks_is_the_documented_one():
    """SwarmTimeouts: a round blocks at most every timeout it passes through; the soak
    checks each round against the bound its peer logged (these properties)."""
    from lowcomm.comm._swarm_timeouts import SwarmTimeouts

    for seconds, wait in ((5.0, 3.0 + 5.0 + 10.0), (100.0, 30.0 + 100.0 + 10.0)):
        t = SwarmTimeouts.from_round_seconds(seconds)
        assert t.wait_timeout == t.matchmaking_timeout + t.averaging_timeout + 10.0 == wait
        assert t.round_bound == (
            60.0 + 2 * t.start_timeout + t.matchmaking_timeout + wait + 5.0 + 3 * t.dht_timeout
        )
        assert t.download_bound == (
            t.dht_patience + 4 * t.dht_timeout + wait + 3 * max(30.0, t.averaging_timeout)
        )
    # A round that downloaded the state may block the download's bound longer.
    rec = _rec("a", 1.0, 1, "x", round_bound_s=113.0, download_bound_s=128.0)
    assert rec.bound(False) == 113.0 and rec.bound(True) == 241.0
    assert _rec("a", 1.0, 1, "x").bound(True) == 18.0  # records from before: wait_timeout


def test_sigterm_to_a_harness_runs_its_cleanup(tmp_path):
    """The soak and robust harnesses stop their peers in ``finally``; SIGTERM's default action
    skipped it and left the peers running (some stopped) after the harness was gone."""
    import signal
    import subprocess
    import sys

    from scripts.reliability import REPO

    done = tmp_path / "cleaned"
    code = (
        "import time\n"
        "from scripts.reliability.swarm import exit_on_sigterm\n"
        "exit_on_sigterm()\n"
        "try:\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(60)\n"
        "finally:\n"
        f"    open({str(done)!r}, 'w').write('yes')\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert done.read_text() == "yes"


def _checkpoint(run_dir: Any, step: int, theta: torch.Tensor) -> Any:
    from lowcomm import checkpoint as ckpt

    shared = {"param.w": theta, "meta.outer_step": torch.tensor([step // 10])}
    state = {"optimizer": {"lowcomm": {"shared": shared}}, "step": step}
    return ckpt.save_checkpoint(
        ckpt.checkpoint_root(run_dir), step, state, rank=0, world_size=1, manifest={}, keep=3
    )


def test_a_killed_peers_checkpoint_must_load_and_hold_the_theta_it_logged(tmp_path):
    from lowcomm.recipes.train_lm import theta_digest
    from scripts.reliability.soak import check_checkpoint

    theta = torch.arange(4.0)
    _checkpoint(tmp_path, 10, theta)
    newest = _checkpoint(tmp_path, 20, theta + 1)
    peer = {"name": "p", "run_dir": str(tmp_path)}
    logged = [_rec("p", 1.0, 1, theta_digest([theta]), step=10)]
    logged.append(_rec("p", 2.0, 2, theta_digest([theta + 1]), step=20))
    out = check_checkpoint(peer, logged)
    assert out["ok"] and out["checkpoint"] == newest.name and out["matches_log"]
    # Killed while writing a newer one: the newest complete one is what must load.
    (newest.parent / "step_000000030").mkdir()
    out = check_checkpoint(peer, logged)
    assert out["ok"] and out["newest_incomplete"] and out["checkpoint"] == newest.name
    # A θ other than the one the peer ran with at that step is a violation.
    assert not check_checkpoint(peer, logged[:1])["ok"]
    # A damaged newest one (flipped bytes) is passed over, as --resume auto does: the
    # previous one verifies, loads, and holds what the peer logged at its step.
    rank_file = next(newest.glob("rank*"))
    data = bytearray(rank_file.read_bytes())
    data[-20] ^= 0xFF
    rank_file.write_bytes(bytes(data))
    out = check_checkpoint(peer, logged)
    assert out["ok"] and out["checkpoint"] == "step_000000010" and out["matches_log"]


def test_loss_comparison_uses_the_tokens_both_runs_reached():
    churn = {
        "survivors": ["a"],
        "evals": {"a": [{"tokens": t, "loss": 2.2} for t in (100, 900, 1000)], "k": []},
    }
    clean = {"evals": {"x": [{"tokens": t, "loss": 2.0} for t in (100, 950, 2000)]}}
    out = compare_loss(churn, clean, window=0.1)
    assert out["tokens"] == [900.0, 1000]
    assert out["churn_points"] == 2 and out["clean_points"] == 1
    assert out["x_percent"] == pytest.approx(10.0)


# -- swarm bugs the soak found (each failed until its fix) ------------------------------------


def _shared_state(peer: str, version: int = 0, history: dict[int, tuple[str, int]] | None = None):  # type: ignore[no-untyped-def]
    """A peer's served-state bookkeeping, without a DHT (as ``tests/test_hivemind.py``)."""
    from lowcomm.comm._swarm_membership import _Peer
    from lowcomm.comm._swarm_state import _SharedState
    from lowcomm.comm._swarm_timeouts import SwarmTimeouts

    me = _Peer("run", peer, None, "prefix", SwarmTimeouts.from_round_seconds(5.0))
    state = _SharedState(me, procs=None)
    state.version, state.history = version, dict(history or {})
    return state


def _record(peer: str, state: Any) -> Any:
    from lowcomm.comm._swarm_membership import _Record

    return _Record(peer, "fp", state.version, state.digest, False, dict(state.history))


def test_peers_with_one_state_but_other_inner_step_counts_do_not_resync():
    from lowcomm.optim.state import shared_tensors

    theta = torch.arange(12, dtype=torch.float32)
    outer = torch.optim.SGD([theta], lr=0.7, momentum=0.9, nesterov=True)
    outer.state[theta]["momentum_buffer"] = torch.ones(12)
    a, b = _shared_state("a"), _shared_state("b")
    # Round 7 averaged together: the same θ and outer state; on deadline rounds each peer
    # took the inner steps its machine managed (700 and 735).
    a.take_snapshot(shared_tensors(["w"], [[0]], [theta], [outer], 7, 700), peers=2)
    b.take_snapshot(shared_tensors(["w"], [[0]], [theta], [outer], 7, 735), peers=2)
    assert a.plan({"b": _record("b", b)}) is None
    assert b.plan({"a": _record("a", a)}) is None


def test_two_peers_never_plan_to_download_each_others_state():
    # Versions 7..10 together; then "a" averaged alone to version 14 while "b" was stopped;
    # "b" woke, sat its round out (weight 0) and stepped its stale θ with the round's mean:
    # a version 11 of its own, from a round of one contributing peer, like a's.
    agreed = {v: (f"t{v}", 2) for v in range(7, 11)}
    a = _shared_state("a", 14, {**agreed, **{v: (f"a{v}", 1) for v in range(11, 15)}})
    b = _shared_state("b", 11, {**agreed, 11: ("b11", 1)})
    a.digest, b.digest = "a14", "b11"
    plan_a = a.plan({"b": _record("b", b)})
    plan_b = b.plan({"a": _record("a", a)})
    # One of them takes the other's state; both doing so swaps them, and they still differ.
    assert (plan_a is None) != (plan_b is None), (plan_a, plan_b)
    assert plan_a is None and plan_b == (14, "a14", ["a"])  # the stale one takes the newer


def test_a_peer_ahead_alone_rejoins_a_majority_that_will_not_take_its_state():
    # a averaged alone to 14 while b and c were stopped at 12, which a also held.
    agreed = {v: (f"t{v}", 3) for v in range(9, 13)}
    a = _shared_state("a", 14, {**agreed, 13: ("a13", 1), 14: ("a14", 1)})
    b = _shared_state("b", 12, agreed)
    c = _shared_state("c", 12, agreed)
    a.digest, b.digest, c.digest = "a14", "t12", "t12"
    records = {p: _record(p, st) for p, st in (("a", a), ("b", b), ("c", c))}
    assert a.plan(records) is None  # nobody holds another state at a version a held
    assert b.plan(records) is None and c.plan(records) is None  # one peer's 14 is no quorum
    # b and c average together to 13: the majority's state wins, a loses its lone rounds but
    # agrees again (b and c would never take a's state: it stays a minority of one).
    for st in (b, c):
        st.version, st.digest = 13, "t13"
        st.history[13] = ("t13", 2)
    records = {p: _record(p, st) for p, st in (("a", a), ("b", b), ("c", c))}
    assert a.plan(records) == (13, "t13", ["b", "c"])
    # Without c, b takes a's 14 (one other peer: trusted), so a keeps it instead of swapping.
    del records["c"]
    assert a.plan(records) is None and b.plan(records) == (14, "a14", ["a"])


# -- the harnesses, short ----------------------------------------------------------------------


@pytest.mark.hivemind
@pytest.mark.timeout(300)
def test_short_churn_soak_holds_every_invariant(tmp_path):
    """4 real `lowcomm join` peers, ~45 s of seeded faults: a stall, a leave, a kill, joins."""
    pytest.importorskip("hivemind")
    from scripts.reliability import soak

    out = tmp_path / "soak.json"
    argv = [
        "--duration", "45", "--baseline-duration", "0", "--seed", "11", "--round-seconds", "4",
        "--mean-gap", "8", "--min-uptime", "6", "--min-live", "3", "--quiet-tail", "12",
        "--work-dir", str(tmp_path / "work"), "--out", str(out),
    ]  # fmt: skip
    rc = soak.main(argv)
    results = json.loads(out.read_text())["churn"]
    assert results["violations"] == [] and rc == 0
    assert {"kill", "leave", "join", "stall"} <= set(results["event_counts"])
    assert results["num_rounds"] >= 5 and results["records"] >= 15
    killed = results["checkpoints"]
    assert killed and all(c["ok"] and c["matches_log"] for c in killed)


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_torchrun_restart_after_a_killed_rank_ends_bit_identical(tmp_path):
    from scripts.reliability import restarts

    # torch's own init_process_group often does not come back from a torchrun restart (2.13;
    # the run's key prefix per attempt is what lets lowcomm's do).
    recovered, errors = restarts.torchrun_restarts_work(tmp_path / "probe", init="lowcomm")
    assert recovered, errors
    out = tmp_path / "restarts.json"
    argv = ["--steps", "120", "--kills", "1", "--seed", "1", "--probes="]  # probed above
    rc = restarts.main([*argv, "--work-dir", str(tmp_path / "work"), "--out", str(out)])
    results = json.loads(out.read_text())
    assert len(results["killed"]["kills"]) == 1 and results["killed"]["resumed_from"] >= 1
    assert results["identical"] and rc == 0, results["differences"]


def test_state_comparison_sees_one_flipped_bit_and_a_missing_key():
    from scripts.reliability.restarts import compare_states

    a = {"x": torch.tensor([1.0, 2.0]), "n": [1, {"k": torch.zeros(())}]}
    b = {"x": torch.tensor([1.0, 2.0]), "n": [1, {"k": torch.zeros(())}]}
    assert compare_states(a, b) == []
    b["x"].view(torch.int32)[1] ^= 1  # one bit of one float
    b["n"][1]["extra"] = 0
    assert sorted(compare_states(a, b)) == ["/n/1/extra", "/x"]
    nan = torch.tensor([float("nan")])
    assert compare_states({"v": nan}, {"v": nan.clone()}) == []  # bits, not ==


@pytest.mark.hivemind
def test_joining_survives_one_slow_dht_read():
    pytest.importorskip("hivemind")
    from concurrent.futures import Future
    from types import SimpleNamespace

    from lowcomm.comm._swarm_membership import _Membership, _Peer
    from lowcomm.comm._swarm_state import _SharedState
    from lowcomm.comm._swarm_timeouts import SwarmTimeouts

    def done(result: Any = None, error: BaseException | None = None) -> Future[Any]:
        future: Future[Any] = Future()
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)
        return future

    class SlowOnce:
        """An empty DHT whose first read times out (the future's result() raises)."""

        peer_id = SimpleNamespace(to_bytes=lambda: b"me")
        gets = 0

        def get(self, *args: Any, **kwargs: Any) -> Future[Any]:
            self.gets += 1
            return done(error=TimeoutError()) if self.gets == 1 else done(None)

        def store(self, *args: Any, **kwargs: Any) -> Future[Any]:
            return done(True)

    timeouts = SwarmTimeouts.from_round_seconds(5.0)

    def joins(dht: Any) -> bool:
        """Whether a peer joins through ``dht`` (and leaves again)."""
        me = _Peer("run", "me", None, "prefix", timeouts)
        members = _Membership(me, dht, _SharedState(me, None), SimpleNamespace(busy=0))
        try:
            members.join("fp")
            return me.fingerprint == "fp"
        finally:
            members.leave()

    slow = SlowOnce()
    assert joins(slow) and slow.gets >= 2

    class Unreachable(SlowOnce):
        def get(self, *args: Any, **kwargs: Any) -> Future[Any]:
            return done(error=TimeoutError())

    class SlowTwice(SlowOnce):
        """Each of the first two reads times out only after 2.5 s, half of ``peer_ttl``."""

        def get(self, *args: Any, **kwargs: Any) -> Future[Any]:
            self.gets += 1
            if self.gets <= 2:
                time.sleep(2.5)
                return done(error=TimeoutError())
            return done(None)

    # The rerun soak's `exited` joiner: one read took the whole peer_ttl, so it had one try.
    # Now at least DHT_TRIES calls' worth of time (dht_patience), so the third read joins.
    assert timeouts.peer_ttl == 5.0 and timeouts.dht_patience == 3 * timeouts.dht_timeout == 15.0
    slow_twice = SlowTwice()
    assert joins(slow_twice) and slow_twice.gets >= 3

    me = _Peer("run", "me", None, "prefix", timeouts)
    members = _Membership(me, Unreachable(), _SharedState(me, None), SimpleNamespace(busy=0))
    start = time.monotonic()
    with pytest.raises(ConnectionError, match="timed out .* times in 15s"):
        members.join("fp")  # gives up after dht_patience, with an error that says what failed
    assert time.monotonic() - start >= 15.0  # it did try again for dht_patience


@pytest.mark.hivemind
def test_a_peer_with_its_own_config_gives_its_dht_client_time_to_start(monkeypatch):
    pytest.importorskip("hivemind")
    from types import SimpleNamespace

    from lowcomm.comm import hivemind
    from lowcomm.config import explicit_keys, load_config
    from lowcomm.recipes import train_lm

    def dht_taking_3s(peers: Any, host: Any, announce: Any, timeout: float) -> Any:
        if timeout < 3.0:
            raise ConnectionError(f"the hivemind DHT did not start within {timeout:g}s")
        return SimpleNamespace(get=lambda *a, **k: None, shutdown=lambda: None)

    monkeypatch.setattr(hivemind, "_make_dht", dht_taking_3s)
    argv = ["--backend", "hivemind", "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/Qm"]
    argv += ["--config", "tiny"]
    cfg = train_lm.join_run_config(load_config(argv), explicit_keys(argv))
    assert cfg.n_layer == 2  # nobody publishes a config: the peer starts the run with its own


def test_reliability_md_is_generated_from_the_checked_in_results():
    # RELIABILITY.md is output, never edited: regenerate it (python -m scripts.reliability.report)
    # whenever the results or the report change.
    from scripts.reliability import REPO, RESULTS_DIR, report

    if not (REPO / ".git").exists():
        pytest.skip("not a checkout: the mutation script's copy holds no results")
    doc = REPO / "RELIABILITY.md"
    assert doc.read_text(encoding="utf-8") == report.document(RESULTS_DIR)


def test_every_planted_mutation_still_applies_to_the_code():
    # The mutation script plants each bug by replacing text that must occur exactly once;
    # code that moved on makes a mutation "stale" (never judged) without anyone noticing.
    from scripts.reliability import REPO
    from scripts.reliability.mutate import MUTATIONS

    if not (REPO / ".git").exists():
        pytest.skip("not a checkout: the mutation script's copy is laid out as the package")
    stale = [m.name for m in MUTATIONS if (REPO / m.path).read_text().count(m.old) != 1]
    assert stale == []
