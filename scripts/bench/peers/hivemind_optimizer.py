"""Peer baseline: hivemind 1.1.12's ``Optimizer(use_local_updates=True)`` on lowcomm's task.

Run from the repository root, in the project venv (which has hivemind)::

    .venv/bin/python -m scripts.bench.peers.hivemind_optimizer \\
        --config recipes/configs/tiny.toml --workers 2 --steps 100 --sync-every 25 \\
        --out runs/peers/hivemind.jsonl

What it runs: ``--workers`` M forked processes (:mod:`scripts.bench.peers.workers`), each with
its own hivemind DHT on loopback (worker 0 bootstraps, the others join it through its visible
multiaddrs), training with the shared loop (:mod:`scripts.bench.peers.loop`: the recipe's
model, AdamW, warm-up/cosine schedule and batches; the schedule is stepped per local step by
the loop, not by hivemind, whose scheduler would step once per epoch). The AdamW is wrapped in ``hivemind.Optimizer(use_local_updates=True,
target_batch_size=M*H*batch_size, batch_size_per_step=batch_size)``.

What hivemind's outer step is (read from hivemind 1.1.12's ``optim/optimizer.py``,
``optim/state_averager.py`` and ``optim/progress_tracker.py``), against DiLoCo's:

* Every ``opt.step()`` runs the local AdamW step on local gradients (never averaged) and reports
  ``batch_size`` more samples to the DHT.
* An *epoch* ends when the swarm's sample count, as each worker estimates it, reaches
  ``target_batch_size``: the estimate adds to the samples peers last reported an extrapolation
  ``(now - report_time) * samples_per_second``, and a worker also moves on when that
  estimate's ETA has passed. So epochs are keyed to time and throughput estimates, not to step
  counts, and time spent blocked (matchmaking, averaging, evaluation) counts as progress. With
  H=``--sync-every`` this is *not* "every H steps"; ``averaging_rounds`` records what happened.
* At an epoch end the workers that find each other (matchmaking, ``--matchmaking-time``)
  all-reduce their *parameters* (butterfly all-reduce, fp32, equal weights) and replace them
  with the mean. That is DiLoCo with outer SGD lr=1 and no momentum (model averaging, "local
  SGD"): hivemind has no outer optimizer on the pseudo-gradient, so outer Nesterov SGD
  (lr 0.7, momentum 0.9) cannot be reproduced. AdamW state stays local, as in DiLoCo.
* ``--delay-averaging`` (hivemind's default, ``delay_state_averaging=True``) averages in a
  background thread from a snapshot and later applies ``mean - own snapshot`` as a delta on
  top of the steps taken meanwhile; without it (this script's default, the closest to lowcomm's
  DiLoCo with ``overlap_steps=0``) the worker blocks until the average has been applied.
* At construction hivemind runs a virtual AdamW step with zero gradients to create the
  optimizer state; it applies one step of weight decay and counts one Adam step. The script
  undoes both (parameters restored, step counts zeroed; the moments are zero anyway).
* A worker that finds itself behind the swarm's epoch downloads the state from a peer
  (``load_state_from_peers``) and skips that step's update; ``state_downloads`` counts these.

Measured and written to ``--out`` (JSON lines): the shared loop's evaluation records, by
rank 0 on *its own local* parameters (hivemind keeps no global copy), with
``averaging_rounds`` and ``epoch``; then a summary line. ``averaging_rounds`` counts state-averaging all-reduces that completed with at
least two peers (counted on the averager's ``StepControl`` futures); ``epochs`` counts epoch
transitions. ``final_eval_loss_mean_of_workers`` evaluates the mean of the workers' final
parameters (computed by this script, outside hivemind). ``bytes_sent`` is null: hivemind
exposes no byte counter; ``bytes_sent_estimate`` is rounds * 2(M-1)/M * 4 * params (the
butterfly all-reduce payload, without protobuf/libp2p framing, DHT traffic or state downloads).

Exit codes: 0 on success, 1 when the run fails or times out (every child, including the DHT
and averager processes and p2pd daemons, is killed), 2 when hivemind is not importable.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowcomm.config import TrainConfig
from scripts.bench.peers import command, loop
from scripts.bench.peers.workers import Worker, run_one_worker, run_workers

# hivemind reads its log level once, at import; --verbose raises it afterwards.
os.environ.setdefault("HIVEMIND_LOGLEVEL", "WARNING")
try:
    import hivemind
    from hivemind.averaging.averager import DecentralizedAverager
    from hivemind.optim.state_averager import TrainingStateAverager
except ImportError as e:
    command.library_missing("hivemind", e, "pip install 'lowcomm[hivemind]' (hivemind==1.1.12)")

LIBRARY = "hivemind"
DESCRIPTION = "hivemind 1.1.12 Optimizer(use_local_updates=True) on lowcomm's task (peer baseline)"


class CountingAverager(DecentralizedAverager):
    """Sits between TrainingStateAverager and DecentralizedAverager in the MRO, so that the
    ``super().step(...)`` calls by which hivemind starts (or pre-schedules) every state
    averaging round go through here; each round's future is counted when it resolves."""

    def _init_counters(self) -> None:
        self.rounds_ok = 0
        self.rounds_failed = 0
        self.group_sizes: list[int] = []
        self._count_lock = threading.Lock()

    def step(self, *args: Any, **kwargs: Any) -> Any:
        control = super().step(*args, **kwargs)
        if hasattr(control, "add_done_callback"):
            control.add_done_callback(self._count)
        return control

    def _count(self, future: Any) -> None:
        try:
            gathered = None if future.cancelled() else future.result(0)
        except BaseException:
            gathered = None
        with self._count_lock:
            if isinstance(gathered, dict) and len(gathered) >= 2:
                self.rounds_ok += 1
                self.group_sizes.append(len(gathered))
            elif not future.cancelled():
                # Cancelled futures are pre-scheduled groups hivemind did not use.
                self.rounds_failed += 1


class CountingStateAverager(TrainingStateAverager, CountingAverager):
    """hivemind's TrainingStateAverager with the round counters of CountingAverager."""

    def __init__(self, **kwargs: Any) -> None:
        self._init_counters()
        super().__init__(**kwargs)


class CountingOptimizer(hivemind.Optimizer):
    """hivemind.Optimizer with a counting state averager; counts state downloads."""

    state_downloads = 0

    def _make_state_averager(self, **kwargs: Any) -> TrainingStateAverager:
        # hivemind 1.1.12's Optimizer._make_state_averager, with the counting class.
        return CountingStateAverager(
            dht=self.dht,
            prefix=f"{self.run_id}_state_averager",
            min_matchmaking_time=self.matchmaking_time,
            allreduce_timeout=self.allreduce_timeout,
            shutdown_timeout=self.shutdown_timeout,
            offload_optimizer=self.offload_optimizer,
            custom_gradients=self.offload_optimizer,
            status_loglevel=self.status_loglevel,
            next_chunk_timeout=self.next_chunk_timeout,
            client_mode=self.client_mode,
            auxiliary=self.auxiliary,
            start=True,
            **kwargs,
        )

    def load_state_from_peers(self, **kwargs: Any) -> None:
        self.state_downloads += 1
        super().load_state_from_peers(**kwargs)


class HivemindPeer:
    """``hivemind.Optimizer(use_local_updates=True)`` (a :class:`~loop.PeerOptimizer`)."""

    def __init__(self, opt: CountingOptimizer) -> None:
        self._opt = opt
        self._averager: CountingStateAverager = opt.state_averager

    def step(self) -> None:
        self._opt.step()  # local AdamW step; at an epoch end, also the parameter averaging

    def zero_grad(self) -> None:
        self._opt.zero_grad(set_to_none=True)

    def eval_parameters(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # its own local parameters: there is no global copy

    def progress(self) -> dict[str, Any]:
        return {"averaging_rounds": self._averager.rounds_ok, "epoch": self._opt.local_epoch}

    def finish(self) -> None:
        # A background (--delay-averaging) round may still be in flight: wait and apply it.
        self._averager.step(wait_for_delayed_updates=True, apply_delayed_updates=True)

    def result(self) -> dict[str, Any]:
        return {
            "averaging_rounds": self._averager.rounds_ok,
            "averaging_rounds_failed": self._averager.rounds_failed,
            "group_sizes": list(self._averager.group_sizes),
            "epochs": self._opt.local_epoch,
            "state_downloads": self._opt.state_downloads,
        }


@contextlib.contextmanager
def hivemind_optimizer(
    worker: Worker,
    cfg: TrainConfig,
    model: nn.Module,
    inner: torch.optim.Optimizer,
    options: dict[str, Any],
) -> Iterator[HivemindPeer]:
    """One hivemind peer (this process plus hivemind's DHT/averager processes and p2pd),
    listening on ``options["host"]``."""
    listen = [f"/ip4/{options['host']}/tcp/0"]
    if worker.rank == 0:
        dht = hivemind.DHT(start=True, host_maddrs=listen)
        worker.broadcast([str(a) for a in dht.get_visible_maddrs()])
    else:
        peers = worker.receive("worker 0's DHT address")
        dht = hivemind.DHT(start=True, host_maddrs=listen, initial_peers=peers)
    opt = None
    try:
        init_params = [p.detach().clone() for p in model.parameters()]
        opt = CountingOptimizer(
            dht=dht,
            run_id=options["run_id"],
            optimizer=inner,
            target_batch_size=worker.num_workers * cfg.sync_every * cfg.batch_size,
            batch_size_per_step=cfg.batch_size,
            use_local_updates=True,
            delay_state_averaging=options["delay_averaging"],
            matchmaking_time=options["matchmaking_time"],
            averaging_timeout=options["averaging_timeout"],
            # hivemind warns that a request_timeout above min_matchmaking_time can deadlock.
            averager_opts={"request_timeout": min(3.0, options["matchmaking_time"] / 2)},
            load_state_timeout=worker.timeout,
            tracker_opts=options["tracker_opts"],
            verbose=options["verbose"],
        )
        # hivemind's TrainingStateAverager creates AdamW's state by a virtual step with zero
        # gradients (initialize_optimizer_state_): that applies one step of weight decay at
        # the un-warmed lr and counts an Adam step. Undo both, so that the inner optimizer
        # starts exactly where the recipe's does; the (zero) moments stay, so that hivemind's
        # state sharing sees the tensors it expects.
        with torch.no_grad():
            for p, p0 in zip(model.parameters(), init_params):
                p.copy_(p0)
        for state in inner.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"].zero_()
            elif "step" in state:
                state["step"] = 0
            assert all(
                not torch.is_tensor(v) or k == "step" or not v.any() for k, v in state.items()
            ), "hivemind's virtual step left non-zero optimizer moments"
        yield HivemindPeer(opt)
    finally:
        if opt is not None:
            opt.shutdown()
        dht.shutdown()


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--delay-averaging",
        action="store_true",
        help="average in the background (hivemind's default delay_state_averaging=True); "
        "default: block until the average is applied, like lowcomm without overlap",
    )
    p.add_argument(
        "--matchmaking-time",
        type=float,
        default=1.0,
        help="seconds a peer waits for others to form an averaging group "
        "(hivemind's default is 15; 1 is plenty for M peers on loopback)",
    )
    p.add_argument(
        "--averaging-timeout",
        type=float,
        help="seconds before an averaging round that finds no group gives up "
        "(default: max(5, 5 * matchmaking time)); at the end of a finite run a peer may "
        "start a round its partners, already done, never join",
    )
    p.add_argument(
        "--refresh-period",
        type=float,
        default=0.1,
        help="seconds between a peer's reads of the swarm's progress from the DHT "
        "(ProgressTracker min/default_refresh_period; hivemind's defaults 0.5/3 are longer "
        "than a whole epoch of the tiny config)",
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the hivemind baseline; write and print the summary; return it."""
    args = command.parse_args(argv, DESCRIPTION, _add_arguments)
    if not args.matchmaking_time > 0:
        raise ValueError(f"--matchmaking-time ({args.matchmaking_time}) must be > 0")
    if args.verbose:
        logging.getLogger("hivemind").setLevel(logging.INFO)
    cfg = command.build_config(args)
    threads = command.threads(args)
    eval_set = loop.load_eval_set(cfg)
    options = {
        "delay_averaging": args.delay_averaging,
        "matchmaking_time": args.matchmaking_time,
        "verbose": args.verbose,
        "averaging_timeout": args.averaging_timeout or max(5.0, 5 * args.matchmaking_time),
        "tracker_opts": {
            "min_refresh_period": args.refresh_period,
            "default_refresh_period": args.refresh_period,
        },
        # One run id per launch: the parent's pid, or the shared rendezvous directory.
        "run_id": f"lowcomm_peer_{os.getpid()}"
        if args.rank is None
        else "lowcomm_peer_" + hashlib.sha256(args.rendezvous.encode()).hexdigest()[:12],
        "host": args.host,
    }
    factory = functools.partial(hivemind_optimizer, options=options)
    target = functools.partial(loop.train, cfg=cfg, threads=threads, factory=factory)
    if args.rank is None:
        results = run_workers(
            target, args.workers, (), args.timeout, command.op_timeout(args), Path(args.out)
        )
    else:
        results = run_one_worker(target, command.process_worker(args))
        if results is None:
            return {}  # not rank 0: rank 0 writes the summary
    num_params = len(results[0]["params"])
    rounds = results[0]["averaging_rounds"]
    m = args.workers
    summary = loop.summarise(
        LIBRARY,
        hivemind.__version__,
        cfg,
        threads,
        results,
        eval_set,
        {
            "bytes_sent_note": (
                "hivemind exposes no byte counter; bytes_sent_estimate = averaging_rounds * "
                "2(M-1)/M * 4 * num_params (butterfly all-reduce payload of fp32 parameters; "
                "no framing, DHT or state-download traffic)"
            ),
            "bytes_sent_estimate": int(rounds * 2 * (m - 1) / m * 4 * num_params),
            "target_batch_size": m * cfg.sync_every * cfg.batch_size,
            "delay_averaging": options["delay_averaging"],
            "matchmaking_time": options["matchmaking_time"],
            "averaging_timeout": options["averaging_timeout"],
            "tracker_opts": options["tracker_opts"],
            "outer_optimizer": {
                "name": "parameter averaging (= outer SGD lr 1, no momentum)",
                "note": "hivemind has no outer optimizer; outer Nesterov SGD is not reproducible",
            },
            "epochs_per_worker": [r["epochs"] for r in results],
            "averaging_rounds_failed_per_worker": [r["averaging_rounds_failed"] for r in results],
            "group_sizes_rank0": results[0]["group_sizes"],
            "state_downloads_per_worker": [r["state_downloads"] for r in results],
        },
    )
    return command.write_summary(args.out, summary)


if __name__ == "__main__":
    command.cli(main)
