"""Plots of a benchmark run (matplotlib, Agg backend), from the suite's results dict.

Run (regenerates the PNGs next to a results file)::

    .venv/bin/python -m scripts.bench.plots benchmarks/results.json

Figures, each from ``results["aggregate"]`` (and the peers' runs):

* ``loss_vs_tokens.png``: mean eval loss over seeds against training tokens (all workers),
  a band of one standard deviation; peers dashed.
* ``loss_vs_bytes.png``: the same losses against the bytes each worker sent so far (log x).
  DP's and the peers' bytes are estimates (marked "est." in the legend).
* ``loss_gap.png``: each method's eval loss divided by DP's at the same step (paired by
  seed), against steps: the gap as a function of training length, not one point.
* ``throughput_vs_rate.png``: tokens/s as a fraction of the no-communication ceiling
  measured in the same run, against the link rate (unshaped links at the right).
* ``frontier.png``: final loss / DP's against DP bytes / method bytes (log x), every method,
  peer and seed as a point, and the published anchor points drawn apart, labelled as
  references at another scale.
* ``tuning_grid.png`` (tuning profiles only): :func:`scripts.bench.grid.plot_grid`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from scripts.bench import grid  # noqa: E402
from scripts.bench.aggregate import baseline_of  # noqa: E402

__all__ = ["is_tuning", "make_plots"]

_DPI = 110
_SIZE = (11.0, 5.2)


def _bytes_label(value: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while value >= 1024 and i < len(units) - 1:
        value /= 1024
        i += 1
    return f"{value:.3g} {units[i]}"


def _colors(names: list[str]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    return {n: cmap(i % cmap.N) for i, n in enumerate(names)}


def _legend(ax: Axes) -> None:
    # Outside the axes: with many methods an inside legend hides the curves it names.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _band(ax: Axes, xs: list[float], point_stats: list[dict[str, Any]], color: Any) -> None:
    means = [p["mean"] for p in point_stats]
    stds = [p["std"] or 0.0 for p in point_stats]
    if any(stds):
        lo = [m - s for m, s in zip(means, stds)]
        hi = [m + s for m, s in zip(means, stds)]
        ax.fill_between(xs, lo, hi, color=color, alpha=0.15, linewidth=0)


def _ylim_from_curves(ax: Axes, values: list[float]) -> None:
    # The first evaluation (ln 256 = 5.5 nats at init) would squash every difference that
    # matters; zoom on the part after the first quarter of training, where methods separate.
    if len(values) >= 4:
        lo, hi = min(values), max(values)
        ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))


def _title(results: dict[str, Any], what: str) -> str:
    task = results["settings"]["task"]
    m = results["settings"]["workers"]
    return (
        f"{what} ({results['profile']} profile: {task['n_layer']}x{task['n_embd']} GPT, "
        f"M={m}, {task['steps']} steps, seeds {','.join(map(str, results['settings']['seeds']))})"
    )


def _late(curve: list[dict[str, Any]]) -> list[float]:
    cut = max(1, len(curve) // 4)
    return [p["loss"]["mean"] for p in curve[cut:]]


def _finish(
    fig: Any, ax: Any, path: Path, xlabel: str, ylabel: str, title: str, log_grid: bool = False
) -> None:
    """Label, grid and legend a panel, write it to ``path`` and free the figure."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both" if log_grid else "major")
    _legend(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)


def plot_loss_vs_tokens(results: dict[str, Any], path: Path) -> None:
    """Mean eval loss against tokens, per method and peer."""
    quality = results["aggregate"]["quality"]
    peers = results["aggregate"]["peers"]
    colors = _colors(list(quality) + list(peers))
    fig, ax = plt.subplots(figsize=_SIZE)
    late: list[float] = []
    for name, q in quality.items():
        xs = [p["tokens"] for p in q["curve"]]
        stats = [p["loss"] for p in q["curve"]]
        ax.plot(xs, [s["mean"] for s in stats], label=q["label"], color=colors[name], lw=1.6)
        _band(ax, xs, stats, colors[name])
        late += _late(q["curve"])
    for name, p in peers.items():
        xs = [c["tokens"] for c in p["curve"]]
        stats = [c["loss"] for c in p["curve"]]
        label = f"{name} {p['version']} (H={p['sync_every']})"
        ax.plot(xs, [s["mean"] for s in stats], ls="--", label=label, color=colors[name], lw=1.4)
        _band(ax, xs, stats, colors[name])
        late += _late(p["curve"])
    _ylim_from_curves(ax, late)
    _finish(
        fig,
        ax,
        path,
        "training tokens (all workers)",
        "eval loss (nats/byte), mean ± std over seeds",
        _title(results, "Eval loss vs tokens"),
    )


def plot_loss_vs_bytes(results: dict[str, Any], path: Path) -> None:
    """Mean eval loss against cumulative bytes sent per worker (log x)."""
    quality = results["aggregate"]["quality"]
    peers = results["aggregate"]["peers"]
    colors = _colors(list(quality) + list(peers))
    fig, ax = plt.subplots(figsize=_SIZE)
    late: list[float] = []
    for name, q in quality.items():
        pts = [p for p in q["curve"] if p["bytes_sent"] > 0]
        if not pts:
            continue
        label = q["label"] + (" (est.)" if q["bytes_sent_estimated"] else "")
        ax.plot(
            [p["bytes_sent"] for p in pts],
            [p["loss"]["mean"] for p in pts],
            marker="o",
            ms=2.5,
            label=label,
            color=colors[name],
            lw=1.4,
        )
        late += _late(pts)
    for name, p in peers.items():
        total, rounds = p["bytes_sent_estimate"], p["curve"][-1]["averaging_rounds"]
        if not total or not rounds:
            continue
        pts = [c for c in p["curve"] if c["averaging_rounds"] > 0]
        ax.plot(
            [total * c["averaging_rounds"] / rounds for c in pts],
            [c["loss"]["mean"] for c in pts],
            ls="--",
            marker="x",
            ms=3,
            color=colors[name],
            label=f"{name} {p['version']} (est.)",
        )
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _bytes_label(v)))
    _ylim_from_curves(ax, late)
    _finish(
        fig,
        ax,
        path,
        "bytes sent per worker so far (log scale)",
        "eval loss (nats/byte), mean over seeds",
        _title(results, "Eval loss vs bytes on the wire"),
        log_grid=True,
    )


def plot_loss_gap(results: dict[str, Any], path: Path) -> None:
    """Eval loss / DP eval loss at the same tokens (paired by seed), against training tokens
    (a method at another batch, ``bs<B>``, reaches them at other steps)."""
    quality = results["aggregate"]["quality"]
    colors = _colors(list(quality))
    fig, ax = plt.subplots(figsize=_SIZE)
    for name, q in quality.items():
        if name == baseline_of(results):
            continue
        pts = [p for p in q["curve"] if p["ratio_to_baseline"] is not None and p["step"] > 0]
        if not pts:
            continue
        xs = [p["tokens"] for p in pts]
        stats = [p["ratio_to_baseline"] for p in pts]
        ax.plot(xs, [s["mean"] for s in stats], label=q["label"], color=colors[name], lw=1.5)
        _band(ax, xs, stats, colors[name])
    ax.axhline(1.0, color="black", lw=0.8, ls=":", label="DP")
    ax.set_yscale("log")
    _finish(
        fig,
        ax,
        path,
        "training tokens (all workers)",
        "eval loss / DP eval loss (same seed, same tokens), log scale",
        _title(results, "Loss gap to DP vs tokens"),
        log_grid=True,
    )


def plot_throughput(results: dict[str, Any], path: Path) -> None:
    """tokens/s / ceiling against link rate; unshaped and loopback at the right."""
    blocks = results["aggregate"]["throughput"]
    shaped = sorted((b for b in blocks.values() if b["rate_bps"]), key=lambda b: b["rate_bps"])
    top = max((b["rate_bps"] for b in shaped), default=1e8)
    xs_of: dict[str, float] = {b["rate"]: b["rate_bps"] for b in shaped}
    extra = [r for r in blocks if r not in xs_of]
    for i, rate in enumerate(extra):
        xs_of[rate] = top * 10 ** (1 + i)
    names: list[str] = []
    for b in blocks.values():
        names += [n for n in b["methods"] if n not in names]
    colors = _colors(names)
    fig, ax = plt.subplots(figsize=_SIZE)
    order = sorted(blocks, key=lambda r: xs_of[r])
    for name in names:
        cells = [
            (xs_of[r], blocks[r]["methods"][name])
            for r in order
            if name in blocks[r]["methods"]
            and blocks[r]["methods"][name]["ratio_to_ceiling"] is not None
        ]
        if cells:
            xs = [x for x, _ in cells]
            ys = [c["ratio_to_ceiling"] for _, c in cells]
            # The spread over passes: from the smallest paired ratio to the largest.
            lo = [y - (c.get("ratio") or {}).get("min", y) for y, (_, c) in zip(ys, cells)]
            hi = [(c.get("ratio") or {}).get("max", y) - y for y, (_, c) in zip(ys, cells)]
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", label=cells[0][1]["label"],
                        color=colors[name], lw=1.5, capsize=3)  # fmt: skip
    ax.axhline(1.0, color="black", lw=0.8, ls=":", label="ceiling (no communication)")
    ax.set_xscale("log")
    ax.set_xticks([xs_of[r] for r in order])
    ax.set_xticklabels([f"{r}\n(veth, no tbf)" if r == "unshaped" else r for r in order])
    ax.minorticks_off()
    ax.set_ylim(0, max(1.15, ax.get_ylim()[1]))
    _finish(
        fig,
        ax,
        path,
        "link rate per direction (tbf-shaped veth per worker)",
        "tokens/s ÷ ceiling (median over passes; bars: smallest to largest)",
        _title(results, "Throughput vs link rate"),
    )


#: Colours of the timeline's span kinds (lowcomm.comm.timeline.KINDS).
_KIND_COLORS = {
    "compute": "#4c72b0",
    "prepare": "#dd8452",
    "apply": "#937860",
    "wait": "#c44e52",
    "encode": "#8172b3",
    "wire": "#55a868",
    "decode": "#da8bc3",
}


def plot_timelines(results: dict[str, Any], path: Path) -> None:
    """One panel per drawn throughput cell: per worker, the training loop's lane and the comm
    thread's, each span a bar coloured by kind (inner spans drawn over outer ones)."""
    cuts = results["aggregate"]["timelines"]
    fig, axes = plt.subplots(len(cuts), 1, figsize=(12.0, 1.2 + 1.6 * len(cuts)), squeeze=False)
    kinds = list(_KIND_COLORS)
    for ax, cut in zip(axes[:, 0], cuts):
        lanes: list[tuple[int, str]] = []
        for w, spans in enumerate(cut["workers"]):
            for lane in dict.fromkeys(s["lane"] for s in spans):
                lanes.append((w, lane))
        lanes.sort(key=lambda x: (x[0], x[1] != "train", x[1]))
        index = {key: i for i, key in enumerate(lanes)}
        for w, spans in enumerate(cut["workers"]):
            # Longer spans first, so a wait inside a sync's start is drawn over it.
            for s in sorted(spans, key=lambda s: s["start"] - s["end"]):
                y = index[(w, s["lane"])]
                ax.broken_barh([(s["start"], s["end"] - s["start"])], (y - 0.4, 0.8),
                               color=_KIND_COLORS.get(s["kind"], "grey"), linewidth=0)  # fmt: skip
        ax.set_yticks(range(len(lanes)))
        ax.set_yticklabels([f"worker {w} {lane}" for w, lane in lanes], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, cut["seconds"])
        blocked = cut.get("blocked_fraction")
        ratio = cut.get("ratio_to_ceiling")
        ax.set_title(
            f"{cut['label']} at {cut['rate']} (pass {cut['repeat']}): "
            f"{'n/a' if ratio is None else f'{ratio:.3f}'} of the ceiling, blocked "
            f"{'n/a' if blocked is None else f'{blocked:.3f}'}",
            fontsize=9,
        )
        ax.grid(alpha=0.3, axis="x")
    axes[-1, 0].set_xlabel("seconds from the window's start (just before a sync)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=_KIND_COLORS[k]) for k in kinds]
    fig.legend(handles, kinds, loc="upper center", ncol=len(kinds), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)


# Published points (Douillard et al. 2025, "Streaming DiLoCo with overlapping communication":
# 35M parameters on C4), as the issue quotes them: (label, DP bytes / method bytes, loss / DP).
# The byte ratio is H for an fp32 outer step (one all-reduce per H steps) and 8H for FP4.
ANCHORS = (
    ("DiLoCo M=2 H=30, fp32", 30.0, 1.009),
    ("Streaming DiLoCo M=2 H=30, FP4", 240.0, 1.006),
    ("DiLoCo M=4 H=100 (x: fp32 assumed)", 100.0, 1.037),
)


def frontier_points(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every method's and peer's runs as (byte ratio, loss ratio) points, paired by seed.

    x is DP's bytes per worker over the method's; y the method's final eval loss over DP's
    with the same seed. Empty without a DP run.
    """
    quality = results["aggregate"]["quality"]
    base = baseline_of(results)
    dp = quality.get(base)
    if dp is None:
        return []
    dp_loss = dict(zip(dp["seeds"], dp["final_eval_loss"]["values"]))
    points = []
    for name, q in quality.items():
        if name == base or not q["bytes_sent"]:
            continue
        for seed, loss in zip(q["seeds"], q["final_eval_loss"]["values"]):
            if seed in dp_loss:
                points.append(
                    {"name": name, "label": q["label"], "seed": seed, "peer": False,
                     "x": dp["bytes_sent"] / q["bytes_sent"], "y": loss / dp_loss[seed]}
                )  # fmt: skip
    for run in results["runs"].get("peers", []):
        est = run["summary"].get("bytes_sent_ring_estimate") or run["summary"].get(
            "bytes_sent_estimate"
        )
        if est and run["seed"] in dp_loss:
            points.append(
                {"name": run["library"], "label": f"{run['library']} (bytes est.)",
                 "seed": run["seed"], "peer": True, "x": dp["bytes_sent"] / est,
                 "y": run["summary"]["final_eval_loss"] / dp_loss[run["seed"]]}
            )  # fmt: skip
    return points


def plot_frontier(results: dict[str, Any], path: Path) -> None:
    """Loss ratio to DP against DP bytes / method bytes (log x): every method and seed."""
    points = frontier_points(results)
    names = list(dict.fromkeys(p["name"] for p in points))
    colors = _colors(names)
    fig, ax = plt.subplots(figsize=_SIZE)
    for name in names:
        pts = [p for p in points if p["name"] == name]
        ax.scatter(
            [p["x"] for p in pts],
            [p["y"] for p in pts],
            s=22,
            marker="x" if pts[0]["peer"] else "o",
            color=colors[name],
            label=pts[0]["label"],
        )
    ax.scatter(
        [a[1] for a in ANCHORS],
        [a[2] for a in ANCHORS],
        s=70,
        marker="*",
        facecolors="none",
        edgecolors="dimgray",
        label="published, OTHER SCALE (35M params, C4; Douillard et al. 2025)",
    )
    for label, x, y in ANCHORS:
        ax.annotate(label, (x, y), fontsize=7, color="dimgray", xytext=(4, 4),
                    textcoords="offset points")  # fmt: skip
    ax.axhline(1.0, color="black", lw=0.8, ls=":", label="DP")
    ax.set_xscale("log")
    _finish(
        fig,
        ax,
        path,
        "DP bytes / method bytes per worker (log scale; higher sends less)",
        "final eval loss / DP's (same seed)",
        _title(results, "Quality per byte: every method and seed"),
        log_grid=True,
    )


def make_plots(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write every plot the results have data for; returns name -> path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    made: dict[str, Path] = {}
    agg = results["aggregate"]
    jobs = []
    if agg["quality"]:
        jobs += [
            ("loss_vs_tokens", plot_loss_vs_tokens),
            ("loss_vs_bytes", plot_loss_vs_bytes),
        ]
        if baseline_of(results) in agg["quality"] and len(agg["quality"]) > 1:
            jobs += [("loss_gap", plot_loss_gap), ("frontier", plot_frontier)]
    if agg["throughput"]:
        jobs.append(("throughput_vs_rate", plot_throughput))
    if agg.get("timelines"):
        jobs.append(("timelines", plot_timelines))
    for name, fn in jobs:
        path = out_dir / f"{name}.png"
        fn(results, path)
        made[name] = path
    if is_tuning(results) and grid.plot_grid(results, out_dir / "tuning_grid.png"):
        made["tuning_grid"] = out_dir / "tuning_grid.png"
    return made


def is_tuning(results: dict[str, Any]) -> bool:
    """Whether a results file is a tuning grid (``tune*`` profiles), not a comparison."""
    return str(results["profile"]).startswith("tune")


if __name__ == "__main__":
    src = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results.json")
    for name, p in make_plots(json.loads(src.read_text()), src.parent).items():
        print(name, p)
