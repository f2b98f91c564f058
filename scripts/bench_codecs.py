"""Codec throughput: G elements/s to compress and to decompress, per compressor.

Run:
    .venv/bin/python scripts/bench_codecs.py                    # CPU, 16M fp32 elements
    .venv/bin/python scripts/bench_codecs.py --device cuda --json runs/codecs_cuda.json
    .venv/bin/python scripts/bench_codecs.py --specs int8 topk:0.01+int8 --repeat 9

Each codec is timed on the same 16M-element fp32 tensor (a pseudo-gradient-like, heavy-tailed
draw); the figure is the best of ``--repeat`` runs after one warm-up, since other processes on
a shared machine only ever add time. Compression and decompression are timed separately and
include allocating their outputs (a fresh payload / a fresh fp32 tensor), as a backend pays
that too. Two reference rows bound what is possible: ``copy`` (clone the fp32 tensor: read 4
bytes, write 4) and ``fill`` (write 4 bytes per element into a fresh tensor).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from lowcomm.comm.compression import ErrorFeedback, compression_spec, parse_compression

DEFAULT_SPECS = [
    "fp16",
    "bf16",
    "int8",
    "int4",
    "int2",
    "topk:0.01",
    "topk:0.01+int8",
    "sparseloco",
]


def _timed(fn: Callable[[], object], device: torch.device, repeat: int) -> list[float]:
    fn()  # warm-up: lazy init, allocator caches
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def bench(specs: list[str], numel: int, device: torch.device, repeat: int) -> list[dict]:
    """Time each spec; return one row (dict) per spec plus the reference rows."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(numel, generator=g) * torch.exp(torch.randn(numel, generator=g))).to(device)
    rows = []
    for name, fn in [("copy", lambda: x.clone()), ("fill", lambda: torch.empty_like(x).fill_(1))]:
        t = _timed(fn, device, repeat)
        rows.append({"spec": name, "compress_gps": numel / min(t) / 1e9, "decompress_gps": None})
    for spec in specs:
        obj = parse_compression(spec)
        comp = obj.compressor if isinstance(obj, ErrorFeedback) else obj
        if comp is None:
            continue
        payload = comp.compress(x)
        decoded = comp.decompress(payload)
        rel_err = float((decoded - x).norm() / x.norm())
        t_c = _timed(partial(comp.compress, x), device, repeat)
        t_d = _timed(partial(comp.decompress, payload), device, repeat)
        rows.append(
            {
                "spec": spec,
                "canonical": compression_spec(comp),
                "bits_per_element": 8 * payload.nbytes / numel,
                "rel_l2_error": rel_err,
                "compress_gps": numel / min(t_c) / 1e9,
                "decompress_gps": numel / min(t_d) / 1e9,
                "compress_gps_median": numel / statistics.median(t_c) / 1e9,
                "decompress_gps_median": numel / statistics.median(t_d) / 1e9,
            }
        )
    return rows


def _fmt(value: float | None, spec: str) -> str:
    width = int(spec.split(".")[0])
    return "-".rjust(width) if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--specs", nargs="+", default=DEFAULT_SPECS, help="compression specs")
    parser.add_argument("--numel", type=int, default=1 << 24, help="elements (default 16M)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per codec")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="also write rows to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = bench(args.specs, args.numel, device, args.repeat)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"# {args.numel} fp32 elements on {where}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, best of {args.repeat}; G elements/s"
    )
    print(f"{'spec':<18} {'bits/elem':>9} {'rel err':>9} {'compress':>9} {'decompress':>10}")
    for r in rows:
        print(
            f"{r['spec']:<18} {_fmt(r.get('bits_per_element'), '9.3f')} "
            f"{_fmt(r.get('rel_l2_error'), '9.2e')} {_fmt(r['compress_gps'], '9.3f')} "
            f"{_fmt(r['decompress_gps'], '10.3f')}"
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "numel": args.numel,
            "device": where,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "repeat": args.repeat,
        }
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
