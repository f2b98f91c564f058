"""A swarm on loopback: a bootstrap DHT and peers, each a real ``lowcomm`` process.

Every process is started as a volunteer would start it (``python -m lowcomm.cli dht`` and
``python -m lowcomm.cli join ...``), in a session of its own, so that a stall can stop all
of a peer's processes (its hivemind averagers and ``p2pd`` daemon too) and cleanup can reach
every one of them. Faults go through :class:`Peer`'s methods, which note when they
happened; :class:`LoopbackSwarm` starts and reaps the processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil

from scripts.reliability import REPO

__all__ = ["LoopbackSwarm", "Peer", "read_records"]


def _group_pids(pgid: int) -> list[int]:
    """Live processes (not zombies) of process group ``pgid``."""
    pids = []
    for proc in psutil.process_iter(["pid", "status"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError, OSError):
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                pids.append(proc.pid)
    return pids


@dataclass
class Peer:
    """One peer process (one incarnation of a slot) and what happened to it.

    Faults are sent without blocking; :meth:`poll` (called often by the harness) notes what
    followed: the exit after a leave, children that outlived a kill, an exit nobody caused.

    Attributes:
        name: ``s<slot>g<generation>``: slot and incarnation.
        slot: the slot it fills.
        run_dir: its ``--run-dir`` (metrics, checkpoints, ``config.json``).
        proc: the process.
        started: wall time it was started.
        stalls: ``[stop, cont]`` wall times of its stalls (``cont`` None while stopped).
        ended: wall time it was seen gone (or killed, or given up on); None while it runs.
        cause: why it ended: ``kill``, ``leave``, ``end`` (stopped at the soak's end), or
            ``exit`` (it exited by itself: a crash or a refused join).
        returncode: its exit status (None: it did not exit when asked to leave).
        orphans: processes of its group still alive 10 s after its main process was killed.
    """

    name: str
    slot: int
    run_dir: Path
    proc: subprocess.Popen[bytes]
    log: IO[bytes]
    started: float
    stalls: list[list[float | None]] = field(default_factory=list)
    ended: float | None = None
    cause: str | None = None
    returncode: int | None = None
    orphans: list[int] = field(default_factory=list)
    _leaving_since: float | None = None
    _orphan_check_at: float | None = None

    @property
    def alive(self) -> bool:
        """Whether it has not ended (a stopped or leaving peer has not)."""
        return self.ended is None

    @property
    def stopped(self) -> bool:
        """Whether it is stalled right now."""
        return bool(self.stalls) and self.stalls[-1][1] is None

    def stop(self, whole: bool) -> None:
        """SIGSTOP: every process of the peer (``whole``) or its main process only."""
        if whole:
            os.killpg(self.proc.pid, signal.SIGSTOP)
        else:
            os.kill(self.proc.pid, signal.SIGSTOP)
        self.stalls.append([time.time(), None])

    def cont(self) -> None:
        """SIGCONT to every process of the peer (harmless to those not stopped)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGCONT)
        if self.stopped:
            self.stalls[-1][1] = time.time()

    def kill(self) -> None:
        """SIGKILL of the main process, as a crash; its children must go with it
        (:meth:`poll` looks for any left 10 s later)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.mark_ended("kill")
        self._orphan_check_at = time.time() + 10.0

    def leave(self) -> None:
        """SIGTERM, a graceful leave (:meth:`poll` waits for the exit)."""
        if self.stopped:
            self.cont()  # a stopped process would only see SIGTERM once continued
        self.proc.send_signal(signal.SIGTERM)
        self._leaving_since = time.time()

    def poll(self, leave_timeout: float = 60.0) -> None:
        """Note what happened since the last look: an exit after :meth:`leave` (or none
        after ``leave_timeout`` s: then it is reaped), a group that outlived a kill, an exit
        the harness did not cause."""
        now = time.time()
        if self._orphan_check_at is not None and now >= self._orphan_check_at:
            self._orphan_check_at = None
            self.orphans = _group_pids(self.proc.pid)
            if self.orphans:
                self.reap()
        if self.ended is not None:
            return
        if self.proc.poll() is not None:
            self.mark_ended("leave" if self._leaving_since is not None else "exit")
        elif self._leaving_since is not None and now - self._leaving_since > leave_timeout:
            self.mark_ended("leave")
            self.reap()

    def reap(self) -> None:
        """SIGKILL whatever of its process group is left."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGCONT)
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)

    def mark_ended(self, cause: str) -> None:
        """Record that it ended now, and why (once)."""
        if self.ended is not None:
            return
        self.ended, self.cause = time.time(), cause
        self.returncode = self.proc.poll()
        if self.stopped:
            self.stalls[-1][1] = self.ended
        self.log.close()

    def summary(self) -> dict[str, Any]:
        """A JSON-ready account of this incarnation."""
        return {
            "name": self.name,
            "slot": self.slot,
            "run_dir": str(self.run_dir),
            "started": self.started,
            "ended": self.ended,
            "cause": self.cause,
            "returncode": self.returncode,
            "stalls": self.stalls,
            "orphans": self.orphans,
            "leave_s": None
            if self._leaving_since is None or self.ended is None
            else round(self.ended - self._leaving_since, 2),
        }


def exit_on_sigterm() -> None:
    """Make SIGTERM raise SystemExit, so that the swarm's ``finally`` stops its peers (the
    default action would end this process alone and leave them running, some stopped)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


def read_records(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Complete JSON lines of ``path`` from byte ``offset`` on; and the offset after them."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1  # a line still being written waits for the next read
    records = []
    for line in data[:end].splitlines():
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    return records, offset + end


class LoopbackSwarm:
    """A bootstrap DHT and peer processes on 127.0.0.1, under ``work_dir``.

    Args:
        work_dir: where run directories and logs go (``peers/<name>/``, ``logs/``).
        run_id: the run's id, for every peer.
        python: the interpreter that runs ``lowcomm`` (this one by default).
        data_dir: ``--data-dir`` for every peer (the corpus cache, shared).
    """

    def __init__(
        self,
        work_dir: Path,
        run_id: str,
        python: str = sys.executable,
        data_dir: Path | None = None,
    ) -> None:
        self.work_dir = Path(work_dir).resolve()
        self.run_id = run_id
        self.python = python
        self.data_dir = data_dir or self.work_dir / "data"
        self.addr = ""
        self.peers: list[Peer] = []
        self._dht: subprocess.Popen[bytes] | None = None
        self._generation: dict[int, int] = {}
        # A previous swarm's peers and logs here would be read as this one's (their metrics,
        # checkpoints and locks): start empty, keeping only the corpus cache.
        for stale in ("peers", "logs"):
            shutil.rmtree(self.work_dir / stale, ignore_errors=True)
        (self.work_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "GLOO_SOCKET_IFNAME": "lo",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            # A peer may run a module of this checkout (scripts.reliability.robust).
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
            ),
        }

    def _popen(
        self, args: list[str], log_path: Path, entry: list[str] | None = None
    ) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
        log = open(log_path, "ab")  # noqa: SIM115 - closed when the peer ends
        proc = subprocess.Popen(
            [self.python, *(entry or ["-m", "lowcomm.cli"]), *args],
            cwd=self.work_dir,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return proc, log

    def start_dht(self, timeout: float = 90.0) -> str:
        """Start ``lowcomm dht`` and return its first multiaddr.

        Raises:
            RuntimeError: it did not write its addresses within ``timeout`` seconds.
        """
        addrs = self.work_dir / "dht.addrs"
        addrs.unlink(missing_ok=True)
        self._dht, log = self._popen(
            ["dht", "--host", "127.0.0.1", "--addrs-file", str(addrs)],
            self.work_dir / "logs" / "dht.log",
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not addrs.exists():
            if time.monotonic() > deadline or self._dht.poll() is not None:
                raise RuntimeError(f"the bootstrap DHT did not start (see {log.name})")
            time.sleep(0.2)
        self.addr = addrs.read_text().split()[0]
        return self.addr

    def start_peer(self, slot: int, options: list[str], entry: list[str] | None = None) -> Peer:
        """Start a new incarnation of ``slot``: ``lowcomm join`` with ``options`` after the
        swarm's own (initial peers, run id, run dir, data dir); ``entry`` replaces
        ``-m lowcomm.cli`` (a module of this checkout that takes the same arguments)."""
        generation = self._generation.get(slot, -1) + 1
        self._generation[slot] = generation
        name = f"s{slot}g{generation}"
        run_dir = self.work_dir / "peers" / name
        args = [
            "join",
            "--initial-peers",
            self.addr,
            "--run-id",
            self.run_id,
            "--run-dir",
            str(run_dir),
            "--data-dir",
            str(self.data_dir),
            *options,
        ]
        proc, log = self._popen(args, self.work_dir / "logs" / f"{name}.log", entry)
        peer = Peer(name, slot, run_dir, proc, log, time.time())
        self.peers.append(peer)
        return peer

    def in_slot(self, slot: int) -> Peer | None:
        """The running incarnation of ``slot``, if any."""
        for peer in reversed(self.peers):
            if peer.slot == slot and peer.alive:
                return peer
        return None

    def close(self, graceful: bool = True) -> None:
        """End every peer (SIGTERM first when ``graceful``), then the DHT; reap everything."""
        live = [p for p in self.peers if p.alive]
        for peer in live:
            if graceful:
                peer.leave()
        deadline = time.monotonic() + (60.0 if graceful else 0.0)
        for peer in live:
            with contextlib.suppress(subprocess.TimeoutExpired):
                peer.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            peer.mark_ended("end")
        for peer in self.peers:
            peer.reap()
        if self._dht is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._dht.pid, signal.SIGTERM)
            try:
                self._dht.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._dht.pid, signal.SIGKILL)
                self._dht.wait()
