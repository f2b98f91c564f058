"""The churn soak's invariants, checked over the peers' per-round records: pure, no processes.

Every swarm peer of the recipe logs one record per applied outer step (``swarm/version``
and friends: ``recipes/train_lm.py`` ``swarm_round_metrics``), *after* the step, so after
any download of the swarm's state it triggered. :class:`SoakChecker` takes those records
as they arrive, with what the harness did to each peer (stalls, kills, exits), and finds:

* ``diverged``: a record whose θ digest differs from the swarm's at that version (the
  digest most records of that version hold; ties as the peers break them: the one from the
  larger group, then the highest peer id) and that is not followed, within ``recover_rounds`` of that peer's own
  next records, by one that agrees again. A peer left out of a round (it averaged alone, was
  stalled, or its download failed) may differ for that long, no longer. A peer that ends
  (killed, left) before that many records is not counted against.
* ``regressed``: a record whose version is below the same peer's previous one, where a
  round it goes back past was averaged with other peers: the peer took an older state than
  its own (a download), and rounds of the swarm are lost. Versions count applied outer
  steps, so they only grow, in either round mode, except for a peer that averaged alone
  (nobody else came: the others were stopped, dead or just joining) and then rejoins the
  majority's older state: the rounds it gives up were never the swarm's (their steps count
  in its ``discarded_steps``), and :meth:`SoakChecker.solo_rounds_given_up` counts them.
* ``stalled``: a round in which the peer was blocked on the swarm (its ``comm_s`` grew: the
  average, publishing and reading the state records, a catch-up download) for longer than
  the bound it logged for that round, ``SwarmTimeouts.round_bound`` (every timeout one round
  passes through, derived from the measured round time), plus ``download_bound`` when it
  downloaded the state, plus ``slack``. Time the harness had the peer stopped is not
  counted.
* ``no_progress``: a running, not stopped, peer that logged no round for ``progress_bound``
  seconds (stopped time not counted), or that logged none ``startup_bound`` seconds after
  it started.
* ``exited``: a peer process that ended by itself (the harness only kills, stops, and
  terminates); ``leave_hung``: one that did not exit within the harness's wait (60 s)
  after SIGTERM, at a leave or at the soak's end; ``orphans``: a killed peer whose child processes outlived it.

Checkpoint and loss invariants need torch and the files; they live in :mod:`.soak`.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["RoundRecord", "SoakChecker", "Violation", "overlap"]


@dataclass(frozen=True)
class RoundRecord:
    """One peer's state after one applied outer step (one ``swarm/version`` record)."""

    peer: str
    time: float
    step: int
    version: int
    theta: str
    peers: int
    sat_out: bool
    state_bytes: int
    comm_s: float
    wait_timeout_s: float
    round_bound_s: float | None = None
    download_bound_s: float = 0.0
    peer_id: str = ""

    def bound(self, downloaded: bool) -> float:
        """The most this round could block its peer: ``SwarmTimeouts.round_bound``, plus
        ``download_bound`` if it downloaded the swarm's state (records from before those
        were logged: ``wait_timeout``)."""
        base = self.wait_timeout_s if self.round_bound_s is None else self.round_bound_s
        return base + (self.download_bound_s if downloaded else 0.0)

    @classmethod
    def from_metrics(cls, peer: str, rec: dict[str, Any]) -> RoundRecord:
        """From a ``metrics.jsonl`` line that has ``swarm/version``."""
        return cls(
            peer,
            float(rec["time"]),
            int(rec["step"]),
            int(rec["swarm/version"]),
            str(rec["swarm/theta"]),
            int(rec["swarm/peers"]),
            bool(rec["swarm/sat_out"]),
            int(rec["swarm/state_bytes"]),
            float(rec["swarm/comm_s"]),
            float(rec["swarm/wait_timeout_s"]),
            rec.get("swarm/round_bound_s"),
            float(rec.get("swarm/download_bound_s", 0.0)),
            str(rec.get("swarm/peer", "")),
        )


@dataclass(frozen=True)
class Violation:
    """An invariant that did not hold: which, for which peer, at what version, and why."""

    kind: str
    peer: str
    version: int
    time: float
    detail: str

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def overlap(start: float, end: float, intervals: list[list[float | None]], now: float) -> float:
    """Seconds of ``[start, end]`` covered by ``intervals`` (an open one ends at ``now``)."""
    total = 0.0
    for a, b in intervals:
        lo, hi = max(start, a or 0.0), min(end, b if b is not None else now)
        total += max(0.0, hi - lo)
    return total


@dataclass
class _PeerState:
    started: float
    records: list[RoundRecord] = field(default_factory=list)
    stalls: list[list[float | None]] = field(default_factory=list)
    ended: float | None = None
    cause: str | None = None
    orphans: list[int] = field(default_factory=list)
    returncode: int | None = None


class SoakChecker:
    """Finds the soak's invariant violations over records fed to it as they arrive.

    Call protocol: :meth:`peer_started` when a peer starts, :meth:`add` for each of its
    round records, :meth:`update_peer` whenever its stalls or end change; :meth:`check`
    any time (live) returns the violations found so far, each once; ``check(final=True)``
    at the end settles what is still open.

    Args:
        recover_rounds: how many of its own next rounds a peer that disagrees with the
            swarm's θ has to agree again.
        slack: seconds allowed above a round's logged wait bound (bookkeeping around the wait).
        progress_bound: the most seconds between two rounds of a running peer.
        startup_bound: the most seconds from a peer's start to its first round.
    """

    def __init__(
        self,
        recover_rounds: int = 2,
        slack: float = 1.0,
        progress_bound: float = 90.0,
        startup_bound: float = 240.0,
    ) -> None:
        self.recover_rounds = recover_rounds
        self.slack = slack
        self.progress_bound = progress_bound
        self.startup_bound = startup_bound
        self.peers: dict[str, _PeerState] = {}
        self._by_version: dict[int, list[RoundRecord]] = defaultdict(list)
        self._found: dict[tuple[str, str, int], Violation] = {}
        self.max_version = 0

    # -- input ---------------------------------------------------------------------------

    def peer_started(self, peer: str, started: float) -> None:
        """A new peer process (incarnation) started at wall time ``started``."""
        self.peers[peer] = _PeerState(started)

    def update_peer(
        self,
        peer: str,
        *,
        stalls: list[list[float | None]] | None = None,
        ended: float | None = None,
        cause: str | None = None,
        orphans: list[int] | None = None,
        returncode: int | None = None,
    ) -> None:
        """What the harness did to ``peer`` so far (its stalls, its end and why)."""
        state = self.peers[peer]
        if stalls is not None:
            state.stalls = [list(s) for s in stalls]
        if ended is not None:
            state.ended, state.cause = ended, cause
            state.orphans = list(orphans or [])
            state.returncode = returncode

    def add(self, record: RoundRecord) -> None:
        """One round record of a started peer."""
        self.peers[record.peer].records.append(record)
        self._by_version[record.version].append(record)
        self.max_version = max(self.max_version, record.version)

    # -- the swarm's state ---------------------------------------------------------------

    def swarm_theta(self, version: int) -> str | None:
        """The digest most records of ``version`` hold; ties as the peers break them when
        they resync (``_resync_plan``): the larger group, then the highest peer id, then
        the larger digest."""
        records = self._by_version.get(version)
        if not records:
            return None
        counts = Counter(r.theta for r in records)
        groups: dict[str, int] = {}
        ids: dict[str, str] = {}
        for r in records:
            groups[r.theta] = max(groups.get(r.theta, 0), r.peers)
            ids[r.theta] = max(ids.get(r.theta, ""), r.peer_id)
        return max(counts, key=lambda d: (counts[d], groups[d], ids[d], d))

    def versions(self) -> list[int]:
        """Every version some peer logged, in order."""
        return sorted(self._by_version)

    def records_at(self, version: int) -> list[RoundRecord]:
        """The records of ``version``."""
        return list(self._by_version.get(version, []))

    # -- checks --------------------------------------------------------------------------

    def check(self, now: float, final: bool = False) -> list[Violation]:
        """Violations found so far that were not returned before (all of them are kept in
        :meth:`violations`). ``final``: the run is over; open cases are settled."""
        found = []
        for name, state in self.peers.items():
            for v in (
                self._agreement(name, state, final)
                + self._regressions(name, state)
                + self._stalls(name, state, now)
                + self._progress(name, state, now)
                + self._ending(name, state)
            ):
                key = (v.kind, v.peer, v.version)
                if key not in self._found:
                    self._found[key] = v
                    found.append(v)
        return found

    def violations(self) -> list[Violation]:
        """Every violation found so far."""
        return list(self._found.values())

    def recovery_lags(self) -> list[int]:
        """For each record that disagreed with the swarm's θ: the peer's rounds until it
        agreed again (only those that did)."""
        lags = []
        for state in self.peers.values():
            for i, r in enumerate(state.records):
                if r.theta == self.swarm_theta(r.version):
                    continue
                for j in range(i + 1, len(state.records)):
                    later = state.records[j]
                    if later.theta == self.swarm_theta(later.version):
                        lags.append(j - i)
                        break
        return lags

    def _agreement(self, name: str, state: _PeerState, final: bool) -> list[Violation]:
        out = []
        records = state.records
        for i, r in enumerate(records):
            # A version is settled once the swarm has moved on past any late records of it.
            if not final and self.max_version < r.version + self.recover_rounds:
                continue
            swarm = self.swarm_theta(r.version)
            if r.theta == swarm:
                continue
            later = records[i + 1 : i + 1 + self.recover_rounds]
            if any(x.theta == self.swarm_theta(x.version) for x in later):
                continue
            # Not yet the rounds to recover in: wait; or it was killed or left first.
            if len(later) < self.recover_rounds and (
                not final or (state.ended is not None and state.cause != "end")
            ):
                continue
            holders = sum(1 for x in self._by_version[r.version] if x.theta == swarm)
            out.append(
                Violation(
                    "diverged",
                    name,
                    r.version,
                    r.time,
                    f"theta {r.theta[:12]} at version {r.version} (after a round of "
                    f"{r.peers} peer(s)) differs from the swarm's {str(swarm)[:12]} "
                    f"({holders} of {len(self._by_version[r.version])} records), and "
                    f"{len(later)} later round(s) of this peer did not agree again",
                )
            )
        return out

    def _given_up(self, records: list[RoundRecord], i: int) -> list[RoundRecord]:
        """The records that ``records[i]``, a lower version than the one before it, went
        back past: the latest ones above its version."""
        out = []
        for x in reversed(records[:i]):
            if x.version <= records[i].version:
                break
            out.append(x)
        return out

    def solo_rounds_given_up(self) -> int:
        """Rounds that peers averaged alone and gave up to rejoin the majority's older state
        (not violations: see ``regressed``)."""
        total = 0
        for state in self.peers.values():
            for i in range(1, len(state.records)):
                lost = self._given_up(state.records, i)
                if lost and all(x.peers <= 1 for x in lost):
                    total += len(lost)
        return total

    def _regressions(self, name: str, state: _PeerState) -> list[Violation]:
        out = []
        records = state.records
        for i in range(1, len(records)):
            before, r = records[i - 1], records[i]
            lost = self._given_up(records, i)
            if not lost or all(x.peers <= 1 for x in lost):
                continue  # only rounds it averaged alone: they were never the swarm's
            met = sum(1 for x in lost if x.peers > 1)
            out.append(
                Violation(
                    "regressed",
                    name,
                    r.version,
                    r.time,
                    f"version {before.version} -> {r.version}: it took an older state "
                    f"(a download: {r.state_bytes > before.state_bytes}), losing "
                    f"{len(lost)} applied outer step(s), {met} of them averaged with others",
                )
            )
        return out

    def _stalls(self, name: str, state: _PeerState, now: float) -> list[Violation]:
        out = []
        previous_comm, previous_time, previous_bytes = 0.0, state.started, 0
        for r in state.records:
            blocked = r.comm_s - previous_comm
            stopped = overlap(previous_time, r.time, state.stalls, now)
            bound = r.bound(downloaded=r.state_bytes > previous_bytes)
            if blocked - stopped > bound + self.slack:
                out.append(
                    Violation(
                        "stalled",
                        name,
                        r.version,
                        r.time,
                        f"blocked {blocked - stopped:.1f}s in the round to version "
                        f"{r.version} ({stopped:.1f}s stopped by the harness not counted), "
                        f"over the bound {bound:.1f}s (+{self.slack}s)",
                    )
                )
            previous_comm, previous_time, previous_bytes = r.comm_s, r.time, r.state_bytes
        return out

    def _progress(self, name: str, state: _PeerState, now: float) -> list[Violation]:
        out = []
        end = state.ended if state.ended is not None else now
        times = [r.time for r in state.records]
        if not times:
            running = end - state.started - overlap(state.started, end, state.stalls, now)
            if running > self.startup_bound:
                out.append(
                    Violation(
                        "no_progress",
                        name,
                        -1,
                        end,
                        f"no round {running:.0f}s after it started "
                        f"(bound {self.startup_bound:.0f}s)",
                    )
                )
            return out
        for a, b in zip([*times], [*times[1:], end]):
            running = b - a - overlap(a, b, state.stalls, now)
            if running > self.progress_bound:
                version = next(r.version for r in state.records if r.time == a)
                out.append(
                    Violation(
                        "no_progress",
                        name,
                        version,
                        b,
                        f"{running:.0f}s running without a round after version {version} "
                        f"(bound {self.progress_bound:.0f}s)",
                    )
                )
        return out

    def _ending(self, name: str, state: _PeerState) -> list[Violation]:
        if state.ended is None:
            return []
        out = []
        if state.cause == "exit":
            out.append(
                Violation(
                    "exited",
                    name,
                    -1,
                    state.ended,
                    f"the peer exited by itself with status {state.returncode}",
                )
            )
        if state.cause in ("leave", "end") and state.returncode is None:
            # A graceful leave (or the soak's end, also SIGTERM) that never finished.
            out.append(Violation("leave_hung", name, -1, state.ended, "no exit after SIGTERM"))
        if state.orphans:
            out.append(
                Violation(
                    "orphans",
                    name,
                    -1,
                    state.ended,
                    f"processes {state.orphans} outlived the killed peer by 10 s",
                )
            )
        return out
