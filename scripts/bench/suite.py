"""Benchmark suite: what each training method sends, how good the model gets, how fast it trains.

Run (from the repository root of a source checkout; shaped links need root, the rest not)::

    sudo .venv/bin/python -m scripts.bench.suite                      # default profile, minutes
    .venv/bin/python -m scripts.bench.suite --rates loopback          # no root: no shaped links
    sudo nohup .venv/bin/python -m scripts.bench.suite --profile headline > bench.log 2>&1 &
    sudo nohup .venv/bin/python -m scripts.bench.suite --profile throughput --phases throughput \
        > throughput.log 2>&1 &                                       # issue 14: hours, idle box
    .venv/bin/python -m scripts.bench.suite --profile smoke --out /tmp/b --doc /tmp/b/B.md
    .venv/bin/python -m scripts.bench.suite --dry-run                 # the plan, what is cached
    .venv/bin/python -m scripts.bench.suite --help

``make bench ARGS=...`` and ``lowcomm bench ...`` run the same from a checkout.

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
   :mod:`scripts.bench.wansim`; ``loopback`` runs without namespaces): runs per method and
   link rate, in passes (:func:`throughput_plan`). tokens/s is measured from the end of the
   step-0 evaluation to the last step's log line (no evaluation inside). The ceiling is
   ``--mode local`` (no communication at all), run before and after each method's runs in
   every pass; each run is reported as a fraction of the two ceiling runs around it, and
   each cell as the median over passes with its spread. Every worker records how long its
   training loop was blocked on communication (``worker<R>.json``) and its timeline
   (``LOWCOMM_TIMELINE``). The per-host interface byte counters are read when the step-0
   evaluation is logged and after the run, and put beside the library's own counter for the
   same window. Peer libraries (``torchft-h<H>``, ``hivemind-h<H>``) run here too, one
   process per host like lowcomm's recipe, behind the same links.
3. **Peers** (loopback): torchft 0.2.0 DiLoCo and hivemind 1.1.12 ``Optimizer
   (use_local_updates=True)`` through :mod:`scripts.bench.peers` on the same task and seeds
   (torchft from its own interpreter, ``--torchft-python``: ``make bench-peers`` builds it).

Then ``benchmarks/results.json`` (every run, every eval point, the machine),
``benchmarks/summary.csv``, the plots (:mod:`scripts.bench.plots`) and ``BENCHMARKS.md``
(:mod:`scripts.bench.report`) are written. Profiles other than ``default`` write to
``benchmarks/<profile>/``; the report shows every profile found there.

This module holds the settings, the phases and the command line; method names are in
:mod:`scripts.bench.methods`, profiles in :mod:`scripts.bench.profiles`, launching a run and
reading its metrics in :mod:`scripts.bench.launch`, the aggregation into tables in
:mod:`scripts.bench.aggregate`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from scripts.bench import REPO, plots, report, wansim
from scripts.bench.aggregate import (
    CEILING,
    aggregate_peers,
    aggregate_quality,
    aggregate_throughput,
    headline_rows,
    write_csv,
)
from scripts.bench.launch import (
    ArgvFor,
    RunFailed,
    _kill,
    _tail,
    bytes_at,
    quality_record,
    read_metrics,
    read_workers,
    recipe_argv,
    run_with_retry,
    throughput_record,
    worker_dirs,
)
from scripts.bench.machine import machine_info, python_command
from scripts.bench.methods import Method, parse_method
from scripts.bench.profiles import PROFILES, Profile
from scripts.bench.timelines import (
    breakdown,
    excerpt,
    read_timeline,
    timeline_paths,
    waiting_for_peers,
)

logger = logging.getLogger("lowcomm.bench")

# The peer baselines, run as ``python -m MODULE`` from the repository root.
PEER_MODULES = {
    "torchft": "scripts.bench.peers.torchft_diloco",
    "hivemind": "scripts.bench.peers.hivemind_optimizer",
}
# torchft pulls in dependencies of its own, so it lives in a venv of its own (make bench-peers).
DEFAULT_TORCHFT_PYTHON = str(REPO / ".venv-torchft" / "bin" / "python")
RESULT_VERSION = 1
# The suite's phases, in the order they run.
PHASES = ("quality", "throughput", "peers")
# Per packet the veth counter sees: Ethernet (14) + IPv4 (20) + TCP with timestamps (32).
# A GSO super-packet counts once, with one set of headers, as the counter counts it.
HEADER_BYTES_PER_PACKET = 66
WANSIM_PREFIX = "lcbench"
# Keys of the recipe config that a method or a phase sets; the rest is the profile's task.
_RUN_KEYS = ("config", "run_dir", "resume", "overwrite", "mode", "run_name")


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
    throughput_seconds: float | None
    timelines: list[str]
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
    lines = ["# Generated by scripts.bench.suite: the benchmark task, shared by every run."]
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


# Recipe options added after results were cached, each with the value that does what every
# run did before the option existed: at that value they stay out of the cache key, so adding
# an option does not throw away hours of cached runs.
KEY_NEUTRAL_OPTIONS: dict[str, Any] = {"outer_warmup": 0}


def run_key(payload: dict[str, Any]) -> str:
    """Digest of everything a cached result depends on (see :data:`KEY_NEUTRAL_OPTIONS`)."""
    if "task" in payload:
        task = {
            k: v
            for k, v in payload["task"].items()
            if k not in KEY_NEUTRAL_OPTIONS or v != KEY_NEUTRAL_OPTIONS[k]
        }
        payload = {**payload, "task": task}
    text = json.dumps({"v": RESULT_VERSION, **payload}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# Options added to the recipe after the headline's runs were published, each with the value at
# which a run that is not a swarm does what it did before they existed (they set swarm peers
# and torchrun replicas, neither of which such a run has): a result recorded without them also
# matches the same run recorded with them (:func:`run_keys`).
LATER_OPTIONS: dict[str, Any] = {
    "replicas": 0,
    "shard": "ddp",
    "sync_clock": "auto",
    "wait_for_peers": 1,
    "wait_for_peers_timeout": 600.0,
    "max_norm": 0.0,
    "norm_ratio": 10.0,
    "aggregation": "mean",
}


def run_keys(payload: dict[str, Any], swarm: bool = False) -> tuple[str, ...]:
    """The keys a cached result of this run may carry: :func:`run_key`, then (for a run that
    is not a swarm) its key from before :data:`LATER_OPTIONS` existed."""
    key = run_key(payload)
    if swarm or "task" not in payload:
        return (key,)
    task = {
        k: v for k, v in payload["task"].items() if k not in LATER_OPTIONS or v != LATER_OPTIONS[k]
    }
    older = run_key({**payload, "task": task})
    return (key,) if older == key else (key, older)


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


# The task's step counts that a batch-size method scales (:func:`same_tokens`).
_PER_STEP_OPTIONS = ("steps", "eval_every", "warmup_steps")


def same_tokens(task: dict[str, Any], method: Method) -> dict[str, int]:
    """The recipe options that keep a method with its own batch (``ddp-bs8``) at the task's
    tokens: the steps, the evaluation and log intervals and the lr warm-up, each times task
    batch / the method's, so that its evaluations fall on the same token counts (the log
    interval, which only sets how often a line is written, becomes the largest divisor of
    the evaluation interval not above its scaled value). Empty for a method at the task's
    batch.

    Raises:
        ValueError: a count that the batch ratio does not scale to a whole number of steps.
    """
    batch = method.options.get("batch_size")
    if batch is None or int(batch) == int(task["batch_size"]):
        return {}
    out = {}
    for key in _PER_STEP_OPTIONS:
        tokens = int(task[key]) * int(task["batch_size"])
        if tokens % int(batch):
            raise ValueError(
                f"method {method.name}: the task's {key} ({task[key]}) x batch "
                f"{task['batch_size']} is not a whole number of steps of batch {batch}"
            )
        out[key] = tokens // int(batch)
    scaled = max(1, int(task["log_every"]) * int(task["batch_size"]) // int(batch))
    out["log_every"] = max(d for d in range(1, scaled + 1) if out["eval_every"] % d == 0)
    return out


def window_log_step(method: Method, steps: int) -> int:
    """The inner step at which the wire-counter window of a throughput run starts.

    It is the run's first log record (``log_every``): after the start-up (rendezvous and the
    parameter broadcast, which ``sync_state`` returns from only once every rank has it, so
    none of it drains into the first steps), a tenth into the run, and not at or just after
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


def _cached(
    path: Path,
    key: str | tuple[str, ...],
    force: bool,
    published: Sequence[dict[str, Any]] = (),
) -> dict[str, Any] | None:
    """The cached result at ``path`` if it has ``key`` (or one of ``key``). Else the record
    of the same key among ``published`` (a profile's committed ``results.json``, read once
    per phase by :func:`_published_runs`), restored to ``path``: a fresh clone, whose
    ``runs/`` is empty, adds methods to a profile without rerunning the hours of runs the
    file already holds (same key: the same settings, so the same run)."""
    keys = (key,) if isinstance(key, str) else key
    if force:
        return None
    if path.exists():
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("key") in keys:
            return record
    for record in published:
        if record.get("key") in keys:
            _save(path, record)
            return record
    return None


def _published_runs(published: Path | None) -> list[dict[str, Any]]:
    """Every quality and peer record of a results file (none when it does not exist)."""
    if published is None or not published.exists():
        return []
    runs = json.loads(published.read_text(encoding="utf-8")).get("runs", {})
    return [*runs.get("quality", []), *runs.get("peers", [])]


def quality_phase(
    st: Settings, toml: Path, dry_run: bool = False
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Every method x seed on loopback; returns the per-run records and the failed runs."""
    records: list[dict[str, Any]] = []
    failed: list[dict[str, str]] = []
    total = len(st.methods) * len(st.seeds)
    n = 0
    published = _published_runs(st.out_dir / "results.json")
    for method in st.methods:
        for seed in st.seeds:
            n += 1
            keys = run_keys(
                {"kind": "quality", "task": st.task, "method": method_key(method), "seed": seed,
                 "workers": st.workers},
                swarm=method.swarm,
            )  # fmt: skip
            key = keys[0]
            path = st.work_dir / "quality" / method.name / f"seed{seed}.json"
            cached = _cached(path, keys, st.force, published)
            if dry_run:
                print(f"quality {n}/{total} {method.name} seed {seed}: "
                      f"{'cached' if cached else 'to run'}")  # fmt: skip
                continue
            if cached is not None:
                records.append(cached)
                continue
            run_dir = st.work_dir / "runs" / "quality" / method.name / f"seed{seed}"
            argv = recipe_argv(toml, method, seed, run_dir, same_tokens(st.task, method))
            logger.info("quality %d/%d: %s seed %d", n, total, method.name, seed)
            try:
                launch = run_with_retry(
                    argv, run_dir, st.workers, st.threads, st.run_timeout, swarm=method.swarm
                )
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
                **quality_record(metrics, st.workers if method.swarm else 1),
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
    return None if rate in ("loopback", "unshaped", CEILING) else wansim.parse_rate(rate)


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


#: Every throughput worker records its timeline (cheap: see lowcomm.comm.timeline).
TIMELINE_ENV = {"LOWCOMM_TIMELINE": "1"}


@dataclasses.dataclass(frozen=True)
class TputRun:
    """One run of the throughput plan: a method at a rate, in pass ``repeat``, at ``slot``."""

    method: Method
    rate: str
    repeat: int
    slot: int

    @property
    def name(self) -> str:
        """The run's file name (the ceiling's carries its slot: a pass has several)."""
        if self.rate == CEILING:
            return f"local-r{self.repeat}-s{self.slot}"
        return self.method.name + (f"-r{self.repeat}" if self.repeat else "")


def throughput_plan(methods: Sequence[Method], rates: Sequence[str], repeats: int) -> list[TputRun]:
    """The throughput runs in the order they run: per pass, a ceiling run, then one method at
    every rate, then the ceiling again, then the next method, ..., and a last ceiling.

    Every method's runs are thus bracketed by ceiling runs minutes apart, and a drifting load
    on the machine moves both alike; odd passes take the methods in reverse order, so no
    method always runs first or last.
    """
    local = parse_method("local")
    others = [m for m in methods if m.mode != "local"]
    plan: list[TputRun] = []
    for repeat in range(repeats):
        slot = 0
        order = others if repeat % 2 == 0 else others[::-1]
        for method in [*order, None]:
            plan.append(TputRun(local, CEILING, repeat, slot))
            slot += 1
            if method is None:
                break
            for rate in rates:
                plan.append(TputRun(method, rate, repeat, slot))
                slot += 1
    return plan


def run_steps(st: Settings, method: Method, rate: str) -> int:
    """Inner steps of a throughput run: the profile's, except for DP under a shaped link,
    which runs as many as its per-step all-reduces need to fill ``throughput_seconds`` at
    the link's rate (its steps take the wire time of a whole fp32 sync each)."""
    bps = _rate_bps(rate)
    if method.mode != "ddp" or bps is None or not st.throughput_seconds:
        return st.throughput_steps
    workers = st.workers
    sync_bits = 8 * 2 * (workers - 1) / workers * 4 * task_num_params(st.task)
    steps = math.ceil(st.throughput_seconds * bps / sync_bits)
    return max(10, min(st.throughput_steps, steps))


def task_num_params(task: dict[str, Any]) -> int:
    """Parameters of the task's model (built on the meta device: no memory, no time)."""
    import torch

    from lowcomm.gpt import GPT, GPTConfig

    config = GPTConfig(
        block_size=int(task["seq_len"]),
        n_layer=int(task["n_layer"]),
        n_head=int(task["n_head"]),
        n_embd=int(task["n_embd"]),
        tie_weights=bool(task["tie_weights"]),
    )
    with torch.device("meta"):
        return int(GPT(config).num_params())


def worker_records(run_dir: Path, workers: int, swarm: bool) -> list[dict[str, Any]]:
    """Each worker's training window, blocked seconds, and (from its timeline) the seconds
    of each span kind per lane inside that window."""
    out = []
    dirs = worker_dirs(run_dir, workers, swarm)
    records = read_workers(run_dir, workers, swarm)
    spans = [read_timeline(p) for p in timeline_paths(dirs, swarm)]
    late = None
    if all(w is not None for w in records):
        late = waiting_for_peers(spans, [(w["start"], w["end"]) for w in records])  # type: ignore[index]
    for rank, (w, ss) in enumerate(zip(records, spans)):
        if w is None:
            out.append({"rank": rank, "blocked_fraction": None})
            continue
        out.append(
            {
                "rank": rank,
                "train_seconds": w["train_seconds"],
                "blocked_seconds": w["blocked_seconds"],
                "blocked_fraction": w["blocked_fraction"],
                "flush_seconds": w.get("flush_seconds"),
                "seconds_by_kind": breakdown(ss, w["start"], w["end"]) if ss else None,
                "waiting_for_peers": late[rank] if late else None,
            }
        )
    return out


def throughput_phase(
    st: Settings, toml: Path, dry_run: bool = False
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """The throughput plan (:func:`throughput_plan`); returns records, and what was skipped."""
    records: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    rates = []
    for rate in st.rates:
        problem = _shaping_problem(rate)
        if problem is None:
            rates.append(rate)
        else:
            skipped.append({"what": f"throughput at {rate}", "why": problem})
            logger.warning("skipping throughput at %s: %s", rate, problem)
    if not rates:
        return records, skipped
    plan = throughput_plan(st.throughput_methods, rates, st.throughput_repeats)
    for n, run in enumerate(plan, 1):
        method, rate = run.method, run.rate
        steps = run_steps(st, method, rate)
        extra = {
            "steps": steps,
            "eval_every": steps,
            "eval_batches": 1,
            "log_every": window_log_step(method, steps),
        }
        key = run_key(
            {"kind": "throughput", "task": st.task, "method": method_key(method), "rate": rate,
             "extra": extra, "workers": st.workers, "repeat": run.repeat, "slot": run.slot,
             "timeline": True}
        )  # fmt: skip
        path = st.work_dir / "throughput" / rate / f"{run.name}.json"
        cached = _cached(path, key, st.force)
        if dry_run:
            print(f"throughput {n}/{len(plan)} {rate} {run.name} ({steps} steps): "
                  f"{'cached' if cached else 'to run'}")  # fmt: skip
            continue
        if cached is not None:
            records.append(cached)
            continue
        run_dir = st.work_dir / "runs" / "throughput" / rate / run.name
        argv: list[str] | ArgvFor = recipe_argv(toml, method, st.seeds[0], run_dir, extra)
        if method.peer is not None:
            python = _peer_python(st, method.peer)
            if not Path(python).exists():
                skipped.append({"what": f"throughput {run.name} at {rate}",
                                "why": f"no interpreter at {python} (--torchft-python)"})  # fmt: skip
                continue
            argv = peer_throughput_argv(st, method, python, toml, run_dir, steps)
        logger.info("throughput %d/%d: %s at %s", n, len(plan), run.name, rate)
        net = "loopback" if rate == CEILING else rate
        try:
            with _network(net, st.workers) as sim:
                launch = run_with_retry(
                    argv,
                    run_dir,
                    st.workers,
                    st.threads,
                    st.run_timeout,
                    sim=sim,
                    swarm=method.swarm,
                    env=TIMELINE_ENV,
                )
            if method.peer is None:
                metrics = read_metrics(run_dir)
                measured = throughput_record(metrics, st.workers if method.swarm else 1)
                wire = wire_comparison(launch, metrics)
            else:
                measured, wire = peer_throughput_record(run_dir, st.workers), None
        except RunFailed as e:
            logger.error("throughput run %s at %s failed: %s", run.name, rate, e)
            skipped.append({"what": f"throughput {run.name} at {rate}", "why": _short(e)})
            continue
        workers = worker_records(run_dir, st.workers, method.swarm)
        blocked = [w["blocked_fraction"] for w in workers if w["blocked_fraction"] is not None]
        rec = {
            "key": key,
            "kind": "throughput",
            "method": method.name,
            "repeat": run.repeat,
            "slot": run.slot,
            "rate": rate,
            "rate_bps": _rate_bps(rate),
            "seed": st.seeds[0],
            # A peer's workers differ only in --rank and --host: rank 0's stands for them.
            "command": argv(0, "HOST") if callable(argv) else argv,
            "run_dir": str(run_dir),
            **launch,
            **measured,
            "workers": workers,
            "blocked_fraction": statistics.fmean(blocked) if blocked else None,
            "wire_compare": wire,
        }
        _save(path, rec)
        short = st.throughput_seconds and rec["train_seconds"] < st.throughput_seconds
        logger.info(
            "  %.3g tokens/s, blocked %s, %.0f s of training%s",
            rec["tokens_per_s"] or float("nan"),
            "n/a" if rec["blocked_fraction"] is None else f"{rec['blocked_fraction']:.3f}",
            rec["train_seconds"],
            f" (short of the profile's {st.throughput_seconds:g} s)" if short else "",
        )
        records.append(rec)
    return records, skipped


def peer_throughput_argv(
    st: Settings, method: Method, python: str, toml: Path, run_dir: Path, steps: int
) -> ArgvFor:
    """A peer library's worker command, one process per host (``--rank``): the run directory
    is the workers' rendezvous, where each also leaves ``worker<R>.json`` and its timeline."""
    assert method.peer is not None and method.sync_every is not None
    base = [
        python, "-m", PEER_MODULES[method.peer], "--config", str(toml),
        "--workers", str(st.workers), "--steps", str(steps),
        "--sync-every", str(method.sync_every), "--seed", str(st.seeds[0]),
        "--eval-every", str(steps), "--threads", str(st.threads),
        "--out", str(run_dir / "peer.jsonl"), "--timeout", str(int(st.run_timeout)),
        "--rendezvous", str(run_dir),
    ]  # fmt: skip
    return lambda rank, host: [*base, "--rank", str(rank), "--host", host]


def peer_throughput_record(run_dir: Path, workers: int) -> dict[str, Any]:
    """tokens/s of a peer run, every worker's tokens over the longest worker's training
    window (from the end of its step-0 evaluation to the end of its last step, evaluations
    left out: hivemind's workers need not finish together), and its counters."""
    lines = [json.loads(x) for x in (run_dir / "peer.jsonl").read_text().splitlines() if x]
    summary = next((x for x in lines if x.get("summary")), None)
    if summary is None:
        raise RunFailed(f"{run_dir}/peer.jsonl has no summary")
    window = summary["windows"][0]
    seconds = max(w["train_seconds"] for w in summary["windows"])
    estimate = summary.get("bytes_sent_ring_estimate") or summary.get("bytes_sent_estimate")
    return {
        "steps": summary["steps"],
        "tokens": summary["tokens"],
        "train_seconds": seconds,
        "tokens_per_s": summary["tokens"] / seconds if seconds > 0 else None,
        "lib_bytes_sent_rank0": int(estimate or 0),
        "lib_bytes_received_rank0": None,
        "lib_bytes_estimated": True,
        "num_params": summary["num_params"],
        "outer_steps": summary["averaging_rounds"],
        "peak_sync_bytes": None,
        "comm_seconds": window["blocked_seconds"],
        "library": summary["library"],
        "version": summary["version"],
    }


def throughput_timelines(st: Settings, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Excerpts of the timelines the profile asks to draw (``method@rate``), each from the
    run of its median pass (by tokens/s ÷ ceiling), read back from its run directory."""
    out = []
    paired = aggregate_throughput(runs)
    for cell in st.timelines:
        name, _, rate = cell.partition("@")
        name = parse_method(name).name
        item = paired.get(rate, {}).get("methods", {}).get(name)
        if item is None or item.get("median_run") is None:
            logger.warning("no throughput run of %s at %s to draw the timeline of", name, rate)
            continue
        run = next(r for r in runs if r["key"] == item["median_run"])
        method = parse_method(name)
        dirs = worker_dirs(Path(run["run_dir"]), st.workers, method.swarm)
        spans = [read_timeline(p) for p in timeline_paths(dirs, method.swarm)]
        # Two gaps between syncs (H, or H/P with fragments; DP: 5 steps), at this run's
        # measured seconds per step: what one sync does to the steps around it.
        gap = (method.sync_every or 5) // int(method.options.get("fragments") or 1)
        seconds = 2 * max(1, gap) * run["train_seconds"] / max(1, run["steps"])
        cut = excerpt(spans, seconds)
        if cut is None:
            logger.warning("no timeline spans in %s", run["run_dir"])
            continue
        out.append(
            {
                "method": name,
                "label": method.label,
                "rate": rate,
                "repeat": run["repeat"],
                "ratio_to_ceiling": item["ratio_to_ceiling"],
                "blocked_fraction": run.get("blocked_fraction"),
                **cut,
            }
        )
    return out


def _peer_python(st: Settings, library: str) -> str:
    return st.torchft_python if library == "torchft" else sys.executable


def peers_phase(
    st: Settings, toml: Path, dry_run: bool = False
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """torchft / hivemind baselines on loopback; returns records and what was not compared."""
    records: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    published = _published_runs(st.out_dir / "results.json")
    for library in st.peers:
        python = _peer_python(st, library)
        if not Path(python).exists():
            skipped.append(
                {"what": library, "why": f"no interpreter at {python} (--torchft-python)"}
            )
            continue
        for seed in st.seeds:
            keys = run_keys(
                {"kind": "peer", "library": library, "task": st.task, "seed": seed,
                 "workers": st.workers, "sync_every": st.peer_sync_every, "python": python}
            )  # fmt: skip
            key = keys[0]
            path = st.work_dir / "peers" / library / f"seed{seed}.json"
            cached = _cached(path, keys, st.force, published)
            if dry_run:
                print(f"peer {library} seed {seed}: {'cached' if cached else 'to run'}")
                continue
            if cached is not None:
                records.append(cached)
                continue
            out = st.work_dir / "runs" / "peers" / library / f"seed{seed}.jsonl"
            out.parent.mkdir(parents=True, exist_ok=True)
            argv = [
                python, "-m", PEER_MODULES[library], "--config", str(toml), "--workers", str(st.workers),
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
    for m in methods:
        same_tokens(task, m)  # a batch that does not divide the task's tokens fails here
    for m in tmethods:
        if "batch_size" in m.options:
            raise ValueError(
                f"throughput method {m.name}: bs<B> is for the quality runs (tokens/s at "
                "another batch is another workload)"
            )
    rates = _csv_list(args.rates) if args.rates else list(profile.rates)
    for rate in rates:
        if rate not in ("loopback", "unshaped"):
            wansim.parse_rate(rate)
    peers = _csv_list(args.peers) if args.peers is not None else list(profile.peers)
    for p in peers:
        if p not in PEER_MODULES:
            raise ValueError(f"peer {p!r} must be one of {', '.join(PEER_MODULES)}")
    all_h = {m.sync_every for m in methods + tmethods if m.sync_every}
    for h in sorted(all_h):
        if task["steps"] % h:
            logger.warning("steps (%d) is not a multiple of H=%d", task["steps"], h)
    if task["eval_every"] % task["log_every"]:
        raise ValueError(
            f"eval_every ({task['eval_every']}) must be a multiple of log_every "
            f"({task['log_every']}) so that bytes are known at every evaluation"
        )
    out_dir = (
        Path(args.out)
        if args.out
        else (report.BENCH_DIR if profile.name == "default" else report.BENCH_DIR / profile.name)
    )
    phases = _csv_list(args.phases)
    for ph in phases:
        if ph not in PHASES:
            raise ValueError(f"phase {ph!r} must be one of {', '.join(PHASES)}")
    return Settings(
        profile=profile,
        task=task,
        seeds=seeds,
        methods=methods,
        throughput_methods=tmethods,
        throughput_steps=args.throughput_steps or profile.throughput_steps,
        throughput_repeats=args.throughput_repeats or profile.throughput_repeats,
        throughput_seconds=profile.throughput_seconds,
        timelines=_csv_list(args.timelines)
        if args.timelines is not None
        else list(profile.timelines),
        rates=rates,
        peers=peers,
        peer_sync_every=args.peer_sync_every or profile.peer_sync_every,
        workers=args.workers or profile.workers,
        threads=args.threads,
        device=args.device,
        work_dir=Path(args.work_dir) if args.work_dir else REPO / "runs" / "bench" / profile.name,
        out_dir=out_dir,
        doc=Path(args.doc) if args.doc else report.default_doc(out_dir),
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
        prog="python -m scripts.bench.suite",
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
        "--throughput-repeats", type=int, help="passes over the throughput runs (median counts)"
    )
    p.add_argument(
        "--timelines",
        help="throughput cells whose timeline to draw, as METHOD@RATE, comma-separated "
        "(e.g. diloco-h25-eager@20mbit; empty: none)",
    )
    p.add_argument(
        "--rates", help="link rates: loopback (no namespaces), unshaped, or e.g. 100mbit"
    )
    p.add_argument("--peers", help="peer libraries: torchft,hivemind (empty: none)")
    p.add_argument("--peer-sync-every", type=int, help="H of the peer runs")
    p.add_argument(
        "--torchft-python", help=f"interpreter with torchft (default {DEFAULT_TORCHFT_PYTHON})"
    )
    p.add_argument(
        "--workers", type=int, help="M, workers (one process each; default: the profile's)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any recipe option")
    p.add_argument("--phases", default=",".join(PHASES))
    p.add_argument(
        "--work-dir", help="run directories and cached results (default runs/bench/<profile>)"
    )
    p.add_argument("--out", help="results, CSV and plots (default benchmarks[/<profile>])")
    p.add_argument(
        "--doc",
        help="the generated Markdown (default: BENCHMARKS.md for benchmarks/, else beside --out)",
    )
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
    timelines: list[dict[str, Any]] = []
    if "throughput" in st.phases:
        t0 = time.monotonic()
        tput_runs, skipped = throughput_phase(st, toml, dry_run)
        not_compared += skipped
        if not dry_run:
            timelines = throughput_timelines(st, tput_runs)
        walls["throughput"] = time.monotonic() - t0
    if "peers" in st.phases:
        t0 = time.monotonic()
        peer_runs, skipped = peers_phase(st, toml, dry_run)
        not_compared += skipped
        walls["peers"] = time.monotonic() - t0
    if dry_run:
        return None
    walls["total"] = time.monotonic() - t_all
    skipped_phases = [ph for ph in PHASES if ph not in st.phases]
    if skipped_phases:
        not_compared.append(
            {
                "what": f"phases {', '.join(skipped_phases)}",
                "why": f"not run in this invocation (--phases {','.join(st.phases)})",
            }
        )
    if st.peers and "peers" in st.phases:
        if not any(m.peer for m in st.throughput_methods):
            not_compared.append(
                {
                    "what": "peers under shaped links (throughput vs link rate)",
                    "why": "this profile's throughput methods name no peer library; "
                    "torchft-h<H> and hivemind-h<H> run them one process per host behind "
                    "the same links as lowcomm's methods (--throughput-methods)",
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
    baseline = parse_method(st.profile.baseline).name
    quality = aggregate_quality(quality_runs, baseline)
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
            "throughput_seconds": st.throughput_seconds,
            "headline_roles": st.profile.headline,
            "baseline": baseline,
        },
        "runs": {"quality": quality_runs, "throughput": tput_runs, "peers": peer_runs},
        "aggregate": {
            "quality": quality,
            "throughput": aggregate_throughput(tput_runs),
            "timelines": timelines,
            "peers": aggregate_peers(peer_runs, quality, st.peer_sync_every, baseline),
        },
        "headline": headline_rows(
            quality, st.profile.headline, st.workers, int(st.task["steps"]), baseline
        ),
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
    made = plots.make_plots(results, out_dir)
    results["plots"] = {k: str(v.name) for k, v in made.items()}
    (out_dir / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    write_csv(results, out_dir / "summary.csv")
    report.write_report(out_dir, doc)
    logger.info("wrote %s, %s and %s", out_dir / "results.json", out_dir / "summary.csv", doc)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    command = [python_command(), "-m", "scripts.bench.suite", *argv]
    try:
        st = build_settings(args, command)
    except ValueError as e:
        print(f"scripts.bench.suite: {e}", file=sys.stderr)
        return 2

    def stop(signum: int, _frame: Any) -> None:
        # Unwinding runs every ``finally``: the workers of the run in progress are killed
        # (each runs in its own session, so nothing else would stop them).
        logger.warning("got signal %d: stopping; cached runs are kept", signum)
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    if args.report_only:
        path = st.out_dir / "results.json"
        results = json.loads(path.read_text(encoding="utf-8"))
        # Aggregated afresh from the runs kept in the file: tables follow the aggregation of
        # this version (the timeline excerpts need the run directories, so they stay).
        results["aggregate"]["throughput"] = aggregate_throughput(results["runs"]["throughput"])
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
