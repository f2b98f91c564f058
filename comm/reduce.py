"""Bandwidth-optimal averaging of compressed tensors, independent of the transport.

Dense payloads go through a reduce-scatter of compressed chunks (each worker decodes and sums
its chunk in fp32), then an all-gather of the re-compressed reduced chunks, so every worker
sends about ``2 (N-1)/N`` times the compressed size, the bound of a ring all-reduce. Sparse
payloads (top-k) cannot be summed while compressed and are all-gathered whole.

The transport is passed in as two functions, so the same arithmetic serves torch.distributed
and a single process, and every worker sums contributions in rank order: the result is
bit-identical on all workers, whatever the compressor.

Each worker's contribution is encoded once. What the others decode from it (``own``) comes
back beside the mean, for error feedback and eager updates.

Weights are scaled by the largest one before the sum, so a long round (a weight of hundreds
of steps) cannot push a large but finite contribution past fp32's range; a mean that still is
not finite is reported as "no finite contribution" (total weight 0), never handed on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from lowcomm.comm.base import AverageResult
from lowcomm.comm.compression.base import Compressor, Payload, check_payload
from lowcomm.comm.timeline import span

__all__ = [
    "Identity",
    "average_result",
    "chunk_bounds",
    "dense_average",
    "finite_weight",
    "sparse_average",
]

logger = logging.getLogger(__name__)

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


def finite_weight(flat: torch.Tensor, weight: float) -> torch.Tensor:
    """``weight`` as a 1-element float64 tensor on ``flat``'s device, 0 if ``flat`` is not finite.

    Computed on the device without reading ``flat`` back, so a backend can exchange it with
    the other weights and learn the verdict on its own thread.
    """
    w = torch.tensor([float(weight)], dtype=torch.float64, device=flat.device)
    return torch.where(torch.isfinite(flat).all(), w, torch.zeros_like(w))


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


def _scales(weights: Sequence[float]) -> tuple[list[float], float]:
    """Weights divided by the largest, and their sum: the terms of an overflow-safe mean."""
    top = max(weights, default=0.0)
    if top <= 0:
        return [0.0] * len(weights), 0.0
    scaled = [w / top for w in weights]
    return scaled, sum(scaled)


def dense_average(
    flat: torch.Tensor,
    weights: Sequence[float],
    rank: int,
    compressor: Compressor,
    all_to_all: AllToAll,
    all_gather: AllGather,
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Weighted mean of every worker's ``flat`` through compressed reduce-scatter/all-gather.

    Args:
        flat: this worker's 1-D fp32 contribution (may be non-finite when its weight is 0).
        weights: every worker's weight, in rank order (already exchanged; 0 for a worker
            whose contribution is left out).
        rank: this worker's index into ``weights``.
        compressor: a dense compressor.
        all_to_all: the transport's uneven all-to-all of byte buffers.
        all_gather: the transport's all-gather of equal-size byte buffers.

    Returns:
        (mean, own, bytes sent, bytes received): the mean is identical on every worker;
        ``own`` is this worker's contribution as the others decoded it.
    """
    world = len(weights)
    scaled, total = _scales(weights)
    bounds = chunk_bounds(flat.numel(), world, compressor.granularity)
    sizes = [compressor.nbytes(hi - lo) if hi > lo else 0 for lo, hi in bounds]
    with span("encode"):
        send = _encode_chunks(compressor, flat, bounds, sizes)
    lo, hi = bounds[rank]
    mine = sizes[rank]
    received = all_to_all(send, sizes, [mine] * world)
    with span("decode"):
        acc = torch.zeros(hi - lo, dtype=torch.float32, device=flat.device)
        own_chunk = None
        for src in range(world):  # rank order: the same float sums on every worker
            if scaled[src] != 0.0:
                part = _decode(compressor, received[src * mine : (src + 1) * mine], hi - lo)
                acc.add_(part, alpha=scaled[src])
                if src == rank:
                    own_chunk = part
        del received  # summed: not alive beside what comes next
        if total > 0:
            acc.div_(total)
    pad = sizes[0]
    with span("encode"):
        reduced = _encode(compressor, acc)
        del acc  # encoded: not alive beside the decoded mean below
        if reduced.numel() < pad:
            reduced = torch.cat([reduced, reduced.new_zeros(pad - reduced.numel())])
    gathered = all_gather(reduced)
    with span("decode"):
        if isinstance(compressor, Identity) and all(size == pad for size in sizes):
            # fp32 chunks of one size, in order: the gathered bytes are the mean itself.
            out = gathered.view(torch.float32)
        else:
            # Decoded chunk by chunk into one buffer: one chunk's decode at a time beside it.
            out = torch.empty(flat.numel(), dtype=torch.float32, device=flat.device)
            for r, (b_lo, b_hi) in enumerate(bounds):
                data = gathered[r * pad : r * pad + sizes[r]]
                out[b_lo:b_hi] = _decode(compressor, data, b_hi - b_lo)
        own = _own(compressor, flat, weights[rank], send, sizes, bounds, rank, own_chunk)
    sent = sum(s for r, s in enumerate(sizes) if r != rank) + (world - 1) * pad
    recv = (world - 1) * mine + (world - 1) * pad
    return out, own, sent, recv


def _own(
    compressor: Compressor,
    flat: torch.Tensor,
    weight: float,
    send: torch.Tensor,
    sizes: list[int],
    bounds: list[tuple[int, int]],
    rank: int,
    own_chunk: torch.Tensor | None,
) -> torch.Tensor:
    """This worker's contribution as the receivers decode it, from the bytes it sent."""
    if weight == 0:
        return torch.zeros_like(flat)
    if isinstance(compressor, Identity):
        return flat  # lossless: the bytes sent are the input's
    own = torch.empty(flat.numel(), dtype=torch.float32, device=flat.device)
    offset = 0
    for r, ((lo, hi), size) in enumerate(zip(bounds, sizes)):
        if r == rank and own_chunk is not None:
            own[lo:hi] = own_chunk  # already decoded while reducing
        else:
            own[lo:hi] = _decode(compressor, send[offset : offset + size], hi - lo)
        offset += size
    return own


def _encode_chunks(
    compressor: Compressor,
    flat: torch.Tensor,
    bounds: list[tuple[int, int]],
    sizes: list[int],
) -> torch.Tensor:
    """Every chunk's payload, back to back, in one buffer (the all-to-all's input)."""
    if isinstance(compressor, Identity) and flat.is_contiguous():
        # fp32 chunks cut in order are the input's own bytes: no copy.
        return flat.view(torch.uint8)
    send = torch.empty(sum(sizes), dtype=torch.uint8, device=flat.device)
    offset = 0
    for (lo, hi), size in zip(bounds, sizes):
        if size:
            send[offset : offset + size] = _encode(compressor, flat[lo:hi])
        offset += size
    return send


def sparse_average(
    flat: torch.Tensor,
    weights: Sequence[float],
    rank: int,
    compressor: Compressor,
    all_gather: AllGather,
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Weighted mean of every worker's ``flat`` through an all-gather of whole payloads.

    Returns:
        (mean, own, bytes sent, bytes received): the mean is identical on every worker.
    """
    world = len(weights)
    scaled, total = _scales(weights)
    size = compressor.nbytes(flat.numel())
    with span("encode"):
        payload = _encode(compressor, flat)
    gathered = all_gather(payload)
    with span("decode"):
        acc = torch.zeros_like(flat, dtype=torch.float32)
        own = torch.zeros_like(acc)
        for src in range(world):
            if scaled[src] != 0.0:
                part = _decode(compressor, gathered[src * size : (src + 1) * size], flat.numel())
                acc.add_(part, alpha=scaled[src])
                if src == rank:
                    own = part
        if total > 0:
            acc.div_(total)
    return acc, own, (world - 1) * size, (world - 1) * size


def average_result(
    mean: torch.Tensor,
    own: torch.Tensor,
    weights: Sequence[float],
    rank: int,
    sent: int,
    received: int,
) -> AverageResult:
    """The :class:`AverageResult` of a finished average; a non-finite mean counts as empty.

    Reads the mean back once to check it (on the backend's thread, not the training loop's);
    tensors without data (``device="meta"``) are taken as finite.
    """
    total = float(sum(weights))
    peers = sum(1 for w in weights if w > 0)
    if total > 0 and mean.device.type != "meta" and not bool(torch.isfinite(mean).all()):
        # Every contribution was finite but their sum was not: nobody may step with it.
        logger.warning(
            "the average of %d contributions is not finite (a contribution near fp32's range?); "
            "it is dropped on every worker",
            peers,
        )
        total, peers = 0.0, 0
    return AverageResult(mean, own, peers, total, float(weights[rank]), sent, received)
