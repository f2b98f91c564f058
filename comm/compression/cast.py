"""Half-precision casts: ``FP16`` and ``BF16``.

Payload layout: the ``numel`` values as IEEE binary16 (``FP16``) or bfloat16 (``BF16``), two
bytes each, in the host's byte order (little-endian on every platform torch ships for).

Error: round-to-nearest-even, so each decoded value is within a relative ``2**-11`` (fp16)
or ``2**-8`` (bf16) of its input for inputs in the normal range (fp16: ``|x| >= 2**-14``;
smaller ones are within an absolute ``2**-25``). fp16 saturates: finite inputs beyond
``+-65504`` (and infinities) encode as ``+-65504`` instead of overflowing to infinity, so a
single large entry cannot turn the average into ``inf``. NaN stays NaN. DiLoCo checks that a
pseudo-gradient is finite before it compresses it.

This module also holds the small helpers the other codecs share (input checks, reinterpreting
payload bytes, the working-set size of chunked loops).
"""

from __future__ import annotations

import torch

from lowcomm.comm.compression.base import Payload, check_payload

__all__ = ["BF16", "FP16"]

_FP16_MAX = 65504.0
# Elements per pass of the chunked CPU loops: 256Ki fp32 is 1 MiB, which stays in L2 so the
# several elementwise passes per chunk read the input from memory once.
_CPU_CHUNK = 1 << 18
# On accelerators every op is a kernel launch; big chunks amortise launch cost instead.
_DEVICE_CHUNK = 1 << 24


def _check_input(tensor: torch.Tensor) -> torch.Tensor:
    """Return ``tensor`` as a contiguous 1-D floating tensor, or raise for a user mistake."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"compress expects a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"compress expects a floating tensor, got dtype={tensor.dtype}")
    if tensor.dim() != 1:
        raise ValueError(
            f"compress expects a 1-D tensor (flatten it first), got shape {tuple(tensor.shape)}"
        )
    return tensor.contiguous()


def _chunk_elems(device: torch.device) -> int:
    """Elements processed per pass of a chunked encode/decode loop on ``device``."""
    return _CPU_CHUNK if device.type == "cpu" else _DEVICE_CHUNK


def _as_dtype(data: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret the bytes of a 1-D uint8 slice as ``dtype`` (copying if misaligned).

    A backend may hand over a payload that is a slice of a larger receive buffer; a view as a
    wider dtype needs the slice to start at a multiple of that dtype's size.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    if data.storage_offset() % itemsize != 0 or not data.is_contiguous():
        data = data.clone()
    return data.view(dtype)


class _Cast16:
    """Shared by the 16-bit casts: two bytes per element of ``dtype``, dense, granularity 1."""

    dtype: torch.dtype
    dense: bool = True
    granularity: int = 1

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self).__name__)

    def nbytes(self, numel: int) -> int:
        """Exact payload size: two bytes per element."""
        return 2 * int(numel)

    def decompress(self, payload: Payload) -> torch.Tensor:
        """Decode to a fresh 1-D fp32 tensor of ``payload.numel`` elements."""
        check_payload(self, payload)
        return _as_dtype(payload.data, self.dtype).float()


class FP16(_Cast16):
    """Cast to IEEE half precision (2 bytes per element), saturating at ``+-65504``.

    Call protocol: stateless; ``compress`` and ``decompress`` are pure and thread-safe. Dense
    with granularity 1, so a backend may cut the tensor anywhere. This is the 16-bit
    communication used by DiLoCo (Douillard et al., 2023, "DiLoCo: Distributed Low-Communication
    Training of Language Models").
    """

    dtype = torch.float16

    def compress(self, tensor: torch.Tensor) -> Payload:
        """Encode a 1-D floating tensor as fp16 bytes on the same device."""
        tensor = _check_input(tensor)
        numel = tensor.numel()
        data = torch.empty(2 * numel, dtype=torch.uint8, device=tensor.device)
        half = data.view(torch.float16)
        if tensor.dtype == torch.float16:
            half.copy_(tensor)
            return Payload(data, numel)
        # Saturate in the source precision chunk by chunk: clamping writes a cached buffer
        # that the cast then reads, instead of a second full-size temporary.
        step = _chunk_elems(tensor.device)
        buf = torch.empty(min(step, numel), dtype=tensor.dtype, device=tensor.device)
        for start in range(0, numel, step):
            end = min(start + step, numel)
            b = buf[: end - start]
            torch.clamp(tensor[start:end], -_FP16_MAX, _FP16_MAX, out=b)
            half[start:end].copy_(b)
        return Payload(data, numel)


class BF16(_Cast16):
    """Cast to bfloat16 (2 bytes per element; fp32's exponent range, 8-bit significand).

    Call protocol: stateless; ``compress`` and ``decompress`` are pure and thread-safe. Dense
    with granularity 1. bf16 keeps fp32's range, so nothing saturates, at 8x the relative
    error of fp16 (Kalamkar et al., 2019, "A Study of BFLOAT16 for Deep Learning Training").
    """

    dtype = torch.bfloat16

    def compress(self, tensor: torch.Tensor) -> Payload:
        """Encode a 1-D floating tensor as bf16 bytes on the same device."""
        tensor = _check_input(tensor)
        numel = tensor.numel()
        data = torch.empty(2 * numel, dtype=torch.uint8, device=tensor.device)
        data.view(torch.bfloat16).copy_(tensor)
        return Payload(data, numel)
