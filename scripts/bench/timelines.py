"""The workers' timelines (``LOWCOMM_TIMELINE``, :mod:`lowcomm.comm.timeline`) as numbers.

A throughput run's workers each write ``timeline.rank<R>.jsonl``: spans of ``compute``,
``prepare``, ``wait``, ``apply`` on the training thread and ``encode``, ``wire``, ``decode``
on the comm thread. This module turns them into what the suite keeps:

* :func:`breakdown`: per worker and lane (``train``: the training loop; ``comm``: lowcomm's
  comm thread), the seconds of each kind inside the training window, each instant counted
  once (a ``wait`` inside a ``prepare`` is wait, not both);
* :func:`waiting_for_peers`: of that, the part of each worker's ``wait`` (training loop)
  and ``wire`` (comm thread) that lay before the *last* worker started the same sync: a
  collective cannot finish before every worker has joined it, so that part is waiting for
  a slower worker, not for the network;
* :func:`excerpt`: the spans of a few seconds around a sync in the middle of the run, which
  :func:`scripts.bench.plots.plot_timelines` draws.

Pure functions of the files (no processes). Used by :mod:`scripts.bench.suite`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "breakdown",
    "excerpt",
    "lane",
    "read_timeline",
    "timeline_paths",
    "waiting_for_peers",
]

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


def _overlap(spans: Sequence[Span], intervals: Sequence[tuple[float, float]]) -> float:
    total = 0.0
    for s in spans:
        for a, b in intervals:
            total += max(0.0, min(s["end"], b) - max(s["start"], a))
    return total


def waiting_for_peers(
    timelines: Sequence[Sequence[Span]], windows: Sequence[tuple[float, float]]
) -> list[dict[str, float]] | None:
    """Per worker, the seconds of its ``wait`` (train lane) and ``wire`` (comm lane) spans
    that lay before the last worker started the same sync, inside its window.

    Sync ``k`` starts at a worker's ``k``-th ``prepare`` span (syncs are issued in the same
    order everywhere). None when the workers' sync counts differ (a swarm's peers may skip
    rounds) or there are no syncs (DP, the ceiling).
    """
    starts = [
        sorted(s["start"] for s in spans if s["kind"] == "prepare" and lane(s["thread"]) == "train")
        for spans in timelines
    ]
    if not starts or not starts[0] or any(len(x) != len(starts[0]) for x in starts):
        return None
    last = [max(col) for col in zip(*starts)]
    out = []
    for spans, own, (lo, hi) in zip(timelines, starts, windows):
        early = [(max(a, lo), min(b, hi)) for a, b in zip(own, last) if b > a]
        out.append(
            {
                kind: _overlap(
                    [s for s in spans if s["kind"] == kind and lane(s["thread"]) == ln], early
                )
                for kind, ln in (("wait", "train"), ("wire", "comm"))
            }
        )
    return out


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
