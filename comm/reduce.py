"""Bandwidth-optimal averaging of compressed tensors, independent of the transport.

Dense payloads go through a reduce-scatter of compressed chunks (each worker decodes and sums
its chunk in fp32), then an all-gather of the re-compressed reduced chunks, so every worker
sends about ``2 (N-1)/N`` times the compressed size, the bound of a ring all-reduce. Sparse
payloads (top-k) cannot be summed while compressed and are all-gathered whole.

The transport is passed in as two functions, so the same arithmetic serves torch.distributed
and a single process, and every worker sums contributions in rank order: the result is
bit-identical on all workers, whatever the compressor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lowcomm.comm.compression.base import Compressor, Payload, check_payload

__all__ = ["Identity", "chunk_bounds", "dense_average", "sparse_average"]

# (send buffer, send split sizes, receive split sizes) -> receive buffer
AllToAll = Callable[[torch.Tensor, list[int], list[int]], torch.Tensor]
# (this worker's equal-size buffer) -> every worker's buffer, concatenated in rank order
AllGather = Callable[[torch.Tensor], torch.Tensor]


class Identity:
    """fp32 on the wire: the "no compression" compressor, so one code path serves both."""

    dense = True
    granularity = 1

    def nbytes(self, numel: int) -> int:
        return 4 * numel

    def compress(self, tensor: torch.Tensor) -> Payload:
        flat = tensor.detach().reshape(-1).to(torch.float32).contiguous()
        return Payload(flat.view(torch.uint8), flat.numel())

    def decompress(self, payload: Payload) -> torch.Tensor:
        check_payload(self, payload)
        return payload.data.view(torch.float32)


def chunk_bounds(numel: int, world_size: int, granularity: int) -> list[tuple[int, int]]:
    """Split ``[0, numel)`` into ``world_size`` chunks cut at multiples of ``granularity``.

    Chunks are front-loaded (earlier ones are never smaller), so chunk 0 has the largest
    payload and bounds the all-gather's padding. Trailing chunks may be empty.
    """
    per = -(-numel // world_size)
    per = -(-per // granularity) * granularity
    return [(min(r * per, numel), min((r + 1) * per, numel)) for r in range(world_size)]


def _encode(compressor: Compressor, flat: torch.Tensor) -> torch.Tensor:
    if flat.numel() == 0:
        return torch.empty(0, dtype=torch.uint8, device=flat.device)
    payload = compressor.compress(flat)
    # Checked before anything is sent: a receiver sizes its buffers from nbytes, so a payload
    # of another length would be read as garbage (or hang the collective).
    check_payload(compressor, payload)
    return payload.data


def _decode(compressor: Compressor, data: torch.Tensor, numel: int) -> torch.Tensor:
    if numel == 0:
        check_payload(Identity(), Payload(data, 0))
        return torch.zeros(0, dtype=torch.float32, device=data.device)
    return compressor.decompress(Payload(data, numel)).to(torch.float32)


def dense_average(
    flat: torch.Tensor,
    weights: Sequence[float],
    rank: int,
    compressor: Compressor,
    all_to_all: AllToAll,
    all_gather: AllGather,
) -> tuple[torch.Tensor, int, int]:
    """Weighted mean of every worker's ``flat`` through compressed reduce-scatter/all-gather.

    Args:
        flat: this worker's 1-D fp32 contribution.
        weights: every worker's weight, in rank order (already exchanged).
        rank: this worker's index into ``weights``.
        compressor: a dense compressor.
        all_to_all: the transport's uneven all-to-all of byte buffers.
        all_gather: the transport's all-gather of equal-size byte buffers.

    Returns:
        (mean, bytes sent, bytes received); the mean is identical on every worker.
    """
    world = len(weights)
    total = float(sum(weights))
    bounds = chunk_bounds(flat.numel(), world, compressor.granularity)
    sizes = [compressor.nbytes(hi - lo) if hi > lo else 0 for lo, hi in bounds]
    send = torch.cat([_encode(compressor, flat[lo:hi]) for lo, hi in bounds])
    lo, hi = bounds[rank]
    mine = sizes[rank]
    received = all_to_all(send, sizes, [mine] * world)
    acc = torch.zeros(hi - lo, dtype=torch.float32, device=flat.device)
    for src in range(world):  # rank order: the same float sums on every worker
        if weights[src] != 0.0:
            part = _decode(compressor, received[src * mine : (src + 1) * mine], hi - lo)
            acc.add_(part, alpha=weights[src])
    if total > 0:
        acc.div_(total)
    pad = sizes[0]
    reduced = _encode(compressor, acc)
    if reduced.numel() < pad:
        reduced = torch.cat([reduced, reduced.new_zeros(pad - reduced.numel())])
    gathered = all_gather(reduced)
    out = torch.cat(
        [
            _decode(compressor, gathered[r * pad : r * pad + sizes[r]], b_hi - b_lo)
            for r, (b_lo, b_hi) in enumerate(bounds)
        ]
    )
    sent = sum(s for r, s in enumerate(sizes) if r != rank) + (world - 1) * pad
    recv = (world - 1) * mine + (world - 1) * pad
    return out, sent, recv


def sparse_average(
    flat: torch.Tensor,
    weights: Sequence[float],
    compressor: Compressor,
    all_gather: AllGather,
) -> tuple[torch.Tensor, int, int]:
    """Weighted mean of every worker's ``flat`` through an all-gather of whole payloads.

    Returns:
        (mean, bytes sent, bytes received); the mean is identical on every worker.
    """
    world = len(weights)
    total = float(sum(weights))
    size = compressor.nbytes(flat.numel())
    gathered = all_gather(_encode(compressor, flat))
    acc = torch.zeros_like(flat, dtype=torch.float32)
    for src in range(world):
        if weights[src] != 0.0:
            part = _decode(compressor, gathered[src * size : (src + 1) * size], flat.numel())
            acc.add_(part, alpha=weights[src])
    if total > 0:
        acc.div_(total)
    return acc, (world - 1) * size, (world - 1) * size
