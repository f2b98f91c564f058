"""The peer baselines' shared command line: options, the run's config, the summary output.

Exit codes of every peer command: 0 on success, 1 when the run fails or times out (every
child is killed), 2 when the library is not importable (:func:`library_missing`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from lowcomm.config import TrainConfig, load_config
from scripts.bench.peers.workers import ProcessWorker

__all__ = [
    "build_config",
    "cli",
    "library_missing",
    "parse_args",
    "process_worker",
    "threads",
    "write_summary",
]

logger = logging.getLogger(__name__)

# What the peers run is plain DiLoCo in fp32 on CPU: lowcomm's layers on top are not compared.
_NOT_IN_PEERS = {
    "fragments": 1,
    "overlap_steps": 0,
    "compression": "none",
    "error_feedback": False,
    "dtype": "fp32",
}


def library_missing(library: str, error: ImportError, install: str) -> NoReturn:
    """Say that ``library`` is not importable in this interpreter and how to get it; exit 2."""
    print(f"{library} is not importable in {sys.executable} ({error}); {install}", file=sys.stderr)
    raise SystemExit(2)


def parse_args(
    argv: list[str] | None,
    description: str,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """The peer commands' common options; unset values come from ``--config``.

    Args:
        argv: the arguments (None: ``sys.argv[1:]``).
        description: the ``--help`` text.
        add_arguments: ``f(parser)`` adding a command's own options.
    """
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", help="a lowcomm TOML config (model, data, inner optimizer)")
    p.add_argument("--workers", type=int, default=2, help="number of worker processes (M)")
    p.add_argument("--steps", type=int, help="inner steps per worker (default: config)")
    p.add_argument("--sync-every", type=int, default=25, help="H, inner steps per outer step")
    p.add_argument("--batch-size", type=int, help="sequences per worker per step")
    p.add_argument("--seq-len", type=int, help="bytes per sequence")
    p.add_argument("--seed", type=int, help="run seed (model init and batches)")
    p.add_argument("--eval-every", type=int, help="inner steps between evaluations")
    p.add_argument("--threads", type=int, help="torch threads per worker (default 1, as torchrun)")
    p.add_argument("--out", required=True, help="JSON-lines output file (overwritten)")
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds the workers may take, from fork to their last result (then all are killed)",
    )
    p.add_argument("--verbose", action="store_true", help="show the library's own INFO logs")
    p.add_argument(
        "--rank",
        type=int,
        help="run only this worker, in this process (one process per worker, e.g. one per "
        "network namespace; every worker gets the same --rendezvous); default: fork them all",
    )
    p.add_argument(
        "--rendezvous",
        help="with --rank: a directory every worker sees (messages, barriers, results; also "
        "each worker's worker<R>.json and timeline)",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="with --rank: this worker's address, which the others reach it at",
    )
    if add_arguments is not None:
        add_arguments(p)
    args = p.parse_args(argv)
    for name in ("workers", "steps", "sync_every", "batch_size", "seq_len", "eval_every"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} ({value}) must be >= 1")
    if not args.timeout > 0:
        p.error(f"--timeout ({args.timeout}) must be > 0")
    if args.rank is not None:
        if not 0 <= args.rank < args.workers:
            p.error(f"--rank ({args.rank}) must be in [0, --workers ({args.workers}))")
        if not args.rendezvous:
            p.error("--rank needs --rendezvous (a directory every worker sees)")
    return args


def process_worker(args: argparse.Namespace) -> ProcessWorker:
    """This process's worker for ``--rank`` (rank 0 writes the evaluations to ``--out``)."""
    return ProcessWorker(
        args.rank,
        args.workers,
        op_timeout(args),
        Path(args.rendezvous),
        Path(args.out) if args.rank == 0 else None,
    )


def build_config(args: argparse.Namespace) -> TrainConfig:
    """The lowcomm ``TrainConfig`` of this run: ``--config`` plus the command-line overrides."""
    argv = ["--config", args.config] if args.config else []
    overrides = {
        "steps": args.steps,
        "sync_every": args.sync_every,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "seed": args.seed,
        "eval_every": args.eval_every,
    }
    for key, value in overrides.items():
        if value is not None:
            argv += [f"--{key}", str(value)]
    cfg = load_config(argv)
    differ = {k: getattr(cfg, k) for k, v in _NOT_IN_PEERS.items() if getattr(cfg, k) != v}
    if differ:
        logger.warning("ignoring config settings the peer baselines do not have: %s", differ)
    return cfg


def threads(args: argparse.Namespace) -> int:
    """torch threads per worker: ``--threads``, else ``OMP_NUM_THREADS``, else 1."""
    return int(args.threads or os.environ.get("OMP_NUM_THREADS", "1"))


def op_timeout(args: argparse.Namespace) -> float:
    """Seconds any one wait of a worker for another may take (within ``--timeout``)."""
    return max(10.0, min(args.timeout, 120.0))


def write_summary(out: str, summary: dict[str, Any]) -> dict[str, Any]:
    """Append ``summary`` to the JSONL file ``out``, print it (less the config), return it."""
    with open(out, "a", encoding="utf-8") as f:
        f.write(json.dumps(summary) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=1))
    return summary


def cli(main: Callable[[], Any]) -> None:
    """Run a peer command's ``main()``: logging on, exit 1 with the message on a configuration
    or run error."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        main()
    except (RuntimeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
