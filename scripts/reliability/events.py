"""The soak's fault schedule, drawn from a seed before the run starts: pure, no processes.

Four kinds of event hit the peers of a swarm, each in a peer *slot* (a slot holds one peer
process at a time; a peer that dies or leaves is replaced by a new joiner in its slot):

* ``kill``: SIGKILL of the peer's main process (a crash); its slot rejoins later.
* ``leave``: SIGTERM, a graceful leave; its slot rejoins later.
* ``stall``: SIGSTOP for ``seconds``, then SIGCONT: a frozen machine (``whole=True``: every
  process of the peer, its averagers and p2p daemon too) or a stuck training loop
  (``whole=False``: the main process only; its averagers keep answering).
* ``join``: a new peer process in a free slot, joining by address alone.

:func:`plan_events` simulates the slots while it draws, so every event it returns applies
to a slot in the right state, and never fewer than ``min_live`` peers are up and running.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["KINDS", "Event", "plan_events"]

KINDS = ("kill", "leave", "stall", "join")


@dataclass(frozen=True)
class Event:
    """One fault (or join) at ``at`` seconds after the soak's clock starts.

    Attributes:
        at: seconds after the start.
        kind: one of :data:`KINDS`.
        slot: the peer slot it applies to.
        seconds: how long a ``stall`` lasts (0 for the other kinds).
        whole: a ``stall`` of every process of the peer (else its main process only).
    """

    at: float
    kind: str
    slot: int
    seconds: float = 0.0
    whole: bool = True

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def plan_events(
    seed: int,
    duration: float,
    *,
    num_slots: int = 4,
    min_live: int = 2,
    mean_gap: float = 20.0,
    round_seconds: float = 5.0,
    min_uptime: float = 20.0,
    rejoin_after: tuple[float, float] = (3.0, 15.0),
    quiet_tail: float = 30.0,
    weights: dict[str, float] | None = None,
) -> list[Event]:
    """A seeded schedule of kills, leaves, stalls and the joins that refill their slots.

    Disruptions (kill, leave, stall) come at gaps drawn uniformly from ``[0.5, 1.5]`` times
    ``mean_gap``; each picks its kind by ``weights`` and a slot among those up for at least
    ``min_uptime`` seconds and not stalled, and only if at least ``min_live`` slots stay up
    and running. A kill or leave schedules its slot's join ``rejoin_after`` seconds later.
    Stalls last 0.5 to 6 rounds, so some end inside a round and some span several. Nothing
    starts in the last ``quiet_tail`` seconds (a slot down then rejoins as it begins), so
    that the run ends settled, every slot up.

    Args:
        seed: the schedule's seed: the same arguments give the same events.
        duration: seconds the soak runs (from its clock's start).
        num_slots: peer slots, all up at the start.
        min_live: slots that stay up and not stalled at every instant.
        mean_gap: mean seconds between two disruptions.
        round_seconds: the swarm's round length (stall lengths are drawn in rounds).
        min_uptime: a slot is disrupted only this long after it (re)joined.
        rejoin_after: (min, max) seconds from a kill or leave to its slot's join.
        quiet_tail: seconds at the end with no event starting.
        weights: relative weights of ``kill``, ``leave`` and ``stall``.

    Returns:
        The events in time order.

    Raises:
        ValueError: ``min_live`` is not below ``num_slots``, or a duration is not positive.
    """
    if not 1 <= min_live < num_slots:
        raise ValueError(f"min_live ({min_live}) must be >= 1 and below num_slots ({num_slots})")
    if duration <= 0 or mean_gap <= 0 or round_seconds <= 0:
        raise ValueError(
            f"duration ({duration}), mean_gap ({mean_gap}) and round_seconds "
            f"({round_seconds}) must be positive"
        )
    weights = weights or {"kill": 0.4, "leave": 0.15, "stall": 0.45}
    rng = random.Random(seed)
    up_since: dict[int, float | None] = {s: 0.0 for s in range(num_slots)}  # None: down
    stalled_until = dict.fromkeys(range(num_slots), 0.0)
    joins: list[Event] = []
    events: list[Event] = []
    end = duration - quiet_tail
    t = 0.0
    while True:
        t += rng.uniform(0.5, 1.5) * mean_gap
        if t >= end:
            break
        # Joins due by now bring their slots up (in time order, before this disruption).
        for join in [j for j in joins if j.at <= t]:
            up_since[join.slot] = join.at
            joins.remove(join)
        running = [
            s for s, since in up_since.items() if since is not None and stalled_until[s] <= t
        ]
        if len(running) - 1 < min_live:
            continue
        eligible = [s for s in running if t - (up_since[s] or 0.0) >= min_uptime]
        if not eligible:
            continue
        kinds = sorted(weights)
        kind = rng.choices(kinds, weights=[weights[k] for k in kinds])[0]
        slot = rng.choice(eligible)
        if kind == "stall":
            seconds = round(rng.uniform(0.5, 6.0) * round_seconds, 2)
            whole = rng.random() < 0.5
            events.append(Event(round(t, 2), "stall", slot, seconds, whole))
            stalled_until[slot] = t + seconds
            continue
        events.append(Event(round(t, 2), kind, slot))
        up_since[slot] = None
        # Every slot comes back, at the latest when the quiet tail starts.
        join = Event(round(min(t + rng.uniform(*rejoin_after), end), 2), "join", slot)
        joins.append(join)
        events.append(join)
    return sorted(events, key=lambda e: (e.at, e.kind != "join"))
