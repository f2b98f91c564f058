"""Churn soak: 4 peers of the tiny model in a hivemind swarm on loopback, under a seeded
schedule of kills, stalls, graceful leaves and joins; then the same swarm without faults.

Run from the repository root (the full soak, 30 minutes of faults and 30 without)::

    .venv/bin/python -m scripts.reliability.soak --duration 1800 --seed 1
    .venv/bin/python -m scripts.reliability.soak --duration 90 --mean-gap 15 --baseline-duration 0

Every peer is a real process started as a volunteer would start it: ``lowcomm dht
--addrs-file F`` once, the first peer ``lowcomm join --initial-peers ADDR --run-id RUN
--config tiny ...`` and every other one, first three and each later joiner alike, ``lowcomm
join --initial-peers ADDR --run-id RUN`` with only its own settings (run dir, logging): it
takes the run's config from the live peers. Rounds are the default of ``lowcomm join``:
``sync_clock=auto``, i.e. wall-clock deadlines every ``--round-seconds``; a peer that missed
a round sits the next one out and downloads the swarm's state.

The fault schedule is drawn from ``--seed`` before the run (:mod:`.events`) and its clock
starts once every first peer has applied an outer step (observed progress). Peers log a
record per applied outer step (state version, θ digest, peers in the average, blocked
seconds, the wait bound: ``swarm_round_metrics`` in the recipe); the harness reads them as
they come and checks the invariants of :mod:`.invariants` live (every few seconds) and at the
end. At the end it also checks that the newest checkpoint of every peer that was killed
verifies and loads (``verify_checkpoint`` + ``load_rank_state``) and holds the θ that peer
logged for that step; and compares the survivors' eval loss against tokens with the run
without faults. Results: ``benchmarks/reliability/soak.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scripts.reliability import RESULTS_DIR
from scripts.reliability.events import Event, plan_events
from scripts.reliability.invariants import RoundRecord, SoakChecker, Violation
from scripts.reliability.swarm import LoopbackSwarm, Peer, exit_on_sigterm, read_records

__all__ = ["SoakSettings", "check_checkpoint", "compare_loss", "main", "run_phase"]


@dataclass
class SoakSettings:
    """What one soak runs.

    Attributes:
        duration: seconds of the schedule's clock (faults happen in it).
        seed: the fault schedule's seed.
        num_peers: peer slots (all up at the start).
        round_seconds: the swarm's round length (``--round-seconds`` of the run).
        sync_every: the run's nominal inner steps per round (weights are bounded at 4x).
        mean_gap: mean seconds between two disruptions.
        min_uptime: a peer is disrupted only this long after it joined.
        min_live: peers up and not stalled at every instant (of the schedule).
        quiet_tail: the schedule's last seconds, without new faults.
        eval_every: inner steps between evaluations (every peer).
        eval_batches: held-out batches per evaluation.
        ckpt_every: outer steps (``sync_every`` inner steps each) between checkpoints.
        recover_rounds: rounds a peer left out of one has to agree with the swarm again.
        startup_timeout: seconds for the first peers to apply an outer step.
    """

    duration: float = 1800.0
    seed: int = 1
    num_peers: int = 4
    round_seconds: float = 5.0
    sync_every: int = 50
    mean_gap: float = 20.0
    min_uptime: float = 20.0
    min_live: int = 2
    quiet_tail: float = 30.0
    eval_every: int = 200
    eval_batches: int = 8
    ckpt_every: int = 2
    recover_rounds: int = 2
    startup_timeout: float = 300.0
    extra: list[str] = field(default_factory=list)

    def run_options(self) -> list[str]:
        """The first peer's options: the run's config (the others take it from the swarm)."""
        return [
            "--config",
            "tiny",
            "--steps",
            str(10**8),  # never reached: every peer runs until the harness ends it
            "--round-seconds",
            str(self.round_seconds),
            "--sync-every",
            str(self.sync_every),
            *self.extra,
        ]

    def own_options(self) -> list[str]:
        """Every peer's own settings (``SWARM_LOCAL_KEYS``)."""
        return [
            "--log-every",
            str(self.sync_every),
            "--eval-every",
            str(self.eval_every),
            "--eval-batches",
            str(self.eval_batches),
            "--ckpt-every",
            str(self.ckpt_every),
            "--keep",
            "2",
        ]


def _log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", flush=True)


class _Phase:
    """One run of the swarm (with or without faults): its processes, records and checker."""

    def __init__(self, settings: SoakSettings, work_dir: Path, run_id: str) -> None:
        self.settings = settings
        self.swarm = LoopbackSwarm(work_dir, run_id)
        self.checker = SoakChecker(
            recover_rounds=settings.recover_rounds,
            progress_bound=4 * settings.round_seconds + 60.0,
        )
        self.offsets: dict[str, int] = {}
        self.evals: dict[str, list[dict[str, Any]]] = {}
        self.live_violations: list[dict[str, Any]] = []
        self.timeline: list[dict[str, Any]] = []

    def start_peer(self, slot: int, first: bool = False) -> Peer:
        options = self.settings.own_options()
        if first:
            wait = str(self.settings.num_peers)
            options += [*self.settings.run_options(), "--wait-for-peers", wait]
        peer = self.swarm.start_peer(slot, options)
        self.checker.peer_started(peer.name, peer.started)
        self.evals[peer.name] = []
        return peer

    def read(self) -> None:
        """New records of every peer into the checker; evals aside."""
        for peer in self.swarm.peers:
            records, self.offsets[peer.name] = read_records(
                peer.run_dir / "metrics.jsonl", self.offsets.get(peer.name, 0)
            )
            for rec in records:
                if "swarm/version" in rec:
                    self.checker.add(RoundRecord.from_metrics(peer.name, rec))
                elif "eval/loss" in rec:
                    self.evals[peer.name].append(
                        {"time": rec["time"], "tokens": rec["tokens"], "loss": rec["eval/loss"]}
                    )

    def update(self) -> None:
        """What happened to each peer, into the checker."""
        for peer in self.swarm.peers:
            peer.poll()
            self.checker.update_peer(
                peer.name,
                stalls=peer.stalls,
                ended=peer.ended,
                cause=peer.cause,
                orphans=peer.orphans,
                returncode=peer.returncode,
            )

    def check_live(self, t0: float) -> None:
        for v in self.checker.check(time.time()):
            entry = {**v.as_dict(), "at": round(v.time - t0, 1), "live": True}
            self.live_violations.append(entry)
            _log(f"VIOLATION {v.kind} {v.peer} v{v.version}: {v.detail}")

    def sample(self, t0: float) -> None:
        peers = self.swarm.peers
        self.timeline.append(
            {
                "t": round(time.time() - t0, 1),
                "running": sum(1 for p in peers if p.alive and not p.stopped),
                "stopped": sum(1 for p in peers if p.alive and p.stopped),
            }
        )


def _wait_for_first_rounds(phase: _Phase, peers: list[Peer], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        phase.read()
        phase.update()
        done = [p for p in peers if phase.checker.peers[p.name].records]
        if len(done) == len(peers):
            return
        gone = [p.name for p in peers if not p.alive]
        if gone or time.monotonic() > deadline:
            raise RuntimeError(
                f"the first peers did not all apply an outer step (gone: {gone}, done: "
                f"{[p.name for p in done]}); see {phase.swarm.work_dir / 'logs'}"
            )
        time.sleep(0.5)


def _apply(phase: _Phase, event: Event, conts: list[tuple[float, Peer]]) -> dict[str, Any]:
    """Carry out one event; what happened, for the results."""
    swarm = phase.swarm
    peer = swarm.in_slot(event.slot)
    outcome: dict[str, Any] = {**event.as_dict(), "wall": time.time()}
    if event.kind == "join":
        if peer is not None:
            # Its last peer is still leaving (a graceful leave takes seconds): join once it
            # is gone.
            return {**outcome, "deferred": f"slot {event.slot} still runs {peer.name}"}
        outcome["peer"] = phase.start_peer(event.slot).name
        return outcome
    if peer is None or peer.stopped:
        outcome["skipped"] = f"slot {event.slot} has no running peer"
        return outcome
    outcome["peer"] = peer.name
    if event.kind == "kill":
        peer.kill()
    elif event.kind == "leave":
        peer.leave()
    elif event.kind == "stall":
        peer.stop(event.whole)
        conts.append((time.time() + event.seconds, peer))
    return outcome


def run_phase(
    settings: SoakSettings, work_dir: Path, events: list[Event], duration: float, label: str
) -> dict[str, Any]:
    """Start the swarm, run ``events`` over ``duration`` seconds, check, and summarise."""
    phase = _Phase(settings, work_dir, run_id=f"soak-{label}-{settings.seed}-{int(time.time())}")
    swarm = phase.swarm
    executed: list[dict[str, Any]] = []
    try:
        addr = swarm.start_dht()
        _log(f"{label}: bootstrap DHT at {addr}")
        # The first peers start the run together (its config on their command lines);
        # every later joiner joins by address alone and takes the config from them.
        initial = [phase.start_peer(s, first=True) for s in range(settings.num_peers)]
        _wait_for_first_rounds(phase, initial, settings.startup_timeout)
        t0 = time.time()
        _log(f"{label}: every first peer applied an outer step; the clock starts")
        pending = list(events)
        conts: list[tuple[float, Peer]] = []
        deferred: list[Event] = []
        next_check = next_sample = 0.0
        while (now := time.time()) < t0 + duration:
            for due in [c for c in conts if c[0] <= now]:
                conts.remove(due)
                due[1].cont()
            while pending and t0 + pending[0].at <= now:
                event = pending.pop(0)
                outcome = _apply(phase, event, conts)
                if "deferred" in outcome:
                    deferred.append(event)
                    continue
                outcome["t"] = round(now - t0, 1)
                outcome["late_s"] = round(now - t0 - event.at, 1)
                executed.append(outcome)
                _log(
                    f"{label} t={outcome['t']:.0f}s {event.kind} slot {event.slot} "
                    f"{outcome.get('peer', '')} {outcome.get('skipped', '')}".rstrip()
                )
            phase.read()
            phase.update()
            # Deferred joins go back in line; one is tried again on the next pass.
            pending = sorted(pending + deferred, key=lambda e: e.at)
            deferred = []
            if now >= next_sample:
                phase.sample(t0)
                next_sample = now + 5.0
            if now >= next_check:
                phase.check_live(t0)
                next_check = now + 5.0
            time.sleep(0.25)
        for _, peer in conts:
            peer.cont()
        phase.read()
        phase.update()
        phase.check_live(t0)
    finally:
        swarm.close()
    phase.read()
    phase.update()
    final = phase.checker.check(time.time(), final=True)
    for v in final:
        _log(f"VIOLATION (at the end) {v.kind} {v.peer} v{v.version}: {v.detail}")
    return _summarise(phase, executed, t0, duration)


def check_checkpoint(peer: dict[str, Any], rounds: list[RoundRecord]) -> dict[str, Any]:
    """The newest checkpoint of a peer that verifies: does it load, and hold the θ that
    the peer logged for the last round before it?"""
    from lowcomm import checkpoint as ckpt
    from lowcomm.recipes.train_lm import theta_digest

    root = ckpt.checkpoint_root(Path(peer["run_dir"]))
    dirs = sorted(p.name for p in root.glob("step_*")) if root.is_dir() else []
    out: dict[str, Any] = {"peer": peer["name"], "step_dirs": len(dirs)}
    latest = ckpt.latest_checkpoint(root)
    out["newest_incomplete"] = bool(dirs) and (latest is None or latest.name != dirs[-1])
    if latest is None:
        out["checkpoint"] = None
        out["ok"] = not dirs  # killed before its first checkpoint: nothing to load
        out["why"] = "no checkpoint yet" if not dirs else "no checkpoint verifies"
        return out
    out["checkpoint"] = latest.name
    try:
        ckpt.verify_checkpoint(latest)
        state = ckpt.load_rank_state(latest, 0)
    except ValueError as e:
        return {**out, "ok": False, "why": str(e)}
    shared = state["optimizer"]["lowcomm"]["shared"]
    theta = [v for k, v in shared.items() if k.startswith("param.")]
    finite = all(bool(t.isfinite().all()) for t in theta)
    digest = theta_digest(theta)
    step = int(state["step"])
    logged = [r for r in rounds if r.step <= step]
    out.update(
        step=step,
        version=int(shared["meta.outer_step"].item()),
        finite=finite,
        matches_log=bool(logged) and logged[-1].theta == digest,
    )
    out["ok"] = finite and (not logged or out["matches_log"])
    if not out["ok"]:
        out["why"] = "non-finite theta" if not finite else "theta differs from the logged one"
    return out


def _summarise(
    phase: _Phase, executed: list[dict[str, Any]], t0: float, duration: float
) -> dict[str, Any]:
    checker = phase.checker
    peers = [p.summary() for p in phase.swarm.peers]
    rounds = []
    for v in checker.versions():
        recs = checker.records_at(v)
        swarm = checker.swarm_theta(v)
        rounds.append(
            {
                "version": v,
                "t": round(min(r.time for r in recs) - t0, 1),
                "records": len(recs),
                "peers": sorted({r.peer for r in recs}),
                "group_sizes": sorted(r.peers for r in recs),
                "digests": len({r.theta for r in recs}),
                "disagreeing": sorted(r.peer for r in recs if r.theta != swarm),
                "sat_out": sorted(r.peer for r in recs if r.sat_out),
            }
        )
    blocked, downloads = [], 0
    for state in checker.peers.values():
        previous_comm, previous_bytes = 0.0, 0
        for r in state.records:
            blocked.append(round(r.comm_s - previous_comm, 3))
            downloads += r.state_bytes > previous_bytes
            previous_comm, previous_bytes = r.comm_s, r.state_bytes
    stall_events = [e for e in executed if e["kind"] == "stall" and "skipped" not in e]
    killed = [p for p in peers if p["cause"] == "kill"]
    checkpoints = [check_checkpoint(p, checker.peers[p["name"]].records) for p in killed]
    violations = [v.as_dict() for v in checker.violations()]
    for c in checkpoints:
        if not c["ok"]:
            violations.append(
                Violation("checkpoint", c["peer"], -1, 0.0, c.get("why", "")).as_dict()
            )
    wait_bounds = [r.bound(False) for s in checker.peers.values() for r in s.records]
    download_bounds = [
        r.download_bound_s for s in checker.peers.values() for r in s.records if r.download_bound_s
    ]
    return {
        "t0": t0,
        "duration": duration,
        "events": executed,
        "event_counts": dict(Counter(e["kind"] for e in executed if "skipped" not in e)),
        "skipped_events": sum(1 for e in executed if "skipped" in e),
        "peers": peers,
        "rounds": rounds,
        "num_rounds": len(rounds),
        "records": sum(len(s.records) for s in checker.peers.values()),
        "rounds_all_agree": sum(1 for r in rounds if r["digests"] == 1),
        "recovery_lags": dict(Counter(checker.recovery_lags())),
        "downloads": downloads,
        "solo_rounds_given_up": checker.solo_rounds_given_up(),
        "blocked_s": blocked,
        "wait_bound_s": [min(wait_bounds), max(wait_bounds)] if wait_bounds else None,
        "download_bound_s": (
            [min(download_bounds), max(download_bounds)] if download_bounds else None
        ),
        "stall_seconds": [e["seconds"] for e in stall_events],
        "checkpoints": checkpoints,
        "violations": violations,
        "live_violations": phase.live_violations,
        "timeline": phase.timeline,
        "evals": {
            name: [{**e, "t": round(e["time"] - t0, 1)} for e in evals]
            for name, evals in phase.evals.items()
        },
        "survivors": [p["name"] for p in peers if p["cause"] == "end"],
    }


def compare_loss(
    churn: dict[str, Any], clean: dict[str, Any], window: float = 0.1, survivors: bool = True
) -> dict[str, Any]:
    """Eval loss against tokens with faults (the survivors', or every peer's), against the
    run without faults (every peer's).

    Compared over the last ``window`` of the tokens both reached: the relative difference of
    the means, in percent (positive: the run with faults is worse).
    """
    names = churn["survivors"] if survivors else list(churn["evals"])
    ours = [e for name in names for e in churn["evals"][name]]
    theirs = [e for evals in clean["evals"].values() for e in evals]
    if not ours or not theirs:
        return {"x_percent": None, "why": "no eval points"}
    reach = min(max(e["tokens"] for e in ours), max(e["tokens"] for e in theirs))
    lo = reach * (1 - window)
    a = [e["loss"] for e in ours if lo <= e["tokens"] <= reach]
    b = [e["loss"] for e in theirs if lo <= e["tokens"] <= reach]
    if not a or not b:
        return {"x_percent": None, "why": "no eval points in the window"}
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    return {
        "survivors": survivors,
        "tokens": [lo, reach],
        "churn_loss": mean_a,
        "clean_loss": mean_b,
        "churn_points": len(a),
        "clean_points": len(b),
        "x_percent": 100.0 * (mean_a - mean_b) / mean_b,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the soak; write the results; exit 1 if any invariant was violated."""
    exit_on_sigterm()
    parser = argparse.ArgumentParser(
        prog="python -m scripts.reliability.soak", description=__doc__.split("\n\n")[0]
    )
    d = SoakSettings()
    parser.add_argument("--duration", type=float, default=d.duration, help="seconds of faults")
    parser.add_argument(
        "--baseline-duration",
        type=float,
        default=None,
        help="seconds of the run without faults (default: --duration; 0: none)",
    )
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--peers", type=int, default=d.num_peers)
    parser.add_argument("--round-seconds", type=float, default=d.round_seconds)
    parser.add_argument("--sync-every", type=int, default=d.sync_every)
    parser.add_argument("--mean-gap", type=float, default=d.mean_gap)
    parser.add_argument("--min-uptime", type=float, default=d.min_uptime)
    parser.add_argument("--min-live", type=int, default=d.min_live)
    parser.add_argument("--quiet-tail", type=float, default=d.quiet_tail)
    parser.add_argument("--eval-every", type=int, default=d.eval_every)
    parser.add_argument("--recover-rounds", type=int, default=d.recover_rounds)
    parser.add_argument("--min-events", type=int, default=0, help="refuse a shorter schedule")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/reliability/soak"))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "soak.json")
    args = parser.parse_args(argv)
    settings = SoakSettings(
        duration=args.duration,
        seed=args.seed,
        num_peers=args.peers,
        round_seconds=args.round_seconds,
        sync_every=args.sync_every,
        mean_gap=args.mean_gap,
        min_uptime=args.min_uptime,
        min_live=args.min_live,
        quiet_tail=args.quiet_tail,
        eval_every=args.eval_every,
        recover_rounds=args.recover_rounds,
    )
    events = plan_events(
        settings.seed,
        settings.duration,
        num_slots=settings.num_peers,
        mean_gap=settings.mean_gap,
        round_seconds=settings.round_seconds,
        min_uptime=settings.min_uptime,
        min_live=settings.min_live,
        quiet_tail=settings.quiet_tail,
    )
    if len(events) < args.min_events:
        parser.error(f"the schedule has {len(events)} events, fewer than --min-events")
    _log(f"{len(events)} events planned: {dict(Counter(e.kind for e in events))}")
    started = time.time()
    churn = run_phase(settings, args.work_dir / "churn", events, settings.duration, "churn")
    baseline = settings.duration if args.baseline_duration is None else args.baseline_duration
    clean = None
    if baseline > 0:
        clean = run_phase(settings, args.work_dir / "clean", [], baseline, "clean")
    loss = compare_loss(churn, clean) if clean is not None else None
    if loss is not None and loss["x_percent"] is None:
        loss = compare_loss(churn, clean, survivors=False)
    results = {
        "command": "python -m scripts.reliability.soak " + " ".join(argv or sys.argv[1:]),
        "settings": {k: v for k, v in vars(settings).items() if k != "extra"},
        "run_options": settings.run_options() + settings.own_options(),
        "planned_events": len(events),
        "started": started,
        "wall_s": time.time() - started,
        "churn": churn,
        "clean": clean,
        "loss": loss,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=_json_default) + "\n")
    bad = churn["violations"] + (clean["violations"] if clean else [])
    _log(
        f"done: {sum(churn['event_counts'].values())} events, {churn['num_rounds']} rounds, "
        f"{len(bad)} violation(s); loss x = "
        f"{loss['x_percent'] if loss else None}; results in {args.out}"
    )
    return 1 if bad else 0


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
