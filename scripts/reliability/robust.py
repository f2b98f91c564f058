"""Robust aggregation measured: 4 swarm peers, 1 of them sending scaled noise every round.

Run from the repository root::

    .venv/bin/python -m scripts.reliability.robust                  # every case, ~10 minutes
    .venv/bin/python -m scripts.reliability.robust --cases clean,attack-mean

Each case is a swarm of 4 recipe processes on loopback (``lowcomm join ... --config tiny``)
with ``lowcomm join``'s default rounds, wall-clock deadlines (``--sync-clock auto``), so that
a peer slower than the others (the attacker, say) still lands in every round; under
``--sync-clock steps`` a peer that falls one round behind is left out of every later one
(measured: the attacker averaged alone in every round, and the attack never landed). In the ``attack-*`` cases the 4th peer is the recipe with
one thing changed: its backend replaces each pseudo-gradient it sends by noise with 5 times
its norm, coordinate by coordinate (``5·|Δ_i|`` with a random sign): inside the default
``norm_ratio`` of 10 in every slice, so only the aggregation rule can stop it. The cases:
``clean`` (4 honest peers, ``mean``), ``attack-mean``, ``attack-trimmed_mean``,
``attack-centered_clip``, and ``clean-trimmed_mean`` / ``clean-centered_clip`` (what a robust
rule costs without an attacker). Reported: the honest peers' eval loss curves, and the final
loss (the mean over the honest peers of their last ``--final-evals`` evaluations) against
the clean run's. Results: ``benchmarks/reliability/robust.json`` (``--out``).

``python -m scripts.reliability.robust byzantine join ...`` is the attacking peer itself
(``lowcomm join`` with that backend), which the harness starts.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from scripts.reliability import RESULTS_DIR
from scripts.reliability.swarm import LoopbackSwarm, exit_on_sigterm, read_records

__all__ = ["CASES", "main", "noisy_backend", "run_case"]

CASES = (
    "clean",
    "attack-mean",
    "attack-trimmed_mean",
    "attack-centered_clip",
    "clean-trimmed_mean",
    "clean-centered_clip",
)
#: The attacker's noise, in multiples of its honest pseudo-gradient, coordinate by coordinate.
SCALE = 5.0


def noisy_backend(backend: Any) -> Any:
    """``backend`` (a ``HivemindBackend``) turned attacker: every contribution it sends is
    ``SCALE·|Δ_i|`` with a random sign per coordinate (seeded by the round)."""
    from lowcomm.comm.hivemind import HivemindBackend

    class NoisyBackend(HivemindBackend):
        def average(self, flat: torch.Tensor, **kw: Any) -> Any:  # type: ignore[override]
            g = torch.Generator().manual_seed(int(kw.get("step") or 0))
            signs = torch.randint(0, 2, flat.shape, generator=g).to(flat) * 2 - 1
            return super().average(flat.abs() * signs * SCALE, **kw)

    backend.__class__ = NoisyBackend  # the same object, one method changed
    return backend


def _byzantine(argv: list[str]) -> int:
    """``lowcomm join`` whose backend is :func:`noisy_backend`'s."""
    from lowcomm import cli
    from lowcomm.recipes import train_lm

    honest = train_lm.make_backend

    def make_backend(cfg: Any) -> Any:
        backend = honest(cfg)
        return noisy_backend(backend) if backend is not None else None

    train_lm.make_backend = make_backend  # type: ignore[assignment]
    return cli.main(argv)


def run_case(
    case: str,
    work_dir: Path,
    *,
    steps: int,
    sync_every: int,
    eval_every: int,
    timeout: float,
    sync_clock: str = "auto",
) -> dict[str, Any]:
    """One swarm of 4 peers until each has taken ``steps`` inner steps; its eval curves."""
    if work_dir.exists():
        shutil.rmtree(work_dir)  # a case's files are its own run's only
    attack = case.startswith("attack")
    aggregation = case.split("-", 1)[1] if "-" in case else "mean"
    swarm = LoopbackSwarm(work_dir, run_id=f"robust-{case}-{int(time.time())}")
    options = [
        "--config", "tiny", "--steps", str(steps), "--sync-clock", sync_clock,
        "--sync-every", str(sync_every), "--round-seconds", "3", "--aggregation", aggregation,
        "--wait-for-peers", "4", "--eval-every", str(eval_every), "--eval-batches", "8",
        "--log-every", str(sync_every), "--ckpt-every", "0",
    ]  # fmt: skip
    t0 = time.time()
    try:
        swarm.start_dht()
        peers = [
            swarm.start_peer(
                slot,
                options,
                entry=["-m", "scripts.reliability.robust", "byzantine"]
                if attack and slot == 3
                else None,
            )
            for slot in range(4)
        ]
        while any(p.proc.poll() is None for p in peers):
            if time.time() - t0 > timeout:
                raise TimeoutError(f"case {case} ran past {timeout}s; see {work_dir / 'logs'}")
            time.sleep(1.0)
        for p in peers:
            p.poll()
    finally:
        swarm.close(graceful=False)
    honest = peers[:3] if attack else peers
    curves, group_sizes = {}, []
    for p in honest:
        records, _ = read_records(p.run_dir / "metrics.jsonl")
        curves[p.name] = [[r["step"], r["eval/loss"]] for r in records if "eval/loss" in r]
        group_sizes += [r["swarm/peers"] for r in records if "swarm/peers" in r]
    attacker_log = work_dir / "logs" / f"{peers[3].name}.log"
    logs = "".join(
        (work_dir / "logs" / f"{p.name}.log").read_text(errors="replace") for p in honest
    )
    return {
        "case": case,
        "aggregation": aggregation,
        "attack": attack,
        "returncodes": [p.returncode for p in peers],
        "wall_s": round(time.time() - t0, 1),
        "curves": curves,
        # Parts the reducers refused (norm bounds): the attack is meant to pass them.
        "dropped_warnings": logs.count("were dropped from parts of the average"),
        "alone_rounds": logs.count("averaging alone"),
        # Did the attacker land in the honest peers' averages? Their rounds by group size.
        "honest_group_sizes": {n: group_sizes.count(n) for n in sorted(set(group_sizes))},
        "attacker_alone_rounds": attacker_log.read_text(errors="replace").count("averaging alone"),
    }


def _final(case: dict[str, Any], last: int) -> float | None:
    points = [loss for curve in case["curves"].values() for _, loss in curve[-last:]]
    return sum(points) / len(points) if points else None


def main(argv: list[str] | None = None) -> int:
    """Run the cases; write the results; exit 1 if a case failed to run."""
    exit_on_sigterm()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["byzantine"]:
        return _byzantine(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m scripts.reliability.robust", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--cases", default=",".join(CASES), help=f"of {', '.join(CASES)}")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--sync-clock", default="auto", help="auto (deadline rounds) or steps")
    parser.add_argument("--sync-every", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--final-evals", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per case")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/reliability/robust"))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "robust.json")
    args = parser.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {', '.join(CASES)}")
    results: dict[str, Any] = {
        "command": "python -m scripts.reliability.robust " + " ".join(argv),
        "steps": args.steps,
        "sync_every": args.sync_every,
        "sync_clock": args.sync_clock,
        "scale": SCALE,
        "final_evals": args.final_evals,
        "cases": {},
    }
    failed = False
    for case in cases:
        for attempt in range(3):
            out = run_case(
                case,
                args.work_dir / case,
                steps=args.steps,
                sync_every=args.sync_every,
                eval_every=args.eval_every,
                timeout=args.timeout,
                sync_clock=args.sync_clock,
            )
            out["attempts"] = attempt + 1
            # A peer that failed to start (on a loaded machine: its DHT did not come up
            # within the 2 s a peer with its own config waits) makes the case void: again.
            if all(rc == 0 for rc in out["returncodes"]):
                break
        out["final_loss"] = _final(out, args.final_evals)
        failed |= any(rc != 0 for rc in out["returncodes"])
        results["cases"][case] = out
        print(f"robust: {case}: final loss {out['final_loss']}, {out['wall_s']}s", flush=True)
    clean = results["cases"].get("clean", {}).get("final_loss")
    for out in results["cases"].values():
        final = out["final_loss"]
        out["gap_percent"] = (
            100.0 * (final - clean) / clean if clean and final is not None else None
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    for case, out in results["cases"].items():
        print(f"robust: {case:22s} final loss {out['final_loss']}  vs clean {out['gap_percent']}%")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
