"""Where a worker's time goes: an opt-in record of timed spans, per thread.

Set ``LOWCOMM_TIMELINE=1`` in a worker's environment and the recipe writes
``run_dir/timeline.rank<R>.jsonl`` at the end of the run (:meth:`Timeline.write`); a plot of
it shows, thread by thread, what the training loop and the comm thread did when::

    LOWCOMM_TIMELINE=1 torchrun --nproc_per_node 2 recipes/train_lm.py --config demo ...

Span kinds, and who records them:

===========  =========================  ======================================================
kind         thread                     what
===========  =========================  ======================================================
``compute``  training loop              forward, backward and the inner optimizer step
``prepare``  training loop              a sync's start: pseudo-gradient, error feedback, hand-off
``wait``     training loop              blocked on communication (an average, DDP's all-reduce)
``apply``    training loop              a sync's end: residual, outer step, merge into θ_i
``encode``   comm thread                compressing a payload (fp32 included: a copy)
``wire``     comm thread                inside a collective: bytes moving, or waiting for them
``decode``   comm thread                decompressing payloads and summing them
===========  =========================  ======================================================

Cost: when disabled, a span is one attribute read and a shared no-op context manager; when
enabled, two clock reads and a list append (no lock: ``list.append`` is atomic), so spans can
stay in the loop of a benchmark without changing what it measures.

Times are wall-clock seconds (``time.time()`` scale, from the monotonic clock plus one offset
taken at start-up), so the spans of processes on one machine line up with each other and with
``metrics.jsonl``.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["ENV_VAR", "KINDS", "TIMELINE", "Timeline", "span"]

#: The environment variable that turns the process's timeline on (any value but "" or "0").
ENV_VAR = "LOWCOMM_TIMELINE"
#: Span kinds, in the order a plot stacks them (later ones are drawn over earlier ones).
KINDS = ("compute", "prepare", "apply", "wait", "encode", "wire", "decode")

_NULL = contextlib.nullcontext()


class Timeline:
    """Timed spans of this process, with the thread that ran each.

    Call protocol: any thread calls :meth:`span` (or :meth:`add`) while :attr:`enabled`;
    one thread calls :meth:`write` at the end. Nothing is recorded while disabled.

    Args:
        enabled: record spans from the start.
    """

    def __init__(self, enabled: bool = False) -> None:
        self.enabled = enabled
        self._spans: list[tuple[str, str, float, float]] = []
        # perf_counter is monotonic and fine-grained; the offset puts it on time.time()'s scale.
        self._offset = time.time() - time.perf_counter()

    def enable(self, on: bool = True) -> None:
        """Start (or stop) recording."""
        self.enabled = on

    def span(self, kind: str) -> contextlib.AbstractContextManager[None]:
        """A context manager that records a span of ``kind`` around its block (when enabled)."""
        if not self.enabled:
            return _NULL
        return self._timed(kind)

    @contextlib.contextmanager
    def _timed(self, kind: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(kind, start, time.perf_counter())

    def add(self, kind: str, start: float, end: float) -> None:
        """Record a span measured by the caller (``time.perf_counter()`` values)."""
        if self.enabled:
            self._spans.append((kind, threading.current_thread().name, start, end))

    def spans(self) -> list[dict[str, Any]]:
        """The spans so far, oldest first: ``kind``, ``thread``, ``start``, ``end`` (wall s)."""
        return [
            {"kind": k, "thread": t, "start": s + self._offset, "end": e + self._offset}
            for k, t, s, e in list(self._spans)
        ]

    def clear(self) -> None:
        """Forget the spans recorded so far."""
        self._spans.clear()

    def write(self, path: str | os.PathLike[str], **header: Any) -> Path:
        """Write the spans as JSON lines to ``path``: first ``header`` (e.g. the rank), then
        one span per line. Returns the path."""
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps({"header": True, "pid": os.getpid(), **header}) + "\n")
            for s in self.spans():
                f.write(json.dumps(s) + "\n")
        os.replace(tmp, out)
        return out


#: This process's timeline, on when ``LOWCOMM_TIMELINE`` is set.
TIMELINE = Timeline(enabled=os.environ.get(ENV_VAR, "") not in ("", "0"))


def span(kind: str) -> contextlib.AbstractContextManager[None]:
    """``TIMELINE.span(kind)``: record a span of this process's timeline around a block."""
    return TIMELINE.span(kind)
