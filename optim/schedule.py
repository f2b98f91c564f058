"""Which fragment syncs when. Pure: no tensors, no I/O.

Streaming DiLoCo (Douillard et al. 2025, "Streaming DiLoCo with overlapping communication")
syncs fragment ``p`` of ``P`` every ``H`` inner steps at offset ``p * H / P``, so about ``1/P``
of the model is on the wire at any time instead of all of it every ``H`` steps.

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
    """Fragment ``p`` syncs after inner steps ``s`` with ``s % H == p * H / P`` (``s >= 1``).

    With ``P = 1`` this is plain DiLoCo: every fragment (the whole model) syncs after steps
    ``H, 2H, ...``. Each fragment syncs exactly once in any ``H`` consecutive inner steps.

    Args:
        sync_every: ``H``, inner steps between two syncs of one fragment (>= 1).
        num_fragments: ``P`` (>= 1), which must divide ``H`` so offsets are whole steps.

    Raises:
        ValueError: if ``H < 1``, ``P < 1`` or ``P`` does not divide ``H``.
    """

    def __init__(self, sync_every: int, num_fragments: int = 1) -> None:
        if not isinstance(sync_every, int) or isinstance(sync_every, bool) or sync_every < 1:
            raise ValueError(f"sync_every ({sync_every!r}) must be an integer >= 1")
        if not isinstance(num_fragments, int) or num_fragments < 1:
            raise ValueError(f"fragments ({num_fragments!r}) must be an integer >= 1")
        if sync_every % num_fragments:
            raise ValueError(
                f"fragments ({num_fragments}) must divide sync_every ({sync_every}) so that "
                f"fragment syncs are evenly spaced"
            )
        self.period = sync_every
        self.num_fragments = num_fragments
        self.spacing = sync_every // num_fragments

    def offset(self, fragment: int) -> int:
        """The inner step (mod ``H``) after which ``fragment`` syncs."""
        return fragment * self.spacing

    def due(self, step: int) -> list[int]:
        """Fragments whose sync starts right after inner step ``step`` (counted from 1)."""
        if step < 1 or step % self.spacing:
            return []
        return [(step % self.period) // self.spacing]

    def __repr__(self) -> str:
        return f"StaggeredSchedule(sync_every={self.period}, num_fragments={self.num_fragments})"
