"""Which fragment syncs when. Pure: no tensors, no I/O.

Streaming DiLoCo (Douillard et al. 2025, "Streaming DiLoCo with overlapping communication")
syncs fragment ``p`` of ``P`` every ``H`` inner steps at offset ``p * H / P`` (rounded down when
``P`` does not divide ``H``), so about ``1/P`` of the model is on the wire at any time instead of
all of it every ``H`` steps.

Writing your own schedule: any object with ``num_fragments``, ``period``, ``spacing`` and
``due(step)`` satisfies :class:`FragmentSchedule`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["FragmentSchedule", "StaggeredSchedule"]


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

    def __repr__(self) -> str:
        return f"StaggeredSchedule(sync_every={self.period}, num_fragments={self.num_fragments})"
