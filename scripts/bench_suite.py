#!/usr/bin/env python
"""Benchmark suite: what each training method sends, how good the model gets, how fast it trains.

Run (from the repository root; shaped links need root, everything else does not)::

    sudo .venv/bin/python scripts/bench_suite.py                      # default profile, minutes
    .venv/bin/python scripts/bench_suite.py --rates loopback          # no root: no shaped links
    sudo nohup .venv/bin/python scripts/bench_suite.py --profile headline > bench.log 2>&1 &
    .venv/bin/python scripts/bench_suite.py --profile smoke --out /tmp/b --doc /tmp/b/B.md
    .venv/bin/python scripts/bench_suite.py --dry-run                 # the plan, what is cached
    .venv/bin/python scripts/bench_suite.py --help

Every run goes through the real recipe, ``recipes/train_lm.py``, one process per worker
(``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` env:// rendezvous), ONE training at a time, with the
same model, data streams (``sample_batch(seed, rank, step)``), seed and token budget for every
method: DP is ``--mode ddp`` with the same per-worker batch, so its global batch is M times
the per-worker batch and every method sees the same tokens.

Three phases, each made of independent runs whose results are cached under ``--work-dir``
(a run whose result file exists with the same settings is skipped, so an interrupted suite
resumes where it stopped; ``--force`` reruns):

1. **Quality** (loopback): every method x every seed for the profile's step count; the eval
   loss curve (global parameters for DiLoCo), the tokens and the library's byte counter at each
   evaluation. DP's bytes are the ring all-reduce estimate (torch DDP counts nothing); the shaped
   runs check that estimate against the interface counters.
2. **Throughput** (one network namespace per worker behind ``tbf``-shaped links, via
   ``scripts/wansim.py``; ``loopback`` runs without namespaces): short runs per method and
   link rate. tokens/s is measured from the end of the step-0 evaluation to the last step's
   log line (no evaluation inside). The ceiling is ``--mode local`` (no communication at all),
   measured before and after each rate's block; every method is reported as a fraction of it.
   The per-host interface byte counters are read when the step-0 evaluation is logged and
   after the run, and put beside the library's own counter for the same window.
3. **Peers** (loopback): torchft 0.2.0 DiLoCo and hivemind 1.1.12 ``Optimizer
   (use_local_updates=True)`` through ``scripts/peers/*.py`` on the same task and seeds.

Then ``benchmarks/results.json`` (every run, every eval point, the machine),
``benchmarks/summary.csv``, the plots (``scripts/bench_plots.py``) and ``BENCHMARKS.md``
(``scripts/bench_report.py``) are written. Profiles other than ``default`` write to
``benchmarks/<profile>/``; the report shows every profile found there.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import bench_plots  # noqa: E402
import bench_report  # noqa: E402
import wansim  # noqa: E402

logger = logging.getLogger("lowcomm.bench")

RECIPE = REPO / "recipes" / "train_lm.py"
PEER_SCRIPTS = {
    "torchft": REPO / "scripts" / "peers" / "torchft_diloco.py",
    "hivemind": REPO / "scripts" / "peers" / "hivemind_optimizer.py",
}
PEER_VERSIONS = {"torchft": "0.2.0", "hivemind": "1.1.12"}
DEFAULT_TORCHFT_PYTHON = "/tmp/ftvenv/bin/python"
RESULT_VERSION = 1
# Per packet the veth counter sees: Ethernet (14) + IPv4 (20) + TCP with timestamps (32).
# A GSO super-packet counts once, with one set of headers, as the counter counts it.
HEADER_BYTES_PER_PACKET = 66
# Inside a fresh namespace every port is free; on loopback a free one is picked per run.
NETNS_MASTER_PORT = 29500
WANSIM_PREFIX = "lcbench"
# Keys of the recipe config that a method or a phase sets; the rest is the profile's task.
_RUN_KEYS = ("config", "run_dir", "resume", "overwrite", "mode", "run_name")


# --------------------------------------------------------------------------- methods


@dataclasses.dataclass(frozen=True)
class Method:
    """One training method: a name and the recipe options it sets.

    Names are ``-``-separated tokens (see :func:`parse_method`), e.g. ``ddp``, ``local``,
    ``diloco-h20``, ``diloco-h20-int8``, ``diloco-h20-topk0.01-ef``, ``streaming-p4-h20``.

    Attributes:
        name: the canonical name.
        overrides: recipe options (``mode``, ``sync_every``, ``compression`` ...).
        label: a human-readable label for tables and plots.
    """

    name: str
    overrides: tuple[tuple[str, Any], ...]
    label: str

    @property
    def options(self) -> dict[str, Any]:
        """The recipe options as a dict."""
        return dict(self.overrides)

    @property
    def mode(self) -> str:
        """The recipe ``--mode``."""
        return str(self.options["mode"])

    @property
    def sync_every(self) -> int | None:
        """H, or None for DP and local training."""
        value = self.options.get("sync_every")
        return None if value is None else int(value)


def parse_method(name: str) -> Method:
    """Build a :class:`Method` from its name.

    Grammar: a kind (``ddp``, ``local``, ``diloco``, ``streaming``), then for the DiLoCo kinds
    any of ``h<H>`` (sync_every, default 20), ``p<P>`` (fragments; streaming default 4),
    ``o<tau>`` (overlap_steps; streaming default 1), one compression token (``int8``, ``int4``,
    ``fp16``, ``bf16``, ``topk<FRACTION>``), ``ef`` (error feedback) or ``ef<DECAY>`` (error
    feedback with a decayed residual, e.g. ``ef0.95``), ``lr<LR>`` and ``m<MOMENTUM>`` (outer
    SGD learning rate and momentum, e.g. ``lr1-m0`` is plain parameter averaging; default: the
    task's).

    Raises:
        ValueError: for an unknown kind or token, or a token the kind does not take.
    """
    tokens = name.strip().lower().split("-")
    kind = tokens[0]
    if kind in ("ddp", "local"):
        if len(tokens) > 1:
            raise ValueError(f"method {name!r}: {kind} takes no options (got {tokens[1:]})")
        label = "DP (DDP, all-reduce every step)" if kind == "ddp" else "local (no communication)"
        return Method(kind, (("mode", kind),), label)
    if kind not in ("diloco", "streaming"):
        raise ValueError(
            f"method {name!r}: kind {kind!r} must be one of ddp, local, diloco, streaming "
            "(e.g. diloco-h20-int8, streaming-p4-h20, diloco-h20-topk0.01-ef)"
        )
    h, p, tau = 20, (4 if kind == "streaming" else 1), (1 if kind == "streaming" else 0)
    compression, ef, ef_decay = "none", False, None
    momentum: float | None = None
    outer_lr: float | None = None
    for tok in tokens[1:]:
        if m := re.fullmatch(r"h(\d+)", tok):
            h = int(m.group(1))
        elif m := re.fullmatch(r"p(\d+)", tok):
            p = int(m.group(1))
        elif m := re.fullmatch(r"o(\d+)", tok):
            tau = int(m.group(1))
        elif tok in ("int8", "int4", "int2", "fp16", "bf16"):
            compression = tok
        elif m := re.fullmatch(r"topk(\d*\.?\d+(?:e-?\d+)?)", tok):
            compression = f"topk:{m.group(1)}"
        elif tok == "ef":
            ef = True
        elif m := re.fullmatch(r"ef(\d*\.\d+|[01])", tok):
            ef, ef_decay = True, float(m.group(1))
        elif m := re.fullmatch(r"m(\d*\.?\d+)", tok):
            momentum = float(m.group(1))
        elif m := re.fullmatch(r"lr(\d*\.?\d+)", tok):
            outer_lr = float(m.group(1))
        else:
            raise ValueError(
                f"method {name!r}: unknown token {tok!r}; valid: h<H>, p<P>, o<tau>, int8, int4, "
                "int2, fp16, bf16, topk<FRACTION>, ef, ef<DECAY>, lr<OUTER_LR>, m<OUTER_MOMENTUM>"
            )
    if ef_decay == 1.0:
        ef_decay = None  # classic error feedback: the same as plain ``ef``
    if ef_decay is not None and not 0.0 <= ef_decay <= 1.0:
        raise ValueError(f"method {name!r}: error feedback decay ({ef_decay}) must be in [0, 1]")
    if momentum is not None and not 0.0 <= momentum <= 1.0:
        raise ValueError(f"method {name!r}: outer momentum ({momentum}) must be in [0, 1]")
    if outer_lr is not None and not outer_lr > 0:
        raise ValueError(f"method {name!r}: outer learning rate ({outer_lr}) must be > 0")
    if h < 1 or p < 1 or h % p:
        raise ValueError(f"method {name!r}: fragments ({p}) must divide H ({h}), both >= 1")
    if tau and tau >= h // p:
        raise ValueError(
            f"method {name!r}: overlap ({tau}) must be less than the fragment spacing H/P "
            f"({h // p})"
        )
    if ef and compression == "none":
        raise ValueError(f"method {name!r}: ef needs a compression token (e.g. topk0.01)")
    parts = [f"p{p}", f"h{h}", f"o{tau}"] if kind == "streaming" else [f"h{h}"]
    if compression != "none":
        parts.append(compression.replace("topk:", "topk"))
    if ef:
        parts.append("ef" if ef_decay is None else f"ef{ef_decay:g}")
    if outer_lr is not None:
        parts.append(f"lr{outer_lr:g}")
    if momentum is not None:
        parts.append(f"m{momentum:g}")
    canonical = "-".join([kind, *parts])
    options: dict[str, Any] = {
        "mode": "diloco",
        "sync_every": h,
        "fragments": p,
        "overlap_steps": tau,
        # A decayed residual is spelled in the compression spec; --error-feedback means decay 1.
        "compression": compression if ef_decay is None else f"ef@{ef_decay:g}:{compression}",
        "error_feedback": ef and ef_decay is None,
    }
    if outer_lr is not None:
        options["outer_lr"] = outer_lr
    if momentum is not None:
        options["outer_momentum"] = momentum
    label = ("Streaming DiLoCo" if kind == "streaming" else "DiLoCo") + f" H={h}"
    if kind == "streaming":
        label += f" P={p} τ={tau}"
    if compression.startswith("topk:"):
        label += f" top-k {float(compression[5:]) * 100:g}%"
    elif compression != "none":
        label += f" {compression}"
    if ef:
        label += " +EF" if ef_decay is None else f" +EF(decay {ef_decay:g})"
    if outer_lr is not None:
        label += f", outer lr {outer_lr:g}"
    if momentum is not None:
        label += f", outer momentum {momentum:g}"
    return Method(canonical, tuple(options.items()), label)


# --------------------------------------------------------------------------- profiles


@dataclasses.dataclass(frozen=True)
class Profile:
    """A benchmark matrix: the task (recipe config), the methods, seeds, rates and peers.

    Attributes:
        name: the profile's name.
        base_config: a recipe TOML the task starts from (None: the recipe's defaults).
        task: recipe options on top of ``base_config`` (model, data, inner optimizer, evals).
        seeds: the quality runs' seeds.
        methods: methods of the quality runs.
        throughput_methods: methods of the throughput runs (the ceiling is always added).
        throughput_steps: inner steps of each throughput run.
        rates: link rates of the throughput runs (``loopback``, ``unshaped`` or e.g.
            ``100mbit``).
        peers: peer libraries to compare (``torchft``, ``hivemind``).
        peer_sync_every: H of the peer runs (compared with lowcomm's ``diloco-h<H>``).
        headline: role -> method for the headline table (``main``, ``fp32``, ``streaming``,
            ``topk``, ``topk_ef``).
        throughput_repeats: passes over a rate's runs (ceiling, then every method); each
            cell reports its fastest pass, since other processes on the machine only ever
            slow a run down.
        run_timeout: seconds one quality run may take.
    """

    name: str
    base_config: str | None
    task: dict[str, Any]
    seeds: tuple[int, ...]
    methods: tuple[str, ...]
    throughput_methods: tuple[str, ...]
    throughput_steps: int
    rates: tuple[str, ...]
    peers: tuple[str, ...]
    peer_sync_every: int
    headline: dict[str, str]
    throughput_repeats: int = 3
    run_timeout: float = 1800.0


PROFILES: dict[str, Profile] = {
    # A few seconds per run: the test suite's smoke run.
    "smoke": Profile(
        name="smoke",
        base_config="recipes/configs/tiny.toml",
        task={"steps": 16, "eval_every": 8, "log_every": 4, "eval_batches": 2},
        seeds=(0,),
        methods=("ddp", "diloco-h4"),
        throughput_methods=("diloco-h4",),
        throughput_steps=16,
        rates=("loopback",),
        peers=(),
        peer_sync_every=4,
        headline={"main": "diloco-h4"},
        throughput_repeats=1,
        run_timeout=300.0,
    ),
    # Minutes on 2 CPU cores: a 137k-parameter byte GPT, 400 steps, 3 seeds.
    "default": Profile(
        name="default",
        base_config=None,
        task={
            "seq_len": 64,
            "n_layer": 2,
            "n_head": 2,
            "n_embd": 64,
            "batch_size": 8,
            "steps": 400,
            "warmup_steps": 20,
            "inner_lr": 2e-3,
            "eval_every": 20,
            "eval_batches": 4,
            "log_every": 10,
        },
        seeds=(0, 1, 2),
        methods=(
            "ddp",
            "diloco-h20",
            "diloco-h100",
            "diloco-h20-int8",
            "streaming-p4-h20",
            "diloco-h20-topk0.01",
            "diloco-h20-topk0.01-ef",
            # SparseLoCo's pairing (Sarfi et al. 2025): a decayed residual, no outer momentum.
            "diloco-h20-topk0.01-ef0.95-m0",
            # Parameter averaging (outer SGD lr 1, no momentum): hivemind's outer step.
            "diloco-h20-lr1-m0",
        ),
        throughput_methods=(
            "ddp",
            "diloco-h20",
            "diloco-h100",
            "diloco-h20-int8",
            "streaming-p4-h20",
            "diloco-h20-topk0.01-ef",
        ),
        throughput_steps=100,
        rates=("unshaped", "100mbit", "20mbit"),
        peers=("torchft", "hivemind"),
        peer_sync_every=20,
        headline={
            "main": "diloco-h20-int8",
            "fp32": "diloco-h20",
            "streaming": "streaming-p4-h20",
            "topk": "diloco-h20-topk0.01",
            "topk_ef": "diloco-h20-topk0.01-ef",
        },
        run_timeout=900.0,
    ),
    # The headline settings: the demo's 0.87M-parameter GPT, M=2, H=25, int8, 1,800
    # steps, 3 seeds. Hours on 2 CPU cores: run it in the background; it resumes.
    "headline": Profile(
        name="headline",
        base_config="recipes/configs/demo.toml",
        task={"steps": 1800, "eval_every": 100, "log_every": 25, "ckpt_every": 0},
        seeds=(0, 1, 2),
        methods=(
            "ddp",
            "diloco-h25",
            "diloco-h25-int8",
            "streaming-p4-h100",
            "diloco-h25-topk0.01",
            "diloco-h25-topk0.01-ef",
        ),
        throughput_methods=(
            "ddp",
            "diloco-h25",
            "diloco-h25-int8",
            "streaming-p4-h100",
            "diloco-h25-topk0.01-ef",
        ),
        throughput_steps=200,
        rates=("unshaped", "100mbit", "20mbit"),
        peers=("torchft", "hivemind"),
        peer_sync_every=25,
        headline={
            "main": "diloco-h25-int8",
            "fp32": "diloco-h25",
            "streaming": "streaming-p4-h100",
            "topk": "diloco-h25-topk0.01",
            "topk_ef": "diloco-h25-topk0.01-ef",
        },
        run_timeout=7200.0,
    ),
}


# --------------------------------------------------------------------------- settings


@dataclasses.dataclass
class Settings:
    """Everything one invocation of the suite runs with (profile plus command-line changes)."""

    profile: Profile
    task: dict[str, Any]
    seeds: list[int]
    methods: list[Method]
    throughput_methods: list[Method]
    throughput_steps: int
    throughput_repeats: int
    rates: list[str]
    peers: list[str]
    peer_sync_every: int
    workers: int
    threads: int
    device: str
    work_dir: Path
    out_dir: Path
    doc: Path
    torchft_python: str
    force: bool
    phases: list[str]
    run_timeout: float
    command: list[str]


def task_config(profile: Profile, sets: Sequence[str], device: str) -> dict[str, Any]:
    """The recipe config of the task (validated by the recipe's own loader), as a dict."""
    from lowcomm.config import load_config

    argv: list[str] = []
    if profile.base_config:
        argv += ["--config", str(REPO / profile.base_config)]
    argv += [f"--{k}={v}" for k, v in profile.task.items()]
    for item in sets:
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--set {item!r} must be KEY=VALUE (a recipe option)")
        argv.append(f"--{key.strip()}={value.strip()}")
    argv += [f"--device={device}", "--ckpt-every=0", "--no-progress"]
    cfg = load_config(argv).to_dict()
    return {k: v for k, v in cfg.items() if k not in _RUN_KEYS and v is not None}


def write_toml(values: dict[str, Any], path: Path) -> None:
    """Write a flat dict as TOML (str, bool, int, float values)."""
    lines = ["# Generated by scripts/bench_suite.py: the benchmark task, shared by every run."]
    for key, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        elif isinstance(value, str):
            text = json.dumps(value)  # a TOML basic string for what configs hold
        else:
            raise TypeError(f"{key} = {value!r}: only str/bool/int/float go into the task TOML")
        lines.append(f"{key} = {text}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def run_key(payload: dict[str, Any]) -> str:
    """Digest of everything a cached result depends on."""
    text = json.dumps({"v": RESULT_VERSION, **payload}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- launching


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


def run_workers(
    argv: list[str],
    run_dir: Path,
    workers: int,
    threads: int,
    timeout: float,
    sim: wansim.WanSim | None = None,
) -> dict[str, Any]:
    """Run ``argv`` once per worker and wait; read interface counters when ``sim`` is given.

    On loopback the workers rendezvous on 127.0.0.1 at a free port; under ``sim`` worker ``i``
    runs in host ``i``'s namespace (``GLOO_SOCKET_IFNAME`` its veth) and host 0's address.

    Returns:
        ``wall_s``; with ``sim`` also per-host counter deltas (tx/rx bytes and packets):
        ``wire`` from the first training log record (inner step ``log_every``) to the end of
        the run, ``wire_setup`` from before the launch to that record, and ``wire_log_step``,
        the step of that record (None if the run ended before it was seen: then ``wire`` is
        the whole run). The window starts at a log record, not at step 0, because at low
        rates the initial broadcast of the parameters is still draining from the socket
        buffers when training starts.

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
    t0 = time.monotonic()
    out: dict[str, Any] = {}
    try:
        port = NETNS_MASTER_PORT if sim is not None else free_port()
        addr = sim.host_address(0) if sim is not None else "127.0.0.1"
        before = sim.counters() if sim is not None else None
        snapshot, log_step = None, None
        for r in range(workers):
            env = worker_env(r, workers, addr, port, threads)
            kw: dict[str, Any] = {"stdout": files[r], "stderr": subprocess.STDOUT, "cwd": REPO}
            if sim is not None:
                procs.append(sim.popen(r, argv, env=env, **kw))
            else:
                env["GLOO_SOCKET_IFNAME"] = "lo"
                full = {**os.environ, **env}
                procs.append(subprocess.Popen(argv, env=full, start_new_session=True, **kw))
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
                raise RunFailed(
                    f"worker {r} exited {codes[r]} ({' '.join(argv)}):\n{_tail(logs[r])}"
                )
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
                    f"timed out after {timeout:.0f}s ({' '.join(argv)}):\n{_tail(logs[0])}"
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
        for f in files:
            f.close()
    return out


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


# --------------------------------------------------------------------------- metrics


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


def bytes_at(logs: list[dict[str, Any]], step: int) -> int:
    """The library's byte counter at the last train log record at or before ``step``."""
    sent = 0
    for rec in logs:
        if rec["step"] > step:
            break
        sent = int(rec.get("bytes_sent", 0))
    return sent


def quality_record(m: dict[str, Any]) -> dict[str, Any]:
    """The per-run result of a quality run from its metrics."""
    s, logs = m["summary"], m["logs"]
    last = logs[-1] if logs else {}
    return {
        "evals": [
            {
                "step": e["step"],
                "tokens": e["tokens"],
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
        "tokens_per_s_incl_eval": s["tokens_per_s"],
    }


def throughput_record(m: dict[str, Any]) -> dict[str, Any]:
    """tokens/s between the step-0 evaluation and the last step's log line, and the bytes."""
    s, logs = m["summary"], m["logs"]
    t0 = m["evals"][0]["time"]
    last = logs[-1]
    seconds = last["time"] - t0
    return {
        "steps": last["step"],
        "tokens": last["tokens"],
        "train_seconds": seconds,
        "tokens_per_s": last["tokens"] / seconds if seconds > 0 else None,
        "lib_bytes_sent_rank0": int(last.get("bytes_sent", 0)),
        "lib_bytes_received_rank0": last.get("bytes_received"),
        "lib_bytes_estimated": s["bytes_sent_estimated"],
        "num_params": s["num_params"],
        "outer_steps": s["outer_steps"],
        "peak_sync_bytes": last.get("peak_sync_bytes"),
        "comm_seconds": last.get("comm_seconds"),
    }


def method_key(method: Method) -> dict[str, Any]:
    """What a cached result of ``method`` depends on: its options, and for methods with a
    sync in flight at the end, that the recipe lands it (``DiLoCo.flush``) before the final
    evaluation and the last byte count, which results cached before it did not."""
    opts = method.options
    overlapped = int(opts.get("overlap_steps") or 0) > 0 or opts.get("overlap_mode") not in (
        None,
        "mix",
    )
    return {**opts, "flushed_at_end": True} if method.mode == "diloco" and overlapped else opts


def window_log_step(method: Method, steps: int) -> int:
    """The inner step at which the wire-counter window of a throughput run starts.

    It is the run's first log record (``log_every``): late enough (a tenth of the run) that
    the initial parameter broadcast has drained even on slow links, and not at or just after
    the start of a sync, whose bytes the library counts when the sync completes on this
    worker while some of them can still be queued on the link.
    """
    first = max(2, steps // 10)
    if method.mode != "diloco":
        return first
    opts = method.options
    spacing = int(opts["sync_every"]) // int(opts["fragments"])
    busy = set(range(int(opts["overlap_steps"]) + 1))
    for step in range(first, steps):
        if step % spacing not in busy:
            return step
    return first


def wire_comparison(launch: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any] | None:
    """Host 0's interface counter beside rank 0's library counter over the same window.

    The recipe lands the syncs still in flight before its last log record, so the library's
    count at that record covers every byte the run sent.
    """
    if not launch.get("wire"):
        return None
    logs = metrics["logs"]
    last = logs[-1]
    start_step = launch.get("wire_log_step")
    lib = int(last.get("bytes_sent", 0)) - (
        bytes_at(logs, start_step) if start_step is not None else 0
    )
    tx, packets = launch["wire"][0]["tx_bytes"], launch["wire"][0]["tx_packets"]
    headers = HEADER_BYTES_PER_PACKET * packets
    return {
        "from_step": start_step,
        "to_step": int(last["step"]),
        "lib_bytes": lib,
        "lib_bytes_estimated": bool(metrics["summary"]["bytes_sent_estimated"]),
        "wire_tx_bytes": tx,
        "wire_tx_packets": packets,
        "header_bytes": headers,
        "wire_over_lib_pct": 100.0 * (tx / lib - 1) if lib else None,
        "residual_after_headers_pct": 100.0 * ((tx - headers) / lib - 1) if lib else None,
    }


# --------------------------------------------------------------------------- phases


def _save(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def _cached(path: Path, key: str, force: bool) -> dict[str, Any] | None:
    if force or not path.exists():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    return record if record.get("key") == key else None


def quality_phase(
    st: Settings, toml: Path, dry_run: bool = False
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Every method x seed on loopback; returns the per-run records and the failed runs."""
    records: list[dict[str, Any]] = []
    failed: list[dict[str, str]] = []
    total = len(st.methods) * len(st.seeds)
    n = 0
    for method in st.methods:
        for seed in st.seeds:
            n += 1
            key = run_key(
                {"kind": "quality", "task": st.task, "method": method_key(method), "seed": seed,
                 "workers": st.workers}
            )  # fmt: skip
            path = st.work_dir / "quality" / method.name / f"seed{seed}.json"
            cached = _cached(path, key, st.force)
            if dry_run:
                print(f"quality {n}/{total} {method.name} seed {seed}: "
                      f"{'cached' if cached else 'to run'}")  # fmt: skip
                continue
            if cached is not None:
                records.append(cached)
                continue
            run_dir = st.work_dir / "runs" / "quality" / method.name / f"seed{seed}"
            argv = recipe_argv(toml, method, seed, run_dir, {})
            logger.info("quality %d/%d: %s seed %d", n, total, method.name, seed)
            try:
                launch = run_with_retry(argv, run_dir, st.workers, st.threads, st.run_timeout)
                metrics = read_metrics(run_dir)
            except RunFailed as e:
                logger.error("quality run %s seed %d failed: %s", method.name, seed, e)
                failed.append({"what": f"quality {method.name} seed {seed}", "why": _short(e)})
                continue
            rec = {
                "key": key,
                "kind": "quality",
                "method": method.name,
                "seed": seed,
                "command": argv,
                "wall_s": launch["wall_s"],
                "exit_anomalies": launch.get("exit_anomalies"),
                **quality_record(metrics),
            }
            _save(path, rec)
            logger.info(
                "  final eval loss %.4f, %d B sent/worker, %.0f s",
                rec["final_eval_loss"],
                rec["bytes_sent"],
                rec["wall_s"],
            )
            records.append(rec)
    return records, failed


def _short(e: Exception) -> str:
    """The first line of a failure and its last log line, for the report."""
    lines = [x for x in str(e).splitlines() if x.strip()]
    return lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1]}"


def _rate_bps(rate: str) -> int | None:
    return None if rate in ("loopback", "unshaped") else wansim.parse_rate(rate)


def _shaping_problem(rate: str) -> str | None:
    if rate == "loopback":
        return None
    try:
        wansim.check_prerequisites()
    except (PermissionError, FileNotFoundError) as e:
        return str(e)
    return None


@contextlib.contextmanager
def _network(rate: str, workers: int) -> Iterator[wansim.WanSim | None]:
    if rate == "loopback":
        yield None
        return
    with wansim.WanSim(workers, None if rate == "unshaped" else rate, prefix=WANSIM_PREFIX) as sim:
        yield sim


def throughput_phase(
    st: Settings, toml: Path, dry_run: bool = False
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Short runs per rate and method (ceiling before and after); returns records, skips."""
    records: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    local = parse_method("local")
    steps = st.throughput_steps
    base_extra = {"steps": steps, "eval_every": steps, "eval_batches": 1}
    for rate in st.rates:
        problem = _shaping_problem(rate)
        if problem is not None:
            skipped.append({"what": f"throughput at {rate}", "why": problem})
            logger.warning("skipping throughput at %s: %s", rate, problem)
            continue
        plan = [
            (m, i)
            for i in range(st.throughput_repeats)
            for m in [local, *(m for m in st.throughput_methods if m.mode != "local")]
        ]
        for method, repeat in plan:
            extra = {**base_extra, "log_every": window_log_step(method, steps)}
            key = run_key(
                {"kind": "throughput", "task": st.task, "method": method_key(method), "rate": rate,
                 "extra": extra, "workers": st.workers, "repeat": repeat}
            )  # fmt: skip
            name = method.name + (f"-r{repeat}" if repeat else "")
            path = st.work_dir / "throughput" / rate / f"{name}.json"
            cached = _cached(path, key, st.force)
            if dry_run:
                print(f"throughput {rate} {name}: {'cached' if cached else 'to run'}")
                continue
            if cached is not None:
                records.append(cached)
                continue
            run_dir = st.work_dir / "runs" / "throughput" / rate / name
            argv = recipe_argv(toml, method, st.seeds[0], run_dir, extra)
            logger.info("throughput %s: %s", rate, name)
            try:
                with _network(rate, st.workers) as sim:
                    launch = run_with_retry(
                        argv, run_dir, st.workers, st.threads, st.run_timeout, sim=sim
                    )
                metrics = read_metrics(run_dir)
            except RunFailed as e:
                logger.error("throughput run %s at %s failed: %s", name, rate, e)
                skipped.append({"what": f"throughput {name} at {rate}", "why": _short(e)})
                continue
            rec = {
                "key": key,
                "kind": "throughput",
                "method": method.name,
                "repeat": repeat,
                "rate": rate,
                "rate_bps": _rate_bps(rate),
                "seed": st.seeds[0],
                "command": argv,
                **launch,
                **throughput_record(metrics),
            }
            rec["wire_compare"] = wire_comparison(launch, metrics)
            _save(path, rec)
            logger.info("  %.3g tokens/s", rec["tokens_per_s"] or float("nan"))
            records.append(rec)
    return records, skipped


def _peer_python(st: Settings, library: str) -> str:
    return st.torchft_python if library == "torchft" else sys.executable


def peers_phase(
    st: Settings, toml: Path, dry_run: bool = False
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """torchft / hivemind baselines on loopback; returns records and what was not compared."""
    records: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for library in st.peers:
        script = PEER_SCRIPTS[library]
        python = _peer_python(st, library)
        if not script.exists():
            skipped.append({"what": library, "why": f"{script.relative_to(REPO)} is missing"})
            continue
        if not Path(python).exists():
            skipped.append(
                {"what": library, "why": f"no interpreter at {python} (--torchft-python)"}
            )
            continue
        for seed in st.seeds:
            key = run_key(
                {"kind": "peer", "library": library, "task": st.task, "seed": seed,
                 "workers": st.workers, "sync_every": st.peer_sync_every, "python": python}
            )  # fmt: skip
            path = st.work_dir / "peers" / library / f"seed{seed}.json"
            cached = _cached(path, key, st.force)
            if dry_run:
                print(f"peer {library} seed {seed}: {'cached' if cached else 'to run'}")
                continue
            if cached is not None:
                records.append(cached)
                continue
            out = st.work_dir / "runs" / "peers" / library / f"seed{seed}.jsonl"
            out.parent.mkdir(parents=True, exist_ok=True)
            argv = [
                python, str(script), "--config", str(toml), "--workers", str(st.workers),
                "--steps", str(st.task["steps"]), "--sync-every", str(st.peer_sync_every),
                "--seed", str(seed), "--eval-every", str(st.task["eval_every"]),
                "--threads", str(st.threads), "--out", str(out),
                "--timeout", str(int(st.run_timeout)),
            ]  # fmt: skip
            logger.info("peer %s seed %d", library, seed)
            env = {**os.environ, "OMP_NUM_THREADS": str(st.threads), "PYTHONUNBUFFERED": "1"}
            log = out.with_suffix(".log")
            t0 = time.monotonic()
            with open(log, "w", encoding="utf-8") as f:
                proc = subprocess.Popen(
                    argv, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )  # fmt: skip
                try:
                    code = proc.wait(timeout=st.run_timeout + 60)
                except subprocess.TimeoutExpired:
                    code = None
                finally:
                    _kill([proc])
            if code != 0:
                why = (
                    f"{library} is not importable by {python}"
                    if code == 2
                    else f"the peer run failed (exit {code}); log tail: {_tail(log, 600)!r}"
                )
                skipped.append({"what": f"{library} seed {seed}", "why": why})
                logger.warning("peer %s seed %d not compared: %s", library, seed, why)
                if code == 2:
                    break
                continue
            lines = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines() if x]
            summary = next(x for x in lines if x.get("summary"))
            rec = {
                "key": key,
                "kind": "peer",
                "library": library,
                "seed": seed,
                "command": argv,
                "wall_s": time.monotonic() - t0,
                "evals": [
                    {
                        "step": x["step"],
                        "tokens": x["tokens"],
                        "loss": x["eval_loss"],
                        "averaging_rounds": x["averaging_rounds"],
                    }
                    for x in lines
                    if not x.get("summary")
                ],  # fmt: skip
                "summary": {k: v for k, v in summary.items() if k != "config"},
            }
            _save(path, rec)
            records.append(rec)
    return records, skipped


# --------------------------------------------------------------------------- aggregation


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for fewer than two values)."""
    vals = [float(v) for v in values]
    if not vals:
        return math.nan, None
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else None


def _stat(values: Sequence[float]) -> dict[str, Any]:
    mean, std = mean_std(values)
    return {"mean": mean, "std": std, "n": len(values), "values": [float(v) for v in values]}


def aggregate_quality(runs: list[dict[str, Any]], baseline: str = "ddp") -> dict[str, Any]:
    """Per method: loss curve mean/std over seeds, bytes, and the loss ratio to the baseline.

    Ratios are paired by seed (same seed, same initialisation and data): for each seed
    ``loss_method / loss_baseline`` at the same eval step, then mean and std over seeds.
    """
    by_method: dict[str, dict[int, dict[str, Any]]] = {}
    for r in runs:
        by_method.setdefault(r["method"], {})[r["seed"]] = r
    base = by_method.get(baseline, {})
    out: dict[str, Any] = {}
    for name, seeds in by_method.items():
        steps = sorted(set.intersection(*({e["step"] for e in r["evals"]} for r in seeds.values())))
        first = next(iter(seeds.values()))
        ev = {s: {e["step"]: e for e in r["evals"]} for s, r in seeds.items()}
        curve = []
        for step in steps:
            point = {
                "step": step,
                "tokens": ev[next(iter(ev))][step]["tokens"],
                "loss": _stat([ev[s][step]["loss"] for s in sorted(ev)]),
                "bytes_sent": statistics.fmean(ev[s][step]["bytes_sent"] for s in ev),
            }
            paired = [
                ev[s][step]["loss"] / b
                for s in sorted(ev)
                if s in base
                for b in [next((e["loss"] for e in base[s]["evals"] if e["step"] == step), None)]
                if b
            ]
            point["ratio_to_baseline"] = _stat(paired) if paired else None
            curve.append(point)
        final_pairs = [
            seeds[s]["final_eval_loss"] / base[s]["final_eval_loss"] for s in seeds if s in base
        ]
        out[name] = {
            "method": name,
            "label": parse_method(name).label,
            "seeds": sorted(seeds),
            "num_params": first["num_params"],
            "steps": first["steps"],
            "final_eval_loss": _stat([seeds[s]["final_eval_loss"] for s in sorted(seeds)]),
            "final_ratio_to_baseline": _stat(final_pairs) if final_pairs else None,
            "bytes_sent": statistics.fmean(r["bytes_sent"] for r in seeds.values()),
            "bytes_sent_estimated": bool(first["bytes_sent_estimated"]),
            "allreduce_bytes": first["allreduce_bytes"],
            "outer_steps": first["outer_steps"],
            "peak_sync_bytes": first["peak_sync_bytes"],
            "compression_ratio": first["compression_ratio"],
            "elapsed_s": _stat([r["elapsed_s"] for r in seeds.values()]),
            "tokens_per_s_incl_eval": _stat([r["tokens_per_s_incl_eval"] for r in seeds.values()]),
            "curve": curve,
        }
    return out


def aggregate_throughput(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per rate: the ceiling and each method's fraction of it, each the fastest of its passes.

    Other processes on a shared machine only ever slow a run down, so the fastest of the
    repeated runs is the least disturbed estimate of each cell (all of them are kept).
    """
    out: dict[str, Any] = {}
    for rate in dict.fromkeys(r["rate"] for r in runs):
        block = [r for r in runs if r["rate"] == rate]
        by_method: dict[str, list[dict[str, Any]]] = {}
        for r in block:
            if r["tokens_per_s"]:
                by_method.setdefault(r["method"], []).append(r)
        ceilings = [r["tokens_per_s"] for r in by_method.get("local", [])]
        ceiling = max(ceilings) if ceilings else None
        methods = {}
        for name, rs in by_method.items():
            if name == "local":
                continue
            r = max(rs, key=lambda x: x["tokens_per_s"])
            methods[name] = {
                "method": name,
                "label": parse_method(name).label,
                "tokens_per_s": r["tokens_per_s"],
                "tokens_per_s_runs": [x["tokens_per_s"] for x in rs],
                "ratio_to_ceiling": r["tokens_per_s"] / ceiling if ceiling else None,
                "lib_bytes_sent_rank0": r["lib_bytes_sent_rank0"],
                "lib_bytes_estimated": r["lib_bytes_estimated"],
                "wire": r.get("wire_compare"),
                "wire_setup_tx_bytes_host0": r["wire_setup"][0]["tx_bytes"]
                if r.get("wire_setup")
                else None,
                "wire_tx_bytes_hosts": [w["tx_bytes"] for w in r["wire"]]
                if r.get("wire")
                else None,
                "steps": r["steps"],
                "train_seconds": r["train_seconds"],
                "comm_seconds": r.get("comm_seconds"),
            }
        out[rate] = {
            "rate": rate,
            "rate_bps": block[0]["rate_bps"],
            "ceiling_tokens_per_s": ceiling,
            "ceiling_runs": ceilings,
            "methods": methods,
        }
    return out


def aggregate_peers(
    runs: list[dict[str, Any]], quality: dict[str, Any], sync_every: int
) -> dict[str, Any]:
    """Per peer library: the loss curve and final loss over seeds, against lowcomm's DiLoCo."""
    ref_name = f"diloco-h{sync_every}"
    ref = quality.get(ref_name)
    out: dict[str, Any] = {}
    for library in dict.fromkeys(r["library"] for r in runs):
        lib_runs = sorted((r for r in runs if r["library"] == library), key=lambda r: r["seed"])
        steps = sorted(set.intersection(*({e["step"] for e in r["evals"]} for r in lib_runs)))
        curve = []
        for step in steps:
            pts = [next(e for e in r["evals"] if e["step"] == step) for r in lib_runs]
            curve.append({"step": step, "tokens": pts[0]["tokens"],
                          "loss": _stat([p["loss"] for p in pts]),
                          "averaging_rounds": statistics.fmean(p["averaging_rounds"] for p in pts)})  # fmt: skip
        sums = [r["summary"] for r in lib_runs]
        est = [s.get("bytes_sent_ring_estimate") or s.get("bytes_sent_estimate") for s in sums]
        out[library] = {
            "library": library,
            "version": sums[0].get("version"),
            "seeds": [r["seed"] for r in lib_runs],
            "sync_every": sync_every,
            "final_eval_loss": _stat([s["final_eval_loss"] for s in sums]),
            "final_eval_loss_mean_of_workers": _stat(
                [s["final_eval_loss_mean_of_workers"] for s in sums]
            ),
            "tokens_per_s_incl_eval": _stat([s["tokens_per_s"] for s in sums]),
            "averaging_rounds": _stat([s["averaging_rounds"] for s in sums]),
            "expected_rounds": sums[0]["expected_rounds_at_sync_every"],
            "bytes_sent_estimate": statistics.fmean(e for e in est if e is not None)
            if any(e is not None for e in est)
            else None,
            "bytes_note": sums[0].get("bytes_sent_note"),
            "outer_optimizer": sums[0].get("outer_optimizer"),
            "reference": ref_name if ref else None,
            "reference_final_eval_loss": ref["final_eval_loss"] if ref else None,
            "reference_tokens_per_s_incl_eval": ref["tokens_per_s_incl_eval"] if ref else None,
            "curve": curve,
        }
    return out


def _paired(quality: dict[str, Any], a: str, b: str, fn: Any) -> dict[str, Any] | None:
    ra, rb = quality.get(a), quality.get(b)
    if ra is None or rb is None:
        return None
    va, vb = ra["final_eval_loss"]["values"], rb["final_eval_loss"]["values"]
    sa, sb = ra["seeds"], rb["seeds"]
    common = [s for s in sa if s in sb]
    return _stat([fn(va[sa.index(s)], vb[sb.index(s)]) for s in common])


def headline_rows(
    quality: dict[str, Any], roles: dict[str, str], workers: int, steps: int
) -> list[dict[str, Any]]:
    """The issue's headline comparisons, from the aggregated quality runs."""
    rows: list[dict[str, Any]] = []
    roles = {k: parse_method(v).name for k, v in roles.items()}

    def missing(role: str, what: str) -> None:
        name = roles.get(role)
        rows.append(
            {"id": role, "title": what, "available": False,
             "why": f"method {name!r} was not run" if name else f"no {role!r} method in profile"}
        )  # fmt: skip

    ddp = quality.get("ddp")
    main = roles.get("main", "")
    if main in quality and ddp:
        mq = quality[main]
        rows.append(
            {
                "id": "main",
                "title": f"{mq['label']}, M={workers}, {steps} steps vs DP",
                "available": True,
                "method": main,
                "loss_ratio": mq["final_ratio_to_baseline"],
                "loss": mq["final_eval_loss"],
                "loss_dp": ddp["final_eval_loss"],
                "bytes": mq["bytes_sent"],
                "bytes_dp": ddp["bytes_sent"],
                "bytes_dp_estimated": ddp["bytes_sent_estimated"],
                "byte_ratio": ddp["bytes_sent"] / mq["bytes_sent"] if mq["bytes_sent"] else None,
                "gap_by_step": [
                    {"step": p["step"], "ratio": p["ratio_to_baseline"]}
                    for p in mq["curve"]
                    if p["ratio_to_baseline"] is not None
                ],
            }
        )
    else:
        missing("main", "DiLoCo vs DP")
    stream = roles.get("streaming", "")
    if stream in quality:
        sq = quality[stream]
        frag = parse_method(stream).options["fragments"]
        opts = parse_method(stream).options
        ref = next(
            (
                q
                for n, q in quality.items()
                if n not in ("ddp", "local")
                and parse_method(n).options["fragments"] == 1
                and parse_method(n).options["compression"] == opts["compression"]
                and parse_method(n).options["error_feedback"] == opts["error_feedback"]
            ),
            None,
        )
        if ref is not None and ref["peak_sync_bytes"]:
            full, how = ref["peak_sync_bytes"], f"one full sync of {ref['method']} (measured)"
        else:
            full = (
                2 * (workers - 1) / workers * 4 * sq["num_params"] / (sq["compression_ratio"] or 1)
            )
            how = "2(M-1)/M x 4 x params / compression ratio (derived)"
        rows.append(
            {
                "id": "streaming",
                "title": f"{sq['label']}: peak bytes per sync vs total/P",
                "available": True,
                "method": stream,
                "fragments": frag,
                "peak_sync_bytes": sq["peak_sync_bytes"],
                "full_sync_bytes": full,
                "full_sync_source": how,
                "peak_over_total_per_p": sq["peak_sync_bytes"] / (full / frag)
                if sq["peak_sync_bytes"]
                else None,
                "loss_ratio": sq["final_ratio_to_baseline"],
            }
        )
    else:
        missing("streaming", "Streaming DiLoCo peak bytes")
    fp32 = roles.get("fp32", "")
    delta = _paired(quality, main, fp32, lambda a, b: a - b)
    if delta is not None:
        rows.append(
            {
                "id": "int8",
                "title": f"{quality[main]['label']} vs {quality[fp32]['label']}: loss delta",
                "available": True,
                "method": main,
                "reference": fp32,
                "loss_delta": delta,
                "loss_delta_pct": _paired(quality, main, fp32, lambda a, b: 100 * (a / b - 1)),
                "loss": quality[main]["final_eval_loss"],
                "loss_reference": quality[fp32]["final_eval_loss"],
            }
        )
    else:
        missing("fp32", "int8 vs fp32 loss delta")
    topk, topk_ef = roles.get("topk", ""), roles.get("topk_ef", "")
    delta = _paired(quality, topk_ef, topk, lambda a, b: a - b)
    if delta is not None:
        rows.append(
            {
                "id": "topk",
                "title": f"{quality[topk_ef]['label']} vs without EF: loss delta",
                "available": True,
                "method": topk_ef,
                "reference": topk,
                "loss_delta": delta,
                "loss_with_ef": quality[topk_ef]["final_eval_loss"],
                "loss_without_ef": quality[topk]["final_eval_loss"],
                "loss_ratio_with_ef": quality[topk_ef]["final_ratio_to_baseline"],
                "loss_ratio_without_ef": quality[topk]["final_ratio_to_baseline"],
                "bytes": quality[topk_ef]["bytes_sent"],
            }
        )
    else:
        missing("topk_ef", "top-k with vs without error feedback")
    return rows


# --------------------------------------------------------------------------- machine, CSV


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    cpu = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "cpu_model": cpu or platform.processor() or None,
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    with contextlib.suppress(OSError):
        info["loadavg_1m"] = float(Path("/proc/loadavg").read_text().split()[0])
    return info


def write_csv(results: dict[str, Any], path: Path) -> None:
    """One row per aggregated quality method, throughput cell and peer."""
    cols = [
        "table", "method", "label", "rate", "seeds", "final_eval_loss_mean",
        "final_eval_loss_std", "loss_ratio_vs_dp_mean", "loss_ratio_vs_dp_std",
        "bytes_sent_per_worker", "bytes_estimated", "byte_ratio_dp_over_method",
        "tokens_per_s", "ratio_to_ceiling", "wire_window_from_step", "lib_bytes_window",
        "wire_tx_bytes_host0", "wire_tx_packets_host0",
        "wire_over_lib_pct", "residual_after_headers_pct",
    ]  # fmt: skip
    rows: list[dict[str, Any]] = []
    quality = results["aggregate"]["quality"]
    dp_bytes = quality.get("ddp", {}).get("bytes_sent")
    for q in quality.values():
        ratio = q["final_ratio_to_baseline"] or {}
        rows.append({
            "table": "quality", "method": q["method"], "label": q["label"],
            "seeds": len(q["seeds"]), "final_eval_loss_mean": q["final_eval_loss"]["mean"],
            "final_eval_loss_std": q["final_eval_loss"]["std"],
            "loss_ratio_vs_dp_mean": ratio.get("mean"), "loss_ratio_vs_dp_std": ratio.get("std"),
            "bytes_sent_per_worker": q["bytes_sent"], "bytes_estimated": q["bytes_sent_estimated"],
            "byte_ratio_dp_over_method": dp_bytes / q["bytes_sent"]
            if dp_bytes and q["bytes_sent"] else None,
            "tokens_per_s": q["tokens_per_s_incl_eval"]["mean"],
        })  # fmt: skip
    for rate, block in results["aggregate"]["throughput"].items():
        rows.append({"table": "throughput", "method": "local", "label": "ceiling",
                     "rate": rate, "tokens_per_s": block["ceiling_tokens_per_s"],
                     "ratio_to_ceiling": 1.0})  # fmt: skip
        for t in block["methods"].values():
            w = t["wire"] or {}
            rows.append({
                "table": "throughput", "method": t["method"], "label": t["label"], "rate": rate,
                "tokens_per_s": t["tokens_per_s"], "ratio_to_ceiling": t["ratio_to_ceiling"],
                "bytes_estimated": t["lib_bytes_estimated"],
                "wire_window_from_step": w.get("from_step"), "lib_bytes_window": w.get("lib_bytes"),
                "wire_tx_bytes_host0": w.get("wire_tx_bytes"),
                "wire_tx_packets_host0": w.get("wire_tx_packets"),
                "wire_over_lib_pct": w.get("wire_over_lib_pct"),
                "residual_after_headers_pct": w.get("residual_after_headers_pct"),
            })  # fmt: skip
    for p in results["aggregate"]["peers"].values():
        rows.append({
            "table": "peers", "method": p["library"], "label": f"{p['library']} {p['version']}",
            "seeds": len(p["seeds"]), "final_eval_loss_mean": p["final_eval_loss"]["mean"],
            "final_eval_loss_std": p["final_eval_loss"]["std"],
            "bytes_sent_per_worker": p["bytes_sent_estimate"], "bytes_estimated": True,
            "tokens_per_s": p["tokens_per_s_incl_eval"]["mean"],
        })  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c) for c in cols})


# --------------------------------------------------------------------------- CLI


def _csv_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_settings(args: argparse.Namespace, command: list[str]) -> Settings:
    """Turn the command line into :class:`Settings` (profile defaults plus changes)."""
    profile = PROFILES[args.profile]
    sets = list(args.set or [])
    if args.steps is not None:
        sets.append(f"steps={args.steps}")
    task = task_config(profile, sets, args.device)
    seeds = [int(s) for s in _csv_list(args.seeds)] if args.seeds else list(profile.seeds)
    methods = [
        parse_method(m) for m in (_csv_list(args.methods) if args.methods else profile.methods)
    ]
    methods = list({m.name: m for m in methods}.values())
    tmethods = [
        parse_method(m)
        for m in (
            _csv_list(args.throughput_methods) if args.throughput_methods else profile.throughput_methods
        )
    ]  # fmt: skip
    rates = _csv_list(args.rates) if args.rates else list(profile.rates)
    for rate in rates:
        if rate not in ("loopback", "unshaped"):
            wansim.parse_rate(rate)
    peers = _csv_list(args.peers) if args.peers is not None else list(profile.peers)
    for p in peers:
        if p not in PEER_SCRIPTS:
            raise ValueError(f"peer {p!r} must be one of {', '.join(PEER_SCRIPTS)}")
    all_h = {m.sync_every for m in methods + tmethods if m.sync_every}
    for h in sorted(all_h):
        if task["steps"] % h:
            logger.warning("steps (%d) is not a multiple of H=%d", task["steps"], h)
    if task["eval_every"] % task["log_every"]:
        raise ValueError(
            f"eval_every ({task['eval_every']}) must be a multiple of log_every "
            f"({task['log_every']}) so that bytes are known at every evaluation"
        )
    default_out = (
        REPO / "benchmarks" if profile.name == "default" else REPO / "benchmarks" / profile.name
    )
    phases = _csv_list(args.phases)
    for ph in phases:
        if ph not in ("quality", "throughput", "peers"):
            raise ValueError(f"phase {ph!r} must be quality, throughput or peers")
    return Settings(
        profile=profile,
        task=task,
        seeds=seeds,
        methods=methods,
        throughput_methods=tmethods,
        throughput_steps=args.throughput_steps or profile.throughput_steps,
        throughput_repeats=args.throughput_repeats or profile.throughput_repeats,
        rates=rates,
        peers=peers,
        peer_sync_every=args.peer_sync_every or profile.peer_sync_every,
        workers=args.workers,
        threads=args.threads,
        device=args.device,
        work_dir=Path(args.work_dir) if args.work_dir else REPO / "runs" / "bench" / profile.name,
        out_dir=Path(args.out) if args.out else default_out,
        doc=Path(args.doc) if args.doc else REPO / "BENCHMARKS.md",
        torchft_python=args.torchft_python
        or os.environ.get("LOWCOMM_TORCHFT_PYTHON")
        or DEFAULT_TORCHFT_PYTHON,
        force=args.force,
        phases=phases,
        run_timeout=args.run_timeout or profile.run_timeout,
        command=command,
    )


def parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="bench_suite.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="profiles: "
        + "; ".join(
            f"{n}: {len(p.methods)} methods x {len(p.seeds)} seeds, {p.task.get('steps')} steps"
            for n, p in PROFILES.items()
        ),
    )
    p.add_argument("--profile", choices=sorted(PROFILES), default="default")
    p.add_argument("--methods", help="quality methods, comma-separated (e.g. ddp,diloco-h20-int8)")
    p.add_argument("--throughput-methods", help="throughput methods, comma-separated")
    p.add_argument("--seeds", help="comma-separated seeds (default: the profile's)")
    p.add_argument("--steps", type=int, help="inner steps of the quality runs")
    p.add_argument("--throughput-steps", type=int, help="inner steps of each throughput run")
    p.add_argument(
        "--throughput-repeats", type=int, help="passes over each rate's runs (best one counts)"
    )
    p.add_argument(
        "--rates", help="link rates: loopback (no namespaces), unshaped, or e.g. 100mbit"
    )
    p.add_argument("--peers", help="peer libraries: torchft,hivemind (empty: none)")
    p.add_argument("--peer-sync-every", type=int, help="H of the peer runs")
    p.add_argument(
        "--torchft-python", help=f"interpreter with torchft (default {DEFAULT_TORCHFT_PYTHON})"
    )
    p.add_argument("--workers", type=int, default=2, help="M, workers (one process each)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any recipe option")
    p.add_argument("--phases", default="quality,throughput,peers")
    p.add_argument(
        "--work-dir", help="run directories and cached results (default runs/bench/<profile>)"
    )
    p.add_argument("--out", help="results, CSV and plots (default benchmarks[/<profile>])")
    p.add_argument("--doc", help="the generated Markdown (default BENCHMARKS.md)")
    p.add_argument("--run-timeout", type=float, help="seconds one run may take")
    p.add_argument("--force", action="store_true", help="rerun cached runs")
    p.add_argument("--dry-run", action="store_true", help="print the plan and what is cached")
    p.add_argument("--report-only", action="store_true", help="regenerate plots and docs only")
    return p


def run_suite(st: Settings, dry_run: bool = False) -> dict[str, Any] | None:
    """Run the phases, aggregate, and write results, CSV, plots and the report."""
    toml = st.work_dir / "task.toml"
    write_toml(st.task, toml)
    machine_start = machine_info()
    walls: dict[str, float] = {}
    quality_runs: list[dict[str, Any]] = []
    tput_runs: list[dict[str, Any]] = []
    peer_runs: list[dict[str, Any]] = []
    not_compared: list[dict[str, str]] = []
    t_all = time.monotonic()
    if "quality" in st.phases:
        t0 = time.monotonic()
        quality_runs, failed = quality_phase(st, toml, dry_run)
        not_compared += failed
        walls["quality"] = time.monotonic() - t0
    if "throughput" in st.phases:
        t0 = time.monotonic()
        tput_runs, skipped = throughput_phase(st, toml, dry_run)
        not_compared += skipped
        walls["throughput"] = time.monotonic() - t0
    if "peers" in st.phases:
        t0 = time.monotonic()
        peer_runs, skipped = peers_phase(st, toml, dry_run)
        not_compared += skipped
        walls["peers"] = time.monotonic() - t0
    if dry_run:
        return None
    walls["total"] = time.monotonic() - t_all
    if st.peers:
        # The peer scripts fork every worker from one parent on loopback: they have no
        # per-host launch, so they cannot be put behind the simulator's links.
        not_compared.append(
            {
                "what": "peers under shaped links (throughput vs link rate)",
                "why": "scripts/peers/*.py fork all workers from one parent process on "
                "loopback; there is no one-process-per-host launch to place in the "
                "simulator's namespaces, so peers are compared on loopback only",
            }
        )
        not_compared.append(
            {
                "what": "peers' bytes on the wire",
                "why": "neither torchft nor hivemind counts the bytes it sends; their rows show "
                "the estimates their scripts compute (ring all-reduce of the fp32 payload)",
            }
        )
    if any(m.mode == "ddp" for m in st.methods):
        not_compared.append(
            {
                "what": "DP bytes in the quality runs",
                "why": "torch DDP counts no bytes; its row is the ring all-reduce estimate "
                "2(M-1)/M x 4 x params per step, checked against the interface counters in "
                "the shaped throughput runs",
            }
        )
    quality = aggregate_quality(quality_runs)
    results = {
        "suite": "lowcomm benchmark suite",
        "version": RESULT_VERSION,
        "profile": st.profile.name,
        "command": st.command,
        "machine": machine_start,
        "loadavg_1m_end": machine_info().get("loadavg_1m"),
        "wall_seconds": walls,
        # Cached runs cost no time in this invocation; their own wall times add up to this.
        "run_seconds": {
            "quality": sum(r["wall_s"] for r in quality_runs),
            "throughput": sum(r["wall_s"] for r in tput_runs),
            "peers": sum(r["wall_s"] for r in peer_runs),
        },
        "settings": {
            "task": st.task,
            "workers": st.workers,
            "threads_per_worker": st.threads,
            "device": st.device,
            "seeds": st.seeds,
            "methods": [dataclasses.asdict(m) for m in st.methods],
            "throughput_methods": [m.name for m in st.throughput_methods],
            "throughput_steps": st.throughput_steps,
            "rates": st.rates,
            "peers": st.peers,
            "peer_sync_every": st.peer_sync_every,
            "throughput_repeats": st.throughput_repeats,
            "headline_roles": st.profile.headline,
        },
        "runs": {"quality": quality_runs, "throughput": tput_runs, "peers": peer_runs},
        "aggregate": {
            "quality": quality,
            "throughput": aggregate_throughput(tput_runs),
            "peers": aggregate_peers(peer_runs, quality, st.peer_sync_every),
        },
        "headline": headline_rows(quality, st.profile.headline, st.workers, int(st.task["steps"])),
        "not_compared": not_compared,
        "anomalies": [
            {
                "what": f"{r['kind']} {r['method']} "
                + (f"at {r['rate']}" if r["kind"] == "throughput" else f"seed {r['seed']}"),
                "rank": a["rank"],
                "returncode": a["returncode"],
                "log_tail": a["log_tail"],
            }
            for r in quality_runs + tput_runs
            for a in r.get("exit_anomalies") or []
        ],
    }
    write_outputs(results, st.out_dir, st.doc)
    return results


def write_outputs(results: dict[str, Any], out_dir: Path, doc: Path) -> None:
    """results.json, summary.csv, the PNGs, and the regenerated Markdown report."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = bench_plots.make_plots(results, out_dir)
    results["plots"] = {k: str(v.name) for k, v in plots.items()}
    (out_dir / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    write_csv(results, out_dir / "summary.csv")
    bench_report.write_report(bench_report.find_results(out_dir, doc), doc)
    logger.info("wrote %s, %s and %s", out_dir / "results.json", out_dir / "summary.csv", doc)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = python.relative_to(REPO)
    command = [str(python), "scripts/bench_suite.py", *argv]
    try:
        st = build_settings(args, command)
    except ValueError as e:
        print(f"bench_suite: {e}", file=sys.stderr)
        return 2
    if args.report_only:
        path = st.out_dir / "results.json"
        results = json.loads(path.read_text(encoding="utf-8"))
        write_outputs(results, st.out_dir, st.doc)
        return 0
    try:
        run_suite(st, dry_run=args.dry_run)
    except RunFailed as e:
        logger.error("%s", e)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
