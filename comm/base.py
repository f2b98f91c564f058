"""The backend contract: how pseudo-gradients are averaged between workers.

A backend moves bytes; it knows nothing of optimizers. :class:`lowcomm.DiLoCo` calls it at
start-up (``check_consistent``, ``sync_state``) and once per fragment per outer step
(``average``), and reads ``stats`` for ``opt.stats``.

Writing your own: implement the four methods and two properties of :class:`Backend`; test it
with :func:`lowcomm.testing.run_ranks` (torch.distributed style) or in one process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from lowcomm.comm.compression.base import Compressor

__all__ = [
    "AverageResult",
    "AverageWork",
    "Backend",
    "ConsistencyError",
    "DoneWork",
    "WireStats",
]


class ConsistencyError(ValueError):
    """Workers disagree on something that must be identical (model shapes, config, world)."""


@dataclass
class WireStats:
    """Counters a backend keeps of its own traffic.

    Attributes:
        bytes_sent: payload bytes this worker handed to the transport for other workers.
        bytes_received: payload bytes this worker received from other workers.
        comm_seconds: wall seconds the caller was blocked waiting for communication.
        num_averages: averages started.
        peak_bytes: the largest ``bytes_sent`` of a single average.
    """

    bytes_sent: int = 0
    bytes_received: int = 0
    comm_seconds: float = 0.0
    num_averages: int = 0
    peak_bytes: int = 0

    def record(self, sent: int, received: int) -> None:
        """Count one average's traffic."""
        self.bytes_sent += sent
        self.bytes_received += received
        self.num_averages += 1
        self.peak_bytes = max(self.peak_bytes, sent)


@dataclass
class AverageResult:
    """The outcome of one average.

    Attributes:
        tensors: the weighted mean, fp32, one tensor per input, same shapes and device.
        num_peers: workers whose contribution is in the mean (this one included).
        total_weight: sum of the weights of those contributions.
        bytes_sent: payload bytes this worker sent for this average.
        bytes_received: payload bytes this worker received for this average.
    """

    tensors: list[torch.Tensor]
    num_peers: int
    total_weight: float
    bytes_sent: int = 0
    bytes_received: int = 0


@runtime_checkable
class AverageWork(Protocol):
    """A started average. ``wait`` blocks until it is done and returns the result."""

    def wait(self) -> AverageResult:
        """Block until the average is complete; return it. Call at most once."""
        ...

    def is_completed(self) -> bool:
        """True if ``wait`` would not block."""
        ...


@dataclass
class DoneWork:
    """An :class:`AverageWork` that is already complete (single process, synchronous paths)."""

    result: AverageResult
    on_wait: Callable[[], None] | None = field(default=None, repr=False)

    def wait(self) -> AverageResult:
        if self.on_wait is not None:
            self.on_wait()
        return self.result

    def is_completed(self) -> bool:
        return True


@runtime_checkable
class Backend(Protocol):
    """Averages lists of tensors between workers.

    Call protocol:
        * ``check_consistent``, ``sync_state`` and ``average`` are collective over the current
          group: every worker calls them in the same order with tensors of the same shapes.
        * ``average`` returns at once with an :class:`AverageWork`; the caller keeps computing
          and calls ``wait`` later (this is what overlap is built on). Inputs must not be
          modified until ``wait`` returns.
        * ``stats`` counts the payload bytes actually handed to the transport.

    Attributes:
        rank: this worker's index (0 for the process that is the reference copy).
        world_size: workers in the group now (live peers for a swarm).
        stats: :class:`WireStats` of this worker's traffic.
    """

    stats: WireStats

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def check_consistent(self, fingerprint: str) -> None:
        """Raise :class:`ConsistencyError` unless every worker passed the same fingerprint."""
        ...

    def sync_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Make ``tensors`` (in place) equal to the reference worker's.

        torch.distributed broadcasts rank 0's and returns once every rank holds it; a swarm
        downloads a live peer's.
        """
        ...

    def average(
        self,
        tensors: Sequence[torch.Tensor],
        *,
        weight: float = 1.0,
        compressor: Compressor | None = None,
        step: int | None = None,
    ) -> AverageWork:
        """Start a weighted average ``sum_i w_i x_i / sum_i w_i`` of ``tensors`` over workers.

        Args:
            tensors: floating tensors; the same shapes on every worker.
            weight: this worker's weight (e.g. inner steps or samples it did); >= 0, and 0
                leaves this worker's tensors out of the mean.
            compressor: how contributions are encoded on the wire; None sends fp32.
            step: the inner step at which this sync starts; names the round for backends
                whose peers must agree on it (a swarm); lockstep backends ignore it.
        """
        ...

    def close(self) -> None:
        """Release sockets, threads and daemons. Idempotent."""
        ...


class Timer:
    """Adds the seconds spent inside a ``with`` block to ``stats.comm_seconds``."""

    def __init__(self, stats: WireStats) -> None:
        self.stats = stats
        self._t0 = 0.0

    def __enter__(self) -> Timer:
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stats.comm_seconds += time.perf_counter() - self._t0
