"""Run a function on several torch.distributed ranks in forked processes.

Shipped in the package so users can test their own backends, compressors and schedules the
way lowcomm tests its own::

    from lowcomm.testing import run_ranks

    def body(rank: int, world_size: int) -> float:
        x = torch.full((4,), float(rank))
        torch.distributed.all_reduce(x)
        return x[0].item()

    assert run_ranks(body, world_size=3) == [3.0, 3.0, 3.0]

Each rank is a forked child with a gloo process group rendezvousing through a ``file://``
in a fresh temp dir (no ports to collide), ``GLOO_SOCKET_IFNAME=lo``, and a timeout on every
collective. Results (anything picklable) come back to the parent in rank order; an exception
in any rank is re-raised in the parent with that rank's traceback. Forking costs ~0.1 s per
group here, spawning ~4 s; fork is also what hivemind's averagers need.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import shutil
import signal
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

__all__ = ["RankError", "run_ranks"]


class RankError(RuntimeError):
    """A rank raised, crashed or timed out; the message holds its traceback."""


def _child(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    init_file: str,
    timeout: float,
    results: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    import torch
    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # Forked children inherit the parent's intra-op threads setting; on 2 cores N ranks with
    # N threads each only thrash.
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout),
        )
        try:
            out = fn(rank, world_size, *args, **kwargs)
        finally:
            dist.destroy_process_group()
        # Plain pickle to bytes: a tensor put on a multiprocessing queue as is travels through
        # shared memory and a file-descriptor server that dies with this process.
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 60.0,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` forked gloo ranks.

    Args:
        fn: the per-rank body; the default process group is initialised when it starts and
            destroyed when it returns. Its return value must be picklable.
        world_size: number of ranks (>= 1).
        timeout: seconds for the whole run and for each collective inside it.

    Returns:
        The ranks' return values, in rank order.

    Raises:
        RankError: if any rank raised, died, or the run exceeded ``timeout``; every child is
            killed before this returns or raises.
    """
    if world_size < 1:
        raise ValueError(f"world_size ({world_size}) must be >= 1")
    # torch.optim imports torch._dynamo lazily on first use (~5 s here); import it once in
    # the parent so forked ranks inherit it instead of each paying for it.
    import torch._dynamo  # noqa: F401

    ctx = mp.get_context("fork")
    tmp = tempfile.mkdtemp(prefix="lowcomm-rdzv-")
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_child,
            args=(fn, r, world_size, os.path.join(tmp, "init"), timeout, results, args, kwargs),
            daemon=True,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    got: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while len(got) + len(errors) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                errors.append(f"timed out after {timeout:.0f}s; finished ranks: {sorted(got)}")
                break
            try:
                rank, ok, out = results.get(timeout=min(left, 0.5))
            except queue.Empty:
                dead = [
                    r
                    for r, p in enumerate(procs)
                    if p.exitcode is not None and p.exitcode != 0 and r not in got
                ]
                if dead:
                    # Give a rank that raised a moment to report its traceback first.
                    try:
                        rank, ok, out = results.get(timeout=1.0)
                    except queue.Empty:
                        errors.append(
                            f"ranks {dead} died with exit codes {[procs[r].exitcode for r in dead]}"
                        )
                        break
                else:
                    continue
            if ok:
                got[rank] = pickle.loads(out)
            else:
                errors.append(f"rank {rank} raised:\n{out}")
                break
    finally:
        for p in procs:
            p.join(timeout=0.0 if errors else 5.0)
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGKILL)
                p.join(timeout=5.0)
        results.close()
        shutil.rmtree(tmp, ignore_errors=True)
    if errors:
        raise RankError("\n".join(errors))
    return [got[r] for r in range(world_size)]
