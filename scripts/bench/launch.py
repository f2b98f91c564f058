"""Launching one benchmark run (one process per worker) and reading what it wrote.

:func:`run_workers` starts the recipe once per worker, on loopback or inside the
simulator's namespaces (reading the interface counters around the training window), and
kills every worker on failure or timeout; :func:`read_metrics` and the ``*_record``
functions turn a run's ``metrics.jsonl`` into the numbers the suite keeps. Used by
:mod:`scripts.bench.suite`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from scripts.bench import REPO, wansim
from scripts.bench.methods import Method

logger = logging.getLogger("lowcomm.bench")

RECIPE = REPO / "recipes" / "train_lm.py"
# Inside a fresh namespace every port is free; on loopback a free one is picked per run.
NETNS_MASTER_PORT = 29500
NETNS_DHT_PORT = 31337
# torch.distributed rendezvous variables, which a swarm peer must not see: it refuses
# WORLD_SIZE > 1 (every peer is a world of one, found through the DHT).
_RENDEZVOUS_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT")


class RunFailed(RuntimeError):
    """A training run exited non-zero or timed out; the message has its logs' tails."""


def free_port() -> int:
    """A TCP port that was free on loopback a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def recipe_argv(
    config_toml: Path, method: Method, seed: int, run_dir: Path, extra: dict[str, Any]
) -> list[str]:
    """The command of one worker: the recipe with the task TOML, the method and the seed."""
    options = {**method.options, "seed": seed, **extra}
    argv = [sys.executable, str(RECIPE), "--config", str(config_toml)]
    argv += [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    argv += ["--run-dir", str(run_dir), "--overwrite"]
    return argv


def worker_env(rank: int, workers: int, addr: str, port: int, threads: int) -> dict[str, str]:
    """torch env:// variables for one worker, one process per (simulated) host."""
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(workers),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(workers),
        "MASTER_ADDR": addr,
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "PYTHONUNBUFFERED": "1",
    }


def start_bootstrap(
    run_dir: Path, addr: str, sim: wansim.WanSim | None, timeout: float = 60.0
) -> tuple[subprocess.Popen[Any], str]:
    """A swarm run's bootstrap DHT (``lowcomm dht``), in host 0's namespace under ``sim``.

    Returns:
        The process (the caller kills it after the run) and the multiaddr peers join with.

    Raises:
        RunFailed: it exited or did not write its address within ``timeout`` seconds.
    """
    addrs, log_path = run_dir / "dht.addrs", run_dir / "dht.log"
    port = NETNS_DHT_PORT if sim is not None else 0
    argv = [sys.executable, "-m", "lowcomm.cli", "dht", "--host", addr, "--port", str(port)]
    argv += ["--addrs-file", str(addrs)]
    with open(log_path, "w", encoding="utf-8") as log:
        kw: dict[str, Any] = {"stdout": log, "stderr": subprocess.STDOUT, "cwd": REPO}
        if sim is not None:
            proc = sim.popen(0, argv, **kw)
        else:
            proc = subprocess.Popen(argv, start_new_session=True, **kw)
    deadline = time.monotonic() + timeout
    while not addrs.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            _kill([proc])
            raise RunFailed(f"the bootstrap DHT did not come up:\n{_tail(log_path)}")
        time.sleep(0.1)
    return proc, addrs.read_text(encoding="utf-8").split()[0]


#: Seconds a swarm peer waits for the others at start before it fails the run.
PEER_WAIT_S = 120.0


def peer_argv(
    argv: list[str], run_dir: Path, rank: int, initial_peer: str, workers: int
) -> list[str]:
    """Worker ``rank``'s command in a swarm run: its own run directory (peer 0 keeps the
    run's, whose metrics the suite reads), the bootstrap address, the run's id, and a start
    that waits for all ``workers`` peers (else a peer that starts a few seconds late on a
    loaded machine finds the other done, and the run measures a lone peer, not a swarm)."""
    out = list(argv)
    i = out.index("--run-dir")
    out[i + 1] = str(run_dir if rank == 0 else run_dir / f"peer{rank}")
    return [
        *out,
        f"--initial-peers={initial_peer}",
        f"--run-id=bench-{run_dir.name}",
        f"--wait-for-peers={workers}",
        f"--wait-for-peers-timeout={PEER_WAIT_S:g}",
    ]


def _first_train_record(path: Path) -> dict[str, Any] | None:
    """The first ``train/loss`` record of a metrics file being written, if there is one."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.endswith("\n"):
                    return None
                rec = json.loads(line)
                if "train/loss" in rec:
                    return rec
    except FileNotFoundError:
        return None
    return None


def _has_summary(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            return any('"summary/' in line for line in f)
    except FileNotFoundError:
        return False


def proc_net_counters(pid: int, ifname: str) -> dict[str, int]:
    """Counters of ``ifname`` as seen from process ``pid``'s network namespace.

    The same kernel counters as :meth:`wansim.WanSim.counters` (``/proc/<pid>/net/dev`` and
    netlink both read ``dev_get_stats``), but a file read instead of running ``ip``, so a
    snapshot can follow a log record within a millisecond.

    Raises:
        OSError: the process is gone.
        KeyError: the interface is not in its namespace.
    """
    with open(f"/proc/{pid}/net/dev", encoding="ascii") as f:
        for line in f:
            name, sep, rest = line.partition(":")
            if sep and name.strip() == ifname:
                v = [int(x) for x in rest.split()]
                return {"tx_bytes": v[8], "tx_packets": v[9], "rx_bytes": v[0], "rx_packets": v[1]}
    raise KeyError(f"{ifname} not in /proc/{pid}/net/dev")


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-chars:]
    except FileNotFoundError:
        return "(no log)"


def _kill(procs: Sequence[subprocess.Popen[Any]]) -> None:
    live = [p for p in procs if p.poll() is None]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in live:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, sig)
        deadline = time.monotonic() + 5.0
        for p in live:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
        live = [p for p in live if p.poll() is None]
        if not live:
            return


#: A worker's command from its rank and its host's address (peers launched one per host).
ArgvFor = Callable[[int, str], list[str]]


def run_workers(
    argv: list[str] | ArgvFor,
    run_dir: Path,
    workers: int,
    threads: int,
    timeout: float,
    sim: wansim.WanSim | None = None,
    swarm: bool = False,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``argv`` once per worker and wait; read interface counters when ``sim`` is given.

    On loopback the workers rendezvous on 127.0.0.1 at a free port; under ``sim`` worker ``i``
    runs in host ``i``'s namespace (``GLOO_SOCKET_IFNAME`` its veth) and host 0's address.
    With ``swarm`` the workers are hivemind peers instead: a bootstrap DHT starts first (on
    host 0), and every worker joins through it as a world of one (:func:`peer_argv`).
    ``argv`` may also be a function of the rank and the host's address (a peer library's
    workers, which find each other on their own): then, as for ``swarm``, the workers get
    no torch rendezvous variables.
    ``env`` is added to every worker's environment (e.g. ``LOWCOMM_TIMELINE``).

    Returns:
        ``wall_s``; with ``sim`` also per-host counter deltas (tx/rx bytes and packets):
        ``wire`` from the first training log record (inner step ``log_every``) to the end of
        the run, ``wire_setup`` from before the launch to that record, and ``wire_log_step``,
        the step of that record (None if the run ended before it was seen: then ``wire`` is
        the whole run). The window starts at a log record, not at step 0, so that the
        start-up traffic (rendezvous, the parameter broadcast) stays out of it.

    Raises:
        RunFailed: a worker exited non-zero or ``timeout`` passed (all workers are killed).
    """
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    metrics = run_dir / "metrics.jsonl"
    logs = [run_dir / f"rank{r}.log" for r in range(workers)]
    files = [open(p, "w", encoding="utf-8") for p in logs]  # noqa: SIM115 - closed below
    procs: list[subprocess.Popen[Any]] = []
    helpers: list[subprocess.Popen[Any]] = []
    t0 = time.monotonic()
    out: dict[str, Any] = {}
    try:
        port = NETNS_MASTER_PORT if sim is not None else free_port()
        addr = sim.host_address(0) if sim is not None else "127.0.0.1"
        before = sim.counters() if sim is not None else None
        snapshot, log_step = None, None
        initial_peer = ""
        if swarm:
            dht, initial_peer = start_bootstrap(run_dir, addr, sim)
            helpers.append(dht)
        isolated = swarm or callable(argv)
        for r in range(workers):
            wenv = {**worker_env(r, workers, addr, port, threads), **(env or {})}
            if callable(argv):
                cmd = argv(r, sim.host_address(r) if sim is not None else "127.0.0.1")
            elif swarm:
                cmd = peer_argv(argv, run_dir, r, initial_peer, workers)
            else:
                cmd = argv
            if isolated:
                wenv = {k: v for k, v in wenv.items() if k not in _RENDEZVOUS_VARS}
            kw: dict[str, Any] = {"stdout": files[r], "stderr": subprocess.STDOUT, "cwd": REPO}
            if sim is not None:
                procs.append(sim.popen(r, cmd, env=wenv, **kw))
            else:
                wenv["GLOO_SOCKET_IFNAME"] = "lo"
                full = {**os.environ, **wenv}
                for var in _RENDEZVOUS_VARS if isolated else ():
                    full.pop(var, None)
                procs.append(subprocess.Popen(cmd, env=full, start_new_session=True, **kw))
        while True:
            codes = [p.poll() for p in procs]
            if sim is not None and snapshot is None:
                rec = _first_train_record(metrics)
                if rec is not None:
                    log_step = int(rec["step"])
                    try:
                        snapshot = [
                            {"rank": i, **proc_net_counters(procs[i].pid, sim.ifname(i))}
                            for i in range(workers)
                        ]
                    except (OSError, KeyError):
                        snapshot = sim.counters()
            failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if failed and not _has_summary(metrics):
                r = failed[0]
                raise RunFailed(f"worker {r} exited {codes[r]} ({_show(argv)}):\n{_tail(logs[r])}")
            if failed:
                # Rank 0 wrote its summary, so every collective of the run completed: the
                # failure is in teardown. The measurement stands; the anomaly is reported.
                deadline = time.monotonic() + 10.0
                while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
                    time.sleep(0.1)
                codes = [p.poll() for p in procs]
                out["exit_anomalies"] = [
                    {"rank": r, "returncode": c, "log_tail": _tail(logs[r], 400)}
                    for r, c in enumerate(codes)
                    if c != 0
                ]
                logger.warning("exit after the summary was written: %s", out["exit_anomalies"])
                break
            if all(c == 0 for c in codes):
                break
            if time.monotonic() - t0 > timeout:
                raise RunFailed(
                    f"timed out after {timeout:.0f}s ({_show(argv)}):\n{_tail(logs[0])}"
                )
            # Fast polling only while waiting for the first log record, so that the snapshot
            # lands close to it (before the next step's traffic).
            time.sleep(0.001 if sim is not None and snapshot is None else 0.1)
        out["wall_s"] = time.monotonic() - t0
        if sim is not None:
            assert before is not None
            after = sim.counters()
            start = snapshot if snapshot is not None else before
            out["wire_log_step"] = log_step
            out["wire"] = _counter_delta(start, after)
            out["wire_setup"] = _counter_delta(before, start)
    finally:
        _kill(procs)
        _kill(helpers)
        for f in files:
            f.close()
    return out


def _show(argv: list[str] | ArgvFor) -> str:
    return " ".join(argv(0, "HOST") if callable(argv) else argv)


def _counter_delta(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[dict[str, int]]:
    keys = ("tx_bytes", "rx_bytes", "tx_packets", "rx_packets")
    return [{"rank": x["rank"], **{k: y[k] - x[k] for k in keys}} for x, y in zip(a, b)]


def run_with_retry(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """:func:`run_workers`, retried once when the loopback port was taken meanwhile."""
    try:
        return run_workers(*args, **kwargs)
    except RunFailed as e:
        if kwargs.get("sim") is None and "address already in use" in str(e).lower():
            logger.warning("port taken between picking and binding it; retrying once")
            return run_workers(*args, **kwargs)
        raise


# -- reading a run's metrics -------------------------------------------------------------------


def read_metrics(run_dir: Path) -> dict[str, Any]:
    """The recipe's ``metrics.jsonl``: eval records, train log records and the summary."""
    evals, logs, summary = [], [], {}
    with open(run_dir / "metrics.jsonl", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if "eval/loss" in rec:
                evals.append(rec)
            elif "train/loss" in rec:
                logs.append(rec)
            elif any(k.startswith("summary/") for k in rec):
                summary = {k[len("summary/") :]: v for k, v in rec.items() if "/" in k}
    if not summary or not evals:
        raise RunFailed(f"{run_dir}/metrics.jsonl has no summary or no evaluation")
    return {"evals": evals, "logs": logs, "summary": summary}


def worker_dirs(run_dir: Path, workers: int, swarm: bool = False) -> list[Path]:
    """Each worker's run directory: the run's (torch.distributed: every rank writes there,
    ``worker<R>.json``), or a swarm peer's own (``peer<R>/``, where it is rank 0)."""
    if swarm:
        return [run_dir if r == 0 else run_dir / f"peer{r}" for r in range(workers)]
    return [run_dir] * workers


def read_workers(run_dir: Path, workers: int, swarm: bool = False) -> list[dict[str, Any] | None]:
    """Each worker's ``worker<R>.json`` (its training window and blocked seconds, written by
    the recipe), in rank order; None for a worker that wrote none."""
    out: list[dict[str, Any] | None] = []
    for r, d in enumerate(worker_dirs(run_dir, workers, swarm)):
        path = d / f"worker{0 if swarm else r}.json"
        out.append(json.loads(path.read_text(encoding="utf-8")) if path.exists() else None)
    return out


def bytes_at(logs: list[dict[str, Any]], step: int) -> int:
    """The library's byte counter at the last train log record at or before ``step``."""
    sent = 0
    for rec in logs:
        if rec["step"] > step:
            break
        sent = int(rec.get("bytes_sent", 0))
    return sent


def quality_record(m: dict[str, Any], peers: int = 1) -> dict[str, Any]:
    """The per-run result of a quality run from its metrics.

    ``peers``: a swarm run's peer 0 is a world of one and counts its own tokens; the swarm
    trained ``peers`` times as many (its peers step in lockstep, round by round).
    """
    s, logs = m["summary"], m["logs"]
    last = logs[-1] if logs else {}
    return {
        "evals": [
            {
                "step": e["step"],
                "tokens": e["tokens"] * peers,
                "loss": e["eval/loss"],
                "bytes_sent": bytes_at(logs, e["step"]),
            }
            for e in m["evals"]
        ],
        "final_eval_loss": s["final_eval_loss"],
        "first_eval_loss": s["first_eval_loss"],
        "num_params": s["num_params"],
        "world_size": s["world_size"],
        "steps": s["steps"],
        "bytes_sent": s["bytes_sent"],
        "bytes_sent_estimated": s["bytes_sent_estimated"],
        "allreduce_bytes": s["allreduce_bytes"],
        "outer_steps": s["outer_steps"],
        "peak_sync_bytes": last.get("peak_sync_bytes"),
        "compression_ratio": last.get("compression_ratio"),
        "elapsed_s": s["elapsed_s"],
        "tokens_per_s_incl_eval": s["tokens_per_s"] * peers,
    }


def throughput_record(m: dict[str, Any], peers: int = 1) -> dict[str, Any]:
    """tokens/s between the step-0 evaluation and the last step's log line, and the bytes.

    ``peers``: as in :func:`quality_record`.
    """
    s, logs = m["summary"], m["logs"]
    t0 = m["evals"][0]["time"]
    last = logs[-1]
    seconds = last["time"] - t0
    tokens = last["tokens"] * peers
    return {
        "steps": last["step"],
        "tokens": tokens,
        "train_seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds > 0 else None,
        "lib_bytes_sent_rank0": int(last.get("bytes_sent", 0)),
        "lib_bytes_received_rank0": last.get("bytes_received"),
        "lib_bytes_estimated": s["bytes_sent_estimated"],
        "num_params": s["num_params"],
        "outer_steps": s["outer_steps"],
        "peak_sync_bytes": last.get("peak_sync_bytes"),
        "comm_seconds": last.get("comm_seconds"),
    }
