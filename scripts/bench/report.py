"""Generate ``BENCHMARKS.md`` from the benchmark suite's results files. Nothing is typed by hand.

Run from the repository root (regenerates the document from every results file under
``benchmarks/``)::

    .venv/bin/python -m scripts.bench.report
    .venv/bin/python -m scripts.bench.report --results /tmp/b/results.json --out /tmp/b/B.md

Every number in the document is read from a ``results.json`` written by
:mod:`scripts.bench.suite`; the prose around the numbers is fixed text in this file, and the
plots are the PNGs the suite wrote next to the results. One section per profile
(headline profiles first, tuning grids last).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scripts.bench import REPO, grid, sparseloco
from scripts.bench.aggregate import baseline_of
from scripts.bench.plots import is_tuning

__all__ = ["document", "find_codecs", "find_results", "render", "write_report"]

BENCH_DIR = REPO / "benchmarks"
#: The codec benchmark's results file, beside the suite's (:mod:`scripts.bench.codecs`).
CODECS_FILE = "codecs.json"
# Suite results recorded before the suite became a package name the script by its path.
_LEGACY_SUITE_SCRIPT = "scripts/bench_suite.py"
_SUITE = ["-m", "scripts.bench.suite"]


# --------------------------------------------------------------------------- formatting


def fmt_bytes(num: float | None) -> str:
    """``1536 -> '1.50 KiB'`` (binary units, three significant digits)."""
    if num is None or (isinstance(num, float) and math.isnan(num)):
        return "n/a"
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    value, i = float(num), 0
    while abs(value) >= 1000 and i < len(units) - 1:
        value /= 1024
        i += 1
    return f"{value:.0f} B" if i == 0 else f"{value:.3g} {units[i]}"


def fmt_stat(stat: dict[str, Any] | None, digits: int = 4, signed: bool = False) -> str:
    """``mean ± std`` of a ``{"mean", "std", "n"}`` dict (just the mean for one value)."""
    if not stat or stat.get("mean") is None or math.isnan(stat["mean"]):
        return "n/a"
    sign = "+" if signed else ""
    text = f"{stat['mean']:{sign}.{digits}f}"
    if stat.get("std") is not None:
        text += f" ± {stat['std']:.{digits}f}"
    return text


def fmt_num(value: float | None, fmt: str = ".3g") -> str:
    """A number, or ``n/a``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, fmt)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- sections


def suite_command(command: Sequence[str]) -> list[str]:
    """The suite invocation a results file records, as it is spelled now.

    Results recorded before the suite became the package ``scripts.bench`` name the script
    ``scripts/bench_suite.py``; the document shows the command that runs today.
    """
    cmd = list(command)
    if len(cmd) > 1 and cmd[1] == _LEGACY_SUITE_SCRIPT:
        cmd[1:2] = _SUITE
    return cmd


def _reproduce(res: dict[str, Any]) -> str:
    cmd = shlex.join(suite_command(res["command"]))
    profile = res["profile"]
    lines = [
        "From the repository root (shaped links need root: network namespaces and `tc`):",
        "",
        "```sh",
        f"{cmd}",
        "```",
        "",
        "Runs are cached under `runs/bench/<profile>/` and skipped when their result exists "
        "with the same settings, so an interrupted suite resumes where it stopped (`--force` "
        "reruns). Other entry points:",
        "",
        "```sh",
        f".venv/bin/python -m scripts.bench.suite --profile {profile} --dry-run   "
        "# the plan, what is cached",
        f".venv/bin/python -m scripts.bench.suite --profile {profile} --report-only  "
        "# plots + this file",
        ".venv/bin/python -m scripts.bench.suite --rates loopback   # without root: no shaped links",
        "make bench-peers   # torchft's own venv (.venv-torchft), which the suite runs it from",
        "```",
    ]
    return "\n".join(lines)


def _machine(res: dict[str, Any]) -> str:
    m = res["machine"]
    walls = res.get("wall_seconds", {})
    rows = [
        ["CPU", m.get("cpu_model")],
        ["cores", m.get("cpu_cores")],
        ["GPU", m.get("cuda") or "none"],
        ["torch", m.get("torch")],
        ["Python", m.get("python")],
        ["kernel", m.get("kernel")],
        ["date", m.get("date_utc")],
        ["1-min load average at start / end", f"{m.get('loadavg_1m')} / {res.get('loadavg_1m_end')}"],
        ["wall time of the last invocation (quality / throughput / peers / total)",
         " / ".join(f"{walls[k]:.0f} s" if k in walls else "n/a"
                    for k in ("quality", "throughput", "peers", "total"))],
    ]  # fmt: skip
    runs = res.get("run_seconds")
    if runs:
        rows.append(
            ["sum of the runs' own wall times, cached ones included (quality / throughput / peers)",
             " / ".join(f"{runs[k]:.0f} s" for k in ("quality", "throughput", "peers"))]
        )  # fmt: skip
    return table(["", ""], rows)


def _settings(res: dict[str, Any]) -> str:
    s = res["settings"]
    t = s["task"]
    q = res["aggregate"]["quality"]
    tput = [r for r in res.get("runs", {}).get("throughput", []) if r.get("num_params")]
    params = (
        next(iter(q.values()))["num_params"] if q else (tput[0]["num_params"] if tput else None)
    )
    rows = [
        ["model", f"byte-level GPT, {t['n_layer']} layers, width {t['n_embd']}, "
                  f"{t['n_head']} heads, context {t['seq_len']}, {fmt_num(params, ',')} parameters"],
        ["data", f"{t['dataset']} (bytes as tokens), held-out fraction {t['heldout_fraction']}"],
        ["workers M", s["workers"]],
        ["batch per worker", f"{t['batch_size']} x {t['seq_len']} tokens (DP: global batch "
                             f"{s['workers']} x {t['batch_size']})"],
        ["inner steps (quality)", t["steps"]],
        ["tokens per run", fmt_num(t["steps"] * t["batch_size"] * t["seq_len"] * s["workers"], ",")],
        ["inner optimizer", f"AdamW lr {t['inner_lr']}, warm-up {t['warmup_steps']}, cosine to "
                            f"{t['min_lr_ratio']}x, weight decay {t['weight_decay']}, clip {t['grad_clip']}"],
        ["outer optimizer", f"SGD lr {t['outer_lr']}, momentum {t['outer_momentum']}, "
                            f"Nesterov {t['nesterov']}"],
        ["evaluation", f"every {t['eval_every']} steps on {t['eval_batches']} fixed held-out batches"],
        ["seeds", ", ".join(map(str, s["seeds"]))],
        ["device / threads per worker", f"{s['device']} / {s['threads_per_worker']}"],
        ["throughput runs", f"{s['throughput_steps']} steps each at {', '.join(s['rates'])}; "
                            f"passes: {s.get('throughput_repeats', 1)}"
                            + (f"; DP under shaped links: steps for "
                               f"{s['throughput_seconds']:g} s of all-reduce"
                               if s.get("throughput_seconds") else "")],
    ]  # fmt: skip
    return table(["setting", "value"], rows)


def headline_table(res: dict[str, Any]) -> str:
    """The headline comparisons of one profile's results as a Markdown table."""
    rows = []
    for h in res["headline"]:
        if not h["available"]:
            rows.append([h["title"], "not measured", h["why"]])
            continue
        if h["id"] == "main":
            pts = [g for g in h["gap_by_step"] if g["step"] > 0]
            stride = max(1, math.ceil(len(pts) / 8))
            pts = pts[::-1][::stride][::-1]  # at most 8 points, the last step always
            gap = ", ".join(f"{g['step']}: {100 * (g['ratio']['mean'] - 1):+.1f}%" for g in pts)
            est = " (DP: ring estimate)" if h["bytes_dp_estimated"] else ""
            rows.append(
                [
                    h["title"],
                    f"loss ratio **{fmt_stat(h['loss_ratio'])}**; DP sends "
                    f"**{fmt_num(h['byte_ratio'], '.1f')}x** the bytes",
                    f"final loss {fmt_stat(h['loss'])} vs DP {fmt_stat(h['loss_dp'])}; bytes per "
                    f"worker {fmt_bytes(h['bytes'])} vs {fmt_bytes(h['bytes_dp'])}{est}; "
                    f"gap by step: {gap}",
                ]
            )
        elif h["id"] == "streaming":
            rows.append(
                [
                    h["title"],
                    f"peak / (total/P) = **{fmt_num(h['peak_over_total_per_p'], '.3f')}**",
                    f"peak {fmt_bytes(h['peak_sync_bytes'])} per fragment sync; total "
                    f"{fmt_bytes(h['full_sync_bytes'])} per full sync ({h['full_sync_source']}), "
                    f"/P={h['fragments']}: {fmt_bytes(h['full_sync_bytes'] / h['fragments'])}; "
                    f"loss ratio to DP {fmt_stat(h['loss_ratio'])}",
                ]
            )
        elif h["id"] == "int8":
            rows.append(
                [
                    h["title"],
                    f"Δ loss **{fmt_stat(h['loss_delta'], signed=True)}** "
                    f"({fmt_stat(h['loss_delta_pct'], 2, signed=True)}%)",
                    f"{fmt_stat(h['loss'])} vs {fmt_stat(h['loss_reference'])} (paired by seed)",
                ]
            )
        elif h["id"] == "topk":
            rows.append(
                [
                    h["title"],
                    f"Δ loss (with − without EF) **{fmt_stat(h['loss_delta'], signed=True)}**",
                    f"with EF {fmt_stat(h['loss_with_ef'])} (ratio to DP "
                    f"{fmt_stat(h['loss_ratio_with_ef'])}), without "
                    f"{fmt_stat(h['loss_without_ef'])} (ratio "
                    f"{fmt_stat(h['loss_ratio_without_ef'])}); {fmt_bytes(h['bytes'])} per worker",
                ]
            )
    return table(["comparison", "result (mean ± std over seeds)", "detail"], rows)


def _quality(res: dict[str, Any]) -> str:
    q = res["aggregate"]["quality"]
    dp = q.get(baseline_of(res))
    rows = []
    for item in q.values():
        ratio = fmt_stat(item["final_ratio_to_baseline"]) if dp else "n/a"
        byte_ratio = (
            fmt_num(dp["bytes_sent"] / item["bytes_sent"], ".1f") + "x"
            if dp and item["bytes_sent"]
            else "n/a"
        )
        rows.append(
            [
                item["label"],
                f"`{item['method']}`",
                len(item["seeds"]),
                fmt_stat(item["final_eval_loss"]),
                ratio,
                fmt_bytes(item["bytes_sent"]) + (" (est.)" if item["bytes_sent_estimated"] else ""),
                byte_ratio,
                fmt_num(item["compression_ratio"], ".2f") if item["outer_steps"] else "",
                item["outer_steps"],
                fmt_bytes(item["peak_sync_bytes"]) if item["peak_sync_bytes"] else "",
            ]
        )
    header = [
        "method", "name", "seeds", "final eval loss", "loss / DP", "sent per worker",
        "DP bytes / bytes", "compression", "outer steps", "peak per sync",
    ]  # fmt: skip
    return table(header, rows)


def _adopted(res: dict[str, Any]) -> str:
    """Which runs an earlier version of the suite recorded, and why they still stand."""
    runs = [r for r in res.get("runs", {}).get("quality", []) if r.get("adopted_from")]
    if not runs:
        return ""
    by_commit: dict[str, list[str]] = {}
    for r in runs:
        src = r["adopted_from"]
        by_commit.setdefault(f"{src['commit']} ({src['file']}): {src['why']}", []).append(
            f"`{r['method']}` seed {r['seed']}"
        )
    return "\n".join(
        f"Carried over from commit {what}. Runs: {', '.join(names)}."
        for what, names in by_commit.items()
    )


def _gap(res: dict[str, Any], max_rows: int = 12) -> str:
    q = res["aggregate"]["quality"]
    base = baseline_of(res)
    if base not in q:
        return "No DP run: no gap to report."
    names = [n for n in q if n != base]
    points = [p for p in q[base]["curve"] if p["step"] > 0]
    if len(points) > max_rows:
        stride = math.ceil(len(points) / max_rows)
        keep = {id(p) for p in points[::-1][::stride]}  # always keep the last point
        points = [p for p in points if id(p) in keep]
    rows = []
    for point in points:  # each method at the baseline's tokens (its own step at its batch)
        row: list[Any] = [point["step"], fmt_num(point["tokens"], ","), fmt_stat(point["loss"])]
        for n in names:
            pt = next((p for p in q[n]["curve"] if p["tokens"] == point["tokens"]), None)
            r = pt["ratio_to_baseline"] if pt else None
            row.append(fmt_stat(r, 3) if r else "n/a")
        rows.append(row)
    header = ["DP step", "tokens", "DP loss"]
    return table(header + [f"{q[n]['label']}" for n in names], rows)


def _spread(stat: dict[str, Any] | None, fmt: str) -> str:
    """``median [min–max] (n)`` of a :func:`~scripts.bench.aggregate.median_spread` dict."""
    if not stat or stat.get("median") is None:
        return "n/a"
    text = format(stat["median"], fmt)
    if stat["n"] > 1:
        text += f" [{format(stat['min'], fmt)}–{format(stat['max'], fmt)}]"
    return text


def _throughput(res: dict[str, Any]) -> str:
    blocks = res["aggregate"]["throughput"]
    if not blocks:
        return "No throughput runs."
    rows = []
    for rate, b in blocks.items():
        ceil_runs = ", ".join(fmt_num(c, ".4g") for c in b["ceiling_runs"])
        rows.append(
            [rate, "ceiling (`local`, no communication)", fmt_num(b["ceiling_tokens_per_s"], ".4g"),
             "1", "0", "", ceil_runs]
        )  # fmt: skip
        for t in b["methods"].values():
            every = ", ".join(fmt_num(x, ".4g") for x in t.get("tokens_per_s_runs", []))
            blocked = _spread(t["blocked"], ".3f")
            if t["blocked"]["n"] and t["blocked_source"] != "workers":
                blocked += " (rank 0)"
            rows.append(
                [rate, t["label"], fmt_num(t["tokens_per_s"], ".4g"), _spread(t["ratio"], ".3f"),
                 blocked, _spread(t.get("blocked_in_flush"), ".3f"), every]
            )  # fmt: skip
    header = [
        "link", "method", "tokens/s (median)", "÷ ceiling: median [min–max]",
        "blocked on communication: median [min–max]", "of which after the last step",
        "tokens/s of every pass",
    ]  # fmt: skip
    return table(header, rows)


#: The columns of the time-breakdown table: (lane, span kind).
_TIME_COLUMNS = (
    ("train", "compute"), ("train", "prepare"), ("train", "wait"), ("train", "wait for peers"),
    ("train", "apply"), ("comm", "encode"), ("comm", "wire"), ("comm", "wire for peers"),
    ("comm", "decode"),
)  # fmt: skip


def _time_breakdown(res: dict[str, Any]) -> str:
    rows = []
    for rate, b in res["aggregate"]["throughput"].items():
        for t in b["methods"].values():
            f = t.get("time_fractions")
            if not f:
                continue
            rows.append(
                [rate, t["label"]]
                + [
                    f"{100 * f[lane][kind]:.1f}%" if kind in f.get(lane, {}) else ""
                    for lane, kind in _TIME_COLUMNS
                ]
            )
    if not rows:
        return "No timelines were recorded in these runs."
    header = ["link", "method"] + [f"{lane}: {kind}" for lane, kind in _TIME_COLUMNS]
    return table(header, rows)


def _wire(res: dict[str, Any]) -> str:
    rows = []
    for rate, b in res["aggregate"]["throughput"].items():
        for t in b["methods"].values():
            w = t.get("wire")
            if not w:
                continue
            lib = fmt_bytes(w["lib_bytes"]) + (" (est.)" if w["lib_bytes_estimated"] else "")
            if w.get("in_flight_syncs_at_end"):  # results cached before DiLoCo.flush()
                lib += (
                    f" + {fmt_bytes(w['in_flight_bytes_estimate'])} estimated in flight at the "
                    f"end ({w['in_flight_syncs_at_end']} sync; a run from before the flush)"
                )
            pct = w["wire_over_lib_pct"]
            res_pct = w["residual_after_headers_pct"]
            rows.append(
                [rate, t["label"], f"{w['from_step']}–{w['to_step']}", lib,
                 fmt_bytes(w["wire_tx_bytes"]), fmt_num(w["wire_tx_packets"], ","),
                 f"{pct:+.2f}%" if pct is not None else "n/a",
                 f"{res_pct:+.2f}%" if res_pct is not None else "n/a",
                 fmt_bytes(t["wire_setup_tx_bytes_host0"])]
            )  # fmt: skip
    if not rows:
        return "No shaped runs: no interface counters (loopback runs have none of their own)."
    header = [
        "link", "method", "steps", "library: bytes sent by rank 0", "interface: tx of host 0",
        "tx packets", "wire vs library", "after 66 B/packet headers",
        "host 0 tx before the window (setup, first steps)",
    ]  # fmt: skip
    return table(header, rows)


def _peers(res: dict[str, Any]) -> str:
    peers = res["aggregate"]["peers"]
    if not peers:
        return "No peer runs (see below for why)."
    rows = []
    for p in peers.values():
        ref = p["reference_final_eval_loss"]
        # Paired by seed where the results have it (older files: a ratio of means).
        paired = p.get("ratio_to_reference")
        if paired:
            ratio = fmt_stat(paired)
        elif ref:
            ratio = fmt_num(p["final_eval_loss"]["mean"] / ref["mean"], ".4f")
        else:
            ratio = "n/a (not run)"
        to_dp = p.get("ratio_to_baseline")
        rows.append(
            [
                f"{p['library']} {p['version']}",
                len(p["seeds"]),
                p["sync_every"],
                fmt_stat(p["final_eval_loss"]),
                (
                    f"{ratio} (vs `{p['reference']}` {fmt_stat(ref)}"
                    + ("; another outer step" if p.get("reference_same_algorithm") is False else "")
                    + ")"
                )
                if ref
                else ratio,
                f"{fmt_stat(to_dp)} (vs `{p['baseline']}`)" if to_dp else "n/a",
                f"{fmt_stat(p['averaging_rounds'], 1)} (H-step schedule: {p['expected_rounds']})",
                fmt_bytes(p["bytes_sent_estimate"]) + " (est.)",
                fmt_num(p["tokens_per_s_incl_eval"]["mean"], ".4g"),
                fmt_num((p["reference_tokens_per_s_incl_eval"] or {}).get("mean"), ".4g"),
                (p.get("outer_optimizer") or {}).get("name", "n/a"),
            ]
        )
    header = [
        "library", "seeds", "H", "final eval loss",
        "/ lowcomm, same algorithm (same H, fp32; by seed)", "/ DP (by seed)",
        "averaging rounds", "sent per worker", "tokens/s (incl. evals, loopback)",
        "lowcomm tokens/s (same)", "outer step",
    ]  # fmt: skip
    notes = [f"- **{p['library']}**: {p['bytes_note']}" for p in peers.values() if p["bytes_note"]]
    return table(header, rows) + "\n\n" + "\n".join(notes)


def _not_compared(res: dict[str, Any]) -> str:
    items = res.get("not_compared") or []
    text = (
        "\n".join(f"- **{i['what']}**: {i['why']}" for i in items)
        if items
        else "Everything in the plan was measured."
    )
    anomalies = res.get("anomalies") or []
    if anomalies:
        text += (
            "\n\nRuns whose workers exited non-zero after rank 0 had written its summary (every "
            "collective had completed, so their measurements are kept):\n\n"
        )
        text += "\n".join(
            f"- {a['what']}: rank {a['rank']} exited {a['returncode']}; last output: "
            f"`{' '.join(a['log_tail'].split()[-12:])}`"
            for a in anomalies
        )
    return text


def _plots(res: dict[str, Any], res_dir: Path, doc_dir: Path) -> str:
    captions = {
        "loss_vs_tokens": "Eval loss vs training tokens (mean ± std over seeds)",
        "loss_vs_bytes": "Eval loss vs bytes sent per worker (log scale)",
        "loss_gap": "Eval loss / DP eval loss vs tokens (paired by seed)",
        "frontier": "Quality per byte: loss / DP vs DP bytes / method bytes, every method and "
        "seed; stars are published points at another scale (35M parameters, C4), not "
        "comparable one to one",
        "throughput_vs_rate": "tokens/s ÷ ceiling vs link rate (median over passes, bars: "
        "smallest to largest)",
        "timelines": "Timelines of the workers (median pass): what each thread did, second by "
        "second, around a sync",
    }
    out = []
    for key, name in (res.get("plots") or {}).items():
        rel = os.path.relpath(res_dir / name, doc_dir)
        out.append(f"**{captions.get(key, key)}**\n\n![{captions.get(key, key)}]({rel})")
    return "\n\n".join(out) if out else "No plots."


def _quality_sections(res: dict[str, Any]) -> list[str]:
    if not res["aggregate"]["quality"]:
        return ["### Quality", "No quality runs in this profile (a throughput-only profile)."]
    return [
        "### Headline",
        headline_table(res),
        "### Quality: final eval loss and bytes",
        "Loss ratios are paired by seed (same seed: same initialisation and data) and then "
        "averaged. Bytes are what each worker sent over the whole run, from lowcomm's own "
        "counter (payload it serialised); DP's are the ring all-reduce estimate "
        "2(M-1)/M x 4 x params per step, checked against interface counters below.",
        _quality(res),
        _adopted(res),
        "### Loss gap to DP as a function of tokens",
        "Each cell: eval loss / DP eval loss at the same tokens and seed, mean ± std over seeds "
        "(DiLoCo evaluates its global parameters, which change only at outer steps).",
        _gap(res),
    ]


def _peer_sections(res: dict[str, Any]) -> list[str]:
    if not res["aggregate"]["peers"] and not res["settings"].get("peers"):
        return []  # a profile without the loopback peer phase
    return [
        "### Peers (loopback)",
        "Same task, seeds, data streams and token budget through `scripts.bench.peers` (one training loop; the "
        "libraries differ only in how they wrap the optimizer and communicate); torchft "
        "evaluates its global parameters, hivemind its rank-0 local parameters (it keeps no "
        "global copy). tokens/s include evaluations for all rows in this table.",
        _peers(res),
    ]


def render_tuning(res: dict[str, Any], res_path: Path, doc_dir: Path) -> str:
    """The section of a tuning grid's results (every setting tried; see :mod:`.grid`)."""
    rel = os.path.relpath(res_path, doc_dir)
    parts = [
        f"## Tuning grid `{res['profile']}`",
        f"Generated from [`{rel}`]({rel}), M={res['settings']['workers']}. Tuning runs use "
        "seeds that no comparison above reports; a comparison's settings come from a grid, "
        "and the comparison's profile (`scripts/bench/profiles.py`) says which run chose each.",
        "### How to reproduce",
        _reproduce(res),
        "### Machine",
        _machine(res),
        "### Settings",
        _settings(res),
        "### Every setting tried",
        grid.section(res, res_path, doc_dir),
    ]
    diffs = sparseloco.section(res)
    if diffs:
        parts += [
            "### SparseLoCo: our sparse path against the reference, one difference at a time",
            "The reference is templar's implementation of SparseLoCo (tplr-ai/templar v2.1.3: "
            "`src/tplr/compress.py`, `src/tplr/neurons.py`, `hparams/hparams.json`). Each row "
            "names the pair of runs of this grid that differ in that one respect, when one "
            "does (`scripts/bench/sparseloco.py` holds the list).",
            diffs,
        ]
        errors = _sparse_errors(doc_dir)
        if errors:
            parts += [
                "What each codec does to the values it keeps, on a 1024 x 4096 matrix of two "
                f"draws ({errors}):",
                sparseloco.errors_table(
                    json.loads(sparseloco.ERRORS_FILE.read_text(encoding="utf-8"))
                ),
            ]
    parts += ["### Not compared, and why", _not_compared(res)]
    return "\n\n".join(parts)


def _sparse_errors(doc_dir: Path) -> str | None:
    """How to regenerate the sparse codecs' error table, when its results file exists."""
    path = sparseloco.ERRORS_FILE
    if not path.exists():
        return None
    rel = os.path.relpath(path, doc_dir)
    return f"[`{rel}`]({rel}), `python -m scripts.bench.sparseloco`"


def render_profile(res: dict[str, Any], res_path: Path, doc_dir: Path) -> str:
    """The section of one profile's results."""
    if is_tuning(res):
        return render_tuning(res, res_path, doc_dir)
    rel = os.path.relpath(res_path, doc_dir)
    s = res["settings"]
    parts = [
        f"## Profile `{res['profile']}`",
        f"Generated from [`{rel}`]({rel}) (every run, every evaluation point) and "
        f"[`summary.csv`]({os.path.relpath(res_path.parent / 'summary.csv', doc_dir)}).",
        "### How to reproduce",
        _reproduce(res),
        "### Machine",
        _machine(res),
        "CPU load from other processes varies during a run, so absolute tokens/s are not "
        "comparable between runs or machines: every method's tokens/s is reported as a "
        "fraction of the no-communication ceiling (`--mode local`) measured in the same suite "
        "run, under the same link, in the same passes as that link's methods.",
        "### Settings",
        _settings(res),
        "Same model initialisation, the same per-worker data streams (batch of inner step s "
        "on worker r is a pure function of (seed, r, s)) and the same token budget for every "
        f"method; DP all-reduces gradients of the {s['workers']} workers' batches every step.",
        *_quality_sections(res),
        "### Throughput under shaped links",
        "One network namespace per worker, each behind a `tbf`-shaped veth (the rate applies to "
        "upload and download), via `scripts.bench.wansim`; `loopback` runs without namespaces. "
        "tokens/s runs from the end of the step-0 evaluation to the last step's log record "
        "(every step of the run, no evaluation inside), counting every worker's tokens. "
        "The runs are repeated in passes. In a pass, each method runs at every link between two "
        "ceiling runs, and each of its runs is divided by the mean of those two; each cell "
        "shows the median of these paired ratios over passes, with the smallest and largest "
        "in brackets (runs recorded by the older plan, which ran the ceiling first at each "
        "link, are divided by the ceiling runs of their pass and link). tokens/s of every pass "
        "are listed. **Blocked on communication** is the fraction of each worker's training "
        "window its training loop spent waiting for communication (lowcomm: "
        "`DiLoCo.stats.comm_seconds`, every wait and hand-off; DP: backward's wait for the "
        "all-reduce after its last gradient bucket was launched), the mean over workers; "
        "other processes on the machine slow every step, which moves tokens/s, but waiting "
        "grows only when communication is not hidden. Cells marked (rank 0) come from runs "
        "recorded before every worker wrote its own: rank 0's seconds. **After the last "
        "step** is the part of it spent landing what was still in flight when training ended "
        "(`DiLoCo.flush()`, a peer's `finish()`): paid once per run, so a run of this length "
        "shows it and a longer run spreads it thinner; it also holds the wait of a worker "
        "that finished first for the others.",
        _throughput(res),
        "#### Where the time goes",
        "From the workers' timelines (`LOWCOMM_TIMELINE`, `lowcomm.comm.timeline`) of each "
        "cell's median pass: the share of the training window each span kind took, the mean "
        "over workers, each instant counted once (a wait inside a sync's start counts as "
        "wait). `train` is the training loop: compute (forward, backward, inner step), "
        "prepare (pseudo-gradient, error feedback, hand-off), wait, apply (outer step, merge); "
        "`comm` is lowcomm's comm thread: encode, wire (inside a collective), decode (and sum). "
        "**for peers** is the part of wait (or wire) that lay before the last worker started "
        "the same sync: a collective cannot finish before every worker has joined it, so that "
        "time is spent waiting for a slower worker, not for the network. The comm thread's "
        "shares overlap the training loop's; on a machine with fewer cores than threads, they "
        "also compete for the same cores.",
        _time_breakdown(res),
        "#### Bytes on the wire: interface counters beside the library's counters",
        "Host 0's veth counters against rank 0's library counter over the same window: from "
        "the first training log record (after the start-up: the rendezvous and the parameter "
        "broadcast, which every rank has received before step 1) to the end of the run. "
        "`wire vs library` is the whole difference; `after 66 B/packet headers` subtracts "
        "Ethernet + IPv4 + TCP (with timestamps) headers per packet the counter saw (pure ACKs "
        "included), which leaves gloo's framing and the process group's own messages. "
        "With overlap, the recipe lands the syncs still in flight after the last step "
        "(`DiLoCo.flush()`) before its last log record, so the library's count covers every "
        "sync the run started. The library counts a sync's bytes when its result is taken: "
        "eager and delayed take it a round later, so a sync that crossed the wire before "
        "the window opened is counted inside it (-1/16 with 16 syncs: the eager rows). "
        "For DP the library column is the ring all-reduce estimate.",
        _wire(res),
        *_peer_sections(res),
        "### Not compared, and why",
        _not_compared(res),
        "### Plots",
        _plots(res, res_path.parent, doc_dir),
    ]
    return "\n\n".join(p for p in parts if p)


def _range(stat: dict[str, float], fmt: str) -> str:
    return f"{stat['median']:{fmt}} [{stat['min']:{fmt}}–{stat['max']:{fmt}}]"


def _codec_run(run: dict[str, Any]) -> str:
    rows = []
    for r in run["rows"]:
        faults = r.get("faults")
        if "encode_gbps" in r:
            name = f"`{r['spec']}`"
            codec = [
                fmt_num(r["bits_per_element"], ".3g"),
                fmt_num(r["rel_l2_error"], ".2e"),
                fmt_num(r["encode_gbps"]["median"], ".2f"),
                fmt_num(r["decode_gbps"]["median"], ".2f"),
            ]
            if faults is not None:
                faults = f"{faults['encode']:,.0f} / {faults['decode']:,.0f}"
        else:  # memcpy and clone: no payload, no error, one operation
            name, codec = r["spec"], ["", "", "", ""]
            if faults is not None:
                faults = f"{faults:,.0f}"
        rows.append(
            [name, *codec, _range(r["total_gbps"], ".2f"), _range(r["ratio_to_memcpy"], ".3f"),
             faults if faults is not None else "n/a"]
        )  # fmt: skip
    header = [
        "codec", "bits / element", "rel. L2 error", "encode GB/s", "decode GB/s",
        "encode + decode GB/s", "÷ memcpy", "page faults per call (encode / decode)",
    ]  # fmt: skip
    return table(header, rows)


def _elements(numel: int) -> str:
    """``4194304 -> '4M'`` (binary, as ``--sizes`` takes them)."""
    for unit, shift in (("M", 20), ("K", 10)):
        if numel % (1 << shift) == 0:
            return f"{numel >> shift}{unit}"
    return f"{numel:,}"


def _threads(run: dict[str, Any]) -> str:
    return f"{run['threads']} thread{'s' if run['threads'] > 1 else ''}"


def _run_title(run: dict[str, Any]) -> str:
    default = " (torch's default)" if run.get("default_threads") else ""
    return (
        f"{_elements(run['numel'])} elements ({fmt_bytes(4 * run['numel'])} of fp32), "
        f"{_threads(run)}{default}, {run['device']}, {run['repeats']} passes"
    )


def render_codecs(res: dict[str, Any], res_path: Path, doc_dir: Path) -> str:
    """The codec section: encode + decode bandwidth of every codec against memcpy."""
    rel = os.path.relpath(res_path, doc_dir)
    m = res["machine"]
    int8 = [
        f"{_range(r['ratio_to_memcpy'], '.2f')} ({_elements(run['numel'])} elements, "
        f"{_threads(run)})"
        for run in res["runs"]
        for r in run["rows"]
        if r["spec"] == "int8"
    ]
    parts = [
        "## Codecs: encode + decode bandwidth against memcpy",
        f"Generated from [`{rel}`]({rel}). From the repository root: "
        f"`{shlex.join(res['command'])}` (`make bench-codecs`).",
        "Each codec compresses and then decompresses the same fp32 tensor (a heavy-tailed "
        "draw, normal times log-normal), each call allocating its output as a backend does. "
        "Bandwidth is the tensor's fp32 bytes (4 per element) over the seconds taken. "
        "`memcpy` is `copy_` into a preallocated fp32 tensor (4 bytes read and 4 written per "
        "element); `clone` allocates, then copies. The passes are interleaved (every row once "
        "per pass, in an order rotated per pass) and each ratio to memcpy is taken within a "
        "pass; cells show the median [min–max] over passes. The page faults are the median "
        "count of minor faults per call: first touches of freshly mapped pages, which a "
        "fresh output costs on top of writing it (large allocations are fresh mappings). "
        "Error feedback is not timed (`sparseloco` is its top-k with 2-bit values).",
        f"Measured on {m.get('cpu_model')} ({m.get('cpu_cores')} cores"
        f"{', ' + m['cuda'] if m.get('cuda') else ''}), torch {m.get('torch')}, "
        f"{m.get('date_utc')}; 1-minute load average {m.get('loadavg_1m')} at the start, "
        f"{res.get('loadavg_1m_end')} at the end (other processes share the machine).",
    ]
    if int8:
        parts.append(
            "**int8 encode + decode ÷ memcpy** (goal: at least 0.5): " + "; ".join(int8) + "."
        )
    for run in res["runs"]:
        parts += [f"### {_run_title(run)}", _codec_run(run)]
    return "\n\n".join(parts)


def render(
    results: Sequence[tuple[Path, dict[str, Any]]],
    doc_dir: Path,
    codecs: tuple[Path, dict[str, Any]] | None = None,
    extras: Sequence[tuple[Path, str]] = (),
) -> str:
    """The whole document: a banner, one section per profile's results file, the codecs,
    then ``extras`` (results file, rendered section) of the stand-alone benchmarks."""
    paths = [p for p, _ in results] + ([codecs[0]] if codecs else []) + [p for p, _ in extras]
    sources = ", ".join(f"`{os.path.relpath(p, doc_dir)}`" for p in paths)
    head = [
        "<!-- GENERATED by scripts.bench.report from the suite's results; do not edit. -->",
        "# lowcomm benchmarks",
        f"> **Generated file.** Every number, table and image below comes from {sources}, "
        "written by `python -m scripts.bench.suite` (and `python -m scripts.bench.codecs`); "
        "regenerate with `.venv/bin/python -m scripts.bench.report`. Nothing here is typed by "
        "hand.",
        "What a training method sends, how good the model gets, and how fast it trains under "
        "a given link, measured in one suite run against synchronous data-parallel training "
        "(DP) and the peer libraries that install here; and how fast each codec encodes and "
        "decodes.",
    ]
    if not paths:
        return "\n\n".join([*head, "No results yet: run `python -m scripts.bench.suite`."]) + "\n"
    body = [render_profile(res, path, doc_dir) for path, res in results]
    if codecs:
        body.append(render_codecs(codecs[1], codecs[0], doc_dir))
    body += [section for _, section in extras]
    return "\n\n".join(head + body) + "\n"


def _base(out_dir: Path) -> Path:
    """The directory whose results go into one document: ``benchmarks/`` for anything under
    it, else ``out_dir`` itself."""
    out_dir = out_dir.resolve()
    root = BENCH_DIR.resolve()
    return root if out_dir == root or root in out_dir.parents else out_dir


def find_results(out_dir: Path, doc: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Results files for the document: ``out_dir``'s, and the other profiles' beside it.

    Under ``benchmarks/``, every profile's results (``benchmarks/results.json`` and
    ``benchmarks/*/results.json``) go into one document: the headline profiles first, then
    ``default``, the others, and the tuning grids last.
    """
    base = _base(out_dir)
    paths = [base / "results.json", *sorted(base.glob("*/results.json"))]
    found = [(p, json.loads(p.read_text(encoding="utf-8"))) for p in paths if p.exists()]
    found.sort(key=lambda pr: _section_order(pr[1]))
    return found


def find_codecs(out_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The codec benchmark's results beside ``out_dir``'s (``codecs.json``), if any."""
    path = _base(out_dir) / CODECS_FILE
    return (path, json.loads(path.read_text(encoding="utf-8"))) if path.exists() else None


def _section_order(results: dict[str, Any]) -> tuple[bool, int, str]:
    profile = str(results["profile"])
    first = {"headline": 0, "headline-m4": 1, "default": 2}
    return is_tuning(results), first.get(profile, 3), profile


def default_doc(out_dir: Path) -> Path:
    """``BENCHMARKS.md`` for results under ``benchmarks/``; else one beside the results."""
    base = _base(out_dir)
    return REPO / "BENCHMARKS.md" if base == BENCH_DIR.resolve() else base / "BENCHMARKS.md"


def document(out_dir: Path, doc: Path) -> str:
    """The document ``doc`` for every results file that belongs with ``out_dir``'s."""
    from scripts.bench import slow_peer

    extras = []
    slow = _base(out_dir) / slow_peer.RESULTS_FILE
    if slow.is_file():
        res = json.loads(slow.read_text())
        extras.append((slow, slow_peer.render_section(res, slow, doc.parent.resolve())))
    return render(find_results(out_dir, doc), doc.parent.resolve(), find_codecs(out_dir), extras)


def write_report(out_dir: Path, doc: Path) -> None:
    """Render and write the document (see :func:`document`)."""
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(document(out_dir, doc), encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: regenerate the document."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", help="one results.json (default: every one under benchmarks/)")
    p.add_argument("--out", help="the Markdown file (default: BENCHMARKS.md for benchmarks/)")
    args = p.parse_args(argv)
    res_dir = Path(args.results).resolve().parent if args.results else BENCH_DIR
    out = Path(args.out) if args.out else default_doc(res_dir)
    write_report(res_dir, out)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
