"""Codec bandwidth: encode + decode of every codec against a plain memcpy of the same fp32 data.

Run from the repository root::

    .venv/bin/python -m scripts.bench.codecs     # 4M and 16M elements, 1 and default threads
    .venv/bin/python -m scripts.bench.codecs --sizes 16M --threads 1 --specs int8 --print-only
    .venv/bin/python -m scripts.bench.codecs --device cuda --out-dir /tmp/cuda  # + its own doc

What is measured, for each size and thread count: every codec compresses and then decompresses
the same fp32 tensor (a pseudo-gradient-like, heavy-tailed draw), each call allocating its
output as a backend does (a fresh payload, a fresh fp32 tensor). Bandwidth is the tensor's
fp32 bytes (4 per element) over the seconds taken. The baseline is ``memcpy``: ``copy_`` of
the tensor into a preallocated fp32 tensor (4 bytes read and 4 written per element);
``clone`` (allocate, then copy) shows what allocating a fresh tensor adds.

Repeats are interleaved: each pass times every row once (in an order rotated per pass), so
that load from other processes falls on all rows alike, and a codec's ratio to memcpy is
taken per pass (paired) before the median. Tables show the median and the range over passes.

The results go to ``codecs.json`` in ``--out-dir`` (default ``benchmarks/``, with the machine
and the command), and the document is regenerated from that directory's results
(:mod:`scripts.bench.report`): ``BENCHMARKS.md`` for ``benchmarks/``, else a ``BENCHMARKS.md``
beside the results. ``--print-only`` writes nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from lowcomm.comm.compression import (
    Compressor,
    ErrorFeedback,
    compression_spec,
    parse_compression,
)
from scripts.bench import report
from scripts.bench.machine import machine_info, python_command

__all__ = ["DEFAULT_SPECS", "bench", "main", "summarise"]

logger = logging.getLogger("lowcomm.bench.codecs")

DEFAULT_SPECS = (
    "fp16",
    "bf16",
    "int8",
    "int4",
    "int2",
    "topk:0.01",
    "topk:0.01+int8",
    "sparseloco",
)
DEFAULT_SIZES = ("4M", "16M")
DEFAULT_THREADS = ("1", "default")
RESULT_VERSION = 1
#: The row every other row is compared with.
BASELINE = "memcpy"
_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """``"4M"`` -> 4194304 elements (binary K/M/G suffixes; a plain integer as is)."""
    t = text.strip().upper()
    unit = t[-1:] if t[-1:] in _SUFFIXES else ""
    number = t[: len(t) - len(unit)]
    if not number.isdigit() or int(number) < 1:
        raise ValueError(f"size {text!r} must be a positive integer with an optional K/M/G suffix")
    return int(number) * _SUFFIXES[unit]


def pseudo_gradient(numel: int, device: torch.device) -> torch.Tensor:
    """A heavy-tailed fp32 draw (normal times log-normal), fixed by seed 0."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(numel, generator=g) * torch.exp(torch.randn(numel, generator=g))
    return x.to(device)


def _codec(spec: str) -> Compressor:
    parsed = parse_compression(spec)
    # Error feedback (sparseloco's decayed residual) is arithmetic around the codec, not codec
    # work; the codec inside it is what is timed.
    comp = parsed.compressor if isinstance(parsed, ErrorFeedback) else parsed
    if comp is None:
        raise ValueError(f"spec {spec!r} is no compression: nothing to time")
    return comp


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _minor_faults() -> int:
    # First touches of freshly mapped pages: what allocating a large output costs on top of
    # writing it (memcpy into a preallocated tensor has none).
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _measured(fn: Callable[[], Any], device: torch.device) -> tuple[float, int, Any]:
    """(seconds, minor page faults, result) of one call."""
    _sync(device)
    faults, t0 = _minor_faults(), time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - t0, _minor_faults() - faults, result


def _describe(spec: str, comp: Compressor, x: torch.Tensor) -> dict[str, Any]:
    payload = comp.compress(x)
    decoded = comp.decompress(payload)
    return {
        "spec": spec,
        "canonical": compression_spec(comp),
        "bits_per_element": 8 * payload.nbytes / x.numel(),
        "rel_l2_error": float((decoded - x).norm() / x.norm()),
        "encode_s": [],
        "decode_s": [],
        "encode_faults": [],
        "decode_faults": [],
    }


def bench(
    specs: Sequence[str], numel: int, device: torch.device, repeats: int
) -> list[dict[str, Any]]:
    """Time every row ``repeats`` times, interleaved; one dict per row with raw measurements.

    Rows: ``memcpy`` and ``clone`` with ``seconds`` and ``faults`` (minor page faults), then
    each spec with ``encode_s``, ``decode_s``, ``encode_faults`` and ``decode_faults`` (one
    entry per pass), its bits per element and relative L2 error.
    """
    x = pseudo_gradient(numel, device)
    dst = torch.empty_like(x)
    codecs = {spec: _codec(spec) for spec in specs}
    references: dict[str, Callable[[], Any]] = {BASELINE: lambda: dst.copy_(x), "clone": x.clone}
    rows: dict[str, dict[str, Any]] = {
        name: {"spec": name, "seconds": [], "faults": []} for name in references
    }
    rows.update({spec: _describe(spec, comp, x) for spec, comp in codecs.items()})
    order = list(rows)
    for rep in range(repeats + 1):
        for name in order:
            row = rows[name]
            if name in references:
                t, faults, _ = _measured(references[name], device)
                measured = {"seconds": t, "faults": faults}
            else:
                comp = codecs[name]
                t_enc, f_enc, payload = _measured(functools.partial(comp.compress, x), device)
                t_dec, f_dec, _ = _measured(functools.partial(comp.decompress, payload), device)
                del payload
                measured = {
                    "encode_s": t_enc,
                    "decode_s": t_dec,
                    "encode_faults": f_enc,
                    "decode_faults": f_dec,
                }
            if rep:  # pass 0 warms up: lazy initialisation, allocator caches
                for key, value in measured.items():
                    row[key].append(value)
        order.append(order.pop(0))  # rotate: no row always runs right after the same one
    return list(rows.values())


def _stat(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(rows: list[dict[str, Any]], numel: int) -> list[dict[str, Any]]:
    """Bandwidths (GB/s of fp32 input) and ratios to memcpy, paired by pass."""
    nbytes = 4 * numel
    base = next(r for r in rows if r["spec"] == BASELINE)["seconds"]
    out = []
    for r in rows:
        if "seconds" in r:
            total = r["seconds"]
        else:
            total = [e + d for e, d in zip(r["encode_s"], r["decode_s"])]
        item = {k: v for k, v in r.items() if not isinstance(v, list)}
        item["total_gbps"] = _stat([nbytes / t / 1e9 for t in total])
        item["ratio_to_memcpy"] = _stat([b / t for b, t in zip(base, total)])
        if "encode_s" in r:
            item["encode_gbps"] = _stat([nbytes / t / 1e9 for t in r["encode_s"]])
            item["decode_gbps"] = _stat([nbytes / t / 1e9 for t in r["decode_s"]])
            item["faults"] = {
                "encode": statistics.median(r["encode_faults"]),
                "decode": statistics.median(r["decode_faults"]),
            }
        else:
            item["faults"] = statistics.median(r["faults"])
        out.append(item)
    return out


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _print_table(run: dict[str, Any]) -> None:
    print(
        f"# {run['numel']:,} fp32 elements on {run['device']}, {run['threads']} thread(s), "
        f"{run['repeats']} interleaved passes; GB/s of fp32 input, median [min, max]"
    )
    print(
        f"{'codec':<16} {'encode':>8} {'decode':>8} {'enc+dec':>22} {'÷ memcpy':>20} "
        f"{'page faults':>14}"
    )
    for r in run["rows"]:
        enc, dec = r.get("encode_gbps"), r.get("decode_gbps")
        t, q, f = r["total_gbps"], r["ratio_to_memcpy"], r["faults"]
        faults = f"{f['encode']:.0f}/{f['decode']:.0f}" if isinstance(f, dict) else f"{f:.0f}"
        print(
            f"{r['spec']:<16} {enc['median'] if enc else float('nan'):8.2f} "
            f"{dec['median'] if dec else float('nan'):8.2f} "
            f"{t['median']:8.2f} [{t['min']:5.2f}, {t['max']:5.2f}] "
            f"{q['median']:6.3f} [{q['min']:5.3f}, {q['max']:5.3f}] {faults:>14}"
        )


def parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="python -m scripts.bench.codecs",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--specs", default=",".join(DEFAULT_SPECS), help="compression specs")
    p.add_argument("--sizes", default=",".join(DEFAULT_SIZES), help="elements, e.g. 4M,16M")
    p.add_argument(
        "--threads", default=",".join(DEFAULT_THREADS), help="torch CPU threads: counts or default"
    )
    p.add_argument("--repeats", type=int, default=11, help="interleaved timed passes")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument(
        "--out-dir", default=str(report.BENCH_DIR), help="where codecs.json goes (benchmarks/)"
    )
    p.add_argument("--doc", help="the generated Markdown (default: see above)")
    p.add_argument("--print-only", action="store_true", help="write no results and no doc")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser()
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    try:
        specs = [s.strip() for s in args.specs.split(",") if s.strip()]
        for spec in specs:
            _codec(spec)
        sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError as e:
        p.error(str(e))
    if args.repeats < 1:
        p.error(f"--repeats ({args.repeats}) must be >= 1")
    default_threads = torch.get_num_threads()
    thread_counts = []
    for t in (x.strip() for x in args.threads.split(",") if x.strip()):
        if t != "default" and not (t.isdigit() and int(t) >= 1):
            p.error(f"--threads entry {t!r} must be a positive integer or 'default'")
        thread_counts.append(default_threads if t == "default" else int(t))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    machine = machine_info()
    runs = []
    for numel in sizes:
        for count in dict.fromkeys(thread_counts):
            logger.info("%d elements, %d thread(s)", numel, count)
            with _threads(count):
                rows = bench(specs, numel, device, args.repeats)
            run = {
                "numel": numel,
                "threads": count,
                "default_threads": count == default_threads,
                "device": where,
                "repeats": args.repeats,
                "rows": summarise(rows, numel),
                "raw": rows,
            }
            _print_table(run)
            runs.append(run)
    if args.print_only:
        return 0
    results = {
        "suite": "lowcomm codec benchmark",
        "version": RESULT_VERSION,
        "command": [python_command(), "-m", "scripts.bench.codecs", *argv],
        "machine": machine,
        "loadavg_1m_end": machine_info().get("loadavg_1m"),
        "baseline": BASELINE,
        "runs": runs,
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / report.CODECS_FILE
    out.write_text(json.dumps(results, indent=1), encoding="utf-8")
    doc = Path(args.doc) if args.doc else report.default_doc(out_dir)
    report.write_report(out_dir, doc)
    logger.info("wrote %s and %s", out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
