"""The tuning grid (issue 13): every setting tried, as a table and heat maps, best per family.

A tuning profile (``tune``, ``tune-long`` in :mod:`scripts.bench.profiles`) runs methods that
differ in the inner learning rate (``ilr<LR>``), the outer learning rate (``lr<LR>``), the
outer momentum (``m<M>``, Nesterov), H and the compression. This module reads them back out of
the method names, so the table and the heat maps show exactly what ran:

* :func:`grid_rows`: one row per method, with every setting spelled out (the task's value
  where the method does not set it) and the final loss against the best DP of the grid;
* :func:`plot_grid`: ``tuning_grid.png``: final loss against the inner learning rate (DP and
  DiLoCo at the task's outer optimizer), and one heat map (outer lr x outer momentum) per
  family (H, compression, inner lr) that has at least four outer settings;
* :func:`section`: the Markdown of a tuning profile in ``BENCHMARKS.md``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from scripts.bench.methods import parse_method  # noqa: E402

__all__ = ["best_rows", "grid_rows", "plot_grid", "section"]

_DPI = 110


def grid_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every method of a results file with its settings and final loss, best DP first.

    ``ratio`` is the final eval loss over the best DP row's (same seeds: the grid's seeds are
    shared by all of its runs), None without a DP row.
    """
    task = results["settings"]["task"]
    rows = []
    for name, q in results["aggregate"]["quality"].items():
        method = parse_method(name)
        opts = method.options
        dp = method.mode == "ddp"
        batch = int(opts.get("batch_size", task["batch_size"]))
        dp_family = "DP" if batch == int(task["batch_size"]) else f"DP batch {batch}"
        rows.append(
            {
                "method": name,
                "label": q["label"],
                "family": dp_family if dp else _family(opts),
                "batch": batch,
                "dp": dp,
                "sync_every": None if dp else opts["sync_every"],
                "compression": None if dp else opts["compression"],
                "inner_lr": float(opts.get("inner_lr", task["inner_lr"])),
                "outer_lr": None if dp else float(opts.get("outer_lr", task["outer_lr"])),
                "momentum": None
                if dp
                else float(opts.get("outer_momentum", task["outer_momentum"])),
                # Outer steps of the averaging-to-Nesterov ramp (0: none).
                "warmup": None
                if dp
                else int(opts.get("outer_warmup", task.get("outer_warmup", 0))),
                "loss": q["final_eval_loss"],
                "seeds": q["seeds"],
                "bytes_sent": q["bytes_sent"],
            }
        )
    dps = [r for r in rows if r["dp"]]
    best_dp = min(dps, key=lambda r: r["loss"]["mean"]) if dps else None
    for r in rows:
        r["ratio"] = r["loss"]["mean"] / best_dp["loss"]["mean"] if best_dp else None
    rows.sort(key=lambda r: (not r["dp"], r["family"], r["loss"]["mean"]))
    return rows


def _family(opts: dict[str, Any]) -> str:
    text = f"DiLoCo H={opts['sync_every']}"
    if int(opts.get("fragments", 1)) > 1:
        text += f" P={opts['fragments']}"
    if opts["compression"] != "none":
        text += f" {opts['compression']}"
    if "batch_size" in opts:
        text += f" batch {opts['batch_size']}"
    return text


def best_rows(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The lowest-loss row of each family."""
    best: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["family"] not in best or r["loss"]["mean"] < best[r["family"]]["loss"]["mean"]:
            best[r["family"]] = r
    return best


def _heat_groups(rows: list[dict[str, Any]]) -> dict[tuple[str, float], list[dict[str, Any]]]:
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in rows:
        if not r["dp"]:
            groups.setdefault((r["family"], r["inner_lr"]), []).append(r)
    return {
        k: v for k, v in groups.items() if len({(r["outer_lr"], r["momentum"]) for r in v}) >= 4
    }


def plot_grid(results: dict[str, Any], path: Path) -> bool:
    """Write ``tuning_grid.png``; False (nothing written) when there is no grid to draw."""
    rows = grid_rows(results)
    task = results["settings"]["task"]
    heat = _heat_groups(rows)
    scan = [
        r
        for r in rows
        if r["dp"]
        or (r["outer_lr"] == task["outer_lr"] and r["momentum"] == task["outer_momentum"])
    ]
    if not heat and len(scan) < 2:
        return False
    panels = 1 + len(heat)
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.6), squeeze=False)
    ax = axes[0][0]
    for family in dict.fromkeys(r["family"] for r in scan):
        pts = sorted((r["inner_lr"], r["loss"]["mean"]) for r in scan if r["family"] == family)
        if len(pts) > 1:
            ax.plot(*zip(*pts), marker="o", label=family)
    ax.set_xscale("log")
    ax.set_xlabel("inner (peak) learning rate")
    ax.set_ylabel("final eval loss (nats/byte)")
    ax.set_title(
        f"inner lr scan (DiLoCo: outer SGD lr {task['outer_lr']:g}, "
        f"Nesterov {task['outer_momentum']:g})",
        fontsize=9,
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    best_dp = min((r["loss"]["mean"] for r in rows if r["dp"]), default=None)
    for ax, ((family, inner), group) in zip(axes[0][1:], heat.items()):
        lrs = sorted({r["outer_lr"] for r in group})
        moms = sorted({r["momentum"] for r in group})
        grid = [[math.nan] * len(lrs) for _ in moms]
        for r in group:
            value = r["loss"]["mean"] / best_dp if best_dp else r["loss"]["mean"]
            grid[moms.index(r["momentum"])][lrs.index(r["outer_lr"])] = value
        image = ax.imshow(grid, origin="lower", cmap="viridis_r", aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=8, color="w")
        ax.set_xticks(range(len(lrs)), [f"{x:g}" for x in lrs])
        ax.set_yticks(range(len(moms)), [f"{x:g}" for x in moms])
        ax.set_xlabel("outer learning rate")
        ax.set_ylabel("outer Nesterov momentum")
        ax.set_title(
            f"{family}, inner lr {inner:g}: loss / best DP" if best_dp else family, fontsize=9
        )
        fig.colorbar(image, ax=ax, shrink=0.8)
    seeds = ",".join(map(str, results["settings"]["seeds"]))
    fig.suptitle(
        f"Tuning grid ({results['profile']} profile: {task['steps']} steps, seeds {seeds})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return True


def _fmt(value: float | None, fmt: str = "g") -> str:
    return "" if value is None else format(value, fmt)


def section(results: dict[str, Any], res_path: Path, doc_dir: Path) -> str:
    """The grid of a tuning profile: every run, best per family, and the heat maps."""
    rows = grid_rows(results)
    header = [
        "family", "name", "batch / worker", "inner lr", "outer lr", "outer momentum",
        "outer warm-up", "final eval loss", "÷ best DP",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    best = {id(r) for r in best_rows(rows).values()}
    for r in rows:
        loss = f"{r['loss']['mean']:.4f}"
        if r["loss"].get("std") is not None:
            loss += f" ± {r['loss']['std']:.4f}"
        cells = [
            r["family"],
            f"`{r['method']}`",
            _fmt(r["batch"]),
            _fmt(r["inner_lr"]),
            _fmt(r["outer_lr"]),
            _fmt(r["momentum"]),
            _fmt(r["warmup"]),
            f"**{loss}**" if id(r) in best else loss,
            _fmt(r["ratio"], ".4f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    parts = [
        "Every run of the grid, grouped by family (DP by batch; DiLoCo by H and "
        "compression), lowest loss first; the best of each family in bold. Settings a method "
        "does not name are the task's (see Settings). Every run trains on the same tokens: "
        "a DP run at another batch per worker takes the steps that make them up. `÷ best DP` "
        "divides by the best DP run of this grid (any batch), same seeds.",
        "\n".join(lines),
    ]
    plot = (results.get("plots") or {}).get("tuning_grid")
    if plot:
        rel = os.path.relpath(res_path.parent / plot, doc_dir)
        parts.append(f"![Tuning grid]({rel})")
    return "\n\n".join(parts)
