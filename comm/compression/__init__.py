"""Compressors for pseudo-gradients on the wire, and error feedback around them.

Compose them instead of setting flags: ``ErrorFeedback(TopK(0.01, values=Int8()))``. Spec
strings (``"int8"``, ``"topk:0.01+int8"``, ``"sparseloco"``) are parsed only by
:func:`parse_compression`.
"""

from __future__ import annotations

from lowcomm.comm.compression.base import (
    Compressor,
    LayoutCompressor,
    Payload,
    PayloadError,
    check_payload,
)
from lowcomm.comm.compression.cast import BF16, FP16
from lowcomm.comm.compression.feedback import ErrorFeedback, sparseloco
from lowcomm.comm.compression.int8 import Int2, Int4, Int8
from lowcomm.comm.compression.registry import SPEC_FORMS, compression_spec, parse_compression
from lowcomm.comm.compression.tiled import TiledTopK
from lowcomm.comm.compression.topk import MAX_NUMEL, TopK

__all__ = [
    "BF16",
    "FP16",
    "MAX_NUMEL",
    "SPEC_FORMS",
    "Compressor",
    "ErrorFeedback",
    "Int2",
    "Int4",
    "Int8",
    "LayoutCompressor",
    "Payload",
    "PayloadError",
    "TiledTopK",
    "TopK",
    "check_payload",
    "compression_spec",
    "parse_compression",
    "sparseloco",
]
