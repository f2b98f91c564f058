"""Every timeout of a swarm peer, derived from one number: the round length.

:class:`SwarmTimeouts` (public through :mod:`lowcomm.comm.hivemind`) is the only thing here:
pure arithmetic, no hivemind, no processes. The backend re-derives it whenever the measured
round time changes (``HivemindBackend.set_round_seconds``) and pushes it into its averagers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["SwarmTimeouts"]


def _clamp(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


@dataclass(frozen=True)
class SwarmTimeouts:
    """Every timeout of the swarm, derived from one number: the round length.

    With ``R = round_seconds``, the wall time of one outer round (``H`` inner steps):

    * ``matchmaking_time = clamp(0.1 R, 1, 30)``: the first peer to reach a round waits this
      long for the others, so peers up to 10% slower than the fastest still make the round.
    * ``request_timeout = matchmaking_time / 2``: a would-be group leader must answer a join
      request this fast (hivemind needs it below ``matchmaking_time`` to break A->B->A waits).
    * ``matchmaking_timeout = 3 matchmaking_time``: after this a peer gives up and proceeds
      alone; room for one more attempt when a group falls apart (a member killed mid-average).
    * ``averaging_timeout = max(R, 5)``: the all-reduce of a formed group; an average that
      takes longer than a round cannot keep up with training anyway.
    * ``next_chunk_timeout = clamp(0.25 averaging_timeout, 2, 60)``: a peer that sends no part
      for this long is dropped from the average (twice that for a peer reducing our parts).
    * ``heartbeat_period = clamp(0.1 R, 1, 30)``; a peer counts as gone ``3`` periods (+2 s)
      after its last heartbeat.

    Attributes:
        round_seconds: the estimate they derive from.
    """

    round_seconds: float
    matchmaking_time: float
    request_timeout: float
    matchmaking_timeout: float
    averaging_timeout: float
    next_chunk_timeout: float
    heartbeat_period: float
    peer_ttl: float

    @classmethod
    def from_round_seconds(cls, round_seconds: float) -> SwarmTimeouts:
        """Derive every timeout from ``round_seconds`` (the rule in the class docstring)."""
        r = float(round_seconds)
        if not math.isfinite(r) or r <= 0:
            raise ValueError(f"round_seconds ({round_seconds}) must be a positive number")
        mm = _clamp(0.1 * r, 1.0, 30.0)
        avg = max(r, 5.0)
        hb = _clamp(0.1 * r, 1.0, 30.0)
        return cls(
            round_seconds=r,
            matchmaking_time=mm,
            request_timeout=mm / 2,
            matchmaking_timeout=3 * mm,
            averaging_timeout=avg,
            next_chunk_timeout=_clamp(0.25 * avg, 2.0, 60.0),
            heartbeat_period=hb,
            peer_ttl=3 * hb + 2.0,
        )

    @property
    def wait_timeout(self) -> float:
        """The most ``AverageWork.wait`` can block: matchmaking, all-reduce, and slack."""
        return self.matchmaking_timeout + self.averaging_timeout + 10.0
