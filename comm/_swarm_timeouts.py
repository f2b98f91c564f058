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

    What they bound (properties): one DHT call, ``dht_timeout = max(5, 4 request_timeout)``;
    handing an average to its averager process, ``start_timeout = max(10, 4
    request_timeout)``, twice; a round keyed by the clock that a peer came to early, up to
    ``matchmaking_timeout`` before it starts; the result, :attr:`wait_timeout`; starting an averager
    process, :attr:`AVERAGER_START_TIMEOUT`, and stopping a wedged one,
    :attr:`AVERAGER_STOP_TIMEOUT`; one state download from one peer,
    ``download_timeout = max(30, averaging_timeout)``, at most :attr:`DOWNLOAD_TRIES` peers
    per attempt. So one outer round blocks a peer at most :attr:`round_bound`, and a
    catch-up download at most :attr:`download_bound` more.

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

    AVERAGER_START_TIMEOUT = 60.0
    """Seconds an averager process may take to start (once per slot, and after a wedged one
    was replaced)."""
    AVERAGER_STOP_TIMEOUT = 5.0
    """Seconds a wedged averager gets to shut down before it is killed."""
    DOWNLOAD_TRIES = 3
    """Peers one download attempt tries, each for up to :attr:`download_timeout`."""
    DHT_TRIES = 3
    """Tries a joining or catching-up peer gives a DHT call that times out (at least; more
    while :attr:`peer_ttl` has not passed): see :attr:`dht_patience`."""

    @property
    def wait_timeout(self) -> float:
        """The most ``AverageWork.wait`` can block: matchmaking, all-reduce, and slack."""
        return self.matchmaking_timeout + self.averaging_timeout + 10.0

    @property
    def dht_timeout(self) -> float:
        """The most one DHT store or read may take."""
        return max(5.0, 4 * self.request_timeout)

    @property
    def dht_patience(self) -> float:
        """How long joining and ``sync_state`` try a DHT call again while it times out: the
        longer of :attr:`peer_ttl` and :attr:`DHT_TRIES` calls (on a loaded machine one read
        can take the whole ``peer_ttl``, and a volunteer should not die of one slow read)."""
        return max(self.peer_ttl, self.DHT_TRIES * self.dht_timeout)

    @property
    def start_timeout(self) -> float:
        """The most handing an average to its averager process may take (each of 2 calls)."""
        return max(10.0, 4 * self.request_timeout)

    @property
    def download_timeout(self) -> float:
        """The most downloading the state from one peer may take."""
        return max(30.0, self.averaging_timeout)

    @property
    def round_bound(self) -> float:
        """The most one outer round can block a peer, a catch-up download aside: starting
        its averager, handing it the average (2 calls), waiting for the round to start
        (rounds keyed by the clock: at most ``matchmaking_timeout`` early) and for the
        result (and stopping the averager if it outlived that), then publishing the new
        state and reading the others' (3 DHT calls)."""
        return (
            self.AVERAGER_START_TIMEOUT
            + 2 * self.start_timeout
            + self.matchmaking_timeout
            + self.wait_timeout
            + self.AVERAGER_STOP_TIMEOUT
            + 3 * self.dht_timeout
        )

    @property
    def download_bound(self) -> float:
        """The most a catch-up download (``sync_state`` after the first) can block a peer:
        reading the records (retried for :attr:`dht_patience`), waiting for a holder that
        is not mid-average (up to :attr:`wait_timeout`), one attempt of up to
        :attr:`DOWNLOAD_TRIES` peers, and the reads and stores around them."""
        return (
            self.dht_patience
            + 4 * self.dht_timeout
            + self.wait_timeout
            + self.DOWNLOAD_TRIES * self.download_timeout
        )
