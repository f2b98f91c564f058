"""Chunked top-k sparsification: ``TopK``.

The tensor is cut into chunks of ``chunk_size`` elements (the last one may be shorter). Each
chunk keeps its ``k_c`` entries of largest magnitude, ``k_c = ceil(fraction * len(chunk))``
(with a ``1e-6`` tolerance, so ``0.07 * 100`` keeps 7, not 8), and sends their indices and
values; every other entry decodes to 0. Chunking (instead of one global top-k) makes the
payload size a function of ``numel`` alone and lets a backend compress pieces independently.

Payload layout (``K`` = total kept entries, see :meth:`TopK.num_kept`)::

    [K int32 indices][values: K fp32, or values.compress(kept values) when ``values`` is set]

Indices are positions in the compressed tensor, strictly increasing within each chunk, chunks
in order; the values follow in the same order. Indices are int32, so a single tensor (or a
single chunk a backend compresses) holds at most ``2**31 - 1`` elements. :meth:`decompress`
rejects a payload whose indices leave their chunk or repeat, so a corrupt payload cannot
scatter values to the wrong place.
"""

from __future__ import annotations

import math
import numbers

import torch

from lowcomm.comm.compression.base import Compressor, Payload, PayloadError, check_payload
from lowcomm.comm.compression.cast import _as_dtype, _check_input, _chunk_elems

__all__ = ["MAX_NUMEL", "TopK"]

MAX_NUMEL = 2**31 - 1
"""Largest element count a top-k payload can index with int32."""


def _num_kept(fraction: float, numel: int) -> int:
    """``ceil(fraction * numel)`` clamped to ``[1, numel]`` (0 for an empty chunk)."""
    if numel <= 0:
        return 0
    # fraction*numel is computed in binary floating point: 0.07*100 is 7.000000000000001.
    return max(1, min(numel, math.ceil(fraction * numel - 1e-6)))


class TopK:
    """Keep the largest-magnitude ``fraction`` of every chunk (indices + values).

    Call protocol: stateless; ``compress`` and ``decompress`` are pure and thread-safe. Sparse
    (``dense = False``): payloads from different workers carry different indices, so a backend
    all-gathers them instead of reducing. ``granularity`` is ``chunk_size``, or a multiple of
    it when ``values`` is set, chosen so that the kept values of a granularity-aligned piece
    start on a block boundary of the ``values`` compressor; hence compressing pieces cut at
    multiples of ``granularity`` decodes to exactly the values of compressing the whole.

    Top-k sparsification with error feedback follows Stich et al., 2018 ("Sparsified SGD with
    Memory"); chunked top-k with quantized values is SparseLoCo's compressor (Sarfi et al.,
    2025). Wrap it in :class:`lowcomm.comm.compression.ErrorFeedback`: on its own top-k drops
    the rest of the pseudo-gradient for good.

    Args:
        fraction: share of each chunk that is kept, in ``(0, 1]``.
        chunk_size: elements per chunk (default 4096).
        values: optional dense compressor for the kept values (e.g. ``Int8()``); None sends
            them as fp32.

    Raises:
        ValueError: fraction outside ``(0, 1]``, chunk_size < 1, or a sparse ``values``.
    """

    dense: bool = False
    granularity: int
    fraction: float
    chunk_size: int
    values: Compressor | None
    k: int

    def __init__(
        self, fraction: float, chunk_size: int = 4096, values: Compressor | None = None
    ) -> None:
        if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real):
            raise TypeError(f"fraction must be a number, got {fraction!r}")
        if not 0.0 < float(fraction) <= 1.0:
            raise ValueError(f"fraction ({fraction}) must be in (0, 1]")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise TypeError(f"chunk_size must be an int, got {chunk_size!r}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size ({chunk_size}) must be >= 1")
        if values is not None and not getattr(values, "dense", False):
            raise ValueError(f"values compressor ({values!r}) must be dense")
        self.fraction = float(fraction)
        self.chunk_size = chunk_size
        self.values = values
        self.k = _num_kept(self.fraction, chunk_size)
        granularity = chunk_size
        if values is not None:
            block = int(values.granularity)
            granularity *= block // math.gcd(self.k, block)
        self.granularity = granularity

    def __repr__(self) -> str:
        return f"TopK({self.fraction!r}, chunk_size={self.chunk_size}, values={self.values!r})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, TopK)
            and (other.fraction, other.chunk_size) == (self.fraction, self.chunk_size)
            and other.values == self.values
        )

    def __hash__(self) -> int:
        return hash(("TopK", self.fraction, self.chunk_size, self.values))

    def num_kept(self, numel: int) -> int:
        """Total entries kept for a tensor of ``numel`` elements (sum over its chunks)."""
        numel = int(numel)
        full, rest = divmod(numel, self.chunk_size)
        return full * self.k + _num_kept(self.fraction, rest)

    def nbytes(self, numel: int) -> int:
        """Exact payload size: int32 indices plus the values' encoding.

        Raises:
            ValueError: ``numel`` above :data:`MAX_NUMEL` (indices are int32).
        """
        numel = int(numel)
        if numel > MAX_NUMEL:
            raise ValueError(f"TopK handles at most {MAX_NUMEL} elements per tensor, got {numel}")
        kept = self.num_kept(numel)
        value_bytes = 4 * kept if self.values is None else self.values.nbytes(kept)
        return 4 * kept + value_bytes

    def compress(self, tensor: torch.Tensor) -> Payload:
        """Encode a 1-D floating tensor into a payload on the same device.

        Raises:
            ValueError: the tensor has more than :data:`MAX_NUMEL` elements.
        """
        x = _check_input(tensor)
        if x.dtype != torch.float32:
            x = x.float()
        numel, cs, k = x.numel(), self.chunk_size, self.k
        data = torch.empty(self.nbytes(numel), dtype=torch.uint8, device=x.device)
        kept = self.num_kept(numel)
        indices = data[: 4 * kept].view(torch.int32)
        if self.values is None:
            values = data[4 * kept :].view(torch.float32)
        else:
            values = torch.empty(kept, dtype=torch.float32, device=x.device)
        num_chunks = numel // cs
        rows = max(1, _chunk_elems(x.device) // cs)
        buf = torch.empty(min(rows, num_chunks) * cs, dtype=torch.float32, device=x.device)
        for r0 in range(0, num_chunks, rows):
            r1 = min(r0 + rows, num_chunks)
            _select(
                x[r0 * cs : r1 * cs].view(-1, cs),
                k,
                r0 * cs,
                buf[: (r1 - r0) * cs].view(-1, cs),
                indices[r0 * k : r1 * k].view(-1, k),
                values[r0 * k : r1 * k].view(-1, k),
            )
        done = num_chunks * k
        if done < kept:
            tail = x[num_chunks * cs :].view(1, -1)
            _select(
                tail,
                kept - done,
                num_chunks * cs,
                torch.empty_like(tail),
                indices[done:].view(1, -1),
                values[done:].view(1, -1),
            )
        if self.values is not None:
            data[4 * kept :] = self.values.compress(values).data
        return Payload(data, numel)

    def decompress(self, payload: Payload) -> torch.Tensor:
        """Decode to a fresh 1-D fp32 tensor of ``payload.numel`` elements, zeros elsewhere.

        Raises:
            PayloadError: wrong size or dtype, or an index outside its chunk or repeated.
        """
        check_payload(self, payload)
        numel, data = payload.numel, payload.data
        kept = self.num_kept(numel)
        indices = _as_dtype(data[: 4 * kept], torch.int32)
        if self.values is None:
            values = _as_dtype(data[4 * kept :], torch.float32)
        else:
            values = self.values.decompress(Payload(data[4 * kept :], kept))
        self._check_indices(indices, numel)
        out = torch.zeros(numel, dtype=torch.float32, device=data.device)
        out.scatter_(0, indices.long(), values)
        return out

    def _check_indices(self, indices: torch.Tensor, numel: int) -> None:
        """Raise :class:`PayloadError` unless every chunk's indices increase inside it."""
        cs, k = self.chunk_size, self.k
        num_chunks = numel // cs
        full = num_chunks * k
        violations = []
        if num_chunks:
            rows = indices[:full].view(num_chunks, k)
            lo = torch.arange(num_chunks, device=indices.device, dtype=torch.int64) * cs
            violations += [rows[:, 0] < lo, rows[:, -1] >= lo + cs]
            if k > 1:
                violations.append(rows[:, 1:] <= rows[:, :-1])
        if full < indices.numel():
            tail = indices[full:]
            violations += [tail[:1] < num_chunks * cs, tail[-1:] >= numel]
            violations.append(tail[1:] <= tail[:-1])
        if indices.device.type == "meta":
            return  # no data to check (shape-only runs, e.g. the device guards)
        # One host read for all checks; decoding runs on the backend's thread, not the
        # training loop's, so it does not stall the accelerator's queue.
        if violations and bool(torch.stack([v.any() for v in violations]).any()):
            raise PayloadError(
                f"TopK payload for {numel} elements has indices outside their chunk of "
                f"{cs} elements or not strictly increasing"
            )


def _select(
    rows: torch.Tensor,
    k: int,
    base: int,
    buf: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
) -> None:
    """Write the ``k`` largest-magnitude entries of each row of ``rows`` (sorted by position)."""
    torch.abs(rows, out=buf)
    _, local = torch.topk(buf, k, dim=1, largest=True, sorted=False)
    # Increasing positions make the receiver's range check cheap and rule out duplicates.
    local = local.sort(dim=1).values
    torch.gather(rows, 1, local, out=values)
    offsets = torch.arange(rows.shape[0], device=rows.device, dtype=torch.int64)
    offsets.mul_(rows.shape[1]).add_(base)
    local.add_(offsets[:, None])
    indices.copy_(local)
