"""The workers' timelines (``LOWCOMM_TIMELINE``, :mod:`lowcomm.comm.timeline`) as numbers.

A throughput run's workers each write ``timeline.rank<R>.jsonl``: spans of ``compute``,
``prepare``, ``wait``, ``apply`` on the training thread and ``encode``, ``wire``, ``decode``
on the comm thread. This module turns them into what the suite keeps:

* :func:`breakdown`: per worker and lane (``train``: the training loop; ``comm``: lowcomm's
  comm thread), the seconds of each kind inside the training window, each instant counted
  once (a ``wait`` inside a ``prepare`` is wait, not both);
* :func:`excerpt`: the spans of a few seconds around a sync in the middle of the run, which
  :func:`scripts.bench.plots.plot_timelines` draws.

Pure functions of the files (no processes). Used by :mod:`scripts.bench.suite`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["breakdown", "excerpt", "lane", "read_timeline", "timeline_paths"]

Span = dict[str, Any]


def timeline_paths(dirs: Sequence[Path], swarm: bool = False) -> list[Path]:
    """Where the workers whose run directories are ``dirs`` wrote their timelines (a swarm
    peer is rank 0 of its own world)."""
    return [d / f"timeline.rank{0 if swarm else r}.jsonl" for r, d in enumerate(dirs)]


def read_timeline(path: Path) -> list[Span]:
    """The spans of one timeline file (the header line left out); [] if there is none."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    return [s for s in (json.loads(x) for x in lines if x.strip()) if not s.get("header")]


def lane(thread: str) -> str:
    """The plot lane of a thread: ``train`` (the training loop), ``comm`` (lowcomm's comm
    thread), else the thread's own name."""
    if thread == "MainThread":
        return "train"
    if thread.startswith("lowcomm-comm"):
        return "comm"
    return thread


def _exclusive(spans: Sequence[Span], start: float, end: float) -> dict[str, float]:
    """Seconds per kind within ``[start, end]``, the innermost span owning each instant.

    Spans of one thread nest (they come from ``with`` blocks); a span that starts inside
    another and ends after it is clipped to its parent.
    """
    out: dict[str, float] = {}
    # Parents first: by start, then the longer one.
    order = sorted(spans, key=lambda s: (s["start"], -s["end"]))
    stack: list[list[Any]] = []  # [kind, start, end, cursor]

    def add(kind: str, a: float, b: float) -> None:
        a, b = max(a, start), min(b, end)
        if b > a:
            out[kind] = out.get(kind, 0.0) + (b - a)

    def close_until(t: float) -> None:
        while stack and stack[-1][2] <= t:
            kind, _, e, cursor = stack.pop()
            add(kind, cursor, e)
            if stack:
                stack[-1][3] = e

    for s in order:
        close_until(s["start"])
        e = s["end"]
        if stack:
            parent = stack[-1]
            add(parent[0], parent[3], s["start"])
            e = min(e, parent[2])
        stack.append([s["kind"], s["start"], e, s["start"]])
    close_until(float("inf"))
    return out


def breakdown(spans: Sequence[Span], start: float, end: float) -> dict[str, dict[str, float]]:
    """Per lane, the seconds of each span kind inside ``[start, end]`` (see module doc)."""
    lanes: dict[str, list[Span]] = {}
    for s in spans:
        lanes.setdefault(lane(s["thread"]), []).append(s)
    return {name: _exclusive(ss, start, end) for name, ss in sorted(lanes.items())}


def excerpt(
    timelines: Sequence[Sequence[Span]], seconds: float, lead: float = 0.5
) -> dict[str, Any] | None:
    """A few ``seconds`` of every worker's timeline, from just before a sync mid-run.

    The window starts ``lead`` seconds before worker 0's ``prepare`` span nearest the middle
    of its training (DP, which has none: the middle itself). Spans are clipped to the window
    and their times made relative to its start.

    Returns:
        ``{"start": wall time, "seconds": ..., "workers": [[span, ...], ...]}``, each span
        with ``kind``, ``lane``, ``start`` and ``end``; None without worker 0's spans.
    """
    if not timelines or not timelines[0]:
        return None
    first = timelines[0]
    lo = min(s["start"] for s in first)
    hi = max(s["end"] for s in first)
    middle = (lo + hi) / 2
    syncs = [s["start"] for s in first if s["kind"] == "prepare" and lane(s["thread"]) == "train"]
    anchor = min(syncs, key=lambda t: abs(t - middle)) if syncs else middle
    t0 = max(lo, anchor - lead)
    t1 = t0 + seconds
    workers = []
    for spans in timelines:
        kept = [
            {
                "kind": s["kind"],
                "lane": lane(s["thread"]),
                "start": round(max(s["start"], t0) - t0, 6),
                "end": round(min(s["end"], t1) - t0, 6),
            }
            for s in spans
            if s["end"] > t0 and s["start"] < t1
        ]
        workers.append(kept)
    return {"start": t0, "seconds": seconds, "workers": workers}
