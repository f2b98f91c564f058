"""Peer baseline: torchft 0.2.0's DiLoCo on lowcomm's task, data and budget (CPU, gloo, loopback).

Run (from the repository root, with an interpreter that has torch, torchft and lowcomm)::

    make bench-peers        # or by hand:
    python3 -m venv .venv-torchft
    .venv-torchft/bin/pip install torch==2.13.0 torchft==0.2.0 numpy tqdm
    .venv-torchft/bin/pip install --no-deps -e .
    .venv-torchft/bin/python scripts/peers/torchft_diloco.py --config recipes/configs/tiny.toml \\
        --workers 2 --steps 100 --sync-every 25 --out runs/peers/torchft.jsonl

What it runs: ``--workers`` M forked processes, each its own torchft replica group of one
process (its own TCPStore on port 0, a ``ProcessGroupGloo`` and a ``Manager`` with
``use_async_quorum=False`` and ``init_sync=False``: every worker builds the same seeded model),
coordinated by an in-process ``LighthouseServer(bind="[::]:0", min_replicas=M)`` in this
(parent) process, started only after the workers are forked (a process forked from one whose
torchft Rust runtime is running segfaults in its first quorum call). Each worker trains lowcomm's byte-level GPT with the recipe's own AdamW and
warm-up/cosine schedule (``recipes/train_lm.py``: ``make_inner_optimizer``, ``lr_factor``) on
``sample_batch(seed, rank, step)``, the batches the lowcomm recipe draws for the same rank and
step, wrapped in ``torchft.local_sgd.DiLoCo(manager, [model], inner, outer, sync_every=H)`` with
outer ``SGD(lr=outer_lr, momentum=outer_momentum, nesterov=True)`` (0.7 / 0.9 by default).

torchft's DiLoCo (one fragment) is the algorithm lowcomm implements: at inner step H it forms a
quorum through the lighthouse, all-reduces (averages) the fp32 pseudo-gradient
``theta_global - theta_local`` parameter by parameter over gloo, asks every replica whether to
commit (``should_commit``), restores the global parameters and steps the outer optimizer on
them. A failed round is discarded and the parameters fall back to the last global ones.

Measured and written to ``--out`` (JSON lines): one line per evaluation (inner step 0, every
``eval_every`` steps and the last step; rank 0 evaluates the recipe's fixed held-out batches) with
``step, tokens, eval_loss, wall, tokens_per_s, averaging_rounds``; then one summary line.
``wall`` runs from the moment all workers are set up (a barrier) to the end of their last step,
evaluations included (``eval_s`` says how long they took), so it compares with the recipe's
``elapsed_s``; ``tokens`` counts all workers' training tokens. The evaluated parameters are the global ones, as in lowcomm's recipe: rank 0 swaps in the copy
torchft keeps for rollback (``DiLoCo._fragments[0].original_parameters``, a private attribute
of torchft 0.2.0) for the evaluation and then restores its local parameters.

What torchft does not expose, and what is reported instead:

* bytes on the wire: torchft has no byte counter and gloo's all-reduce algorithm choice is
  internal, so ``bytes_sent`` is null. ``allreduce_payload_bytes`` is measured (the bytes of the
  tensors each worker handed to the process group's ``allreduce``), and
  ``bytes_sent_ring_estimate`` is the ring bound 2(M-1)/M times that payload. Quorum,
  should_commit and heartbeat RPCs to the lighthouse/manager servers are not counted.
* ``averaging_rounds`` counts committed outer steps (torchft's ``Manager.current_step()``).

Exit codes: 0 on success, 1 when the run fails or times out (every child is killed), 2 when
torchft is not importable.

The helpers under "shared by both peer scripts" are imported by ``hivemind_optimizer.py`` too;
this module imports torchft only inside functions, so they load without it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import logging
import math
import multiprocessing as mp
import os
import queue
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
LIBRARY = "torchft"
logger = logging.getLogger("lowcomm.scripts.peers")


# -- shared by both peer scripts (hivemind_optimizer.py imports these) ------------------------


def parse_args(
    argv: list[str] | None, description: str, add_arguments: Any = None
) -> argparse.Namespace:
    """The peer scripts' common command line; unset values come from ``--config``.

    Args:
        argv: the arguments (None: ``sys.argv[1:]``).
        description: the ``--help`` text.
        add_arguments: ``f(parser)`` adding a script's own options.
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
    if add_arguments is not None:
        add_arguments(p)
    args = p.parse_args(argv)
    for name in ("workers", "steps", "sync_every", "batch_size", "seq_len", "eval_every"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} ({value}) must be >= 1")
    if not args.timeout > 0:
        p.error(f"--timeout ({args.timeout}) must be > 0")
    return args


def build_config(args: argparse.Namespace) -> Any:
    """The lowcomm ``TrainConfig`` of this run: ``--config`` plus the command-line overrides."""
    from lowcomm.config import load_config

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
    # The peers run plain DiLoCo in fp32 on CPU: what lowcomm layers on top is not compared.
    ignored = {
        "fragments": 1,
        "overlap_steps": 0,
        "compression": "none",
        "error_feedback": False,
        "dtype": "fp32",
    }
    differ = {k: getattr(cfg, k) for k, v in ignored.items() if getattr(cfg, k) != v}
    if differ:
        logger.warning("ignoring config settings the peer baselines do not have: %s", differ)
    return cfg


@functools.cache
def load_recipe() -> ModuleType:
    """``recipes/train_lm.py`` as a module (loaded once): its optimizer, schedule, corpus and
    eval are reused as-is."""
    path = REPO / "recipes" / "train_lm.py"
    spec = importlib.util.spec_from_file_location("lowcomm_recipe_train_lm", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_model(cfg: Any) -> torch.nn.Module:
    """The recipe's GPT with the recipe's seeded initialisation (identical on every worker)."""
    from lowcomm.gpt import GPT, GPTConfig

    torch.manual_seed(cfg.seed)
    return GPT(
        GPTConfig(
            block_size=cfg.seq_len,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            n_embd=cfg.n_embd,
            tie_weights=cfg.tie_weights,
        )
    )


def load_data(cfg: Any) -> tuple[Any, list[tuple[torch.Tensor, torch.Tensor]]]:
    """(corpus, fixed eval batches), exactly as the recipe builds them."""
    from lowcomm.data import eval_batches

    corpus = load_recipe().load_training_corpus(cfg)
    evals = eval_batches(
        corpus.val, num_batches=cfg.eval_batches, batch_size=cfg.batch_size, seq_len=cfg.seq_len
    )
    return corpus, evals


def eval_loss(recipe: ModuleType, model: torch.nn.Module, batches: list[Any]) -> float:
    """The recipe's ``evaluate`` in fp32 on CPU."""
    return float(recipe.evaluate(model, batches, torch.device("cpu"), contextlib.nullcontext))


def is_eval_step(cfg: Any, step: int) -> bool:
    """The recipe's evaluation points: step 0, every ``eval_every`` steps, the last step."""
    return step == 0 or step % cfg.eval_every == 0 or step == cfg.steps


def flat_params(model: torch.nn.Module) -> np.ndarray:
    """All parameters as one float64 vector (sent to the parent to compare workers)."""
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().double().numpy()


def _kill_group(proc: mp.process.BaseProcess, sig: int) -> None:
    # Each worker leads its own process group, so its descendants (hivemind's DHT and
    # averager processes, p2pd) go with it.
    if proc.pid is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, sig)


def reap(procs: Sequence[mp.process.BaseProcess], grace: float = 5.0) -> None:
    """Join ``procs``; SIGTERM then SIGKILL the process groups of any still running."""
    deadline = time.monotonic() + grace
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [proc for proc in procs if proc.is_alive()]
        for proc in procs:
            # Descendants may outlive a worker that exited on its own.
            _kill_group(proc, sig if proc.is_alive() else signal.SIGKILL)
        for proc in alive:
            proc.join(2.0)


def _worker_entry(
    target: Any, rank: int, outbox: Any, inbox: Any, barrier: Any, *args: Any
) -> None:
    os.setpgid(0, 0)
    try:
        outbox.put(("done", rank, target(rank, outbox, inbox, barrier, *args)))
    except BaseException:
        outbox.put(("error", rank, traceback.format_exc()))
        raise
    finally:
        outbox.close()
        outbox.join_thread()


def run_workers(
    target: Any,
    num_workers: int,
    args: tuple[Any, ...],
    timeout: float,
    out: Path,
    on_started: Any = None,
) -> list[dict[str, Any]]:
    """Fork ``num_workers`` processes running ``target(rank, outbox, inbox, barrier, *args)``.

    Workers put ``("eval", rank, record)`` on ``outbox`` while they run (written to ``out`` at
    once), ``("broadcast", rank, message)`` to have ``message`` put on every other worker's
    ``inbox``, and ``("done", rank, result)`` or ``("error", rank, traceback)`` at the end. If
    given, ``on_started()`` runs in this process once every worker is forked, and what it
    returns is put on every inbox: state that must not be inherited through ``fork`` (torchft's
    Rust runtime) is created there. Every worker, and everything it started, is killed when one
    fails, when ``timeout`` passes, or on Ctrl-C. ``barrier`` is a ``multiprocessing.Barrier``
    of the workers (they wait on it once set up, so that their clocks start together).

    Returns:
        The workers' results, by rank.

    Raises:
        RuntimeError: a worker failed or died, or the timeout passed.
    """
    ctx = mp.get_context("fork")
    outbox = ctx.Queue()
    inboxes = [ctx.Queue() for _ in range(num_workers)]
    barrier = ctx.Barrier(num_workers)
    procs = [
        ctx.Process(
            target=_worker_entry, args=(target, rank, outbox, inboxes[rank], barrier, *args)
        )
        for rank in range(num_workers)
    ]
    deadline = time.monotonic() + timeout
    results: dict[int, dict[str, Any]] = {}
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(out, "w", encoding="utf-8") as f:
            for proc in procs:
                proc.start()
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.setpgid(proc.pid, proc.pid)  # type: ignore[arg-type]
            if on_started is not None:
                message = on_started()
                for inbox in inboxes:
                    inbox.put(message)
            while len(results) < num_workers:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"timed out after {timeout:.0f}s (--timeout)")
                try:
                    kind, rank, payload = outbox.get(timeout=min(left, 1.0))
                except queue.Empty:
                    dead = [
                        (i, p.exitcode)
                        for i, p in enumerate(procs)
                        if p.exitcode not in (None, 0) and i not in results
                    ]
                    if dead:
                        raise RuntimeError(f"worker(s) died without a result: {dead}") from None
                    continue
                if kind == "eval":
                    f.write(json.dumps(payload) + "\n")
                    f.flush()
                    logger.info("step %d: eval loss %.4f", payload["step"], payload["eval_loss"])
                elif kind == "broadcast":
                    for i, inbox in enumerate(inboxes):
                        if i != rank:
                            inbox.put(payload)
                elif kind == "error":
                    raise RuntimeError(f"worker {rank} failed:\n{payload}")
                else:
                    results[rank] = payload
    finally:
        # After a failure there is nothing left to wait for.
        reap(procs, grace=5.0 if len(results) == num_workers else 0.5)
        for q in (outbox, *inboxes):
            q.close()
            q.cancel_join_thread()
    return [results[r] for r in range(num_workers)]


def receive(inbox: Any, timeout: float, what: str) -> Any:
    """The next message on a worker's ``inbox``.

    Raises:
        RuntimeError: nothing arrived within ``timeout`` seconds.
    """
    try:
        return inbox.get(timeout=timeout)
    except queue.Empty:
        raise RuntimeError(f"no {what} within {timeout:.0f}s") from None


def summarise(
    library: str,
    cfg: Any,
    results: list[dict[str, Any]],
    recipe: ModuleType,
    eval_set: list[Any],
    extra: dict[str, Any],
) -> dict[str, Any]:
    """The summary line: rank 0's evals, the slowest worker's wall time, worker agreement."""
    num_workers = len(results)
    tokens = cfg.steps * cfg.batch_size * cfg.seq_len * num_workers
    wall = max(r["wall"] for r in results)
    params = [np.asarray(r["params"]) for r in results]
    mean = np.mean(params, axis=0)
    model = make_model(cfg)
    torch.nn.utils.vector_to_parameters(torch.from_numpy(mean).float(), model.parameters())
    evals = results[0]["evals"]
    return {
        "summary": True,
        "library": library,
        **extra,
        "workers": num_workers,
        "steps": cfg.steps,
        "sync_every": cfg.sync_every,
        "batch_size": cfg.batch_size,
        "seq_len": cfg.seq_len,
        "seed": cfg.seed,
        "num_params": int(mean.size),
        "first_eval_loss": evals[0][1],
        "final_eval_loss": evals[-1][1],
        "final_eval_loss_mean_of_workers": eval_loss(recipe, model, eval_set),
        "max_abs_param_diff_between_workers": float(
            max(np.abs(p - params[0]).max() for p in params)
        ),
        "tokens": tokens,
        "wall_s": wall,
        "eval_s": results[0]["eval_s"],
        "tokens_per_s": tokens / max(wall, 1e-9),
        "averaging_rounds": results[0]["averaging_rounds"],
        "averaging_rounds_per_worker": [r["averaging_rounds"] for r in results],
        "expected_rounds_at_sync_every": cfg.steps // cfg.sync_every,
        "config": cfg.to_dict(),
        "command": " ".join([sys.executable, *sys.argv]),
    }


# -- torchft ------------------------------------------------------------------------------------


def _train(
    rank: int,
    q: Any,
    inbox: Any,
    barrier: Any,
    cfg: Any,
    num_workers: int,
    threads: int,
    op_timeout: float,
) -> dict[str, Any]:
    """One torchft replica group (one process): train ``cfg.steps`` inner steps with DiLoCo."""
    from torch.distributed import TCPStore
    from torchft.local_sgd import DiLoCo
    from torchft.manager import Manager
    from torchft.process_group import ProcessGroupGloo

    from lowcomm.data import sample_batch

    class CountingGloo(ProcessGroupGloo):
        """torchft's gloo group, counting the payload bytes handed to ``allreduce``."""

        payload_bytes = 0

        def allreduce(self, tensors: list[torch.Tensor], opts: object) -> Any:
            self.payload_bytes += sum(t.numel() * t.element_size() for t in tensors)
            return super().allreduce(tensors, opts)

    torch.set_num_threads(threads)
    recipe = load_recipe()
    corpus, eval_set = load_data(cfg)
    model = make_model(cfg)
    inner = recipe.make_inner_optimizer(cfg, model)
    sched = torch.optim.lr_scheduler.LambdaLR(inner, lambda s: recipe.lr_factor(cfg, s))
    outer = torch.optim.SGD(
        model.parameters(),
        lr=cfg.outer_lr,
        momentum=cfg.outer_momentum,
        nesterov=cfg.nesterov and cfg.outer_momentum > 0,
    )

    # A replica group of one process still needs its own store: the manager publishes its
    # address there and the quorum's gloo groups rendezvous under a prefix of one of them.
    lighthouse_addr = receive(inbox, op_timeout, "lighthouse address")
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    pg = CountingGloo(timeout=timedelta(seconds=op_timeout))

    def state_dict() -> dict[str, Any]:
        return {"model": model.state_dict(), "inner": inner.state_dict()}

    def load_state_dict(sd: dict[str, Any]) -> None:
        model.load_state_dict(sd["model"])
        inner.load_state_dict(sd["inner"])

    manager = Manager(
        pg=pg,
        load_state_dict=load_state_dict,
        state_dict=state_dict,
        min_replica_size=num_workers,  # every round waits for all M workers, as lowcomm's does
        use_async_quorum=False,  # DiLoCo refuses async quorum
        init_sync=False,  # identical seeded init everywhere: no step-0 checkpoint transfer
        timeout=timedelta(seconds=op_timeout),
        quorum_timeout=timedelta(seconds=op_timeout),
        connect_timeout=timedelta(seconds=op_timeout),
        rank=0,
        world_size=1,
        store_addr="127.0.0.1",
        store_port=store.port,
        lighthouse_addr=lighthouse_addr,
        replica_id=f"lowcomm_peer_{rank}",
        hostname="127.0.0.1",
        max_retries=3,
    )
    evals: list[tuple[int, float]] = []
    eval_s = 0.0
    tokens_per_step = cfg.batch_size * cfg.seq_len * num_workers

    def maybe_eval(step: int, t0: float, diloco: Any) -> None:
        nonlocal eval_s
        if rank != 0 or not is_eval_step(cfg, step):
            return
        t_eval = time.perf_counter()
        # The global parameters, as lowcomm's recipe evaluates them: torchft keeps them (its
        # rollback copy, private) in the fragment's original_parameters between syncs.
        global_params = diloco._fragments[0].original_parameters
        with torch.no_grad():
            local = {n: p.detach().clone() for n, p in model.named_parameters()}
            for n, p in model.named_parameters():
                p.copy_(global_params[n])
            loss = eval_loss(recipe, model, eval_set)
            for n, p in model.named_parameters():
                p.copy_(local[n])
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
                    "averaging_rounds": manager.current_step(),
                },
            )
        )

    try:
        with DiLoCo(manager, [model], inner, outer, sync_every=cfg.sync_every) as diloco:
            model.train()
            barrier.wait(op_timeout)
            t0 = time.perf_counter()
            maybe_eval(0, t0, diloco)
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
                inner.step()  # DiLoCo's post-hook syncs here every H steps
                inner.zero_grad(set_to_none=True)
                sched.step()
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(f"rank {rank}: loss {loss.item()} at step {step}")
                maybe_eval(step + 1, t0, diloco)
            wall = time.perf_counter() - t0
    finally:
        manager.shutdown(wait=False)
    return {
        "rank": rank,
        "wall": wall,
        "eval_s": eval_s,
        "evals": evals,
        "averaging_rounds": manager.current_step(),
        "batches_committed": manager.batches_committed(),
        "allreduce_payload_bytes": pg.payload_bytes,
        "params": flat_params(model),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the torchft baseline; write and print the summary; return it."""
    args = parse_args(argv, "torchft 0.2.0 DiLoCo on lowcomm's task (peer baseline)")
    # Before torchft is imported (its Rust logger reads RUST_LOG once) and before anything is
    # forked: loopback only, and the libraries' INFO logs off unless --verbose.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if not args.verbose:
        os.environ.setdefault("RUST_LOG", "warn")
        for name in ("torchft", "torchft_quorums", "torchft_commits", "torchft_errors"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # It warns on every quorum that it cannot reset NCCL's flight recorder (gloo here).
        logging.getLogger("torchft.manager").setLevel(logging.ERROR)
    try:
        import torchft
        from torchft.coordination import LighthouseServer
    except ImportError as e:
        print(
            f"torchft is not importable in {sys.executable} ({e}); install it in a separate "
            "venv (or run `make bench-peers`): python3 -m venv .venv-torchft && .venv-torchft/bin/pip install torch==2.13.0 "
            "torchft==0.2.0 numpy tqdm && .venv-torchft/bin/pip install --no-deps -e .",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    from importlib.metadata import version

    cfg = build_config(args)
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", "1"))
    recipe = load_recipe()
    _, eval_set = load_data(cfg)  # builds the corpus cache once, before the workers fork

    op_timeout = max(10.0, min(args.timeout, 120.0))
    servers: list[Any] = []

    def start_lighthouse() -> str:
        # Started only after the workers are forked: a child forked from a process whose
        # torchft (Rust/tokio) runtime is running segfaults in its first quorum call.
        # The lighthouse waits for all M replicas (min_replicas) before it forms a quorum.
        lighthouse = LighthouseServer(
            bind="[::]:0", min_replicas=args.workers, join_timeout_ms=int(op_timeout * 1000)
        )
        servers.append(lighthouse)
        # The advertised address carries the machine's hostname; loopback needs only the port.
        return f"http://127.0.0.1:{lighthouse.address().rsplit(':', 1)[1]}"

    try:
        results = run_workers(
            _train,
            args.workers,
            (cfg, args.workers, threads, op_timeout),
            args.timeout,
            Path(args.out),
            on_started=start_lighthouse,
        )
    finally:
        for server in servers:
            server.shutdown()

    payload = results[0]["allreduce_payload_bytes"]
    m = args.workers
    summary = summarise(
        LIBRARY,
        cfg,
        results,
        recipe,
        eval_set,
        {
            "version": getattr(torchft, "__version__", None) or version("torchft"),
            "torch": torch.__version__,
            "threads_per_worker": threads,
            "bytes_sent": None,
            "bytes_sent_note": (
                "torchft exposes no byte counter; allreduce_payload_bytes is measured (fp32 "
                "pseudo-gradient bytes handed to ProcessGroupGloo.allreduce per worker); "
                "bytes_sent_ring_estimate = 2(M-1)/M * payload; lighthouse/manager RPCs "
                "(quorum, should_commit, heartbeats) are not counted"
            ),
            "allreduce_payload_bytes": payload,
            "bytes_sent_ring_estimate": int(2 * (m - 1) / m * payload),
            "outer_optimizer": {
                "name": "SGD",
                "lr": cfg.outer_lr,
                "momentum": cfg.outer_momentum,
                "nesterov": cfg.nesterov and cfg.outer_momentum > 0,
            },
        },
    )
    return write_summary(args.out, summary)


def write_summary(out: str, summary: dict[str, Any]) -> dict[str, Any]:
    """Append ``summary`` to the JSONL file ``out``, print it (less the config), return it."""
    with open(out, "a", encoding="utf-8") as f:
        f.write(json.dumps(summary) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=1))
    return summary


def cli(main: Any) -> None:
    """Run a peer script's ``main()`` as a command: logging on, exit 1 with the message on a
    configuration or run error."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        main()
    except (RuntimeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli(main)
