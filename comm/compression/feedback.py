"""Error feedback: what compression dropped this round is sent in later rounds.

Each worker keeps, per key (DiLoCo uses one key per fragment), a residual ``e`` and sends
``C(x)`` for ``x = delta + decay * e``, then keeps ``e = x - C(x)``. Nothing is lost for good:
with ``decay = 1`` the sum of everything sent plus the final residual equals the sum of the
pseudo-gradients, so a biased compressor such as top-k still converges (Seide et al., 2014,
"1-bit SGD"; Stich et al., 2018, "Sparsified SGD with Memory"; Karimireddy et al., 2019,
"Error Feedback Fixes SignSGD").

Which to use when:

* **Classic error feedback** (``ErrorFeedback(compressor)``, ``decay = 1``) with DiLoCo's
  usual outer optimizer, SGD with Nesterov momentum 0.9 (by default reached after a warm-up
  from plain averaging). The residual only repairs the
  compression error; the outer momentum does what it always does. Use it with any lossy
  compressor (``Int4``, ``TopK(..., values=Int8())``); lossless-enough ones (fp16, int8) barely
  need it.
* **SparseLoCo** (:func:`sparseloco`, ``decay = 0.95``, chunked top-k with 2-bit values) with
  outer **SGD without momentum** (Sarfi et al., 2025, "Communication Efficient LLM
  Pre-training with SparseLoCo"). The decayed residual accumulates past pseudo-gradients like
  a momentum buffer, so it stands in for outer momentum; adding Nesterov momentum on top
  counts the history twice.

Error feedback is not a :class:`~lowcomm.comm.compression.base.Compressor` (it holds state).
DiLoCo uses it as::

    x = ef.prepare(key, delta)                          # delta + decay * residual
    result = backend.average(x, compressor=ef.compressor).wait()
    ef.record(key, x, result.own)                       # residual = x - what was decoded

``x`` is encoded once, by the backend, which returns what the receivers decoded of this
worker's contribution beside the mean, so the residual is exact and nothing is encoded twice.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch

from lowcomm.comm.compression.base import Compressor
from lowcomm.comm.compression.int8 import Int2
from lowcomm.comm.compression.topk import TopK

__all__ = ["ErrorFeedback", "sparseloco"]

logger = logging.getLogger(__name__)


class ErrorFeedback:
    """Per-worker residual memory around a compressor.

    Call protocol: local to one worker, no communication. For each key, once per round call
    :meth:`prepare`, send ``x`` with :attr:`compressor`, then :meth:`record` what the
    receivers decoded of it (a backend returns that as ``AverageResult.own``;
    :meth:`roundtrip` computes it without sending). Residuals are fp32 and live on the device
    of the tensors passed to :meth:`record`. Not thread-safe for the same key.

    Args:
        compressor: the (stateless) compressor that encodes what is sent.
        decay: factor ``beta`` on the residual added back, in ``[0, 1]``. 1 is classic error
            feedback; SparseLoCo uses 0.95 and drops outer momentum (see the module docstring).

    Attributes:
        compressor: the wrapped compressor; hand it to the backend.
        decay: the residual decay ``beta``.
    """

    compressor: Compressor
    decay: float

    def __init__(self, compressor: Compressor, decay: float = 1.0) -> None:
        if not isinstance(compressor, Compressor):
            raise TypeError(
                f"ErrorFeedback wraps a Compressor (compress/decompress/nbytes/dense/"
                f"granularity), got {compressor!r}"
            )
        if isinstance(decay, bool) or not isinstance(decay, numbers.Real):
            raise TypeError(f"decay must be a number, got {decay!r}")
        if not 0.0 <= float(decay) <= 1.0:
            raise ValueError(f"decay ({decay}) must be in [0, 1]")
        self.compressor = compressor
        self.decay = float(decay)
        self._residuals: dict[str, torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"ErrorFeedback({self.compressor!r}, decay={self.decay!r})"

    def prepare(self, key: str, delta: torch.Tensor) -> torch.Tensor:
        """Return ``delta + decay * residual[key]`` as a new fp32 tensor (residual starts at 0).

        Args:
            key: which residual (e.g. the fragment's name).
            delta: this round's pseudo-gradient for ``key``, floating, any shape; the same
                shape every round.

        Raises:
            ValueError: ``delta`` has a different shape than the residual kept for ``key``.
        """
        _check_key(key)
        if not isinstance(delta, torch.Tensor) or not delta.is_floating_point():
            raise TypeError(f"delta for {key!r} must be a floating tensor, got {delta!r:.80}")
        residual = self._residuals.get(key)
        if residual is None:
            return delta.to(torch.float32, copy=True)
        if residual.shape != delta.shape:
            raise ValueError(
                f"delta for {key!r} has shape {tuple(delta.shape)} but its residual has shape "
                f"{tuple(residual.shape)}; shapes must match every round"
            )
        # The residual stays where record() put it (e.g. host memory, to keep the
        # accelerator free); it is staged to delta's device for the sum only.
        return torch.add(delta.float(), residual.to(delta.device), alpha=self.decay)

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        """What receivers decode from ``x``: ``decompress(compress(x))``, in ``x``'s shape."""
        comp = self.compressor
        return comp.decompress(comp.compress(x.reshape(-1))).view(x.shape)

    def record(self, key: str, x: torch.Tensor, sent: torch.Tensor) -> None:
        """Keep ``residual[key] = x - sent``.

        Args:
            key: the key passed to :meth:`prepare`.
            x: what :meth:`prepare` returned.
            sent: the decoded value of what was sent for ``x`` (:meth:`roundtrip`).

        Raises:
            ValueError: ``x`` and ``sent`` differ in shape.
        """
        _check_key(key)
        if x.shape != sent.shape:
            raise ValueError(
                f"x {tuple(x.shape)} and sent {tuple(sent.shape)} for {key!r} must have one shape"
            )
        residual = self._residuals.get(key)
        if residual is not None and residual.shape == x.shape and residual.device == x.device:
            torch.sub(x, sent, out=residual)
        else:
            self._residuals[key] = torch.sub(x.float(), sent.float())

    def residual(self, key: str) -> torch.Tensor | None:
        """The residual kept for ``key`` (not a copy), or None before its first record."""
        return self._residuals.get(key)

    def keys(self) -> list[str]:
        """Keys that have a residual."""
        return list(self._residuals)

    def reset(self) -> None:
        """Forget every residual (e.g. after the global parameters were replaced)."""
        self._residuals.clear()

    def state_dict(self) -> dict[str, Any]:
        """Residuals as fp32 CPU clones, plus ``decay`` and the compressor's spec string."""
        from lowcomm.comm.compression.registry import compression_spec

        return {
            "decay": self.decay,
            "compressor": compression_spec(self.compressor),
            "residuals": {
                k: v.detach().to("cpu", torch.float32, copy=True)
                for k, v in self._residuals.items()
            },
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore residuals from :meth:`state_dict`; they move to the device of the next
        :meth:`prepare` for their key.

        A different ``decay`` or compressor in ``state_dict`` is logged and ignored: the
        residual is still the mass not yet sent, whatever encoded it.

        Raises:
            ValueError: ``state_dict`` has no ``residuals`` mapping of string keys to tensors.
        """
        residuals = state_dict.get("residuals")
        if not isinstance(residuals, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in residuals.items()
        ):
            raise ValueError("ErrorFeedback state_dict needs 'residuals': a dict of str -> Tensor")
        from lowcomm.comm.compression.registry import compression_spec

        saved_decay = state_dict.get("decay", self.decay)
        if saved_decay != self.decay:
            logger.warning(
                "error feedback state was saved with decay=%s; keeping decay=%s",
                saved_decay,
                self.decay,
            )
        saved = state_dict.get("compressor")
        ours = compression_spec(self.compressor)
        if saved is not None and saved != ours:
            logger.warning(
                "error feedback state was saved with compressor %s; now using %s", saved, ours
            )
        self._residuals = {
            k: v.detach().to("cpu", torch.float32, copy=True) for k, v in residuals.items()
        }


def sparseloco(
    fraction: float = 1 / 64, chunk_size: int = 4096, decay: float = 0.95
) -> ErrorFeedback:
    """SparseLoCo's compressor: decayed error feedback around chunked top-k with 2-bit values.

    Returns ``ErrorFeedback(TopK(fraction, chunk_size, values=Int2(block)), decay)``. The 2-bit
    scale block is one chunk's kept values, ``k = ceil(fraction * chunk_size)`` (``lcm(k, 4)``
    when ``k`` is not a multiple of 4), so each chunk carries one fp32 scale. This follows
    Sarfi et al., 2025 ("Communication Efficient LLM Pre-training with SparseLoCo": chunked
    top-k at 1-3% density, 2-bit values, residual decay 0.95). Pair it with outer SGD
    *without* momentum: the decayed residual plays the role of outer momentum.

    Args:
        fraction: share of each chunk kept (default 1/64, 64 of every 4096 entries).
        chunk_size: elements per top-k chunk (default 4096).
        decay: residual decay ``beta`` (default 0.95).
    """
    kept = TopK(fraction, chunk_size).k
    # Int2 packs 4 codes per byte, so its block is a multiple of 4; lcm(kept, 4) keeps the
    # top-k granularity at no more than 4 chunks.
    block = kept * 4 // math.gcd(kept, 4)
    return ErrorFeedback(TopK(fraction, chunk_size, values=Int2(block)), decay)


def _check_key(key: object) -> None:
    if not isinstance(key, str):
        raise TypeError(f"error feedback keys are strings, got {key!r}")
