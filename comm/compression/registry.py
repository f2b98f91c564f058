"""Compression spec strings: the one place where ``"int8"`` or ``"topk:0.01"`` become objects.

Grammar (case-insensitive, whitespace ignored)::

    none                                   no compression (fp32 on the wire) -> None
    fp16 | bf16                            FP16() | BF16()
    int8[:BLOCK] | int4[:BLOCK] | int2[:BLOCK]
                                           Int8(BLOCK=128) | Int4(BLOCK=64) | Int2(BLOCK=64)
    topk:FRACTION[:CHUNK][+VALUES]         TopK(FRACTION, CHUNK=4096, values=parse(VALUES)),
                                           VALUES one of the dense specs above
    tiled:K[:TILE[:BITS[:RANGE]]]          TiledTopK(K, TILE=64, BITS=2, RANGE=6); BITS 32: fp32
    sparseloco[:FRACTION[:CHUNK[:DECAY]]]  sparseloco(FRACTION=1/64, CHUNK=4096, DECAY=0.95)
    ef[@DECAY]:SPEC                        ErrorFeedback(parse(SPEC), DECAY=1.0)

Examples: ``"int8:256"``, ``"topk:0.01+int8"``, ``"ef:topk:0.01:4096+int4"``,
``"ef@0.9:int4"``, ``"sparseloco:0.03"``.

:func:`compression_spec` goes the other way and gives the canonical (fully spelled-out) form,
which parses back to an equal object; workers compare it in their start-up fingerprint.
"""

from __future__ import annotations

from lowcomm.comm.compression.base import Compressor
from lowcomm.comm.compression.cast import BF16, FP16
from lowcomm.comm.compression.feedback import ErrorFeedback, sparseloco
from lowcomm.comm.compression.int8 import Int2, Int4, Int8
from lowcomm.comm.compression.tiled import TiledTopK
from lowcomm.comm.compression.topk import TopK

__all__ = ["SPEC_FORMS", "compression_spec", "parse_compression"]

SPEC_FORMS = (
    "none",
    "fp16",
    "bf16",
    "int8[:BLOCK]",
    "int4[:BLOCK]",
    "int2[:BLOCK]",
    "topk:FRACTION[:CHUNK][+VALUES]",
    "tiled:K[:TILE[:BITS[:RANGE]]]",
    "sparseloco[:FRACTION[:CHUNK[:DECAY]]]",
    "ef[@DECAY]:SPEC",
)
"""Every form :func:`parse_compression` accepts, as listed in its error messages."""

_BLOCK_QUANTIZERS: dict[str, type[Int8 | Int4 | Int2]] = {"int8": Int8, "int4": Int4, "int2": Int2}


def parse_compression(spec: str) -> Compressor | ErrorFeedback | None:
    """Build the compressor (or error feedback wrapper) a spec string names.

    Args:
        spec: e.g. ``"none"``, ``"fp16"``, ``"int8:256"``, ``"topk:0.01+int8"``,
            ``"sparseloco"``, ``"ef:int4"``; see the module docstring for the grammar.

    Returns:
        None for ``"none"``, an :class:`ErrorFeedback` for ``ef...`` and ``sparseloco...``,
        else a compressor.

    Raises:
        TypeError: ``spec`` is not a string.
        ValueError: unknown name (the message lists the valid forms) or a bad parameter.
    """
    if not isinstance(spec, str):
        raise TypeError(f"compression spec must be a string, got {spec!r}")
    text = "".join(spec.split()).lower()
    try:
        return _parse(text)
    except _UnknownName as exc:
        raise ValueError(
            f"unknown compression {str(exc)!r} in {spec!r}; valid: {', '.join(SPEC_FORMS)}"
        ) from None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bad compression spec {spec!r}: {exc}") from None


class _UnknownName(ValueError):
    pass


def _parse(text: str) -> Compressor | ErrorFeedback | None:
    if text.startswith("ef:") or text.startswith("ef@"):
        head, sep, inner = text.partition(":")
        if not sep or not inner:
            raise ValueError("ef needs a compressor after ':', e.g. 'ef:topk:0.01'")
        decay = _number(head[3:], "decay") if head.startswith("ef@") else 1.0
        wrapped = _parse(inner)
        if wrapped is None or isinstance(wrapped, ErrorFeedback):
            raise ValueError(f"ef wraps a compressor, not {inner!r}")
        return ErrorFeedback(wrapped, decay)
    name, _, rest = text.partition(":")
    args = rest.split(":") if rest else []
    if name == "topk":
        body, plus, values_spec = text.partition("+")
        args = body.split(":")[1:]
        if not 1 <= len(args) <= 2:
            raise ValueError("topk takes topk:FRACTION[:CHUNK][+VALUES]")
        values = None
        if plus:
            parsed = _parse(values_spec)
            if parsed is None or isinstance(parsed, ErrorFeedback) or not parsed.dense:
                raise ValueError(f"top-k values must use a dense compressor, not {values_spec!r}")
            values = parsed
        chunk = _integer(args[1], "chunk") if len(args) > 1 else 4096
        return TopK(_number(args[0], "fraction"), chunk, values=values)
    if "+" in text:
        raise ValueError("only topk takes '+VALUES'")
    if name == "tiled":
        if not 1 <= len(args) <= 4:
            raise ValueError("tiled takes tiled:K[:TILE[:BITS[:RANGE]]]")
        k = _integer(args[0], "k")
        tile = _integer(args[1], "tile") if len(args) > 1 else 64
        bits = _integer(args[2], "bits") if len(args) > 2 else 2
        sigmas = _number(args[3], "range") if len(args) > 3 else 6.0
        return TiledTopK(k, tile, None if bits == 32 else bits, sigmas)
    if name == "sparseloco":
        if len(args) > 3:
            raise ValueError("sparseloco takes sparseloco[:FRACTION[:CHUNK[:DECAY]]]")
        fraction = _number(args[0], "fraction") if len(args) > 0 else 1 / 64
        chunk = _integer(args[1], "chunk") if len(args) > 1 else 4096
        decay = _number(args[2], "decay") if len(args) > 2 else 0.95
        return sparseloco(fraction, chunk, decay)
    if name in ("none", "fp16", "bf16"):
        if args:
            raise ValueError(f"{name} takes no parameters")
        return None if name == "none" else FP16() if name == "fp16" else BF16()
    if name in _BLOCK_QUANTIZERS:
        if len(args) > 1:
            raise ValueError(f"{name} takes {name}[:BLOCK]")
        cls = _BLOCK_QUANTIZERS[name]
        return cls(_integer(args[0], "block")) if args else cls()
    raise _UnknownName(name)


def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{what} must be a number, got {text!r}") from None


def _integer(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{what} must be an integer, got {text!r}") from None


def compression_spec(obj: Compressor | ErrorFeedback | None) -> str:
    """A stable string naming ``obj``, for fingerprints and logs.

    Built-in compressors give their canonical spec (``parse_compression`` of it returns an
    equal object), e.g. ``"int8:128"``, ``"topk:0.01:4096+int8:128"``,
    ``"ef@0.95:topk:0.015625:4096+int2:64"``. Other compressors give their class's import path
    and their public scalar attributes, e.g. ``"mypkg.codecs.Half(bits=16)"``.
    """
    if obj is None:
        return "none"
    kind = type(obj)
    if isinstance(obj, ErrorFeedback) and kind is ErrorFeedback:
        return f"ef@{obj.decay!r}:{compression_spec(obj.compressor)}"
    if kind is FP16:
        return "fp16"
    if kind is BF16:
        return "bf16"
    if isinstance(obj, (Int8, Int4, Int2)):
        for name, cls in _BLOCK_QUANTIZERS.items():
            if kind is cls:
                return f"{name}:{obj.block_size}"
    if isinstance(obj, TiledTopK) and kind is TiledTopK:
        bits = 32 if obj.bits is None else obj.bits
        return f"tiled:{obj.k}:{obj.tile}:{bits}:{obj.range_sigmas!r}"
    if isinstance(obj, TopK) and kind is TopK:
        spec = f"topk:{obj.fraction!r}:{obj.chunk_size}"
        return spec if obj.values is None else f"{spec}+{compression_spec(obj.values)}"
    params = ",".join(
        f"{k}={v!r}"
        for k, v in sorted(getattr(obj, "__dict__", {}).items())
        if not k.startswith("_") and (v is None or isinstance(v, (bool, int, float, str)))
    )
    return f"{kind.__module__}.{kind.__qualname__}({params})"
