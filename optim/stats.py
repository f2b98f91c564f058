"""What a DiLoCo optimizer has done so far: the counters behind ``DiLoCo.stats``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = ["DiLoCoStats", "MemoryReport"]


@dataclass
class DiLoCoStats:
    """What a :class:`DiLoCo` has done so far (``opt.stats``).

    Attributes:
        inner_steps: inner optimizer steps taken.
        outer_steps: complete outer rounds (every fragment synced once more).
        fragment_syncs: fragment syncs applied (``outer_steps * P`` plus the current round's).
        bytes_sent: payload bytes this worker sent, from the backend's counters.
        bytes_received: payload bytes this worker received.
        comm_seconds: seconds the training loop was blocked on communication: waiting for
            averages, handing them to the backend and, on a swarm, publishing and downloading
            the shared state (the start-up broadcast at construction is not counted).
        peak_sync_bytes: the most bytes this worker sent for one fragment sync.
        max_in_flight_bytes: the most bytes of parameter payload in flight at once (launched
            but not yet applied), the figure streaming keeps near ``total / P``.
        dense_bytes_per_sync: what one full sync of the model in fp32 would send, for the ratio.
        compression_ratio: fp32 bytes / compressed bytes of the pseudo-gradients sent.
        overlap_steps: inner steps the last sync was overlapped with (0: none).
        mean_overlap_steps: mean over all syncs.
        skipped_outer_steps: fragment syncs skipped because no finite contribution arrived.
        nonfinite_rounds: syncs where this worker's own pseudo-gradient was NaN/Inf and was
            left out of the average.
        num_peers: workers in the last average.
        max_peers: the most workers in any one average so far. On an elastic backend a
            round can fall back to fewer (a peer that timed out averages alone), so this,
            not ``num_peers``, is how large the swarm this worker trained in was.
        averaged_steps: this worker's inner steps whose pseudo-gradient entered an average
            with at least one other worker (its weight in those averages, over fragments
            divided by ``P``): divided by ``inner_steps``, the share of its work that
            entered an average with others.
        discarded_steps: this worker's inner steps whose work was thrown away (over
            fragments divided by ``P``): steps of rounds it averaged alone while the swarm
            moved on without it, dropped when it then adopted the swarm's state, and steps
            of stale rounds it sat out (weight 0). ``1 - discarded_steps / inner_steps`` is
            the share of its work that reached the global model; it counts the rounds a
            worker averaged alone because it was the only one training (its state then is
            the swarm's), which ``averaged_steps`` does not.
    """

    inner_steps: int = 0
    outer_steps: int = 0
    fragment_syncs: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    comm_seconds: float = 0.0
    peak_sync_bytes: int = 0
    max_in_flight_bytes: int = 0
    dense_bytes_per_sync: int = 0
    compression_ratio: float = 1.0
    overlap_steps: int = 0
    mean_overlap_steps: float = 0.0
    skipped_outer_steps: int = 0
    nonfinite_rounds: int = 0
    num_peers: int = 1
    max_peers: int = 1
    averaged_steps: float = 0.0
    discarded_steps: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """A plain dict, for logging."""
        return asdict(self)


@dataclass
class MemoryReport:
    """Memory a :class:`DiLoCo` holds beside the model and its inner optimizer
    (``opt.memory()``).

    Attributes:
        bytes_by_device: bytes held per device (``"cpu"``, ``"cuda:0"``, ...): the fp32
            global copy, the outer optimizers' state, error-feedback residuals, and the
            buffers of syncs in flight.
        num_params: elements of the synced parameters this worker holds (its local shards
            under FSDP2).
    """

    bytes_by_device: dict[str, int]
    num_params: int

    @classmethod
    def of(
        cls,
        tensors: Sequence[torch.Tensor],
        num_params: int,
        extra: Mapping[str, int] | None = None,
    ) -> MemoryReport:
        """Count the storage behind ``tensors`` once each (views share it), plus ``extra``
        bytes per device; tensors without data (``device="meta"``) count nothing."""
        held = dict(extra or {})
        seen: set[int] = set()
        for t in tensors:
            if t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            held[str(t.device)] = held.get(str(t.device), 0) + storage.nbytes()
        return cls(held, num_params)

    @property
    def host_bytes(self) -> int:
        """Bytes held in host memory."""
        return sum(b for d, b in self.bytes_by_device.items() if d == "cpu")

    @property
    def device_bytes(self) -> int:
        """Bytes held on accelerators (every device but the host)."""
        return sum(b for d, b in self.bytes_by_device.items() if d != "cpu")

    @property
    def host_bytes_per_param(self) -> float:
        """Host bytes per synced parameter element."""
        return self.host_bytes / max(1, self.num_params)

    @property
    def device_bytes_per_param(self) -> float:
        """Accelerator bytes per synced parameter element."""
        return self.device_bytes / max(1, self.num_params)
