"""Block-wise absmax quantizers: ``Int8``, ``Int4`` and ``Int2``.

The tensor is cut into blocks of ``block_size`` elements (the last one may be shorter). Each
block keeps its largest magnitude ``m`` as an fp32 scale and every element as a small integer
code on a uniform grid over ``[-m, m]``, rounded to nearest:

========  ===================================  ======================  =================
class     levels (times ``m``)                 per-element error       bits per element
========  ===================================  ======================  =================
Int8      ``c/127``, ``c`` in ``-127..127``    ``<= m/254``            8 + 32/block
Int4      ``c/7``, ``c`` in ``-7..7``          ``<= m/14``             4 + 32/block
Int2      ``{-1, -1/3, 1/3, 1}``               ``<= m/3``              2 + 32/block
========  ===================================  ======================  =================

(plus fp32 rounding, a relative ``2**-23`` of ``m``). A block of zeros has scale 0 and decodes
to zeros. Int8 and Int4 represent 0 exactly; Int2 has no zero level (it is meant for the values
SparseLoCo's top-k keeps, which are the large ones) and decodes an exact 0 as ``+-m/3``.

Payload layout (``nb = ceil(numel / block_size)`` blocks)::

    [nb fp32 scales, m / levels_per_side][codes]

codes: Int8 -- ``numel`` int8 (two's complement) bytes; Int4 -- ``ceil(numel/2)`` bytes, two
codes ``c+8`` in ``1..15`` per byte, element ``2i`` in the low nibble; Int2 -- ``ceil(numel/4)``
bytes, four codes ``0..3`` per byte, element ``4i+j`` in bits ``2j..2j+1``. The last byte is
padded with the code for 0. Scales go first so a payload that starts 4-byte aligned has aligned
scales whatever ``numel`` is. fp32 scales, not fp16: an fp16 scale is off by up to a relative
``2**-11``, which moves the top code by ``127 * 2**-11 = 0.06`` of a step and breaks the bound
above, and fp16 cannot hold scales of tiny pseudo-gradients (below ``6e-8``) at all.

Every byte string of the right length decodes (there is nothing to range-check), so
:func:`~lowcomm.comm.compression.base.check_payload` (size and dtype) is the whole validation.
Non-finite inputs do not crash, but the block that holds them decodes to NaN or garbage.
DiLoCo checks that a pseudo-gradient is finite before it compresses it.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from lowcomm.comm.compression.base import Payload, check_payload
from lowcomm.comm.compression.cast import _as_dtype, _check_input, _chunk_elems

__all__ = ["Int2", "Int4", "Int8"]

# Adding 1.5 * 2**23 to a float in [-2**22, 2**22] rounds it to the nearest integer (ties to
# even) in one IEEE operation, and that integer sits in the low bits of the float's bit
# pattern, so a cast of the bits to a byte reads the code with no separate round pass.
_MAGIC = 12582912.0
_FP32_MAX = torch.finfo(torch.float32).max
# Elements per pass of the CPU loops, per intra-op thread. Each encode pass reads the input
# chunk or a scratch chunk of the same size and writes one of them: at 64Ki fp32 (256 KiB)
# per thread both stay in that core's L2 from one pass to the next.
_CPU_CHUNK_PER_THREAD = 1 << 16


def _loop_chunk_elems(device: torch.device) -> int:
    """Elements per pass of the encode/decode loops on ``device``."""
    if device.type == "cpu":
        return _CPU_CHUNK_PER_THREAD * torch.get_num_threads()
    return _chunk_elems(device)


class _BlockQuantizer:
    """Shared encode/decode loop; subclasses fix the grid and the bit packing."""

    dense: bool = True
    granularity: int
    block_size: int
    _levels_per_side: ClassVar[float]  # h: codes span [-h, h] before the offset
    _code_offset: ClassVar[float]  # added so that stored codes are non-negative
    _per_byte: ClassVar[int]  # codes per byte

    def __init__(self, block_size: int) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int):
            raise TypeError(f"block_size must be an int, got {block_size!r}")
        if block_size < 1 or block_size % self._per_byte != 0:
            raise ValueError(
                f"{type(self).__name__} block_size ({block_size}) must be a positive multiple "
                f"of {self._per_byte}"
            )
        self.block_size = block_size
        self.granularity = block_size

    def __repr__(self) -> str:
        return f"{type(self).__name__}(block_size={self.block_size})"

    def __eq__(self, other: object) -> bool:
        return (
            type(other) is type(self)
            and isinstance(other, _BlockQuantizer)
            and other.block_size == self.block_size
        )

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.block_size))

    def num_blocks(self, numel: int) -> int:
        """Number of scales in a payload for ``numel`` elements."""
        return -(-int(numel) // self.block_size)

    def nbytes(self, numel: int) -> int:
        """Exact payload size: fp32 scales plus packed codes."""
        numel = int(numel)
        return 4 * self.num_blocks(numel) + -(-numel // self._per_byte)

    # -- encode ----------------------------------------------------------------------------

    def compress(self, tensor: torch.Tensor) -> Payload:
        """Encode a 1-D floating tensor into a payload on the same device."""
        x = _check_input(tensor)
        if x.dtype != torch.float32:
            x = x.float()
        numel, bs, pb = x.numel(), self.block_size, self._per_byte
        num_blocks = self.num_blocks(numel)
        data = torch.empty(self.nbytes(numel), dtype=torch.uint8, device=x.device)
        scales = data[: 4 * num_blocks].view(torch.float32)
        codes = data[4 * num_blocks :]
        num_full = (numel // bs) * bs
        step = max(1, _loop_chunk_elems(x.device) // bs) * bs
        size = min(step, num_full)
        buf = torch.empty(size, dtype=torch.float32, device=x.device)
        scratch = torch.empty(size if pb > 1 else 0, dtype=torch.uint8, device=x.device)
        for start in range(0, num_full, step):
            end = min(start + step, num_full)
            self._encode_blocks(
                x[start:end].view(-1, bs),
                buf[: end - start].view(-1, bs),
                scales[start // bs : end // bs],
                codes[start // pb : end // pb],
                scratch[: end - start],
            )
        if num_full < numel:
            # The short last block, zero-padded to whole bytes; zeros leave its absmax alone.
            rest = numel - num_full
            padded = -(-rest // pb) * pb
            tail = torch.zeros(1, padded, dtype=torch.float32, device=x.device)
            tail[0, :rest] = x[num_full:]
            self._encode_blocks(
                tail,
                torch.empty_like(tail),
                scales[num_blocks - 1 :],
                codes[num_full // pb :],
                torch.empty(padded if pb > 1 else 0, dtype=torch.uint8, device=x.device),
            )
        return Payload(data, numel)

    def _encode_blocks(
        self,
        blocks: torch.Tensor,
        buf: torch.Tensor,
        scales: torch.Tensor,
        out: torch.Tensor,
        scratch: torch.Tensor,
    ) -> None:
        """Quantize ``blocks`` (rows are blocks) into ``scales`` and packed bytes ``out``."""
        h = self._levels_per_side
        absmax = torch.abs(blocks, out=buf).amax(dim=1)
        torch.div(absmax, h, out=scales)
        # h/absmax is inf for a zero block and for a subnormal absmax, NaN for a NaN one. inf is
        # capped (inf*0 would be NaN) and NaN zeroed, which maps every element into [-h, h]; a
        # zero block holds only zeros, which the capped inverse keeps at 0. Two small ops, not
        # five: on a chunk of this loop each costs about as much as a pass over the chunk.
        inv = torch.div(h, absmax).nan_to_num_(nan=0.0, posinf=_FP32_MAX)
        # Each op below rounds once (no fused multiply-add), so the codes do not depend on
        # where a chunk starts: that is what makes chunked compression bit-identical.
        torch.mul(blocks, inv[:, None], out=buf)
        offset = self._code_offset
        if offset != int(offset):
            # _MAGIC + 1.5 is not an fp32 (its ulp is 1): add the fraction in its own pass.
            buf.add_(offset)
            offset = 0.0
        buf.add_(_MAGIC + offset)
        self._pack(buf.view(torch.int32).view(-1), out, scratch)

    def _pack(self, bits: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor) -> None:
        raise NotImplementedError

    # -- decode ----------------------------------------------------------------------------

    def decompress(self, payload: Payload) -> torch.Tensor:
        """Decode to a fresh 1-D fp32 tensor of ``payload.numel`` elements."""
        check_payload(self, payload)
        numel, bs, pb = payload.numel, self.block_size, self._per_byte
        num_blocks = self.num_blocks(numel)
        data = payload.data
        scales = _as_dtype(data[: 4 * num_blocks], torch.float32)
        codes = data[4 * num_blocks :]
        out = torch.empty(numel, dtype=torch.float32, device=data.device)
        num_full = (numel // bs) * bs
        step = max(1, _loop_chunk_elems(data.device) // bs) * bs
        for start in range(0, num_full, step):
            end = min(start + step, num_full)
            chunk = out[start:end]
            self._unpack(codes[start // pb : end // pb], chunk)
            chunk.view(-1, bs).mul_(scales[start // bs : end // bs, None])
        if num_full < numel:
            rest = numel - num_full
            tail = torch.empty(-(-rest // pb) * pb, dtype=torch.float32, device=data.device)
            self._unpack(codes[num_full // pb :], tail)
            torch.mul(tail[:rest], scales[num_blocks - 1], out=out[num_full:])
        return out

    def _unpack(self, packed: torch.Tensor, out: torch.Tensor) -> None:
        """Write the signed grid values ``code - offset`` of ``packed`` into fp32 ``out``."""
        raise NotImplementedError


class Int8(_BlockQuantizer):
    """8-bit block-wise absmax quantization (``numel + 4 * ceil(numel / block_size)`` bytes).

    Call protocol: stateless; ``compress`` and ``decompress`` are pure and thread-safe. Dense,
    with ``granularity == block_size``: a backend cutting at block boundaries gets bit-identical
    decoded values. Per-element error ``<= m/254`` for block absmax ``m``. Block-wise scaling
    as in Dettmers et al., 2022 ("8-bit Optimizers via Block-wise Quantization").

    Args:
        block_size: elements per fp32 scale (default 128: 0.25 bits of overhead per element).
    """

    _levels_per_side = 127.0
    _code_offset = 0.0
    _per_byte = 1

    def __init__(self, block_size: int = 128) -> None:
        super().__init__(block_size)

    def _pack(self, bits: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor) -> None:
        # Integer narrowing keeps the low byte: the two's complement int8 code.
        out.copy_(bits)

    def _unpack(self, packed: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(packed.view(torch.int8))


class Int4(_BlockQuantizer):
    """4-bit block-wise absmax quantization, two codes per byte.

    Call protocol: as :class:`Int8`. Codes are integers in ``-7..7`` times ``m/7`` (0 is exact);
    per-element error ``<= m/14``. Streaming DiLoCo (Douillard et al., 2025, "Streaming DiLoCo
    with overlapping communication") reports 4-bit pseudo-gradients without loss of quality.

    Args:
        block_size: elements per fp32 scale; even (default 64: 0.5 bits of overhead).
    """

    _levels_per_side = 7.0
    _code_offset = 8.0
    _per_byte = 2

    def __init__(self, block_size: int = 64) -> None:
        super().__init__(block_size)

    def _pack(self, bits: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor) -> None:
        scratch.copy_(bits)
        # Two code bytes read as one little-endian int16 are c0 + 256*c1; OR-ing in a copy
        # shifted right by 4 puts c1 in the high nibble of the low byte.
        pairs = scratch.view(torch.int16)
        shifted = torch.bitwise_right_shift(pairs, 4)
        shifted.bitwise_or_(pairs)
        out.copy_(shifted)

    def _unpack(self, packed: torch.Tensor, out: torch.Tensor) -> None:
        words = packed.to(torch.int16)
        words.bitwise_or_(torch.bitwise_left_shift(words, 4)).bitwise_and_(0x0F0F)
        out.copy_(words.view(torch.uint8))
        out.sub_(self._code_offset)


class Int2(_BlockQuantizer):
    """2-bit block-wise absmax quantization, four codes per byte.

    Call protocol: as :class:`Int8`. The four levels are ``{-m, -m/3, m/3, m}`` (a mid-rise
    grid with no zero level); per-element error ``<= m/3``. Meant for the values that top-k
    keeps, which are the large entries of their chunk, as in SparseLoCo's 2-bit quantized
    top-k values (Sarfi et al., 2025, "Communication Efficient LLM Pre-training with
    SparseLoCo"); as a dense codec on its own it is coarse.

    Args:
        block_size: elements per fp32 scale; a multiple of 4 (default 64).
    """

    _levels_per_side = 1.5
    _code_offset = 1.5
    _per_byte = 4

    def __init__(self, block_size: int = 64) -> None:
        super().__init__(block_size)

    def _pack(self, bits: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor) -> None:
        scratch.copy_(bits)
        # Four code bytes as one little-endian int32 w; w | w>>6 | w>>12 | w>>18 holds
        # c0 | c1<<2 | c2<<4 | c3<<6 in its low byte.
        words = scratch.view(torch.int32)
        acc = torch.bitwise_right_shift(words, 6)
        acc.bitwise_or_(words)
        acc.bitwise_or_(torch.bitwise_right_shift(acc, 12))
        out.copy_(acc)

    def _unpack(self, packed: torch.Tensor, out: torch.Tensor) -> None:
        words = packed.to(torch.int32)
        words.bitwise_or_(torch.bitwise_left_shift(words, 6))
        words.bitwise_or_(torch.bitwise_left_shift(words, 12)).bitwise_and_(0x03030303)
        out.copy_(words.view(torch.uint8))
        out.sub_(self._code_offset)
