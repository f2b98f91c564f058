"""The single-process backend: no communication, the same arithmetic."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lowcomm.comm.base import AverageResult, DoneWork, WireStats
from lowcomm.comm.compression.base import Compressor
from lowcomm.comm.reduce import Identity, dense_average, sparse_average

__all__ = ["LocalBackend"]


class LocalBackend:
    """A world of one worker.

    ``average`` returns the worker's own tensors after the same encode/decode as a real
    average (so a compressed single-process run sees the compressor's error), and sends
    nothing. ``check_consistent`` and ``sync_state`` have nobody to compare with.

    Call protocol: none; everything completes immediately.
    """

    elastic = False
    rank = 0
    world_size = 1

    def __init__(self) -> None:
        self.stats = WireStats()

    def check_consistent(self, fingerprint: str) -> None:
        """Nothing to compare with."""

    def sync_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Nothing to download: this worker is the reference."""

    def average(
        self,
        tensors: Sequence[torch.Tensor],
        *,
        weight: float = 1.0,
        compressor: Compressor | None = None,
        step: int | None = None,
    ) -> DoneWork:
        """Return ``tensors`` passed through ``compressor``'s encode/decode."""
        if weight < 0 or weight != weight:
            raise ValueError(f"weight ({weight}) must be >= 0")
        comp: Compressor = compressor if compressor is not None else Identity()
        flat = torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors])

        def no_a2a(send: torch.Tensor, _s: list[int], _r: list[int]) -> torch.Tensor:
            return send

        def no_gather(buf: torch.Tensor) -> torch.Tensor:
            return buf

        if comp.dense:
            out, _, _ = dense_average(flat, [weight], 0, comp, no_a2a, no_gather)
        else:
            out, _, _ = sparse_average(flat, [weight], comp, no_gather)
        result, offset = [], 0
        for t in tensors:
            result.append(out[offset : offset + t.numel()].view(t.shape))
            offset += t.numel()
        self.stats.num_averages += 1
        return DoneWork(AverageResult(result, 1 if weight > 0 else 0, float(weight)))

    def close(self) -> None:
        """Nothing to release."""
