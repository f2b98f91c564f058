"""The one training loop of every peer baseline, on lowcomm's task.

Each worker trains the recipe's byte-level GPT (``recipes/train_lm.py``: its seeded model,
AdamW and warm-up/cosine schedule, corpus, held-out batches and ``evaluate``) on
``sample_batch(seed, rank, step)``, the batches the lowcomm recipe draws for the same rank
and step. What differs between peer libraries is only how they wrap the inner optimizer and
communicate: a :class:`PeerOptimizer`, made by the library's :data:`PeerFactory`.

Rank 0 evaluates at inner step 0, every ``eval_every`` steps and at the last step, on the
parameters the library's ``eval_parameters()`` puts in place, and reports ``step, tokens,
eval_loss, wall, tokens_per_s`` plus the library's ``progress()`` counters. ``wall`` runs
from the moment all workers are set up (a barrier) to the end of their last step,
evaluations included (``eval_s`` says how long they took), so it compares with the recipe's
``elapsed_s``; ``tokens`` counts all workers' training tokens.

Each worker also measures, as the recipe does for lowcomm (``worker<R>.json``), its training
``window`` (from the end of the step-0 evaluation to the end of its last step, later
evaluations left out) and the seconds its loop was **blocked** in it: the time inside the
library's ``step()`` beyond the inner optimizer's own step, timed by hooks on the inner
optimizer (:class:`InnerStepClock`), which is the library's communication and bookkeeping.
With ``LOWCOMM_TIMELINE`` set, these are also ``compute`` and ``wait`` spans of lowcomm's
timeline (:mod:`lowcomm.comm.timeline`).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from lowcomm.comm.timeline import TIMELINE, span
from lowcomm.config import TrainConfig
from lowcomm.data import eval_batches, sample_batch
from lowcomm.gpt import GPT, GPTConfig
from recipes import train_lm as recipe
from scripts.bench.peers.workers import Worker

__all__ = [
    "InnerStepClock",
    "PeerFactory",
    "PeerOptimizer",
    "eval_loss",
    "load_eval_set",
    "summarise",
    "train",
]

Batches = list[tuple[torch.Tensor, torch.Tensor]]


class PeerOptimizer(Protocol):
    """One worker's inner optimizer as a peer library wraps it, with its communication.

    Call protocol: the loop calls ``step()`` and ``zero_grad()`` once per inner step (after
    ``backward`` and gradient clipping); whatever averaging the library does happens inside
    ``step()``. Rank 0 evaluates inside ``eval_parameters()``. After the last step the loop
    calls ``finish()`` (still timed), then ``result()``, then leaves the factory's context.
    """

    def step(self) -> None:
        """One inner step, and the library's communication when it is due."""
        ...

    def zero_grad(self) -> None:
        """Drop the gradients (set to None)."""
        ...

    def eval_parameters(self) -> AbstractContextManager[None]:
        """Put in place the parameters an evaluation sees (and restore them on exit)."""
        ...

    def progress(self) -> dict[str, Any]:
        """Counters for an evaluation record (at least ``averaging_rounds``)."""
        ...

    def finish(self) -> None:
        """Land whatever is still in flight after the last step."""
        ...

    def result(self) -> dict[str, Any]:
        """This worker's counters for the summary (at least ``averaging_rounds``)."""
        ...


#: ``factory(worker, cfg, model, inner)``: a context manager that wraps ``inner`` (an AdamW
#: over ``model``) into the library's optimizer and yields it; leaving it shuts the library's
#: communication down.
PeerFactory = Callable[
    [Worker, TrainConfig, nn.Module, torch.optim.Optimizer],
    AbstractContextManager[PeerOptimizer],
]


class InnerStepClock:
    """Seconds the inner optimizer's own ``step`` takes, from step hooks on it.

    A library's ``step()`` minus these is what its communication and bookkeeping cost the
    training loop. torch runs an optimizer's hooks in the order they were registered, and
    a library may hook the inner optimizer itself (torchft syncs in a post-hook): so the
    post-hook is registered at construction, before the library wraps the optimizer, and the
    pre-hook by :meth:`arm`, after it, which leaves the library's hooks outside the timing.
    """

    def __init__(self, inner: torch.optim.Optimizer) -> None:
        self.seconds = 0.0
        self._inner = inner
        self._start: float | None = None
        inner.register_step_post_hook(self._post)

    def arm(self) -> None:
        """Register the pre-hook; call once the library has wrapped the inner optimizer."""
        self._inner.register_step_pre_hook(self._pre)

    def _pre(self, *_: Any) -> None:
        self._start = time.perf_counter()

    def _post(self, *_: Any) -> None:
        if self._start is not None:
            end = time.perf_counter()
            self.seconds += end - self._start
            TIMELINE.add("compute", self._start, end)
            self._start = None


def make_model(cfg: TrainConfig) -> GPT:
    """The recipe's GPT with the recipe's seeded initialisation (identical on every worker)."""
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


def load_data(cfg: TrainConfig) -> tuple[Any, Batches]:
    """(corpus, fixed eval batches), exactly as the recipe builds them."""
    corpus = recipe.load_training_corpus(cfg)
    evals = eval_batches(
        corpus.val, num_batches=cfg.eval_batches, batch_size=cfg.batch_size, seq_len=cfg.seq_len
    )
    return corpus, evals


def load_eval_set(cfg: TrainConfig) -> Batches:
    """The held-out batches (building the corpus cache once, before the workers fork)."""
    return load_data(cfg)[1]


def eval_loss(model: nn.Module, batches: Batches) -> float:
    """The recipe's ``evaluate`` in fp32 on CPU."""
    return float(recipe.evaluate(model, batches, torch.device("cpu"), contextlib.nullcontext))


def _is_eval_step(cfg: TrainConfig, step: int) -> bool:
    return step == 0 or step % cfg.eval_every == 0 or step == cfg.steps


def train(worker: Worker, cfg: TrainConfig, threads: int, factory: PeerFactory) -> dict[str, Any]:
    """One worker: ``cfg.steps`` inner steps through the library's optimizer.

    Returns:
        ``rank, wall, eval_s, evals`` (rank 0's ``(step, loss)`` pairs), the library's
        :meth:`PeerOptimizer.result` and ``params`` (the final parameters, float64).
    """
    torch.set_num_threads(threads)
    rank = worker.rank
    corpus, eval_set = load_data(cfg)
    model = make_model(cfg)
    inner = recipe.make_inner_optimizer(cfg, model)
    evals: list[tuple[int, float]] = []
    eval_s = 0.0
    tokens_per_step = cfg.batch_size * cfg.seq_len * worker.num_workers
    clock = InnerStepClock(inner)
    blocked = 0.0
    with factory(worker, cfg, model, inner) as opt:
        clock.arm()
        # After the factory: hivemind creates the optimizer state by a step of its own, and
        # the schedule must drive the very AdamW the library steps.
        sched = torch.optim.lr_scheduler.LambdaLR(inner, lambda s: recipe.lr_factor(cfg, s))

        def maybe_eval(step: int, t0: float) -> None:
            nonlocal eval_s
            if rank != 0 or not _is_eval_step(cfg, step):
                return
            t_eval = time.perf_counter()
            with opt.eval_parameters():
                loss = eval_loss(model, eval_set)
            eval_s += time.perf_counter() - t_eval
            evals.append((step, loss))
            wall = time.perf_counter() - t0
            worker.report(
                {
                    "step": step,
                    "tokens": step * tokens_per_step,
                    "eval_loss": loss,
                    "wall": wall,
                    "tokens_per_s": step * tokens_per_step / max(wall, 1e-9),
                    **opt.progress(),
                }
            )

        model.train()
        # Every worker is set up (joined its swarm, built its optimizer) before anyone trains.
        worker.wait_for_all()
        t0 = time.perf_counter()
        maybe_eval(0, t0)
        window_start, evals_before = time.time(), eval_s
        for step in range(cfg.steps):
            with span("compute"):
                x, y = sample_batch(
                    corpus.train,
                    batch_size=cfg.batch_size,
                    seq_len=cfg.seq_len,
                    seed=cfg.seed,
                    rank=rank,
                    world_size=worker.num_workers,
                    step=step,
                )
                _, loss = model(x, y)
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            t_step, inner_before = time.perf_counter(), clock.seconds
            opt.step()
            t_end = time.perf_counter()
            blocked += max(0.0, t_end - t_step - (clock.seconds - inner_before))
            TIMELINE.add("wait", t_step, t_end)  # the inner step's compute span lies inside
            opt.zero_grad()
            sched.step()
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"rank {rank}: loss {loss.item()} at step {step}")
            maybe_eval(step + 1, t0)
        t_finish = time.perf_counter()
        opt.finish()  # lands what is still in flight: blocked, as lowcomm's flush() is
        flushed = time.perf_counter() - t_finish
        blocked += flushed
        TIMELINE.add("wait", t_finish, t_finish + flushed)
        wall = time.perf_counter() - t0
        window_end = time.time()
        seconds = window_end - window_start - (eval_s - evals_before)
        # Nobody leaves (and takes its share of an average with it) before all are done.
        worker.wait_for_all()
        result = opt.result()
    params = torch.nn.utils.parameters_to_vector(model.parameters()).detach().double().numpy()
    return {
        "rank": rank,
        "wall": wall,
        "eval_s": eval_s,
        "evals": evals,
        "window": {
            "rank": rank,
            "start": window_start,
            "end": window_end,
            "train_seconds": seconds,
            "blocked_seconds": blocked,
            "blocked_fraction": blocked / seconds if seconds > 0 else None,
            "flush_seconds": flushed,
        },
        **result,
        "params": params,
    }


def summarise(
    library: str,
    version: str,
    cfg: TrainConfig,
    threads: int,
    results: list[dict[str, Any]],
    eval_set: Batches,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """The summary line: rank 0's evals, the slowest worker's wall time, worker agreement,
    and the library's ``extra`` counters and notes.

    ``final_eval_loss_mean_of_workers`` evaluates the mean of the workers' final parameters
    (computed here, outside the library).
    """
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
        "version": version,
        "torch": torch.__version__,
        "threads_per_worker": threads,
        # Neither peer library counts the bytes it sends; ``extra`` says what stands in.
        "bytes_sent": None,
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
        "final_eval_loss_mean_of_workers": eval_loss(model, eval_set),
        "max_abs_param_diff_between_workers": float(
            max(np.abs(p - params[0]).max() for p in params)
        ),
        "tokens": tokens,
        "wall_s": wall,
        "eval_s": results[0]["eval_s"],
        "tokens_per_s": tokens / max(wall, 1e-9),
        "averaging_rounds": results[0]["averaging_rounds"],
        "averaging_rounds_per_worker": [r["averaging_rounds"] for r in results],
        "windows": [r["window"] for r in results],
        "expected_rounds_at_sync_every": cfg.steps // cfg.sync_every,
        "config": cfg.to_dict(),
        "command": " ".join([sys.executable, *sys.argv]),
    }
