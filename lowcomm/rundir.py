"""Run directory lock: one live run per run directory.

:func:`lock_run_dir` takes, on every rank, an exclusive ``flock`` on
``run_dir/.lock.rankNNNNN`` for the run's life, so that a second run started in the same
directory fails fast on every rank instead of overwriting the first run's checkpoints.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

__all__ = ["RunDirLock", "lock_run_dir"]

_LOCK_PREFIX = ".lock.rank"


class RunDirLock:
    """One rank's hold on a run directory, from :func:`lock_run_dir`.

    Held until :meth:`release` (or the end of a ``with`` block); if the process dies first,
    the kernel releases it.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        """Give the directory up (idempotent)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the only descriptor drops the flock

    def __enter__(self) -> RunDirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _try_flock(fd: int, operation: int) -> bool:
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _lock_path(run_dir: Path, rank: int) -> Path:
    return run_dir / f"{_LOCK_PREFIX}{rank:05d}"


def _holder(path: Path) -> dict[str, Any]:
    """What the (last) holder of a lock file wrote into it; {} if unreadable."""
    try:
        holder = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _is_held(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        return not _try_flock(fd, fcntl.LOCK_SH)
    finally:
        os.close(fd)


def _in_use(run_dir: Path, path: Path) -> ValueError:
    h = _holder(path)
    who = (
        f"pid {h.get('pid')} on host {h.get('host')} (its rank {h.get('rank')})"
        if h
        else "a process that has not said who it is yet"
    )
    return ValueError(
        f"run_dir {run_dir} is in use by another live run: {path.name} is held by {who}; "
        "wait for that run to end, stop it, or use another run_dir"
    )


def lock_run_dir(
    run_dir: str | os.PathLike[str],
    rank: int,
    *,
    run_id: str,
    grace: float = 0.5,
    poll_interval: float = 0.01,
) -> RunDirLock:
    """Claim ``run_dir`` for rank ``rank`` of run ``run_id`` until the lock is released.

    Call protocol: every rank calls it at start-up, before any collective (so a rank that
    fails here leaves no other rank waiting in one), and holds the lock for the whole run.
    Each rank takes an exclusive ``flock`` on ``run_dir/.lock.rankNNNNN`` and writes its pid,
    host and ``run_id`` into it. Ranks other than 0 also check that rank 0's lock is free or
    held by their own run: so a second run fails on every rank even when it has more ranks
    than the run that holds the directory. The kernel drops a ``flock`` when its holder dies,
    so a crashed run never blocks the next; lock files are never deleted (deleting one would
    race with a process that has opened it and is about to lock it). On NFS, Linux maps
    ``flock`` to POSIX locks, which the server arbitrates.

    Args:
        run_dir: the run directory (created if missing).
        rank: this process's rank.
        run_id: the same on every rank of one run and different between runs that can
            overlap (the recipe uses torchrun's run id and rendezvous address).
        grace: seconds a busy lock is retried: another rank of this run may hold it for an
            instant while checking it, whereas a live run holds it for its whole life.
        poll_interval: seconds between retries.

    Returns:
        The held lock.

    Raises:
        ValueError: if another live run holds the directory, naming its pid and host.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = _lock_path(run_dir, rank)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask applies
    try:
        deadline = time.monotonic() + grace
        while not _try_flock(fd, fcntl.LOCK_EX):
            if time.monotonic() > deadline:
                raise _in_use(run_dir, path)
            time.sleep(poll_interval)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "rank": rank, "run_id": run_id}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        if rank != 0:
            first = _lock_path(run_dir, 0)
            deadline = time.monotonic() + grace
            # Held by a stranger may also be this run's rank 0 between its flock and its
            # write: give it the grace period to say who it is.
            while _holder(first).get("run_id") != run_id and _is_held(first):
                if time.monotonic() > deadline:
                    raise _in_use(run_dir, first)
                time.sleep(poll_interval)
    except BaseException:
        os.close(fd)
        raise
    return RunDirLock(path, fd)
