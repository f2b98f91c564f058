"""Which fragment syncs when. No tensors, no I/O (a deadline schedule reads a clock it is given).

Streaming DiLoCo (Douillard et al. 2025, "Streaming DiLoCo with overlapping communication")
syncs fragment ``p`` of ``P`` every ``H`` inner steps at offset ``p * H / P`` (rounded down when
``P`` does not divide ``H``), so about ``1/P`` of the model is on the wire at any time instead of
all of it every ``H`` steps: :class:`StaggeredSchedule`, keyed by inner steps, the same on
every worker, bit-exact.

Machines of unequal speed drift apart on a step-keyed schedule (a slow one reaches step
``k·H`` after the others averaged it). :class:`DeadlineSchedule` cuts rounds by a shared wall
clock instead: every worker syncs at the same instants, each contributing the inner steps it
managed (Async Local-SGD, Liu et al. 2024; hivemind weighs contributions by samples alike).

Writing your own schedule: implement :class:`FragmentSchedule`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

__all__ = ["DeadlineSchedule", "FragmentSchedule", "StaggeredSchedule"]


@runtime_checkable
class FragmentSchedule(Protocol):
    """Decides after which inner steps each fragment starts a sync.

    Attributes:
        num_fragments: number of fragments ``P``.
        period: inner steps between two syncs of the same fragment (``H``).
        spacing: fewest inner steps between two syncs of any fragments; an overlapped
            sync must land before the next one starts.
    """

    num_fragments: int
    period: int
    spacing: int

    def due(self, step: int) -> list[int]:
        """Fragments whose sync starts right after inner step ``step`` (counted from 1)."""
        ...

    def key(self, fragment: int, step: int) -> int:
        """The round a sync of ``fragment`` started after ``step`` belongs to: workers group
        only with workers of the same key (a swarm backend's ``average(step=...)``)."""
        ...

    def stale(self, fragment: int) -> bool:
        """True when ``fragment``'s previous sync was more than a round before the one due
        now: this worker was held up, and its pseudo-gradient is against global parameters
        the others have moved on from (it should sit the round out and catch up)."""
        ...

    def last_sync_step(self, fragment: int, inner_steps: int) -> int:
        """After this worker's state was replaced at ``inner_steps`` (a swarm download): the
        inner step that counts as ``fragment``'s last sync, from which its next weight counts.
        Also restarts any bookkeeping of its own."""
        ...


class StaggeredSchedule:
    """Fragment ``p`` syncs after inner steps ``s >= 1`` with ``s % H == ⌊p·H/P⌋``.

    With ``P = 1`` this is plain DiLoCo: the one fragment (the whole model) syncs after steps
    ``H, 2H, ...``. When ``P`` divides ``H`` the offsets are the paper's ``p·H/P``, evenly
    spaced; otherwise they are rounded down, so the gaps between consecutive syncs are
    ``⌊H/P⌋`` or ``⌈H/P⌉`` steps. Either way the ``P`` offsets are distinct (``P <= H``), and
    each fragment syncs exactly once in any ``H`` consecutive inner steps.

    Args:
        sync_every: ``H``, inner steps between two syncs of one fragment (>= 1).
        num_fragments: ``P``, between 1 and ``H``, so every fragment has a step of its own.

    Raises:
        ValueError: if ``H < 1``, ``P < 1`` or ``P > H``.
    """

    def __init__(self, sync_every: int, num_fragments: int = 1) -> None:
        if not isinstance(sync_every, int) or isinstance(sync_every, bool) or sync_every < 1:
            raise ValueError(f"sync_every ({sync_every!r}) must be an integer >= 1")
        if not isinstance(num_fragments, int) or num_fragments < 1:
            raise ValueError(f"fragments ({num_fragments!r}) must be an integer >= 1")
        if num_fragments > sync_every:
            raise ValueError(
                f"fragments ({num_fragments}) must be <= sync_every ({sync_every}): each "
                f"fragment needs an inner step of its own to sync after"
            )
        self.period = sync_every
        self.num_fragments = num_fragments
        self._offsets = [p * sync_every // num_fragments for p in range(num_fragments)]
        self._fragment_at = {offset: p for p, offset in enumerate(self._offsets)}
        # The smallest gap between consecutive syncs, the wrap from the last fragment to
        # fragment 0 of the next period included: an overlapped sync must land within it.
        ends = [*self._offsets[1:], sync_every + self._offsets[0]]
        self.spacing = min(end - start for start, end in zip(self._offsets, ends))

    def offset(self, fragment: int) -> int:
        """The inner step (mod ``H``) after which ``fragment`` syncs: ``⌊fragment·H/P⌋``."""
        return self._offsets[fragment]

    def due(self, step: int) -> list[int]:
        """Fragments whose sync starts right after inner step ``step`` (counted from 1)."""
        if step < 1:
            return []
        fragment = self._fragment_at.get(step % self.period)
        return [] if fragment is None else [fragment]

    def key(self, fragment: int, step: int) -> int:
        """The inner step itself: lockstep workers reach it together."""
        return step

    def stale(self, fragment: int) -> bool:
        """Never: steps cannot be skipped."""
        return False

    def last_sync_step(self, fragment: int, inner_steps: int) -> int:
        """The last step ``<= inner_steps`` at which ``fragment`` synced (0: never)."""
        offset = self._offsets[fragment] or self.period
        last = inner_steps - ((inner_steps - offset) % self.period)
        return last if last >= offset else 0

    def __repr__(self) -> str:
        return f"StaggeredSchedule(sync_every={self.period}, num_fragments={self.num_fragments})"


_TIMED_STEPS = 5
"""How many recent inner-step times :class:`DeadlineSchedule` takes the median of."""


class DeadlineSchedule:
    """Fragments sync at wall-clock deadlines: every ``round_seconds``, fragment ``p`` at
    offset ``p·T/P`` into the round, the same instants on every machine whose clock is right.

    The clock is cut into slots of ``T/P`` seconds; slot ``q = ⌊clock() / (T/P)⌋`` belongs to
    fragment ``q % P``, and ``q`` is its round key, so workers meet by the clock alone. A
    slot's fragment is due at the last inner step that ends before the slot begins: each
    worker times its own steps (the median of its last few, steps that synced left out) and
    syncs when the next step would end past the boundary, so every worker, a slow one
    included, reaches the round's matchmaking by its start instead of up to one step late
    (a peer that came late found the group formed without it). A step that ends in a slot
    not yet synced makes that slot due at once (the first steps, before there is a timing,
    or a step slower than predicted). At most one fragment per step: a worker that slept
    through several slots syncs the current one only. Each worker's weight
    is the inner steps it took since the fragment's last sync, so a slow machine contributes
    less but is never left out. A fragment whose previous sync is more than a round old is
    :meth:`stale`: DiLoCo has it sit the round out (weight 0) and the swarm's state catches
    it up.

    Clocks must agree to well within a slot (NTP does; hivemind's own DHT expirations rely on
    wall time too).

    Args:
        round_seconds: ``T``, seconds between two syncs of one fragment.
        num_fragments: ``P``.
        sync_every: the nominal inner steps per round (``period``); used for bounds and
            fingerprints, not for timing.
        clock: seconds since the epoch; :func:`time.time` (looked up when built) unless
            given.

    Raises:
        ValueError: if ``T`` is not a positive finite number, or ``P``/``H`` are invalid.
    """

    def __init__(
        self,
        round_seconds: float,
        num_fragments: int = 1,
        sync_every: int = 1,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if isinstance(round_seconds, bool) or not (
            isinstance(round_seconds, (int, float)) and math.isfinite(round_seconds)
        ):
            raise ValueError(f"round_seconds ({round_seconds!r}) must be a positive number")
        if round_seconds <= 0:
            raise ValueError(f"round_seconds ({round_seconds!r}) must be a positive number")
        steps = StaggeredSchedule(sync_every, num_fragments)  # the same checks on H and P
        self.round_seconds = float(round_seconds)
        self.num_fragments = num_fragments
        self.period = sync_every
        self.spacing = steps.spacing
        self._slot = self.round_seconds / num_fragments
        self._clock = clock or time.time
        self._last_slot: int | None = None
        self._synced: dict[int, int] = {}  # fragment -> slot of its last sync
        self._stale = False  # the sync due now skipped a round of its fragment
        self._last_call: float | None = None  # when due() last ran; None: next interval
        self._intervals: list[float] = []  # recent inner-step times, syncs left out

    def _now(self) -> int:
        return math.floor(self._clock() / self._slot)

    def step_seconds(self) -> float | None:
        """The median of this worker's last inner-step times (None before there is one)."""
        if not self._intervals:
            return None
        ordered = sorted(self._intervals)
        return ordered[len(ordered) // 2]

    def _time_step(self, now: float) -> None:
        if self._last_call is not None and now >= self._last_call:
            self._intervals = [*self._intervals[-(_TIMED_STEPS - 1) :], now - self._last_call]
        self._last_call = now

    def due(self, step: int) -> list[int]:
        """The fragment of the next slot if the next inner step would end in it, or of the
        current slot if this step is the first to end in it unsynced; else nothing."""
        now = self._clock()
        slot = math.floor(now / self._slot)
        self._time_step(now)
        if self._last_slot is None:
            # Counting starts now: the first deadline is the next slot boundary.
            self._last_slot = slot
            return []
        if slot > self._last_slot:
            target = slot
        elif self._last_slot > slot:
            # The next slot is synced already: never further ahead, however long the steps
            # look (after a stall the timings can say a step takes longer than a slot, and
            # each step would sync, alone, for a round further in the future).
            return []
        else:
            per_step = self.step_seconds()
            if per_step is None or math.floor((now + per_step) / self._slot) <= self._last_slot:
                return []
            target = self._last_slot + 1
        # The interval up to the next call holds this sync: not an inner step's time.
        self._last_call = None
        self._last_slot = target
        fragment = target % self.num_fragments
        previous = self._synced.get(fragment)
        self._stale = previous is not None and target - previous > self.num_fragments
        self._synced[fragment] = target
        return [fragment]

    def key(self, fragment: int, step: int) -> int:
        """The slot number: the same for every worker syncing at this deadline."""
        assert self._last_slot is not None, "key() is asked for a fragment due()"
        return self._last_slot

    def stale(self, fragment: int) -> bool:
        """Whether the sync just due skipped one or more of this fragment's rounds."""
        return self._stale

    def last_sync_step(self, fragment: int, inner_steps: int) -> int:
        """``inner_steps``: after a download, the next weight counts from now; every
        fragment's bookkeeping restarts at the current slot."""
        # Not before the slot synced last: that round may be one still to start.
        slot = max(self._now(), self._last_slot if self._last_slot is not None else -1)
        self._last_slot = slot
        self._synced = {f: slot for f in range(self.num_fragments)}
        self._stale = False
        self._last_call = None  # the download's time is not an inner step's
        return inner_steps

    def __repr__(self) -> str:
        return (
            f"DeadlineSchedule(round_seconds={self.round_seconds}, "
            f"num_fragments={self.num_fragments}, sync_every={self.period})"
        )
