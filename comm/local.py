"""The single-process backend: no communication, the same arithmetic."""

from __future__ import annotations

import torch

from lowcomm.comm.base import DoneWork, WireStats
from lowcomm.comm.compression.base import Compressor
from lowcomm.comm.reduce import (
    Identity,
    average_result,
    dense_average,
    finite_weight,
    sparse_average,
)

__all__ = ["LocalBackend"]


class LocalBackend:
    """A world of one worker: the explicit way to train alone.

    ``average`` returns the worker's own contribution after the same encode/decode as a real
    average (so a compressed single-process run sees the compressor's error), and sends
    nothing. ``check_consistent`` and ``sync_state`` have nobody to compare with.

    Call protocol: none; everything completes immediately, on the caller's thread.
    """

    elastic = False
    rank = 0
    world_size = 1

    def __init__(self) -> None:
        self.stats = WireStats()

    def check_compressor(self, compressor: Compressor | None) -> None:
        """Every compressor works here (dense or sparse)."""

    def check_consistent(self, fingerprint: str) -> None:
        """Nothing to compare with."""

    def sync_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Nothing to download: this worker is the reference."""

    def average(
        self,
        flat: torch.Tensor,
        *,
        weight: float = 1.0,
        compressor: Compressor | None = None,
        step: int | None = None,
    ) -> DoneWork:
        """Return ``flat`` passed through ``compressor``'s encode/decode."""
        if weight < 0 or weight != weight:
            raise ValueError(f"weight ({weight}) must be >= 0")
        comp: Compressor = compressor if compressor is not None else Identity()
        flat = flat.detach().reshape(-1).to(torch.float32)
        weights = finite_weight(flat, weight).tolist()

        def no_a2a(send: torch.Tensor, _s: list[int], _r: list[int]) -> torch.Tensor:
            return send

        def no_gather(buf: torch.Tensor) -> torch.Tensor:
            return buf

        if comp.dense:
            mean, own, _, _ = dense_average(flat, weights, 0, comp, no_a2a, no_gather)
        else:
            mean, own, _, _ = sparse_average(flat, weights, 0, comp, no_gather)
        self.stats.num_averages += 1
        return DoneWork(average_result(mean, own, weights, 0, 0, 0))

    def close(self) -> None:
        """Nothing to release."""
