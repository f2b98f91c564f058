"""A peer baseline's workers, the messages between them, and their cleanup. Two launches:

* **Forked** (:func:`run_workers`): one command forks every worker on loopback. Each is a
  child leading its own process group, so that whatever it starts (hivemind's DHT and
  averager processes, p2pd) is killed with it; workers talk to the parent through queues:
  evaluation records, broadcasts to the other workers, and a final result.
* **One process per worker** (:func:`run_one_worker`, the command's ``--rank``): the way
  lowcomm's recipe is launched, one process per (simulated) host, each in its own network
  namespace behind a shaped link. Workers talk through files in a directory they all see
  (``--rendezvous``: namespaces isolate the network, not the file system): broadcasts,
  barriers, and the results rank 0 collects for the summary.

Both kinds of worker satisfy :class:`Worker`.
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
from typing import Any, Protocol

import numpy as np

from lowcomm.comm.timeline import TIMELINE

__all__ = ["ForkedWorker", "ProcessWorker", "Worker", "reap", "run_one_worker", "run_workers"]

logger = logging.getLogger(__name__)


class Worker(Protocol):
    """What a peer baseline's worker is given: its rank, the others' count, and channels.

    Attributes:
        rank: this worker's index, ``0..num_workers-1``.
        num_workers: the number of workers (M).
        timeout: seconds any one wait for another worker may take.
    """

    rank: int
    num_workers: int
    timeout: float

    def report(self, record: dict[str, Any]) -> None:
        """Write an evaluation record to the run's output (rank 0 reports them)."""
        ...

    def broadcast(self, message: Any) -> None:
        """Send ``message`` (JSON-able) to every other worker."""
        ...

    def receive(self, what: str) -> Any:
        """The next message for this worker (``what`` names it in the timeout error)."""
        ...

    def wait_for_all(self) -> None:
        """Block until every worker has called this (a barrier)."""
        ...


@dataclasses.dataclass
class ForkedWorker:
    """A forked :class:`Worker` (:func:`run_workers`): its channels are the parent's queues."""

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
    target: Callable[..., dict[str, Any]], worker: ForkedWorker, args: tuple[Any, ...]
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
        ForkedWorker(rank, num_workers, op_timeout, outbox, inboxes[rank], barrier)
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


@dataclasses.dataclass
class ProcessWorker:
    """A worker that is a process of its own (:func:`run_one_worker`); its channels are files
    in ``rendezvous``, a directory every worker sees.

    Args:
        rank: this worker's index.
        num_workers: M.
        timeout: seconds any one wait for another worker may take.
        rendezvous: the shared directory (created if missing).
        out: where rank 0 writes the evaluation records (None: nowhere).
        inbox: messages for this worker itself, read before any other worker's broadcasts
            (rank 0 gives itself the address it broadcast).
    """

    rank: int
    num_workers: int
    timeout: float
    rendezvous: Path
    out: Path | None = None
    inbox: list[Any] = dataclasses.field(default_factory=list)
    _sent: int = 0
    _read: set[str] = dataclasses.field(default_factory=set)
    _barriers: int = 0

    def __post_init__(self) -> None:
        self.rendezvous.mkdir(parents=True, exist_ok=True)

    def report(self, record: dict[str, Any]) -> None:
        if self.out is not None:
            with open(self.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            logger.info("step %d: eval loss %.4f", record["step"], record["eval_loss"])

    def broadcast(self, message: Any) -> None:
        _write_atomic(self.rendezvous / f"message.{self.rank}.{self._sent}.json", message)
        self._sent += 1

    def receive(self, what: str) -> Any:
        if self.inbox:
            return self.inbox.pop(0)

        def unread() -> list[Path]:
            return sorted(
                p
                for p in self.rendezvous.glob("message.*.json")
                if p.name.split(".")[1] != str(self.rank) and p.name not in self._read
            )

        path = self._poll(lambda: (unread() or [None])[0], what)
        self._read.add(path.name)
        return json.loads(path.read_text(encoding="utf-8"))

    def wait_for_all(self) -> None:
        n = self._barriers
        self._barriers += 1
        (self.rendezvous / f"barrier.{n}.{self.rank}").touch()
        marks = [self.rendezvous / f"barrier.{n}.{r}" for r in range(self.num_workers)]
        self._poll(lambda: all(m.exists() for m in marks) or None, f"barrier {n}")

    def save_result(self, result: dict[str, Any]) -> None:
        """Leave this worker's result for rank 0 (its ``params`` as a ``.npy`` beside it);
        its training window as ``worker<R>.json`` and, when lowcomm's timeline is on, its
        spans as ``timeline.rank<R>.jsonl``, the files lowcomm's recipe writes."""
        params = np.asarray(result["params"])
        np.save(self.rendezvous / f"params.{self.rank}.npy", params)
        rest = {k: v for k, v in result.items() if k != "params"}
        if "window" in result:
            _write_atomic(self.rendezvous / f"worker{self.rank}.json", result["window"])
        if TIMELINE.enabled:
            TIMELINE.write(self.rendezvous / f"timeline.rank{self.rank}.jsonl", rank=self.rank)
        _write_atomic(self.rendezvous / f"result.{self.rank}.json", rest)

    def collect_results(self) -> list[dict[str, Any]]:
        """Every worker's result, by rank (waiting for them)."""
        out = []
        for r in range(self.num_workers):
            path = self.rendezvous / f"result.{r}.json"
            self._poll(lambda p=path: p.exists() or None, f"worker {r}'s result")
            rec = json.loads(path.read_text(encoding="utf-8"))
            rec["params"] = np.load(self.rendezvous / f"params.{r}.npy")
            out.append(rec)
        return out

    def _poll(self, ready: Callable[[], Any], what: str) -> Any:
        deadline = time.monotonic() + self.timeout
        while (got := ready()) is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {what} within {self.timeout:.0f}s ({self.rendezvous})")
            time.sleep(0.02)
        return got


def _write_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj), encoding="utf-8")
    os.replace(tmp, path)


def run_one_worker(
    target: Callable[..., dict[str, Any]],
    worker: ProcessWorker,
    args: tuple[Any, ...] = (),
) -> list[dict[str, Any]] | None:
    """Run ``target(worker, *args)`` in this process, as worker ``worker.rank`` of a launch
    with one process per worker; return every worker's result on rank 0, None on the others.

    Each worker leaves its result in the rendezvous directory; rank 0 collects them (the
    others may already have exited) for the summary.
    """
    if worker.rank == 0 and worker.out is not None:
        worker.out.parent.mkdir(parents=True, exist_ok=True)
        worker.out.write_text("", encoding="utf-8")
    worker.save_result(target(worker, *args))
    return worker.collect_results() if worker.rank == 0 else None
