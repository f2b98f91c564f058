"""Peer baseline: hivemind 1.1.12's ``Optimizer(use_local_updates=True)`` on lowcomm's task.

Run (from the repository root, in the project venv, which has hivemind)::

    .venv/bin/python scripts/peers/hivemind_optimizer.py --config recipes/configs/tiny.toml \\
        --workers 2 --steps 100 --sync-every 25 --out runs/peers/hivemind.jsonl

What it runs: ``--workers`` M forked processes, each with its own hivemind DHT on loopback
(worker 0 bootstraps, the others join it through its visible multiaddrs), training lowcomm's
byte-level GPT with the recipe's own AdamW and warm-up/cosine schedule
(``recipes/train_lm.py``: ``make_inner_optimizer``, ``lr_factor``; the schedule is stepped per
local step by this script, not by hivemind, whose scheduler would step once per epoch) on
``sample_batch(seed, rank, step)``, the batches the lowcomm recipe draws for the same rank and
step. The AdamW is wrapped in ``hivemind.Optimizer(use_local_updates=True,
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

Measured and written to ``--out`` (JSON lines): one line per evaluation (inner step 0, every
``eval_every`` steps and the last step), by rank 0 on *its own local* parameters (hivemind keeps
no global copy), with ``step, tokens, eval_loss, wall, tokens_per_s, averaging_rounds``; then a
summary line. ``averaging_rounds`` counts state-averaging all-reduces that completed with at
least two peers (counted on the averager's ``StepControl`` futures); ``epochs`` counts epoch
transitions. ``final_eval_loss_mean_of_workers`` evaluates the mean of the workers' final
parameters (computed by this script, outside hivemind). ``bytes_sent`` is null: hivemind
exposes no byte counter; ``bytes_sent_estimate`` is rounds * 2(M-1)/M * 4 * params (the
butterfly all-reduce payload, without protobuf/libp2p framing, DHT traffic or state downloads).

Exit codes: 0 on success, 1 when the run fails or times out (every child, including the DHT
and averager processes and p2pd daemons, is killed), 2 when hivemind is not importable.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch


def _load_shared() -> ModuleType:
    # The helpers shared by both peer scripts live in torchft_diloco.py, which imports torchft
    # only inside its functions.
    path = Path(__file__).resolve().with_name("torchft_diloco.py")
    spec = importlib.util.spec_from_file_location("lowcomm_peers_shared", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


shared = _load_shared()
LIBRARY = "hivemind"


def _make_optimizer_class() -> type:
    """``hivemind.Optimizer`` that counts completed averaging rounds and state downloads."""
    from hivemind import Optimizer
    from hivemind.averaging.averager import DecentralizedAverager
    from hivemind.optim.state_averager import TrainingStateAverager

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

    class CountingOptimizer(Optimizer):
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

    return CountingOptimizer


def _train(
    rank: int,
    q: Any,
    inbox: Any,
    barrier: Any,
    cfg: Any,
    num_workers: int,
    threads: int,
    op_timeout: float,
    hm: dict[str, Any],
) -> dict[str, Any]:
    """One hivemind peer (this process plus hivemind's DHT/averager processes and p2pd)."""
    import hivemind

    from lowcomm.data import sample_batch

    torch.set_num_threads(threads)
    recipe = shared.load_recipe()
    corpus, eval_set = shared.load_data(cfg)
    model = shared.make_model(cfg)
    inner = recipe.make_inner_optimizer(cfg, model)

    loopback = ["/ip4/127.0.0.1/tcp/0"]
    if rank == 0:
        dht = hivemind.DHT(start=True, host_maddrs=loopback)
        q.put(("broadcast", rank, [str(a) for a in dht.get_visible_maddrs()]))
    else:
        peers = shared.receive(inbox, op_timeout, "worker 0's DHT address")
        dht = hivemind.DHT(start=True, host_maddrs=loopback, initial_peers=peers)
    opt = None
    try:
        init_params = [p.detach().clone() for p in model.parameters()]
        opt = _make_optimizer_class()(
            dht=dht,
            run_id=hm["run_id"],
            optimizer=inner,
            target_batch_size=num_workers * cfg.sync_every * cfg.batch_size,
            batch_size_per_step=cfg.batch_size,
            use_local_updates=True,
            delay_state_averaging=hm["delay_averaging"],
            matchmaking_time=hm["matchmaking_time"],
            averaging_timeout=hm["averaging_timeout"],
            # hivemind warns that a request_timeout above min_matchmaking_time can deadlock.
            averager_opts={"request_timeout": min(3.0, hm["matchmaking_time"] / 2)},
            load_state_timeout=op_timeout,
            tracker_opts=hm["tracker_opts"],
            verbose=hm["verbose"],
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
        # Created after hivemind.Optimizer: it must schedule the very AdamW hivemind steps.
        sched = torch.optim.lr_scheduler.LambdaLR(inner, lambda s: recipe.lr_factor(cfg, s))
        averager = opt.state_averager
        evals: list[tuple[int, float]] = []
        eval_s = 0.0
        tokens_per_step = cfg.batch_size * cfg.seq_len * num_workers

        def maybe_eval(step: int, t0: float) -> None:
            nonlocal eval_s
            if rank != 0 or not shared.is_eval_step(cfg, step):
                return
            t_eval = time.perf_counter()
            loss = shared.eval_loss(recipe, model, eval_set)
            eval_s += time.perf_counter() - t_eval
            evals.append((step, loss))
            wall = time.perf_counter() - t0
            q.put(
                (
                    "eval",
                    rank,
                    {
                        "step": step,
                        "tokens": step * tokens_per_step,
                        "eval_loss": loss,
                        "wall": wall,
                        "tokens_per_s": step * tokens_per_step / max(wall, 1e-9),
                        "averaging_rounds": averager.rounds_ok,
                        "epoch": opt.local_epoch,
                    },
                )
            )

        model.train()
        # Every peer has joined the DHT and built its optimizer before anyone reports samples.
        barrier.wait(op_timeout)
        t0 = time.perf_counter()
        maybe_eval(0, t0)
        for step in range(cfg.steps):
            x, y = sample_batch(
                corpus.train,
                batch_size=cfg.batch_size,
                seq_len=cfg.seq_len,
                seed=cfg.seed,
                rank=rank,
                world_size=num_workers,
                step=step,
            )
            _, loss = model(x, y)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()  # local AdamW step; at an epoch end, also the parameter averaging
            opt.zero_grad(set_to_none=True)
            sched.step()
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"rank {rank}: loss {loss.item()} at step {step}")
            maybe_eval(step + 1, t0)
        # A background (--delay-averaging) round may still be in flight: wait and apply it.
        averager.step(wait_for_delayed_updates=True, apply_delayed_updates=True)
        wall = time.perf_counter() - t0
        # Nobody leaves (and takes its share of an all-reduce with it) before all are done.
        barrier.wait(op_timeout)
        return {
            "rank": rank,
            "wall": wall,
            "eval_s": eval_s,
            "evals": evals,
            "averaging_rounds": averager.rounds_ok,
            "averaging_rounds_failed": averager.rounds_failed,
            "group_sizes": list(averager.group_sizes),
            "epochs": opt.local_epoch,
            "state_downloads": opt.state_downloads,
            "params": shared.flat_params(model),
        }
    finally:
        if opt is not None:
            opt.shutdown()
        dht.shutdown()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the hivemind baseline; write and print the summary; return it."""

    def add_arguments(p: Any) -> None:
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

    args = shared.parse_args(
        argv,
        "hivemind 1.1.12 Optimizer(use_local_updates=True) on lowcomm's task (peer baseline)",
        add_arguments,
    )
    if not args.matchmaking_time > 0:
        raise ValueError(f"--matchmaking-time ({args.matchmaking_time}) must be > 0")
    if not args.verbose:
        os.environ.setdefault("HIVEMIND_LOGLEVEL", "WARNING")
    try:
        import hivemind
    except ImportError as e:
        print(
            f"hivemind is not importable in {sys.executable} ({e}); "
            "pip install 'lowcomm[hivemind]' (hivemind==1.1.12)",
            file=sys.stderr,
        )
        raise SystemExit(2) from None

    cfg = shared.build_config(args)
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", "1"))
    recipe = shared.load_recipe()
    _, eval_set = shared.load_data(cfg)  # builds the corpus cache once, before the workers fork
    op_timeout = max(10.0, min(args.timeout, 120.0))
    hm = {
        "delay_averaging": args.delay_averaging,
        "matchmaking_time": args.matchmaking_time,
        "verbose": args.verbose,
        "averaging_timeout": args.averaging_timeout or max(5.0, 5 * args.matchmaking_time),
        "tracker_opts": {
            "min_refresh_period": args.refresh_period,
            "default_refresh_period": args.refresh_period,
        },
        "run_id": f"lowcomm_peer_{os.getpid()}",
    }
    results = shared.run_workers(
        _train,
        args.workers,
        (cfg, args.workers, threads, op_timeout, hm),
        args.timeout,
        Path(args.out),
    )
    num_params = len(results[0]["params"])
    rounds = results[0]["averaging_rounds"]
    m = args.workers
    summary = shared.summarise(
        LIBRARY,
        cfg,
        results,
        recipe,
        eval_set,
        {
            "version": hivemind.__version__,
            "torch": torch.__version__,
            "threads_per_worker": threads,
            "bytes_sent": None,
            "bytes_sent_note": (
                "hivemind exposes no byte counter; bytes_sent_estimate = averaging_rounds * "
                "2(M-1)/M * 4 * num_params (butterfly all-reduce payload of fp32 parameters; "
                "no framing, DHT or state-download traffic)"
            ),
            "bytes_sent_estimate": int(rounds * 2 * (m - 1) / m * 4 * num_params),
            "target_batch_size": m * cfg.sync_every * cfg.batch_size,
            "delay_averaging": hm["delay_averaging"],
            "matchmaking_time": hm["matchmaking_time"],
            "averaging_timeout": hm["averaging_timeout"],
            "tracker_opts": hm["tracker_opts"],
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
    return shared.write_summary(args.out, summary)


if __name__ == "__main__":
    shared.cli(main)
