"""The compressor contract: what a pseudo-gradient looks like on the wire.

A compressor turns a 1-D fp32 tensor into a :class:`Payload` (a flat ``uint8`` tensor of
bytes plus the element count both sides already know) and back. Compressors are stateless;
error feedback (:class:`lowcomm.comm.compression.ErrorFeedback`) is a separate wrapper that
holds the residual.

Writing your own takes about 20 lines::

    class Half:
        dense = True
        granularity = 1

        def nbytes(self, numel: int) -> int:
            return 2 * numel

        def compress(self, tensor: torch.Tensor) -> Payload:
            data = tensor.to(torch.float16).view(torch.uint8)
            return Payload(data, tensor.numel())

        def decompress(self, payload: Payload) -> torch.Tensor:
            check_payload(self, payload)
            return payload.data.view(torch.float16).float()
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

__all__ = ["Compressor", "LayoutCompressor", "Payload", "PayloadError", "check_payload"]


class PayloadError(ValueError):
    """A payload does not match what its receiver expects (length, dtype, indices)."""


@dataclass(frozen=True)
class Payload:
    """What goes on the wire for one tensor.

    Attributes:
        data: 1-D ``torch.uint8`` tensor holding every byte that is sent.
        numel: number of fp32 elements it encodes. Not sent: a receiver knows it from the
            tensor shapes agreed at start-up, and checks ``data`` against ``nbytes(numel)``.
    """

    data: torch.Tensor
    numel: int

    @property
    def nbytes(self) -> int:
        """Bytes on the wire for this payload."""
        return int(self.data.numel())


@runtime_checkable
class Compressor(Protocol):
    """Encodes 1-D fp32 tensors for the wire.

    Call protocol: ``compress`` and ``decompress`` are pure functions of their input (no
    state, no communication) and may be called from any thread. ``nbytes(numel)`` is the exact
    size of every payload for ``numel`` elements, so receivers can size buffers before data
    arrives and reject payloads of any other size.

    Attributes:
        dense: True when the compressor encodes every element (fp16, int8, ...). Dense
            payloads can be averaged chunk by chunk (reduce-scatter, then all-gather); sparse
            ones (top-k) must be all-gathered whole.
        granularity: chunk boundaries a backend cuts at must be multiples of this many
            elements, so that compressing chunks separately gives exactly the same decoded
            values as compressing the whole tensor (int8's block size, top-k's chunk size).
    """

    dense: bool
    granularity: int

    def nbytes(self, numel: int) -> int:
        """Exact payload size in bytes for ``numel`` elements."""
        ...

    def compress(self, tensor: torch.Tensor) -> Payload:
        """Encode a 1-D floating tensor (any device) into a payload on the same device."""
        ...

    def decompress(self, payload: Payload) -> torch.Tensor:
        """Decode a payload into a 1-D fp32 tensor of ``payload.numel`` elements.

        Raises:
            PayloadError: if the payload's size or dtype is not what ``nbytes`` announces, or
                its contents are out of range (e.g. top-k indices past the end).
        """
        ...


@runtime_checkable
class LayoutCompressor(Compressor, Protocol):
    """A compressor that encodes each tensor of a flat buffer on its own.

    A pseudo-gradient travels as one flat buffer per fragment, the fragment's tensors
    concatenated in order. A compressor that must not let a chunk span two tensors (e.g.
    :class:`~lowcomm.comm.compression.TiledTopK`, which tiles each matrix) learns where they
    are from :meth:`for_layout`: DiLoCo calls it once per fragment at construction and hands
    the returned compressor to the backend for that fragment's syncs.
    """

    def for_layout(self, shapes: Sequence[Sequence[int]]) -> Compressor:
        """The compressor for flat buffers that concatenate tensors of ``shapes``, in order."""
        ...


def check_payload(compressor: Compressor, payload: Payload) -> None:
    """Raise :class:`PayloadError` unless ``payload`` has the exact size and dtype announced.

    Args:
        compressor: the compressor that is about to decode ``payload``.
        payload: the received payload.
    """
    data = payload.data
    if data.dtype != torch.uint8 or data.dim() != 1:
        raise PayloadError(
            f"payload must be a 1-D torch.uint8 tensor, got dtype={data.dtype} dim={data.dim()}"
        )
    expected = compressor.nbytes(payload.numel)
    if data.numel() != expected:
        raise PayloadError(
            f"{type(compressor).__name__} payload for {payload.numel} elements must be "
            f"{expected} bytes, got {data.numel()}"
        )
