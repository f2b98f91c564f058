"""Turning per-run records into the suite's tables: means and spreads over seeds, ratios
to DP paired by seed, throughput as a fraction of the ceiling, the headline rows, the CSV.

Pure functions of the records (no processes, no files but the CSV). Used by
:mod:`scripts.bench.suite`.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scripts.bench.methods import parse_method


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for fewer than two values)."""
    vals = [float(v) for v in values]
    if not vals:
        return math.nan, None
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else None


def _stat(values: Sequence[float]) -> dict[str, Any]:
    mean, std = mean_std(values)
    return {"mean": mean, "std": std, "n": len(values), "values": [float(v) for v in values]}


def aggregate_quality(runs: list[dict[str, Any]], baseline: str = "ddp") -> dict[str, Any]:
    """Per method: loss curve mean/std over seeds, bytes, and the loss ratio to the baseline.

    Ratios are paired by seed (same seed, same initialisation and data): for each seed
    ``loss_method / loss_baseline`` at the same training tokens (the same step unless one of
    the two trains at another batch, ``bs<B>``), then mean and std over seeds.
    """
    by_method: dict[str, dict[int, dict[str, Any]]] = {}
    for r in runs:
        by_method.setdefault(r["method"], {})[r["seed"]] = r
    base = by_method.get(baseline, {})
    # The baseline's eval loss by seed and training tokens, the key every method pairs on.
    base_loss = {s: {e["tokens"]: e["loss"] for e in r["evals"]} for s, r in base.items()}
    out: dict[str, Any] = {}
    for name, seeds in by_method.items():
        steps = sorted(set.intersection(*({e["step"] for e in r["evals"]} for r in seeds.values())))
        first = next(iter(seeds.values()))
        ev = {s: {e["step"]: e for e in r["evals"]} for s, r in seeds.items()}
        curve = []
        for step in steps:
            point = {
                "step": step,
                "tokens": ev[next(iter(ev))][step]["tokens"],
                "loss": _stat([ev[s][step]["loss"] for s in sorted(ev)]),
                "bytes_sent": statistics.fmean(ev[s][step]["bytes_sent"] for s in ev),
            }
            paired = [
                ev[s][step]["loss"] / b
                for s in sorted(ev)
                if s in base_loss
                for b in [base_loss[s].get(ev[s][step]["tokens"])]
                if b
            ]
            point["ratio_to_baseline"] = _stat(paired) if paired else None
            curve.append(point)
        final_pairs = [
            seeds[s]["final_eval_loss"] / base[s]["final_eval_loss"] for s in seeds if s in base
        ]
        out[name] = {
            "method": name,
            "label": parse_method(name).label,
            "seeds": sorted(seeds),
            "num_params": first["num_params"],
            "steps": first["steps"],
            "final_eval_loss": _stat([seeds[s]["final_eval_loss"] for s in sorted(seeds)]),
            "final_ratio_to_baseline": _stat(final_pairs) if final_pairs else None,
            "bytes_sent": statistics.fmean(r["bytes_sent"] for r in seeds.values()),
            "bytes_sent_estimated": bool(first["bytes_sent_estimated"]),
            "allreduce_bytes": first["allreduce_bytes"],
            "outer_steps": first["outer_steps"],
            "peak_sync_bytes": first["peak_sync_bytes"],
            "compression_ratio": first["compression_ratio"],
            "elapsed_s": _stat([r["elapsed_s"] for r in seeds.values()]),
            "tokens_per_s_incl_eval": _stat([r["tokens_per_s_incl_eval"] for r in seeds.values()]),
            "curve": curve,
        }
    return out


#: The rate recorded for ceiling runs (``--mode local`` sends nothing): they serve every link.
CEILING = "ceiling"


def median_spread(values: Sequence[float]) -> dict[str, Any]:
    """Median, smallest and largest of ``values`` (None for no values), and the values."""
    vals = [float(v) for v in values]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0, "values": []}
    return {
        "median": statistics.median(vals),
        "min": min(vals),
        "max": max(vals),
        "n": len(vals),
        "values": vals,
    }


def bracketing_ceilings(run: dict[str, Any], ceilings: list[dict[str, Any]]) -> list[float]:
    """tokens/s of the ceiling runs a run is compared with: of its pass, the last one before
    it and the first one after it (by ``slot``); for records without slots (an older plan:
    every pass ran the ceiling first at each link), every ceiling of its pass and link."""
    same = [c for c in ceilings if c.get("repeat", 0) == run.get("repeat", 0)]
    if run.get("slot") is None or any(c.get("slot") is None for c in same):
        return [c["tokens_per_s"] for c in same if c["rate"] == run["rate"]]
    before = [c for c in same if c["slot"] < run["slot"]]
    after = [c for c in same if c["slot"] > run["slot"]]
    picked = ([max(before, key=lambda c: c["slot"])] if before else []) + (
        [min(after, key=lambda c: c["slot"])] if after else []
    )
    return [c["tokens_per_s"] for c in picked]


def run_blocked_fraction(run: dict[str, Any]) -> float | None:
    """The run's blocked fraction: the mean over its workers (``worker<R>.json``); for runs
    recorded before the workers wrote theirs, rank 0's ``comm_seconds`` ÷ training seconds."""
    if run.get("blocked_fraction") is not None:
        return float(run["blocked_fraction"])
    if run.get("comm_seconds") is not None and run.get("train_seconds"):
        return float(run["comm_seconds"]) / float(run["train_seconds"])
    return None


def run_flush_fraction(run: dict[str, Any]) -> float | None:
    """Of the run's blocked fraction, the part spent landing what was still in flight after
    the last step (the mean over workers); None for runs without it recorded."""
    parts = [
        w["flush_seconds"] / w["train_seconds"]
        for w in run.get("workers") or []
        if w.get("flush_seconds") is not None and w.get("train_seconds")
    ]
    return statistics.fmean(parts) if parts else None


def time_fractions(run: dict[str, Any]) -> dict[str, dict[str, float]] | None:
    """Per lane (``train``, ``comm``) and span kind: the fraction of the training window it
    took, the mean over the run's workers (from their timelines), with ``wait for peers`` and
    ``wire for peers``, the parts of ``wait`` and ``wire`` spent before the last worker had
    started the same sync; None without timelines."""
    workers = [w for w in run.get("workers") or [] if w.get("seconds_by_kind")]
    if not workers:
        return None
    out: dict[str, dict[str, float]] = {}
    for w in workers:
        late = {f"{k} for peers": v for k, v in (w.get("waiting_for_peers") or {}).items()}
        parts = [(lane, kinds) for lane, kinds in w["seconds_by_kind"].items()]
        parts += [("train", {k: v for k, v in late.items() if k.startswith("wait")})]
        parts += [("comm", {k: v for k, v in late.items() if k.startswith("wire")})]
        for lane, kinds in parts:
            for kind, sec in kinds.items():
                slot = out.setdefault(lane, {})
                slot[kind] = slot.get(kind, 0.0) + sec / w["train_seconds"] / len(workers)
    return out


def aggregate_throughput(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per rate: the ceiling, and each method's tokens/s ÷ ceiling: the median over passes
    with its smallest and largest, each pass's run divided by the ceiling runs bracketing it
    (:func:`bracketing_ceilings`); and the blocked fraction, median over passes.

    The median, not the fastest pass: a pass slowed down by other processes slows its ceiling
    runs too, so paired ratios move less than tokens/s, and the median does not pick the one
    pass that happened to be least disturbed.
    """
    ceilings = [r for r in runs if r["method"] == "local" and r["tokens_per_s"]]
    out: dict[str, Any] = {}
    rates = [r["rate"] for r in runs if r["rate"] != CEILING]
    for rate in dict.fromkeys(rates):
        block = [r for r in runs if r["rate"] == rate and r["method"] != "local"]
        ceil = [c for c in ceilings if c["rate"] in (rate, CEILING)]
        by_method: dict[str, list[dict[str, Any]]] = {}
        for r in block:
            if r["tokens_per_s"]:
                by_method.setdefault(r["method"], []).append(r)
        methods = {}
        for name, rs in by_method.items():
            paired = []
            for r in rs:
                c = bracketing_ceilings(r, ceil)
                paired.append((r, r["tokens_per_s"] / statistics.fmean(c) if c else None))
            ratios = median_spread([x for _, x in paired if x is not None])
            blocked = median_spread(
                [b for b in (run_blocked_fraction(r) for r in rs) if b is not None]
            )
            flush = median_spread([f for f in (run_flush_fraction(r) for r in rs) if f is not None])
            # Older records have rank 0's comm_seconds only (and none for DP).
            source = "workers" if all(r.get("workers") for r in rs) else "rank 0"
            # The run of the median pass: its details (bytes, timeline) stand for the cell.
            mid = ratios["median"]
            median_run = (
                min((p for p in paired if p[1] is not None), key=lambda p: abs(p[1] - mid))[0]
                if mid is not None
                else rs[0]
            )
            r = median_run
            methods[name] = {
                "method": name,
                "label": parse_method(name).label,
                "tokens_per_s": statistics.median(x["tokens_per_s"] for x in rs),
                "tokens_per_s_runs": [x["tokens_per_s"] for x in rs],
                "ratio_to_ceiling": ratios["median"],
                "ratio": ratios,
                "blocked_fraction": blocked["median"],
                "blocked": blocked,
                "blocked_source": source,
                "blocked_in_flush": flush,
                "blocked_per_worker": [w.get("blocked_fraction") for w in r.get("workers") or []]
                or None,
                "time_fractions": time_fractions(r),
                "median_run": r.get("key"),
                "lib_bytes_sent_rank0": r["lib_bytes_sent_rank0"],
                "lib_bytes_estimated": r["lib_bytes_estimated"],
                "wire": r.get("wire_compare"),
                "wire_setup_tx_bytes_host0": r["wire_setup"][0]["tx_bytes"]
                if r.get("wire_setup")
                else None,
                "wire_tx_bytes_hosts": [w["tx_bytes"] for w in r["wire"]]
                if r.get("wire")
                else None,
                "steps": r["steps"],
                "train_seconds": r["train_seconds"],
                "comm_seconds": r.get("comm_seconds"),
            }
        ceiling_runs = [c["tokens_per_s"] for c in ceil]
        out[rate] = {
            "rate": rate,
            "rate_bps": block[0]["rate_bps"] if block else None,
            "ceiling_tokens_per_s": statistics.median(ceiling_runs) if ceiling_runs else None,
            "ceiling_runs": ceiling_runs,
            "methods": methods,
        }
    return out


# lowcomm's run of the same algorithm as each peer library, at the peers' H (``{h}``):
# torchft's DiLoCo steps the task's outer SGD; hivemind's Optimizer averages parameters, which
# is outer SGD at lr 1 without momentum. The first of a library's names that ran is its
# reference.
PEER_REFERENCES = {
    "torchft": ("diloco-h{h}",),
    "hivemind": ("diloco-h{h}-lr1-m0", "diloco-h{h}"),
}


def _by_seed_ratio(runs: list[dict[str, Any]], ref: dict[str, Any] | None) -> dict[str, Any] | None:
    """A peer's final loss over a lowcomm method's, paired by seed (None: no common seed)."""
    if ref is None:
        return None
    values = dict(zip(ref["seeds"], ref["final_eval_loss"]["values"]))
    pairs = [
        r["summary"]["final_eval_loss"] / values[r["seed"]] for r in runs if r["seed"] in values
    ]
    return _stat(pairs) if pairs else None


def aggregate_peers(
    runs: list[dict[str, Any]], quality: dict[str, Any], sync_every: int, baseline: str = "ddp"
) -> dict[str, Any]:
    """Per peer library: the loss curve and final loss over seeds, against lowcomm's run of the
    same algorithm (:data:`PEER_REFERENCES`) and against the DP ``baseline``, paired by seed."""
    out: dict[str, Any] = {}
    for library in dict.fromkeys(r["library"] for r in runs):
        names = [n.format(h=sync_every) for n in PEER_REFERENCES.get(library, ("diloco-h{h}",))]
        ref_name = next((n for n in names if n in quality), names[0])
        ref = quality.get(ref_name)
        lib_runs = sorted((r for r in runs if r["library"] == library), key=lambda r: r["seed"])
        steps = sorted(set.intersection(*({e["step"] for e in r["evals"]} for r in lib_runs)))
        curve = []
        for step in steps:
            pts = [next(e for e in r["evals"] if e["step"] == step) for r in lib_runs]
            curve.append({"step": step, "tokens": pts[0]["tokens"],
                          "loss": _stat([p["loss"] for p in pts]),
                          "averaging_rounds": statistics.fmean(p["averaging_rounds"] for p in pts)})  # fmt: skip
        sums = [r["summary"] for r in lib_runs]
        est = [s.get("bytes_sent_ring_estimate") or s.get("bytes_sent_estimate") for s in sums]
        out[library] = {
            "library": library,
            "version": sums[0].get("version"),
            "seeds": [r["seed"] for r in lib_runs],
            "sync_every": sync_every,
            "final_eval_loss": _stat([s["final_eval_loss"] for s in sums]),
            "final_eval_loss_mean_of_workers": _stat(
                [s["final_eval_loss_mean_of_workers"] for s in sums]
            ),
            "tokens_per_s_incl_eval": _stat([s["tokens_per_s"] for s in sums]),
            "averaging_rounds": _stat([s["averaging_rounds"] for s in sums]),
            "expected_rounds": sums[0]["expected_rounds_at_sync_every"],
            "bytes_sent_estimate": statistics.fmean(e for e in est if e is not None)
            if any(e is not None for e in est)
            else None,
            "bytes_note": sums[0].get("bytes_sent_note"),
            "outer_optimizer": sums[0].get("outer_optimizer"),
            "reference": ref_name if ref else None,
            "reference_final_eval_loss": ref["final_eval_loss"] if ref else None,
            "reference_tokens_per_s_incl_eval": ref["tokens_per_s_incl_eval"] if ref else None,
            "ratio_to_reference": _by_seed_ratio(lib_runs, ref),
            # False: lowcomm's run of the peer's own algorithm did not run; the reference is
            # the fallback, another outer step.
            "reference_same_algorithm": ref_name == names[0],
            "baseline": baseline,
            "ratio_to_baseline": _by_seed_ratio(lib_runs, quality.get(baseline)),
            "curve": curve,
        }
    return out


def _paired(quality: dict[str, Any], a: str, b: str, fn: Any) -> dict[str, Any] | None:
    ra, rb = quality.get(a), quality.get(b)
    if ra is None or rb is None:
        return None
    va, vb = ra["final_eval_loss"]["values"], rb["final_eval_loss"]["values"]
    sa, sb = ra["seeds"], rb["seeds"]
    common = [s for s in sa if s in sb]
    return _stat([fn(va[sa.index(s)], vb[sb.index(s)]) for s in common])


def baseline_of(results: dict[str, Any]) -> str:
    """The DP method a results file's ratios are taken against (``ddp`` unless it names one)."""
    return str(results["settings"].get("baseline") or "ddp")


def headline_rows(
    quality: dict[str, Any],
    roles: dict[str, str],
    workers: int,
    steps: int,
    baseline: str = "ddp",
) -> list[dict[str, Any]]:
    """The issue's headline comparisons, from the aggregated quality runs."""
    rows: list[dict[str, Any]] = []
    roles = {k: parse_method(v).name for k, v in roles.items()}

    def missing(role: str, what: str) -> None:
        name = roles.get(role)
        rows.append(
            {"id": role, "title": what, "available": False,
             "why": f"method {name!r} was not run" if name else f"no {role!r} method in profile"}
        )  # fmt: skip

    ddp = quality.get(baseline)
    main = roles.get("main", "")
    if main in quality and ddp:
        mq = quality[main]
        rows.append(
            {
                "id": "main",
                "title": f"{mq['label']}, M={workers}, {steps} steps vs DP",
                "available": True,
                "method": main,
                "loss_ratio": mq["final_ratio_to_baseline"],
                "loss": mq["final_eval_loss"],
                "loss_dp": ddp["final_eval_loss"],
                "bytes": mq["bytes_sent"],
                "bytes_dp": ddp["bytes_sent"],
                "bytes_dp_estimated": ddp["bytes_sent_estimated"],
                "byte_ratio": ddp["bytes_sent"] / mq["bytes_sent"] if mq["bytes_sent"] else None,
                "gap_by_step": [
                    {"step": p["step"], "ratio": p["ratio_to_baseline"]}
                    for p in mq["curve"]
                    if p["ratio_to_baseline"] is not None
                ],
            }
        )
    else:
        missing("main", "DiLoCo vs DP")
    stream = roles.get("streaming", "")
    if stream in quality:
        sq = quality[stream]
        frag = parse_method(stream).options["fragments"]
        opts = parse_method(stream).options
        ref = next(
            (
                q
                for n, q in quality.items()
                if parse_method(n).mode == "diloco"
                and parse_method(n).options["fragments"] == 1
                and parse_method(n).options["compression"] == opts["compression"]
                and parse_method(n).options["error_feedback"] == opts["error_feedback"]
            ),
            None,
        )
        if ref is not None and ref["peak_sync_bytes"]:
            full, how = ref["peak_sync_bytes"], f"one full sync of {ref['method']} (measured)"
        else:
            full = (
                2 * (workers - 1) / workers * 4 * sq["num_params"] / (sq["compression_ratio"] or 1)
            )
            how = "2(M-1)/M x 4 x params / compression ratio (derived)"
        rows.append(
            {
                "id": "streaming",
                "title": f"{sq['label']}: peak bytes per sync vs total/P",
                "available": True,
                "method": stream,
                "fragments": frag,
                "peak_sync_bytes": sq["peak_sync_bytes"],
                "full_sync_bytes": full,
                "full_sync_source": how,
                "peak_over_total_per_p": sq["peak_sync_bytes"] / (full / frag)
                if sq["peak_sync_bytes"]
                else None,
                "loss_ratio": sq["final_ratio_to_baseline"],
            }
        )
    else:
        missing("streaming", "Streaming DiLoCo peak bytes")
    fp32 = roles.get("fp32", "")
    delta = _paired(quality, main, fp32, lambda a, b: a - b)
    if delta is not None:
        rows.append(
            {
                "id": "int8",
                "title": f"{quality[main]['label']} vs {quality[fp32]['label']}: loss delta",
                "available": True,
                "method": main,
                "reference": fp32,
                "loss_delta": delta,
                "loss_delta_pct": _paired(quality, main, fp32, lambda a, b: 100 * (a / b - 1)),
                "loss": quality[main]["final_eval_loss"],
                "loss_reference": quality[fp32]["final_eval_loss"],
            }
        )
    else:
        missing("fp32", "int8 vs fp32 loss delta")
    topk, topk_ef = roles.get("topk", ""), roles.get("topk_ef", "")
    delta = _paired(quality, topk_ef, topk, lambda a, b: a - b)
    if delta is not None:
        rows.append(
            {
                "id": "topk",
                "title": f"{quality[topk_ef]['label']} vs without EF: loss delta",
                "available": True,
                "method": topk_ef,
                "reference": topk,
                "loss_delta": delta,
                "loss_with_ef": quality[topk_ef]["final_eval_loss"],
                "loss_without_ef": quality[topk]["final_eval_loss"],
                "loss_ratio_with_ef": quality[topk_ef]["final_ratio_to_baseline"],
                "loss_ratio_without_ef": quality[topk]["final_ratio_to_baseline"],
                "bytes": quality[topk_ef]["bytes_sent"],
            }
        )
    else:
        missing("topk_ef", "top-k with vs without error feedback")
    return rows


def write_csv(results: dict[str, Any], path: Path) -> None:
    """One row per aggregated quality method, throughput cell and peer."""
    cols = [
        "table", "method", "label", "rate", "seeds", "final_eval_loss_mean",
        "final_eval_loss_std", "loss_ratio_vs_dp_mean", "loss_ratio_vs_dp_std",
        "bytes_sent_per_worker", "bytes_estimated", "byte_ratio_dp_over_method",
        "tokens_per_s", "ratio_to_ceiling", "wire_window_from_step", "lib_bytes_window",
        "lib_in_flight_estimate", "wire_tx_bytes_host0", "wire_tx_packets_host0",
        "wire_over_lib_pct", "residual_after_headers_pct",
    ]  # fmt: skip
    rows: list[dict[str, Any]] = []
    quality = results["aggregate"]["quality"]
    dp_bytes = quality.get(baseline_of(results), {}).get("bytes_sent")
    for q in quality.values():
        ratio = q["final_ratio_to_baseline"] or {}
        rows.append({
            "table": "quality", "method": q["method"], "label": q["label"],
            "seeds": len(q["seeds"]), "final_eval_loss_mean": q["final_eval_loss"]["mean"],
            "final_eval_loss_std": q["final_eval_loss"]["std"],
            "loss_ratio_vs_dp_mean": ratio.get("mean"), "loss_ratio_vs_dp_std": ratio.get("std"),
            "bytes_sent_per_worker": q["bytes_sent"], "bytes_estimated": q["bytes_sent_estimated"],
            "byte_ratio_dp_over_method": dp_bytes / q["bytes_sent"]
            if dp_bytes and q["bytes_sent"] else None,
            "tokens_per_s": q["tokens_per_s_incl_eval"]["mean"],
        })  # fmt: skip
    for rate, block in results["aggregate"]["throughput"].items():
        rows.append({"table": "throughput", "method": "local", "label": "ceiling",
                     "rate": rate, "tokens_per_s": block["ceiling_tokens_per_s"],
                     "ratio_to_ceiling": 1.0})  # fmt: skip
        for t in block["methods"].values():
            w = t["wire"] or {}
            rows.append({
                "table": "throughput", "method": t["method"], "label": t["label"], "rate": rate,
                "tokens_per_s": t["tokens_per_s"], "ratio_to_ceiling": t["ratio_to_ceiling"],
                "bytes_estimated": t["lib_bytes_estimated"],
                "wire_window_from_step": w.get("from_step"), "lib_bytes_window": w.get("lib_bytes"),
                # Runs from before DiLoCo.flush() ended with syncs in flight (None since).
                "lib_in_flight_estimate": w.get("in_flight_bytes_estimate"),
                "wire_tx_bytes_host0": w.get("wire_tx_bytes"),
                "wire_tx_packets_host0": w.get("wire_tx_packets"),
                "wire_over_lib_pct": w.get("wire_over_lib_pct"),
                "residual_after_headers_pct": w.get("residual_after_headers_pct"),
            })  # fmt: skip
    for p in results["aggregate"]["peers"].values():
        rows.append({
            "table": "peers", "method": p["library"], "label": f"{p['library']} {p['version']}",
            "seeds": len(p["seeds"]), "final_eval_loss_mean": p["final_eval_loss"]["mean"],
            "final_eval_loss_std": p["final_eval_loss"]["std"],
            "bytes_sent_per_worker": p["bytes_sent_estimate"], "bytes_estimated": True,
            "tokens_per_s": p["tokens_per_s_incl_eval"]["mean"],
        })  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c) for c in cols})
