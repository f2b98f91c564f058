"""Forked worker processes of a peer baseline, the messages between them, and their cleanup.

Every worker is a forked child leading its own process group, so that whatever it starts
(hivemind's DHT and averager processes, p2pd) is killed with it. Workers talk to the parent
through queues: evaluation records, broadcasts to the other workers, and a final result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import multiprocessing as mp
import os
import queue
import signal
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["Worker", "reap", "run_workers"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Worker:
    """What a forked worker holds: its rank, the others' count, and its message channels.

    Attributes:
        rank: this worker's index, ``0..num_workers-1``.
        num_workers: the number of workers (M).
        timeout: seconds any one wait for another worker may take.
    """

    rank: int
    num_workers: int
    timeout: float
    _outbox: Any
    _inbox: Any
    _barrier: Any

    def report(self, record: dict[str, Any]) -> None:
        """Send an evaluation record to the parent, which writes it to the output at once."""
        self._outbox.put(("eval", self.rank, record))

    def broadcast(self, message: Any) -> None:
        """Put ``message`` on every other worker's inbox."""
        self._outbox.put(("broadcast", self.rank, message))

    def receive(self, what: str) -> Any:
        """The next message on this worker's inbox.

        Raises:
            RuntimeError: nothing arrived within ``timeout`` seconds.
        """
        try:
            return self._inbox.get(timeout=self.timeout)
        except queue.Empty:
            raise RuntimeError(f"no {what} within {self.timeout:.0f}s") from None

    def wait_for_all(self) -> None:
        """Block until every worker has called this (a barrier)."""
        self._barrier.wait(self.timeout)


def _kill_group(proc: mp.process.BaseProcess, sig: int) -> None:
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
    target: Callable[..., dict[str, Any]], worker: Worker, args: tuple[Any, ...]
) -> None:
    os.setpgid(0, 0)
    outbox = worker._outbox
    try:
        outbox.put(("done", worker.rank, target(worker, *args)))
    except BaseException:
        outbox.put(("error", worker.rank, traceback.format_exc()))
        raise
    finally:
        outbox.close()
        outbox.join_thread()


def run_workers(
    target: Callable[..., dict[str, Any]],
    num_workers: int,
    args: tuple[Any, ...],
    timeout: float,
    op_timeout: float,
    out: Path,
    on_started: Callable[[], Any] | None = None,
) -> list[dict[str, Any]]:
    """Fork ``num_workers`` processes running ``target(worker, *args)``; return their results.

    Evaluation records the workers report are written to ``out`` (JSON lines) as they come.
    If given, ``on_started()`` runs in this process once every worker is forked, and what it
    returns is put on every inbox: state that must not be inherited through ``fork`` (torchft's
    Rust runtime) is created there. Every worker, and everything it started, is killed when one
    fails, when ``timeout`` passes, or on Ctrl-C.

    Args:
        target: the worker's function; it gets a :class:`Worker` and ``args``.
        num_workers: M.
        args: the rest of ``target``'s arguments (inherited through ``fork``, not pickled).
        timeout: seconds from the fork to the last result.
        op_timeout: seconds any one wait of a worker for another may take.
        out: the JSON-lines file (overwritten).
        on_started: see above.

    Returns:
        The workers' results, by rank.

    Raises:
        RuntimeError: a worker failed or died, or the timeout passed.
    """
    ctx = mp.get_context("fork")
    outbox = ctx.Queue()
    inboxes = [ctx.Queue() for _ in range(num_workers)]
    barrier = ctx.Barrier(num_workers)
    workers = [
        Worker(rank, num_workers, op_timeout, outbox, inboxes[rank], barrier)
        for rank in range(num_workers)
    ]
    procs = [ctx.Process(target=_worker_entry, args=(target, w, args)) for w in workers]
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
