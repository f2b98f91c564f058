"""Print the README's benchmark tables from the suite's results.

Run from the repository root::

    .venv/bin/python -m scripts.bench.readme_table   # the streaming/compression table (default profile)
    .venv/bin/python -m scripts.bench.readme_table --headline   # the headline rows (headline profile)

Paste-free: the README sections are this output.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from scripts.bench import report

ROWS = [
    "ddp",
    "diloco-h20",
    "streaming-p4-h20-o1",
    "diloco-h20-int8",
    "diloco-h20-topk0.01",
    "diloco-h20-topk0.01-ef",
    "diloco-h20-topk0.01-ef0.95-m0",
]


def main(path: str = "benchmarks/results.json") -> str:
    results = json.loads(Path(path).read_text())
    agg = results["aggregate"]["quality"]
    lines = [
        f"Measured by `python -m scripts.bench.suite` (profile `{results['profile']}`; M=2 workers, "
        f"{agg['ddp']['num_params']:,}-parameter byte GPT, {agg['ddp']['steps']} inner steps, "
        f"seeds {agg['ddp']['seeds']}; printed by `python -m scripts.bench.readme_table`):",
        "",
        "| method | final eval loss | bytes sent per worker | peak bytes per sync |",
        "|---|---|---|---|",
    ]
    for name in ROWS:
        if name not in agg:
            continue
        a = agg[name]
        loss = a["final_eval_loss"]
        peak = a.get("peak_sync_bytes")
        est = " (ring estimate)" if a.get("bytes_sent_estimated") else ""
        lines.append(
            f"| {a['label']} | {loss['mean']:.4f} ± {loss['std']:.4f} | "
            f"{a['bytes_sent'] / 2**20:.2f} MiB{est} | "
            f"{'—' if not peak else f'{peak / 2**10:.0f} KiB'} |"
        )
    return "\n".join(lines)


def headline(path: str = "benchmarks/headline/results.json") -> str:
    """The headline profile's comparisons, as BENCHMARKS.md shows them."""
    results = json.loads(Path(path).read_text())
    s = results["settings"]
    intro = (
        f"Headline (`python -m scripts.bench.suite --profile {results['profile']}`: M={s['workers']} "
        f"workers, {s['task']['steps']:,} inner steps, seeds {s['seeds']}; printed by "
        "`python -m scripts.bench.readme_table --headline`):"
    )
    return intro + "\n\n" + report.headline_table(results)


if __name__ == "__main__":
    args = sys.argv[1:]
    print(headline(*args[1:]) if args[:1] == ["--headline"] else main(*args))
