"""The backend contract: how pseudo-gradients are averaged between workers.

A backend moves bytes; it knows nothing of optimizers. :class:`lowcomm.DiLoCo` calls it at
start-up (``check_compressor``, ``check_consistent``, ``sync_state``) and once per fragment per
outer step (``average``), and reads ``stats`` for ``opt.stats``. Backends whose workers come
and go (a swarm) also implement :class:`ElasticBackend`.

One pseudo-gradient is one flat fp32 tensor from end to end: ``average`` takes it, encodes it
once, and returns the mean *and* this worker's own contribution as the receivers decoded it,
so error feedback and eager updates reuse that instead of encoding again.

Writing your own: implement the methods and properties of :class:`Backend` (about 20 lines
for a transport that can all-gather; :class:`lowcomm.comm.LocalBackend` is the smallest
example); test it with :func:`lowcomm.testing.run_ranks` (torch.distributed style) or in one
process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
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
    "ElasticBackend",
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
        mean: the weighted mean, a flat fp32 tensor on the input's device; identical on every
            worker that took part. Non-finite when nothing finite arrived (then
            ``total_weight`` is 0 and the caller must not use it).
        own: this worker's contribution as the other workers decoded it (flat fp32, same
            device): the input itself when the wire is lossless, else ``decode(encode(x))``.
            Error feedback keeps ``x - own``; eager updates swap it for a fresh pseudo-gradient.
            Zeros when ``own_weight`` is 0.
        num_peers: workers whose contribution is in the mean (this one included).
        total_weight: sum of the weights of those contributions; 0 when no finite
            contribution arrived or the mean itself was not finite.
        own_weight: the weight this worker's contribution carried: the weight passed to
            ``average``, or 0 when the backend left it out (it was not finite).
        bytes_sent: payload bytes this worker sent for this average.
        bytes_received: payload bytes this worker received for this average.
    """

    mean: torch.Tensor
    own: torch.Tensor
    num_peers: int
    total_weight: float
    own_weight: float
    bytes_sent: int = 0
    bytes_received: int = 0


@runtime_checkable
class AverageWork(Protocol):
    """A started average. ``wait`` blocks until it is done and returns the result."""

    def wait(self) -> AverageResult:
        """Block until the average is complete; return it. Call at most once."""
        ...


@dataclass
class DoneWork:
    """An :class:`AverageWork` that is already complete (single process, synchronous paths)."""

    result: AverageResult

    def wait(self) -> AverageResult:
        return self.result


@runtime_checkable
class Backend(Protocol):
    """Averages flat fp32 tensors between workers.

    Call protocol:
        * ``check_compressor``, then ``check_consistent``, then ``sync_state``, once, at
          start-up; then ``average`` once per fragment sync. ``check_consistent``,
          ``sync_state`` and ``average`` are collective over the backend's workers: every
          worker calls them in the same order with tensors of the same shapes.
        * ``average`` returns at once with an :class:`AverageWork`; the caller keeps computing
          and calls ``wait`` later (this is what overlap is built on). The input must not be
          modified until ``wait`` returns.
        * A contribution that is not finite is left out (weight 0) by the backend, not by the
          caller, so the caller need not read the tensor back (a host sync on an
          accelerator); ``AverageResult.own_weight`` tells the caller it happened.
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

    def check_compressor(self, compressor: Compressor | None) -> None:
        """Raise ValueError if this backend cannot carry ``compressor``'s payloads.

        Called at construction of the optimizer, so an impossible combination fails before
        any training (e.g. a sparse compressor on a transport that can only sum dense slices).
        """
        ...

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
        flat: torch.Tensor,
        *,
        weight: float = 1.0,
        compressor: Compressor | None = None,
        step: int | None = None,
    ) -> AverageWork:
        """Start a weighted average ``sum_i w_i x_i / sum_i w_i`` of ``flat`` over workers.

        Args:
            flat: this worker's 1-D fp32 contribution; the same length on every worker.
            weight: this worker's weight (e.g. inner steps or samples it did); >= 0, and 0
                leaves this worker's contribution out of the mean.
            compressor: how contributions are encoded on the wire; None sends fp32.
            step: the inner step at which this sync starts; names the round for backends
                whose peers must agree on it (a swarm); lockstep backends ignore it.
        """
        ...

    def close(self) -> None:
        """Release sockets, threads and daemons. Idempotent."""
        ...


@runtime_checkable
class ElasticBackend(Backend, Protocol):
    """A backend whose workers join, leave and fall behind: a swarm.

    :class:`lowcomm.DiLoCo` treats a backend as elastic when it satisfies this Protocol (it
    checks ``isinstance(backend, ElasticBackend)``); it then keeps the whole shared state
    (θ, outer optimizer state, counters) ready to serve and calls, after every applied outer
    step, ``publish_state`` and then ``needs_resync``, downloading the swarm's state with
    ``sync_state`` when that returns True. ``world_size`` may change at any time.

    Call protocol: as :class:`Backend`, plus:
        * ``publish_state(state)`` after each applied outer step: the snapshot joiners download.
        * ``needs_resync()`` after ``publish_state``: True if this worker is behind or its state
          differs from the swarm's; then call ``sync_state`` with the full state.
        * ``set_round_seconds(seconds)`` whenever a round's wall time is measured; timeouts
          follow it.
        * ``bound_weights(max_weight)`` once at start: no contribution may count with more
          weight than a round can hold (DiLoCo: its inner steps per round).
    """

    elastic: bool

    def publish_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Serve a snapshot of ``tensors`` to joiners."""
        ...

    def needs_resync(self) -> bool:
        """True if this worker must download the swarm's state with ``sync_state``."""
        ...

    def set_round_seconds(self, round_seconds: float) -> None:
        """Re-derive timeouts from a measured round time."""
        ...

    def bound_weights(self, max_weight: float) -> None:
        """Count no contribution with a weight above ``max_weight``."""
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
