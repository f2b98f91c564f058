"""Averaging in a swarm: one round's contribution on the wire, in flight, and its result.

Every outer step is a round: a peer's contribution is encoded once with a dense compressor
(:func:`_roundtrip`, :func:`_decode`), checked where it is reduced (:func:`_problem`), and
comes back as an :class:`~lowcomm.comm.base.AverageResult`, either from a group's butterfly
all-reduce (:func:`_group_result`) or, when nobody else came, from this peer alone
(:func:`_alone_result`). :class:`_SwarmWork` is a round in flight in an averager process.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import TYPE_CHECKING, Any

import torch

from lowcomm.comm._swarm_procs import _FAILURES
from lowcomm.comm.base import AverageResult, Timer
from lowcomm.comm.compression.base import Payload
from lowcomm.comm.reduce import Identity

if TYPE_CHECKING:
    from lowcomm.comm.compression.base import Compressor
    from lowcomm.comm.hivemind import HivemindBackend

# The backend's own logger, whichever of its modules the message comes from.
logger = logging.getLogger("lowcomm.comm.hivemind")


def _codec_spec(codec: Compressor) -> str:
    if isinstance(codec, Identity):
        return "none"
    try:
        from lowcomm.comm.compression.registry import compression_spec

        return str(compression_spec(codec))
    except Exception:  # a user's own compressor: its repr must identify it
        return f"{type(codec).__module__}.{type(codec).__qualname__}:{codec!r}"


def _roundtrip(codec: Compressor, flat: torch.Tensor) -> torch.Tensor:
    if isinstance(codec, Identity) or flat.numel() == 0:
        return flat.clone()
    return codec.decompress(codec.compress(flat)).to(torch.float32)


def _decode(codec: Compressor, buffer: bytes, numel: int) -> torch.Tensor:
    data = torch.frombuffer(bytearray(buffer), dtype=torch.uint8) if buffer else torch.empty(0)
    return codec.decompress(Payload(data.to(torch.uint8), numel)).to(torch.float32)


def _problem(part: torch.Tensor, numel: int, max_norm: float | None) -> str | None:
    """Why an incoming part must not enter the average, or None if it may."""
    if part.dtype != torch.float32 or part.numel() != numel:
        return f"dtype {part.dtype} and {part.numel()} elements (expected float32, {numel})"
    if not bool(torch.isfinite(part).all()):
        return "non-finite values (NaN/Inf)"
    if max_norm is not None:
        norm = float(part.norm())
        if norm > max_norm:
            return f"L2 norm {norm:.4g} above max_norm {max_norm:.4g}"
    return None


# -- round results -----------------------------------------------------------------------------


def _split(
    flat: torch.Tensor, shapes: list[torch.Size], device: torch.device
) -> list[torch.Tensor]:
    out, offset = [], 0
    for shape in shapes:
        n = shape.numel()
        out.append(flat[offset : offset + n].view(shape).to(device))
        offset += n
    return out


def _alone_result(
    flat: torch.Tensor,
    shapes: list[torch.Size],
    device: torch.device,
    weight: float,
    codec: Compressor,
) -> AverageResult:
    """The result of a round this peer averaged by itself."""
    # The same encode/decode as a real average of one, so error feedback stays right.
    out = _roundtrip(codec, _roundtrip(codec, flat))
    return AverageResult(_split(out, shapes, device), 1 if weight > 0 else 0, float(weight))


def _group_result(
    summary: dict[str, Any],
    out: torch.Tensor,
    shapes: list[torch.Size],
    device: torch.device,
    round_id: int,
) -> AverageResult:
    """The result of a group's all-reduce, from the averager's summary of it."""
    parts = summary.get("part_stats") or [(summary["declared_weight"], summary["group_size"])]
    total = min(float(w) for w, _ in parts)
    complete = all(
        math.isclose(float(w), summary["declared_weight"], rel_tol=1e-9, abs_tol=1e-12)
        for w, _ in parts
    )
    num_peers = summary["positive_peers"] if complete else min(int(c) for _, c in parts)
    if not complete:
        logger.warning(
            "hivemind round %d: some contributions were dropped from parts of the average "
            "(%s); total weight %.4g of %.4g declared",
            round_id,
            "; ".join(summary.get("dropped", [])) or "a peer failed mid-average",
            total,
            summary["declared_weight"],
        )
    return AverageResult(
        _split(out, shapes, device),
        num_peers,
        total,
        int(summary["bytes_sent"]),
        int(summary["bytes_received"]),
    )


# -- a round in flight -------------------------------------------------------------------------


class _SwarmWork:
    """An average in flight in a hivemind averager process."""

    def __init__(
        self,
        backend: HivemindBackend,
        slot: tuple[Any, ...],
        averager: Any,
        control: Any,
        flat: torch.Tensor,
        shapes: list[torch.Size],
        device: torch.device,
        weight: float,
        codec: Compressor,
        round_id: int,
    ) -> None:
        self._backend = backend
        self._slot = slot
        self._averager = averager
        self._control = control
        self._flat = flat
        self._shapes = shapes
        self._device = device
        self._weight = weight
        self._codec = codec
        self._round = round_id
        self._result: AverageResult | None = None

    def is_completed(self) -> bool:
        return self._result is not None or self._control.done()

    def wait(self) -> AverageResult:
        if self._result is not None:
            return self._result
        backend = self._backend
        summary = None
        with Timer(backend.stats):
            try:
                summary = self._control.result(timeout=backend.timeouts.wait_timeout)
            except _FAILURES as e:
                reason = str(e) or type(e).__name__
                if "could not find a group" in reason:
                    reason = "nobody else came to this round within the matchmaking timeout"
                logger.info("hivemind round %d: averaging alone (%s)", self._round, reason)
                if not self._control.done():
                    # The averager is wedged (it outlived every timeout): replace it.
                    with contextlib.suppress(*_FAILURES):
                        self._control.cancel()
                    backend._discard_averager(self._slot)
            if summary is not None:
                with self._averager.get_tensors() as buffers:
                    out = buffers[0].clone()
        if summary is None:
            self._result = _alone_result(
                self._flat, self._shapes, self._device, self._weight, self._codec
            )
            backend._last_round_failed = True
        else:
            self._result = _group_result(summary, out, self._shapes, self._device, self._round)
            backend._last_round_failed = False
        backend._finish(self._slot, self._result)
        return self._result
