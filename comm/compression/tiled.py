"""Per-tensor tiled top-k with sigma-binned values: ``TiledTopK``, SparseLoCo as its authors run it.

This is the compressor of Sarfi et al., 2025 ("Communication Efficient LLM Pre-training with
SparseLoCo"), as templar's reference implementation (``src/tplr/compress.py``, hparams
``target_chunk = 64``, ``topk_compression = 64``, ``quantization_bins = 4``,
``quantization_range = 6``) builds it, where lowcomm's :class:`~lowcomm.comm.compression.TopK`
cuts a flat buffer every ``chunk_size`` elements regardless of which tensor they belong to:

* **Tiles, per tensor.** A tensor of two or more dimensions is viewed as ``(rows, cols)``
  (``cols`` the product of the other dimensions) and cut into ``h x w`` tiles, ``h`` the
  largest divisor of ``rows`` not above ``tile`` and ``w`` the same for ``cols``; a 1-D tensor
  is cut into runs of ``w`` elements. No tile spans two tensors.
* **k per tile.** Each tile keeps its ``min(k, tile size)`` entries of largest magnitude, so a
  tensor whose tiles hold ``k`` elements or fewer (e.g. a 1-D tensor under the defaults) is
  sent whole, its values still quantized.
* **Values: sigma bins, decoded to bin means.** All values kept in one tensor share one
  quantizer: shift ``s`` = their mean, ``sigma`` = the sample standard deviation of
  ``v - s``, bin width ``range_sigmas * sigma / 2**bits``; the code of ``v`` is
  ``round((v - s) / width) + 2**bits / 2`` clamped to ``[0, 2**bits - 1]``, and a receiver
  decodes it to ``s`` plus the mean of the values that fell into its bin (a table of
  ``2**bits`` fp32 sent with the codes), not to the bin's centre. ``bits=None`` sends fp32.
* **Indices: packed positions inside the tile,** ``ceil(log2(tile size))`` bits each (12 for
  a full 64 x 64 tile, as the reference packs them), sorted within each tile.

Payload layout: for every tensor of the layout, in order, ``[shift fp32][2**bits fp32 bin
means][codes, bits each][indices, index bits each]`` (with ``bits=None``: ``[fp32 values]
[indices]``); the codes and the indices are each packed least-significant bit first and padded
to a whole byte. :meth:`TiledTopK.nbytes` is the exact size, so the bytes a backend counts are
the bytes this encoding takes.

The tensor layout comes from :meth:`TiledTopK.for_layout`: DiLoCo calls it once per fragment
with the shapes of the tensors whose pseudo-gradients the fragment's flat buffer concatenates
(see :class:`~lowcomm.comm.compression.base.LayoutCompressor`). Without a layout the whole
input is one 1-D tensor.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lowcomm.comm.compression.base import Payload, PayloadError, check_payload
from lowcomm.comm.compression.cast import _as_dtype, _check_input

__all__ = ["TiledTopK", "largest_divisor"]

# An unbound compressor's payload cannot be cut anywhere but at its ends.
_WHOLE = 2**31 - 1


def largest_divisor(n: int, limit: int) -> int:
    """The largest divisor of ``n`` that is at most ``limit`` (1 when only 1 qualifies)."""
    best = 1
    for d in range(1, math.isqrt(n) + 1):
        if n % d == 0:
            for c in (d, n // d):
                if best < c <= limit:
                    best = c
    return best


@dataclass(frozen=True)
class _Segment:
    """How one tensor of the layout is tiled and encoded."""

    numel: int
    rows: int  # the tensor viewed as (rows, cols)
    cols: int
    h: int  # tile height and width
    w: int
    kept: int  # entries kept per tile
    index_bits: int

    @property
    def num_tiles(self) -> int:
        return self.numel // (self.h * self.w)

    @property
    def num_kept(self) -> int:
        return self.num_tiles * self.kept

    def tiles(self, flat: torch.Tensor) -> torch.Tensor:
        """``flat`` (this tensor's elements) as a ``(num_tiles, h * w)`` tensor (a copy)."""
        x = flat.view(self.rows // self.h, self.h, self.cols // self.w, self.w)
        return x.permute(0, 2, 1, 3).reshape(self.num_tiles, self.h * self.w)

    def untile(self, tiles: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`tiles`: the tensor's elements in their flat order."""
        x = tiles.view(self.rows // self.h, self.cols // self.w, self.h, self.w)
        return x.permute(0, 2, 1, 3).reshape(-1)


class TiledTopK:
    """Top-k per tile of each tensor, values in ``2**bits`` sigma bins, packed indices.

    Call protocol: stateless; ``compress`` and ``decompress`` are pure and thread-safe. Sparse
    (``dense = False``): payloads are all-gathered whole, never cut, so ``granularity`` is the
    whole input. Bind it to a fragment's tensors with :meth:`for_layout` (DiLoCo does); wrap
    it in :class:`~lowcomm.comm.compression.ErrorFeedback` with decay 0.95 and use an outer
    SGD without momentum, as SparseLoCo does (:func:`~lowcomm.comm.compression.sparseloco`).

    Args:
        k: entries kept per tile (default 64: 64 of 4096, 1.6%, the reference's setting).
        tile: tile side (default 64, the reference's ``target_chunk``).
        bits: bits per kept value, 1 to 8 (default 2), or None for fp32 values.
        range_sigmas: the bins span ``range_sigmas`` standard deviations in all (default 6).
        shapes: the layout, shapes of the tensors the input concatenates; None: one 1-D
            tensor of whatever size is compressed.

    Raises:
        TypeError: a parameter of the wrong type.
        ValueError: ``k`` or ``tile`` below 1, ``bits`` outside 1..8, ``range_sigmas <= 0``,
            or an empty shape list.
    """

    dense: bool = False
    k: int
    tile: int
    bits: int | None
    range_sigmas: float
    shapes: tuple[tuple[int, ...], ...] | None
    _segments: list[_Segment]

    def __init__(
        self,
        k: int = 64,
        tile: int = 64,
        bits: int | None = 2,
        range_sigmas: float = 6.0,
        shapes: Sequence[Sequence[int]] | None = None,
    ) -> None:
        for name, value in (("k", k), ("tile", tile)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
            if value < 1:
                raise ValueError(f"{name} ({value}) must be >= 1")
        if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int)):
            raise TypeError(f"bits must be an int or None, got {bits!r}")
        if bits is not None and not 1 <= bits <= 8:
            raise ValueError(f"bits ({bits}) must be in 1..8, or None for fp32 values")
        if isinstance(range_sigmas, bool) or not isinstance(range_sigmas, numbers.Real):
            raise TypeError(f"range_sigmas must be a number, got {range_sigmas!r}")
        if not range_sigmas > 0:
            raise ValueError(f"range_sigmas ({range_sigmas}) must be > 0")
        self.k, self.tile, self.bits = k, tile, bits
        self.range_sigmas = float(range_sigmas)
        self.shapes = None
        self._segments = []
        if shapes is not None:
            self.shapes = tuple(tuple(int(d) for d in s) for s in shapes)
            if not self.shapes:
                raise ValueError("shapes must name at least one tensor (or be None)")
            self._segments = [self._segment(s) for s in self.shapes]

    def __repr__(self) -> str:
        layout = "" if self.shapes is None else f", shapes=<{len(self.shapes)} tensors>"
        return (
            f"TiledTopK(k={self.k}, tile={self.tile}, bits={self.bits}, "
            f"range_sigmas={self.range_sigmas!r}{layout})"
        )

    def _key(self) -> tuple[object, ...]:
        return (self.k, self.tile, self.bits, self.range_sigmas, self.shapes)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TiledTopK) and other._key() == self._key()

    def __hash__(self) -> int:
        return hash(("TiledTopK", *self._key()))

    def for_layout(self, shapes: Sequence[Sequence[int]]) -> TiledTopK:
        """The same compressor for a flat buffer that concatenates tensors of ``shapes``."""
        return TiledTopK(self.k, self.tile, self.bits, self.range_sigmas, shapes)

    @property
    def granularity(self) -> int:
        """Never cut: the layout's element count (unbound: the largest int32)."""
        return _WHOLE if self.shapes is None else sum(s.numel for s in self._segments)

    # -- layout ------------------------------------------------------------------------

    def _segment(self, shape: Sequence[int]) -> _Segment:
        numel = math.prod(shape)
        if len(shape) >= 2:
            rows, cols = int(shape[0]), numel // int(shape[0]) if shape[0] else 0
        else:
            rows, cols = 1, numel
        h = largest_divisor(rows, self.tile) if rows else 1
        w = largest_divisor(cols, self.tile) if cols else 1
        size = h * w
        return _Segment(numel, rows, cols, h, w, min(self.k, size), max(1, (size - 1).bit_length()))

    def _layout(self, numel: int) -> list[_Segment]:
        if self.shapes is None:
            return [self._segment((numel,))]
        total = sum(s.numel for s in self._segments)
        if numel != total:
            raise ValueError(
                f"TiledTopK is bound to {len(self._segments)} tensors of {total} elements in "
                f"all, got {numel}"
            )
        return self._segments

    def _segment_bytes(self, seg: _Segment) -> int:
        n = seg.num_kept
        if n == 0:
            return 0
        values = 4 * n if self.bits is None else 4 * (1 + 2**self.bits) + _packed(n, self.bits)
        return values + _packed(n, seg.index_bits)

    def num_kept(self, numel: int) -> int:
        """Total entries kept for ``numel`` elements (of the bound layout)."""
        return sum(s.num_kept for s in self._layout(int(numel)))

    def nbytes(self, numel: int) -> int:
        """Exact payload size for ``numel`` elements (of the bound layout)."""
        return sum(self._segment_bytes(s) for s in self._layout(int(numel)))

    # -- encode / decode ---------------------------------------------------------------

    def compress(self, tensor: torch.Tensor) -> Payload:
        """Encode a 1-D floating tensor into a payload on the same device.

        Raises:
            ValueError: its size is not the bound layout's.
        """
        x = _check_input(tensor)
        if x.dtype != torch.float32:
            x = x.float()
        segments = self._layout(x.numel())
        parts: list[torch.Tensor] = []
        offset = 0
        for seg in segments:
            flat = x[offset : offset + seg.numel]
            offset += seg.numel
            if seg.num_kept == 0:
                continue
            tiles = seg.tiles(flat)
            # Increasing positions let the receiver rule out duplicates with one comparison.
            index = torch.topk(tiles.abs(), seg.kept, dim=1, sorted=False).indices
            index = index.sort(dim=1).values
            values = tiles.gather(1, index).reshape(-1)
            parts.append(self._encode_values(values))
            parts.append(_pack_bits(index.reshape(-1), seg.index_bits))
        data = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8, device=x.device)
        return Payload(data, x.numel())

    def decompress(self, payload: Payload) -> torch.Tensor:
        """Decode to a fresh 1-D fp32 tensor of ``payload.numel`` elements, zeros elsewhere.

        Raises:
            PayloadError: wrong size or dtype, or an index outside its tile or repeated.
        """
        check_payload(self, payload)
        data = payload.data
        out: list[torch.Tensor] = []
        pos = 0
        for seg in self._layout(payload.numel):
            n = seg.num_kept
            if n == 0:
                out.append(torch.zeros(seg.numel, dtype=torch.float32, device=data.device))
                continue
            size = self._segment_bytes(seg)
            chunk = data[pos : pos + size]
            pos += size
            index_bytes = _packed(n, seg.index_bits)
            values = self._decode_values(chunk[: size - index_bytes], n)
            index = _unpack_bits(chunk[size - index_bytes :], n, seg.index_bits)
            index = index.view(seg.num_tiles, seg.kept)
            tile_size = seg.h * seg.w
            bad = index[:, -1] >= tile_size
            if seg.kept > 1:
                bad = bad | (index[:, 1:] <= index[:, :-1]).any(dim=1)
            if data.device.type != "meta" and bool(bad.any()):
                raise PayloadError(
                    f"TiledTopK payload has indices outside their tile of {tile_size} "
                    "elements or not strictly increasing"
                )
            tiles = torch.zeros(seg.num_tiles, tile_size, dtype=torch.float32, device=data.device)
            tiles.scatter_(1, index, values.view(seg.num_tiles, seg.kept))
            out.append(seg.untile(tiles))
        return torch.cat(out)

    def _encode_values(self, values: torch.Tensor) -> torch.Tensor:
        """The kept values of one tensor: fp32, or shift + bin means + packed codes."""
        if self.bits is None:
            return values.contiguous().view(torch.uint8)
        bins = 2**self.bits
        shift = values.mean()
        centered = values - shift
        n = values.numel()
        # The reference's statistic: sample std of the centred values; a zero, one-value or
        # non-finite spread falls back to a bin width of 1 (every value then lands in a bin
        # whose mean decodes it, exactly when it is alone there).
        std = centered.norm() / math.sqrt(n - 1) if n > 1 else torch.zeros((), device=values.device)
        width = self.range_sigmas * std / bins
        width = torch.where((width > 0) & torch.isfinite(width), width, torch.ones_like(width))
        codes = torch.round(centered / width + bins // 2).clamp_(0, bins - 1).long()
        sums = torch.zeros(bins, dtype=torch.float32, device=values.device)
        counts = torch.zeros(bins, dtype=torch.float32, device=values.device)
        sums.scatter_add_(0, codes, centered)
        counts.scatter_add_(0, codes, torch.ones_like(centered))
        means = torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))
        header = torch.cat([shift.reshape(1), means])
        return torch.cat([header.view(torch.uint8), _pack_bits(codes, self.bits)])

    def _decode_values(self, data: torch.Tensor, n: int) -> torch.Tensor:
        if self.bits is None:
            return _as_dtype(data, torch.float32).clone()
        bins = 2**self.bits
        header = _as_dtype(data[: 4 * (1 + bins)], torch.float32)
        codes = _unpack_bits(data[4 * (1 + bins) :], n, self.bits)
        return header[1:][codes] + header[0]


def _packed(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits take, packed."""
    return -(-count * bits // 8)


def _pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative ints below ``2**bits`` into bytes, least-significant bit first."""
    shifts = torch.arange(bits, device=values.device)
    stream = values.long().unsqueeze(1).bitwise_right_shift(shifts).bitwise_and_(1).reshape(-1)
    nbytes = _packed(values.numel(), bits)
    padded = torch.zeros(nbytes * 8, dtype=torch.long, device=values.device)
    padded[: stream.numel()] = stream
    weights = torch.arange(8, device=values.device)
    return padded.view(nbytes, 8).bitwise_left_shift(weights).sum(dim=1).to(torch.uint8)


def _unpack_bits(data: torch.Tensor, count: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`_pack_bits`: ``count`` int64 values of ``bits`` bits."""
    weights = torch.arange(8, device=data.device)
    stream = data.long().unsqueeze(1).bitwise_right_shift(weights).bitwise_and_(1).reshape(-1)
    shifts = torch.arange(bits, device=data.device)
    return stream[: count * bits].view(count, bits).bitwise_left_shift(shifts).sum(dim=1)
