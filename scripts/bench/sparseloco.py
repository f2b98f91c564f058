"""Our sparse path against SparseLoCo's reference, difference by difference (issue 13).

The reference is templar's implementation of Sarfi et al., 2025 ("Communication Efficient LLM
Pre-training with SparseLoCo"): ``src/tplr/compress.py`` (``ChunkingTransformer``,
``TopKCompressor``, 12-bit index packing), ``src/tplr/neurons.py`` (error feedback, outer
step) and ``hparams/hparams.json`` (``target_chunk`` 64, ``topk_compression`` 64,
``quantization_bins`` 4, ``quantization_range`` 6, ``momentum_decay`` 0.95,
``outer_learning_rate`` 1.0, ``inner_steps`` 30), at tplr-ai/templar v2.1.3.

:data:`DIFFERENCES` lists each difference with the pair of methods (same everything else)
that measures it, when one does; :func:`section` renders the list with the losses a results
file holds for those pairs. :func:`value_errors` (``python -m scripts.bench.sparseloco``,
written to ``benchmarks/sparse_codecs.json``) measures what each sparse codec does to the
values it keeps, on the codec benchmark's heavy-tailed draw shaped as a matrix.

Run from the repository root::

    .venv/bin/python -m scripts.bench.sparseloco          # writes benchmarks/sparse_codecs.json
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch

from lowcomm.comm.compression import ErrorFeedback, TiledTopK, parse_compression
from scripts.bench import REPO
from scripts.bench.methods import parse_method

__all__ = ["DIFFERENCES", "ERRORS_FILE", "section", "value_errors"]

ERRORS_FILE = REPO / "benchmarks" / "sparse_codecs.json"
#: The sparse codecs :func:`value_errors` compares, as compression specs: the old preset
#: (flat chunks, absmax 2-bit values), the same with fp32 values, and the reference's.
ERROR_SPECS = (
    "sparseloco",
    "topk:0.015625",
    "tiled:64:64:2",
    "tiled:64:64:32",
)
# A 1024 x 4096 matrix: 64 x 64 tiles for the tiled codec, 1,024 chunks of 4,096 for top-k.
_SHAPE = (1024, 4096)

# (difference, ours before issue 13, the reference, (ours-side method, reference-side method)
# or None when no pair of runs measures it alone, why not / what else measures it).
DIFFERENCES: tuple[tuple[str, str, str, tuple[str, str] | None, str], ...] = (
    (
        "chunks",
        "the fragment's flat buffer cut every 4,096 elements: a chunk can span two tensors "
        "(a LayerNorm beside an embedding)",
        "per tensor: 64 x 64 tiles of each matrix (largest divisors of its dimensions up "
        "to 64), runs of 64 of each 1-D tensor; no tile spans two tensors (`TiledTopK`)",
        (
            "diloco-h25-topk0.015625-ef0.95-ilr0.004-lr1-m0",
            "diloco-h25-tiled64x64q32-ef0.95-ilr0.004-lr1-m0",
        ),
        "both with fp32 values",
    ),
    (
        "k per chunk",
        "ceil(fraction x 4,096): 64 at 1/64",
        "64 per tile, so a 1-D tensor (tiles of at most 64 elements) is sent whole",
        None,
        "comes with the chunks: measured together in the row above",
    ),
    (
        "value quantizer",
        "`Int2` absmax per chunk's 64 kept values, levels {±m, ±m/3} (as a dense codec, "
        "`scripts.bench.codecs` measured a relative error of 1.62: worse than zeros)",
        "one quantizer per tensor: shift by the mean, 4 bins of width 1.5 sigma (6 sigma in "
        "all), each code decoded to the mean of its bin (a table of 4 fp32 sent along); "
        "errors of both on two draws: the table below",
        (
            "diloco-h25-tiled64x64q32-ef0.95-ilr0.004-lr1-m0",
            "diloco-h25-tiled64-ef0.95-ilr0.004-lr1-m0",
        ),
        "fp32 values against the reference's 2-bit bins, both on tiles; ours against fp32 "
        "on flat chunks: `diloco-h25-topk0.015625-vint2-ef0.95-ilr0.004-lr1-m0`",
    ),
    (
        "indices",
        "int32, 32 bits per kept value",
        "12 bits (a position inside a 4,096-element tile), packed",
        None,
        "bytes only; decoded values are identical",
    ),
    (
        "error feedback",
        "e <- (Δ + βe) − C(Δ + βe), β = 0.95 (`ef0.95`)",
        "e <- βe + lr·Δ, send C(e), e <- e − C(e); β = 0.95, lr = 1",
        None,
        "identical at outer lr 1",
    ),
    (
        "outer step",
        "SGD at the task's lr (0.7) without momentum (the old preset `topk0.01-ef0.95-m0`)",
        "SGD lr 1.0 without momentum",
        None,
        "every sparse run here uses lr 1 (the dense grid measures lr on its own)",
    ),
    (
        "aggregation",
        "mean over all M workers: an entry one worker did not pick counts as 0 from it",
        "mean over the workers that picked the entry (`scatter_reduce` mean), each "
        "worker's values first clipped to the median norm of all workers'",
        None,
        "not built here: it needs a backend that counts selections; with M=2 it doubles the "
        "step of entries only one worker picked, which the outer lr brackets",
    ),
    (
        "density",
        "1% (`topk0.01`) in the issue's runs",
        "64 of 4,096 per tile (1.56%)",
        None,
        "every sparse run here keeps 64 of 4,096",
    ),
    (
        "H",
        "20 (default profile) / 25 (headline)",
        "30 inner steps (paper: 15 to 250)",
        None,
        "H=25, as the headline target",
    ),
)


def value_errors(shape: tuple[int, int] = _SHAPE) -> dict[str, Any]:
    """Bytes and relative L2 errors of each sparse codec on two draws shaped as one matrix.

    Draws: ``normal`` (standard normal) and ``heavy-tailed`` (the codec benchmark's, normal
    times log-normal). ``rel_error_kept`` is over the entries the codec kept (what its values
    quantizer does); ``rel_error`` over the whole tensor (what is dropped dominates it).
    """
    numel = shape[0] * shape[1]
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(numel, generator=g)
    # The codec benchmark's draw (scripts.bench.codecs.pseudo_gradient), whose module imports
    # the report, which imports this one.
    g = torch.Generator().manual_seed(0)
    heavy = torch.randn(numel, generator=g) * torch.exp(torch.randn(numel, generator=g))
    draws = {"normal": normal, "heavy-tailed": heavy}
    rows = []
    for draw, x in draws.items():
        for spec in ERROR_SPECS:
            parsed = parse_compression(spec)
            comp = parsed.compressor if isinstance(parsed, ErrorFeedback) else parsed
            assert comp is not None
            if isinstance(comp, TiledTopK):
                comp = comp.for_layout([shape])
            payload = comp.compress(x)
            y = comp.decompress(payload)
            kept = y != 0
            rows.append(
                {
                    "draw": draw,
                    "spec": spec,
                    "bits_per_element": 8 * payload.nbytes / numel,
                    "kept_fraction": float(kept.float().mean()),
                    "rel_error_kept": float((y - x)[kept].norm() / x[kept].norm()),
                    "rel_error": float((y - x).norm() / x.norm()),
                }
            )
    return {"shape": list(shape), "rows": rows}


def errors_table(data: dict[str, Any]) -> str:
    """The :func:`value_errors` results as a Markdown table."""
    lines = [
        "| draw | codec | bits per element | kept | rel. L2 error of kept values | rel. L2 error |",
        "|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        lines.append(
            f"| {r['draw']} | `{r['spec']}` | {r['bits_per_element']:.3f} | {100 * r['kept_fraction']:.2f}% "
            f"| {r['rel_error_kept']:.3f} | {r['rel_error']:.3f} |"
        )
    return "\n".join(lines)


def _loss(quality: dict[str, Any], name: str) -> float | None:
    item = quality.get(parse_method(name).name)
    return None if item is None else float(item["final_eval_loss"]["mean"])


def section(results: dict[str, Any]) -> str | None:
    """The differences as a Markdown table, with the measured pairs' losses; None when the
    results hold no sparse run at all."""
    quality = results["aggregate"]["quality"]
    if not any(_sparse(n) for n in quality):
        return None
    rows = [
        "| difference | ours (before) | reference | measured (final eval loss) |",
        "|---|---|---|---|",
    ]
    for what, ours, ref, pair, note in DIFFERENCES:
        measured = note
        if pair is not None:
            a, b = (_loss(quality, m) for m in pair)
            if a is not None and b is not None:
                measured = (
                    f"`{parse_method(pair[0]).name}` {a:.4f} → `{parse_method(pair[1]).name}` "
                    f"{b:.4f} ({100 * (b / a - 1):+.1f}%); {note}"
                )
            else:
                measured = f"not run yet (`{pair[0]}` vs `{pair[1]}`); {note}"
        rows.append(f"| {what} | {ours} | {ref} | {measured} |")
    return "\n".join(rows)


def _sparse(name: str) -> bool:
    spec = str(parse_method(name).options.get("compression", "none"))
    if spec.startswith("ef"):
        spec = spec.partition(":")[2]
    return spec.startswith(("topk", "tiled"))


def main() -> int:
    """Write :data:`ERRORS_FILE` and print its table."""
    data = value_errors()
    data["command"] = [sys.executable, "-m", "scripts.bench.sparseloco"]
    ERRORS_FILE.parent.mkdir(parents=True, exist_ok=True)
    ERRORS_FILE.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    print(errors_table(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
