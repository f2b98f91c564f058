"""The benchmark suite (the ``scripts.bench`` package: suite, methods, launch, report ...).

Unit tests check the pieces against independent oracles (method grammar, the library's
schedule replayed by hand, paired statistics, the TOML the recipe reads back, interface
counters against sysfs, the report against the numbers it is given). The smoke test runs the
whole suite on the smallest setting on loopback (no root): real recipe runs, results JSON,
CSV, plots and the generated Markdown, then a second invocation that must reuse every cached
run. A root-only test runs one tiny shaped run in network namespaces and checks the interface
counters against the library's.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from scripts.bench import (
    REPO,
    aggregate,
    codecs,
    grid,
    launch,
    plots,
    report,
    sparseloco,
    suite,
    timelines,
    wansim,
)
from scripts.bench.methods import parse_method
from scripts.bench.profiles import PROFILES

# --------------------------------------------------------------------------- methods


def test_method_grammar() -> None:
    m = parse_method("diloco-h25-int8")
    assert m.name == "diloco-h25-int8"
    assert m.options == {
        "mode": "diloco",
        "sync_every": 25,
        "fragments": 1,
        "overlap_steps": 0,
        "compression": "int8",
        "error_feedback": False,
    }
    # Token order does not matter; the canonical name does not change with it.
    s = parse_method("streaming-h20-p4")
    assert s.name == "streaming-p4-h20-o1" == parse_method("streaming-o1-p4-h20").name
    assert (s.options["fragments"], s.options["overlap_steps"]) == (4, 1)
    t = parse_method("diloco-h20-topk0.01-ef")
    assert t.options["compression"] == "topk:0.01" and t.options["error_feedback"] is True
    assert "top-k 1%" in t.label and "+EF" in t.label
    sl = parse_method("diloco-h20-topk0.01-ef0.95-m0")
    assert sl.options["compression"] == "ef@0.95:topk:0.01" and not sl.options["error_feedback"]
    assert sl.options["outer_momentum"] == 0.0
    # Decay 1 is classic error feedback: the same method as plain ``ef``.
    assert parse_method("diloco-h20-topk0.01-ef1").name == t.name
    assert parse_method("ddp").options == {"mode": "ddp"}
    assert parse_method("local").mode == "local"
    # Fragments and overlap set on a non-streaming kind are part of its name.
    assert parse_method("diloco-p2-h20").name == "diloco-h20-p2"
    assert parse_method("diloco-h4-o1").name == "diloco-h4-o1"
    sw = parse_method("swarm-h25-int8")
    assert sw.swarm and not m.swarm and sw.options["backend"] == "hivemind"
    # The inner learning rate is a knob of every kind, DP included (equal tuning effort).
    d = parse_method("ddp-ilr0.004")
    assert d.name == "ddp-ilr0.004" and d.options == {"mode": "ddp", "inner_lr": 0.004}
    g = parse_method("diloco-ilr.003-h25-int8-lr0.5-m0.8")
    assert g.name == "diloco-h25-int8-ilr0.003-lr0.5-m0.8"
    assert (g.options["inner_lr"], g.options["outer_lr"]) == (0.003, 0.5)
    assert parse_method("ddp-ilr0.00001").name == "ddp-ilr0.00001"  # never 1e-05: '-' splits
    # DP's batch per worker, the other knob DP gets in the grid (at the task's tokens).
    b = parse_method("ddp-ilr0.002-bs8")
    assert b.name == "ddp-bs8-ilr0.002" and b.options["batch_size"] == 8 and "batch 8" in b.label
    db = parse_method("diloco-ow30-bs8-h25-int8")
    assert db.name == "diloco-h25-bs8-int8-ow30" and db.options["batch_size"] == 8
    # SparseLoCo's compressor as its reference runs it: tiled top-k per tensor.
    tl = parse_method("diloco-h25-tiled64-ef0.95-lr1-m0")
    assert tl.name == "diloco-h25-tiled64x64q2-ef0.95-lr1-m0"
    assert tl.options["compression"] == "ef@0.95:tiled:64:64:2"
    assert parse_method("diloco-h25-tiled32x32q32").options["compression"] == "tiled:32:32:32"
    ow = parse_method("diloco-h25-ow30-int8")
    assert ow.name == "diloco-h25-int8-ow30" and ow.options["outer_warmup"] == 30
    # Top-k values through a block codec, one scale per chunk (the old sparseloco preset).
    tv = parse_method("diloco-h25-vint2-topk0.015625-ef0.95")
    assert tv.name == "diloco-h25-topk0.015625-vint2-ef0.95"
    assert tv.options["compression"] == "ef@0.95:topk:0.015625+int2:64"
    assert sw.options["compression"] == "int8" and "hivemind" in sw.label
    # Every generated option is one the recipe accepts.
    from lowcomm.config import load_config

    for name in (
        "diloco-h25-int8",
        "swarm-h25-int8",
        "streaming-p4-h20",
        "diloco-h20-topk0.01-ef",
        "diloco-h20-topk0.01-ef0.95-m0",
        "diloco-h25-tiled64-ef0.95-lr1-m0",
        "diloco-h25-int8-ow30",
        "ddp-ilr0.004",
        "ddp-bs8-ilr0.004",
        "diloco-h25-bs8-int8-ow30",
        "ddp",
    ):
        opts = parse_method(name).options
        load_config([f"--{k}={v}" for k, v in opts.items()] + ["--steps=100"])


def test_eager_and_delayed_are_overlap_modes_the_recipe_takes() -> None:
    from lowcomm.config import load_config

    e = parse_method("diloco-int8-eager-h25")
    assert e.name == "diloco-h25-eager-int8" and e.options["overlap_mode"] == "eager"
    assert e.options["overlap_steps"] == 0 and "eager" in e.label
    # Streaming's default one-step overlap is mix mode's: eager streaming overlaps a period.
    s = parse_method("streaming-p4-h100-eager")
    assert s.name == "streaming-p4-h100-eager" and s.options["overlap_steps"] == 0
    assert parse_method("diloco-h25-delayed").options["overlap_mode"] == "delayed"
    # Mix-mode methods keep their options (and so their cached results' keys).
    assert "overlap_mode" not in parse_method("streaming-p4-h20").options
    for m in (e, s):
        cfg = load_config([f"--{k}={v}" for k, v in m.options.items()] + ["--steps=100"])
        assert cfg.overlap_mode == "eager"


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("diloco-h25-o1-eager", "takes no o<tau>"),
        ("sgd", "kind"),
        ("ddp-h20", "takes only bs<BATCH> and ilr"),
        ("ddp-bs8-bs4", "takes only bs<BATCH>"),
        ("local-bs0", "takes only bs<BATCH>"),
        ("ddp-ilr0.1-ilr0.2", "2 times"),
        ("diloco-h20-zip", "unknown token"),
        ("streaming-p3-h20", "must divide"),
        ("streaming-p4-h4", "fragment spacing"),
        ("diloco-h20-ef", "ef needs a compression"),
        ("diloco-h20-int8-m1.5", "outer momentum"),
        ("diloco-h20-int8-vint2", "add topk"),
    ],
)
def test_method_grammar_rejects(name: str, rule: str) -> None:
    with pytest.raises(ValueError, match=rule):
        parse_method(name)


def test_a_batch_method_trains_on_the_tasks_tokens_and_evaluates_where_the_others_do() -> None:
    task = {"steps": 600, "eval_every": 100, "log_every": 25, "warmup_steps": 20, "batch_size": 16}
    assert suite.same_tokens(task, parse_method("ddp-ilr0.004")) == {}
    assert suite.same_tokens(task, parse_method("ddp-bs16")) == {}  # the task's own batch
    half = suite.same_tokens(task, parse_method("ddp-bs8-ilr0.004"))
    assert half == {"steps": 1200, "eval_every": 200, "warmup_steps": 40, "log_every": 50}
    # Twice the batch: 12.5 steps between log lines is no step count; the interval becomes the
    # largest divisor of the evaluation interval below it (bytes are known at every eval).
    double = suite.same_tokens(task, parse_method("ddp-bs32"))
    assert double == {"steps": 300, "eval_every": 50, "warmup_steps": 10, "log_every": 10}
    for opts in (half, double):  # the same tokens in total and between evaluations
        batch = 16 * 600 // opts["steps"]
        assert opts["steps"] * batch == 600 * 16 and opts["eval_every"] * batch == 100 * 16
    with pytest.raises(ValueError, match="not a whole number of steps of batch 7"):
        suite.same_tokens(task, parse_method("ddp-bs7"))


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_profile_parses_and_tunes_only_on_seeds_it_never_reports(name: str) -> None:
    profile = PROFILES[name]
    task = suite.task_config(profile, [], "cpu")
    methods = {parse_method(m).name for m in profile.methods}
    for m in profile.methods:  # a batch that does not divide the task's tokens is refused
        suite.same_tokens(task, parse_method(m))
    assert {parse_method(m).name for m in profile.headline.values()} <= methods | {
        parse_method(m).name for m in profile.throughput_methods
    }
    if profile.methods and profile.baseline != "ddp":
        assert parse_method(profile.baseline).name in methods
    reported = {s for p in PROFILES.values() if not p.name.startswith("tune") for s in p.seeds}
    if name.startswith("tune"):  # the grid chooses; the seeds it chooses on are never shown
        assert not set(profile.seeds) & reported


def test_unknown_phase_is_refused_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--phases", "quality,speed", "--work-dir", str(tmp_path / "work")]
    assert suite.main(argv) == 2
    assert "phase 'speed' must be one of quality, throughput, peers" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()


def test_lowcomm_bench_runs_the_checkouts_suite_from_any_directory(tmp_path: Path) -> None:
    # Relative paths in the arguments keep meaning the caller's directory.
    cmd = [sys.executable, "-m", "lowcomm.cli", "bench", "--profile", "smoke", "--dry-run"]
    cmd += ["--work-dir", "work"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "quality 1/2 ddp seed 0: to run" in proc.stdout
    assert (tmp_path / "work" / "task.toml").is_file()


def test_lowcomm_bench_outside_a_checkout_says_it_needs_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from lowcomm import cli

    monkeypatch.setattr(cli, "_ROOT", tmp_path)  # an installed package: no scripts/ beside it
    assert cli.main(["bench", "--profile", "smoke"]) == 2
    err = capsys.readouterr().err
    assert "source checkout" in err and "make bench" in err


def test_cache_key_of_overlapped_methods_records_the_final_flush() -> None:
    # Results of overlapped methods cached before the recipe flushed are stale; others are not.
    for name in ("ddp", "diloco-h4", "diloco-h4-int8", "streaming-p4-h20-o0"):
        method = parse_method(name)
        assert suite.method_key(method) == method.options
    for name in ("streaming-p2-h4", "streaming-p4-h12-o2", "diloco-h4-o1"):
        key = suite.method_key(parse_method(name))
        assert key["flushed_at_end"] is True


def test_an_option_added_at_its_old_behaviour_keeps_cached_keys() -> None:
    task = suite.task_config(PROFILES["tune"], [], "cpu")
    before = {k: v for k, v in task.items() if k not in suite.KEY_NEUTRAL_OPTIONS}
    payload = {"kind": "quality", "method": {"mode": "ddp"}, "seed": 0, "workers": 2}
    assert suite.run_key({**payload, "task": task}) == suite.run_key({**payload, "task": before})
    changed = {**task, "outer_warmup": 5}
    assert suite.run_key({**payload, "task": changed}) != suite.run_key({**payload, "task": task})


def test_a_run_recorded_before_the_swarm_and_replica_options_keeps_its_key() -> None:
    task = suite.task_config(PROFILES["headline"], [], "cpu")
    before = {k: v for k, v in task.items() if k not in suite.LATER_OPTIONS}
    payload = {"kind": "quality", "method": {"mode": "diloco"}, "seed": 0, "workers": 2}
    now = suite.run_keys({**payload, "task": task})
    assert now[0] == suite.run_key({**payload, "task": task})
    assert suite.run_key({**payload, "task": before}) in now
    # A swarm's result depends on them (its clock, its norm bounds): no older key matches it.
    assert suite.run_keys({**payload, "task": task}, swarm=True) == now[:1]
    # Away from the old behaviour (replicas of two ranks), the older key is not offered.
    replicated = suite.run_keys({**payload, "task": {**task, "replicas": 2}})
    assert suite.run_key({**payload, "task": before}) not in replicated


def test_a_published_result_restores_a_missing_cache_entry(tmp_path: Path) -> None:
    record = {"kind": "quality", "key": "k1", "method": "ddp", "final_eval_loss": 1.5}
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"runs": {"quality": [record], "peers": []}}))
    published = suite._published_runs(results)
    assert published == [record]
    path = tmp_path / "runs" / "quality" / "ddp" / "seed0.json"
    assert suite._cached(path, "k2", False, published) is None  # another run's key
    assert not path.exists()
    assert suite._cached(path, ("k2", "k1"), False, published) == record
    assert json.loads(path.read_text()) == record  # restored to the cache
    assert suite._cached(path, "k1", False) == record  # now without the published file
    assert suite._cached(path, "k1", True, published) is None  # --force reruns
    assert suite._published_runs(tmp_path / "none.json") == []
    assert suite._cached(tmp_path / "other.json", "k1", False) is None


def test_window_starts_late_and_away_from_sync_starts() -> None:
    s = parse_method("streaming-p4-h20")  # syncs start at multiples of 5, land +1
    step = suite.window_log_step(s, 100)
    assert step >= 10 and step % 5 not in (0, 1)
    h20 = suite.window_log_step(parse_method("diloco-h20"), 100)
    assert h20 >= 10 and h20 % 20
    assert suite.window_log_step(parse_method("ddp"), 100) == 10


# --------------------------------------------------------------------------- statistics


def _quality_run(method: str, seed: int, losses: list[float], sent: int) -> dict[str, Any]:
    steps = [0, 10, 20][: len(losses)]
    return {
        "method": method,
        "seed": seed,
        "evals": [
            {"step": s, "tokens": 100 * s, "loss": v, "bytes_sent": sent * s // 20}
            for s, v in zip(steps, losses)
        ],
        "final_eval_loss": losses[-1],
        "num_params": 1000,
        "steps": 20,
        "bytes_sent": sent,
        "bytes_sent_estimated": method == "ddp",
        "allreduce_bytes": 80000,
        "outer_steps": 0 if method == "ddp" else 1,
        "peak_sync_bytes": None if method == "ddp" else sent,
        "compression_ratio": None if method == "ddp" else 1.0,
        "elapsed_s": 1.0,
        "tokens_per_s_incl_eval": 2000.0,
    }


def test_quality_aggregate_pairs_ratios_by_seed() -> None:
    runs = [
        _quality_run("ddp", 0, [5.5, 3.0, 2.0], 80000),
        _quality_run("ddp", 1, [5.4, 3.2, 2.5], 80000),
        _quality_run("diloco-h20", 0, [5.5, 3.3, 2.2], 4000),
        _quality_run("diloco-h20", 1, [5.4, 3.0, 2.4], 4000),
    ]
    agg = aggregate.aggregate_quality(runs)
    d = agg["diloco-h20"]
    paired = [2.2 / 2.0, 2.4 / 2.5]  # the ratio of means would be 2.3 / 2.25
    assert d["final_ratio_to_baseline"]["mean"] == pytest.approx(statistics.fmean(paired))
    assert d["final_ratio_to_baseline"]["std"] == pytest.approx(statistics.stdev(paired))
    assert d["final_eval_loss"]["mean"] == pytest.approx(2.3)
    mid = next(p for p in d["curve"] if p["step"] == 10)
    assert mid["ratio_to_baseline"]["mean"] == pytest.approx((3.3 / 3.0 + 3.0 / 3.2) / 2)
    assert d["curve"][0]["ratio_to_baseline"]["mean"] == pytest.approx(1.0)
    rows = {r["id"]: r for r in aggregate.headline_rows(agg, {"main": "diloco-h20"}, 2, 20)}
    assert rows["main"]["byte_ratio"] == pytest.approx(20.0)
    assert rows["main"]["loss_ratio"]["mean"] == pytest.approx(statistics.fmean(paired))
    assert not rows["streaming"]["available"] and "streaming" in rows["streaming"]["why"]


def test_a_method_at_another_batch_is_compared_with_dp_at_the_same_tokens(tmp_path: Path) -> None:
    dp = _quality_run("ddp", 0, [5.5, 3.0, 2.0], 80000)  # steps 0, 10, 20 of batch 16
    half = _quality_run("diloco-h20-bs8", 0, [5.5, 3.3, 2.2], 4000)  # 2x the steps of 8
    half["evals"] = [{**e, "step": 2 * e["step"]} for e in half["evals"]]
    agg = aggregate.aggregate_quality([dp, half])
    curve = {p["step"]: p for p in agg["diloco-h20-bs8"]["curve"]}
    # Its step 20 has seen DP's step 10's tokens: paired with that, not with DP's step 20.
    assert curve[20]["ratio_to_baseline"]["mean"] == pytest.approx(3.3 / 3.0)
    assert curve[40]["ratio_to_baseline"]["mean"] == pytest.approx(2.2 / 2.0)
    res = {"profile": "unit", "aggregate": {"quality": agg}, "settings": {"baseline": "ddp"}}
    text = report._gap(res)
    assert "| 10 | 1,000 | 3.0000 | 1.100 |" in text and "| 20 | 2,000 | 2.0000 | 1.100 |" in text


def _peer_run(library: str, seed: int, loss: float) -> dict[str, Any]:
    summary = {
        "final_eval_loss": loss, "final_eval_loss_mean_of_workers": loss, "tokens_per_s": 1.0,
        "averaging_rounds": 2, "expected_rounds_at_sync_every": 2, "version": "x",
    }  # fmt: skip
    evals = [{"step": 20, "tokens": 2000, "loss": loss, "averaging_rounds": 2}]
    return {"library": library, "seed": seed, "evals": evals, "summary": summary}


def test_each_peer_is_paired_with_lowcomms_run_of_the_same_algorithm_and_with_dp() -> None:
    runs = [_quality_run("ddp-ilr0.004", s, [5.5, 2.0 + s], 80000) for s in (0, 1)]
    runs += [_quality_run("diloco-h25", s, [5.5, 2.2 + s], 4000) for s in (0, 1)]
    runs += [_quality_run("diloco-h25-lr1-m0", s, [5.5, 2.1 + s], 4000) for s in (0, 1)]
    quality = aggregate.aggregate_quality(runs, "ddp-ilr0.004")
    peers = [_peer_run("torchft", s, 2.2 + s) for s in (0, 1)]
    peers += [_peer_run("hivemind", s, 2.31 * (1 + s)) for s in (0, 1)]
    out = aggregate.aggregate_peers(peers, quality, 25, "ddp-ilr0.004")
    # torchft's DiLoCo steps the task's outer SGD; hivemind averages (outer lr 1, momentum 0).
    assert out["torchft"]["reference"] == "diloco-h25"
    assert out["torchft"]["ratio_to_reference"]["mean"] == pytest.approx(1.0)
    assert out["hivemind"]["reference"] == "diloco-h25-lr1-m0"
    ratios = out["hivemind"]["ratio_to_reference"]["values"]
    assert ratios == pytest.approx([2.31 / 2.1, 4.62 / 3.1])  # by seed, not a ratio of means
    to_dp = out["hivemind"]["ratio_to_baseline"]
    assert to_dp["values"] == pytest.approx([2.31 / 2.0, 4.62 / 3.0])
    # Without lowcomm's averaging run, hivemind falls back to its DiLoCo at the same H.
    del quality["diloco-h25-lr1-m0"]
    fallback = aggregate.aggregate_peers(peers, quality, 25)["hivemind"]
    assert fallback["reference"] == "diloco-h25" and fallback["reference_same_algorithm"] is False
    assert out["torchft"]["reference_same_algorithm"] is True


def test_streaming_headline_uses_a_full_sync_of_the_same_compression() -> None:
    base = [_quality_run("ddp", 0, [5.5, 2.0], 80000)]
    full = _quality_run("diloco-h20", 0, [5.5, 2.1], 4000)
    stream = _quality_run("streaming-p4-h20-o1", 0, [5.5, 2.2], 4000)
    stream["peak_sync_bytes"] = 1100
    agg = aggregate.aggregate_quality(base + [full, stream])
    (row,) = [
        r
        for r in aggregate.headline_rows(agg, {"streaming": "streaming-p4-h20"}, 2, 20)
        if r["id"] == "streaming"
    ]
    assert row["full_sync_bytes"] == 4000 and "diloco-h20" in row["full_sync_source"]
    assert row["peak_over_total_per_p"] == pytest.approx(1100 / (4000 / 4))


def test_task_toml_reads_back_through_the_recipe_loader(tmp_path: Path) -> None:
    from lowcomm.config import load_config

    task = suite.task_config(PROFILES["default"], ["n_layer=3"], "cpu")
    assert task["n_layer"] == 3 and task["steps"] == 400 and task["ckpt_every"] == 0
    path = tmp_path / "task.toml"
    suite.write_toml(task, path)
    back = load_config(["--config", str(path)]).to_dict()
    assert {k: back[k] for k in task} == task


def test_proc_net_counters_agree_with_sysfs() -> None:
    sysfs = Path("/sys/class/net/lo/statistics")
    if not sysfs.exists():
        pytest.skip("no sysfs network statistics")
    before = int((sysfs / "tx_bytes").read_text())
    got = launch.proc_net_counters(os.getpid(), "lo")
    after = int((sysfs / "tx_bytes").read_text())
    assert before <= got["tx_bytes"] <= after
    with pytest.raises(KeyError):
        launch.proc_net_counters(os.getpid(), "nosuchdev0")


def test_report_prints_the_numbers_it_is_given(tmp_path: Path) -> None:
    runs = [
        _quality_run("ddp", 0, [5.5, 2.0], 80000),
        _quality_run("diloco-h20-int8", 0, [5.5, 2.123456], 1234),
    ]
    agg = aggregate.aggregate_quality(runs)
    results = {
        "profile": "unit",
        "command": [".venv/bin/python", "-m", "scripts.bench.suite", "--profile", "unit"],
        "machine": {"cpu_model": "Test CPU 9000", "cpu_cores": 2, "torch": "x", "loadavg_1m": 1.0},
        "loadavg_1m_end": 2.0,
        "wall_seconds": {"quality": 12.0, "total": 12.0},
        "settings": {
            "task": suite.task_config(PROFILES["default"], [], "cpu"),
            "workers": 2,
            "threads_per_worker": 1,
            "device": "cpu",
            "seeds": [0],
            "throughput_steps": 100,
            "rates": [],
            "throughput_repeats": 3,
        },
        "aggregate": {"quality": agg, "throughput": {}, "peers": {}},
        "headline": aggregate.headline_rows(agg, {"main": "diloco-h20-int8"}, 2, 20),
        "not_compared": [{"what": "hivemind", "why": "because of a test"}],
        "plots": {},
    }
    text = report.render([(tmp_path / "results.json", results)], tmp_path)
    assert text.startswith("<!-- GENERATED")
    assert "2.1235" in text  # the final loss, formatted from the results
    assert f"{80000 / 1234:.1f}x" in text  # the byte ratio
    assert "Test CPU 9000" in text and "because of a test" in text
    assert ".venv/bin/python -m scripts.bench.suite --profile unit" in text


# --------------------------------------------------------------------------- throughput


def test_throughput_plan_brackets_every_method_by_ceiling_runs() -> None:
    methods = [parse_method(m) for m in ("ddp", "diloco-h25", "local")]
    plan = suite.throughput_plan(methods, ["20mbit", "100mbit"], repeats=2)
    names = [(r.method.name, r.rate) for r in plan]
    ceiling = ("local", suite.CEILING)
    assert names[:7] == [
        ceiling, ("ddp", "20mbit"), ("ddp", "100mbit"),
        ceiling, ("diloco-h25", "20mbit"), ("diloco-h25", "100mbit"), ceiling,
    ]  # fmt: skip
    # The next pass takes the methods in reverse order; slots count within a pass.
    assert [n for n, _ in names[7:]] == [
        "local",
        "diloco-h25",
        "diloco-h25",
        "local",
        "ddp",
        "ddp",
        "local",
    ]
    assert [r.slot for r in plan if r.repeat == 1] == list(range(7))
    assert len({(r.rate, r.name) for r in plan}) == len(plan)  # every run has a file of its own


def test_dp_throughput_runs_fill_the_seconds_with_their_all_reduces() -> None:
    st = dataclasses.replace(_settings(), throughput_steps=500, throughput_seconds=60.0)
    params = suite.task_num_params(st.task)
    assert params == 875264  # the demo GPT
    sync_bits = 8 * 4 * params  # 2(M-1)/M = 1 for M = 2
    assert suite.run_steps(st, parse_method("ddp"), "20mbit") == math.ceil(60 * 20e6 / sync_bits)
    assert suite.run_steps(st, parse_method("ddp"), "unshaped") == 500
    assert suite.run_steps(st, parse_method("diloco-h25"), "8mbit") == 500
    assert (
        suite.run_steps(
            dataclasses.replace(st, throughput_seconds=None), parse_method("ddp"), "20mbit"
        )
        == 500
    )


def _settings() -> suite.Settings:
    args = suite.parser().parse_args(["--profile", "throughput"])
    return suite.build_settings(args, ["x"])


def _tput(
    method: str, rate: str, tps: float, repeat: int, slot: int | None, **kw: Any
) -> dict[str, Any]:
    return {
        "key": f"{method}-{rate}-{repeat}-{slot}", "kind": "throughput", "method": method,
        "rate": rate, "rate_bps": None, "repeat": repeat, "slot": slot, "tokens_per_s": tps,
        "lib_bytes_sent_rank0": 0, "lib_bytes_estimated": False, "steps": 100,
        "train_seconds": 10.0, **kw,
    }  # fmt: skip


def test_throughput_ratios_are_paired_with_the_bracketing_ceilings_and_medianed() -> None:
    c = suite.CEILING
    w = [{"rank": 0, "blocked_fraction": 0.1}, {"rank": 1, "blocked_fraction": 0.3}]
    runs = [
        _tput("local", c, 100.0, 0, 0), _tput("diloco-h25", "20mbit", 90.0, 0, 1, workers=w, blocked_fraction=0.2),
        _tput("local", c, 80.0, 0, 2),
        # A pass on a busier machine: both the ceiling and the method are slower.
        _tput("local", c, 50.0, 1, 0), _tput("diloco-h25", "20mbit", 40.0, 1, 1, workers=w, blocked_fraction=0.4),
        _tput("local", c, 50.0, 1, 2),
        _tput("local", c, 60.0, 2, 0), _tput("diloco-h25", "20mbit", 57.0, 2, 1, workers=w, blocked_fraction=0.0),
        _tput("local", c, 60.0, 2, 2),
    ]  # fmt: skip
    agg = aggregate.aggregate_throughput(runs)
    t = agg["20mbit"]["methods"]["diloco-h25"]
    assert t["ratio"]["values"] == pytest.approx([90 / 90, 40 / 50, 57 / 60])
    assert t["ratio_to_ceiling"] == pytest.approx(0.95) and t["ratio"]["min"] == pytest.approx(0.8)
    assert t["median_run"] == "diloco-h25-20mbit-2-1"
    assert t["blocked_fraction"] == pytest.approx(0.2) and t["blocked"]["max"] == pytest.approx(0.4)
    assert t["blocked_source"] == "workers" and t["blocked_per_worker"] == [0.1, 0.3]
    assert t["tokens_per_s"] == 57.0  # the median pass, not the fastest
    assert agg["20mbit"]["ceiling_tokens_per_s"] == 60.0


def test_throughput_records_of_the_older_plan_pair_with_their_pass_and_link() -> None:
    runs = [
        _tput("local", "20mbit", 100.0, 0, None), _tput("ddp", "20mbit", 10.0, 0, None),
        _tput("local", "20mbit", 50.0, 1, None), _tput("ddp", "20mbit", 10.0, 1, None, comm_seconds=5.0),
        _tput("local", "100mbit", 1.0, 1, None),
    ]  # fmt: skip
    t = aggregate.aggregate_throughput(runs)["20mbit"]["methods"]["ddp"]
    assert t["ratio"]["values"] == pytest.approx([0.1, 0.2])
    # Rank 0's comm_seconds where the workers' records are missing.
    assert t["blocked"]["values"] == [0.5] and t["blocked_source"] == "rank 0"


def test_timeline_breakdown_counts_each_instant_once() -> None:
    spans = [
        {"kind": "compute", "thread": "MainThread", "start": 0.0, "end": 1.0},
        {"kind": "prepare", "thread": "MainThread", "start": 1.0, "end": 2.0},
        {"kind": "wait", "thread": "MainThread", "start": 1.2, "end": 1.7},
        {"kind": "apply", "thread": "MainThread", "start": 1.7, "end": 1.8},
        {"kind": "compute", "thread": "MainThread", "start": 2.0, "end": 3.0},
        {"kind": "wire", "thread": "lowcomm-comm_0", "start": 1.1, "end": 2.6},
        {"kind": "encode", "thread": "lowcomm-comm_0", "start": 1.0, "end": 1.1},
    ]
    got = timelines.breakdown(spans, 0.5, 2.5)
    assert got["train"] == pytest.approx(
        {"compute": 1.0, "prepare": 0.4, "wait": 0.5, "apply": 0.1}
    )
    assert got["comm"] == pytest.approx({"encode": 0.1, "wire": 1.4})
    cut = timelines.excerpt([spans, spans], seconds=1.0, lead=0.25)
    assert cut is not None and cut["start"] == 0.75  # just before the sync at 1.0
    kinds = {(s["kind"], s["lane"]) for s in cut["workers"][1]}
    assert ("wait", "train") in kinds and ("wire", "comm") in kinds
    assert all(0.0 <= s["start"] <= s["end"] <= 1.0 for s in cut["workers"][0])


def test_waiting_for_a_later_worker_is_told_apart_from_waiting_for_the_wire() -> None:
    def worker(launches: list[float], waits: list[tuple[float, float]]) -> list[dict[str, Any]]:
        # As with overlap_steps=0: the wait for the average lies inside the sync's start.
        spans = [
            {"kind": "prepare", "thread": "MainThread", "start": t, "end": t + 2.6}
            for t in launches
        ]
        spans += [{"kind": "wait", "thread": "MainThread", "start": a, "end": b} for a, b in waits]
        spans += [
            {"kind": "wire", "thread": "lowcomm-comm_0", "start": t, "end": t + 3.0}
            for t in launches
        ]
        return spans

    # Worker 0 starts each sync 2 s before worker 1 and waits 2.5 s for it; worker 1 waits
    # 0.5 s, all of it after both had started: the network's share.
    w0 = worker([10.0, 20.0], [(10.0, 12.5), (20.0, 22.5)])
    w1 = worker([12.0, 22.0], [(12.0, 12.5), (22.0, 22.5)])
    got = timelines.waiting_for_peers([w0, w1], [(0.0, 30.0), (0.0, 30.0)])
    assert got == [pytest.approx({"wait": 4.0, "wire": 4.0}), {"wait": 0.0, "wire": 0.0}]
    # The window bounds it; unequal sync counts (a swarm's skipped rounds) give nothing.
    assert timelines.waiting_for_peers([w0, w1], [(0.0, 15.0), (0.0, 15.0)])[0]["wait"] == 2.0
    assert timelines.waiting_for_peers([w0, w1[1:]], [(0.0, 30.0)] * 2) is None
    run = {"workers": [{"train_seconds": 30.0, "waiting_for_peers": got[0],
                        "seconds_by_kind": timelines.breakdown(w0, 0.0, 30.0)}]}  # fmt: skip
    f = aggregate.time_fractions(run)
    assert f is not None and f["train"]["wait for peers"] == pytest.approx(4.0 / 30)
    assert f["train"]["wait"] == pytest.approx(5.0 / 30)


def test_report_shows_medians_spreads_blocked_fractions_and_the_timeline(tmp_path: Path) -> None:
    c = suite.CEILING
    w = [{"rank": 0, "blocked_fraction": 0.125, "train_seconds": 10.0, "flush_seconds": 0.5,
          "seconds_by_kind": {"train": {"compute": 9.0, "wait": 1.0}, "comm": {"wire": 4.0}}}]  # fmt: skip
    runs = [
        _tput("local", c, 100.0, 0, 0), _tput("diloco-h25-eager", "20mbit", 96.0, 0, 1, workers=w, blocked_fraction=0.125),
        _tput("local", c, 100.0, 0, 2), _tput("diloco-h25-eager", "20mbit", 91.0, 1, 1, workers=w, blocked_fraction=0.25),
        _tput("local", c, 100.0, 1, 0), _tput("local", c, 100.0, 1, 2),
    ]  # fmt: skip
    agg = aggregate.aggregate_throughput(runs)
    cut = {"method": "diloco-h25-eager", "label": "DiLoCo H=25 eager", "rate": "20mbit",
           "repeat": 0, "ratio_to_ceiling": 0.935, "blocked_fraction": 0.125, "start": 0.0,
           "seconds": 2.0, "workers": [[{"kind": "compute", "lane": "train", "start": 0.0, "end": 1.5},
                                         {"kind": "wire", "lane": "comm", "start": 0.5, "end": 2.0}]]}  # fmt: skip
    results = {"profile": "unit", "settings": {"task": {"n_layer": 1, "n_embd": 8, "steps": 4}, "workers": 2, "seeds": [0]},
               "aggregate": {"throughput": agg, "timelines": [cut]}}  # fmt: skip
    text = report._throughput(results)
    assert (
        "| 20mbit | DiLoCo H=25 eager | 93.5 | 0.935 [0.910–0.960] | 0.188 [0.125–0.250] "
        "| 0.050 [0.050–0.050] |" in text
    )
    assert (
        "| 20mbit | DiLoCo H=25 eager | 90.0% |  | 10.0% |  |  |  | 40.0% |  |  |"
        in report._time_breakdown(results)
    )
    plots.plot_timelines(results, tmp_path / "t.png")
    assert _png(tmp_path / "t.png")


def test_peer_workers_in_processes_of_their_own_meet_through_files(tmp_path: Path) -> None:
    from scripts.bench.peers.workers import ProcessWorker

    out = tmp_path / "evals.jsonl"
    w0 = ProcessWorker(0, 2, 5.0, tmp_path / "rv", out, inbox=["mine"])
    w1 = ProcessWorker(1, 2, 5.0, tmp_path / "rv")
    w0.broadcast({"address": "10.0.0.1"})
    assert w0.receive("own") == "mine"  # rank 0 gives itself what it broadcast
    assert w1.receive("address") == {"address": "10.0.0.1"}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        late = pool.submit(lambda: (time.sleep(0.3), w1.wait_for_all()))
        t0 = time.monotonic()
        w0.wait_for_all()  # returns only once rank 1 has arrived
        assert time.monotonic() - t0 >= 0.25
        late.result()
    w0.report({"step": 0, "eval_loss": 5.5})
    w1.report({"step": 0, "eval_loss": 9.9})  # only rank 0 writes the output
    assert [json.loads(x) for x in out.read_text().splitlines()] == [{"step": 0, "eval_loss": 5.5}]
    for w in (w1, w0):
        w.save_result({"rank": w.rank, "window": {"rank": w.rank}, "params": [float(w.rank)] * 3})
    got = w0.collect_results()
    assert [r["rank"] for r in got] == [0, 1] and list(got[1]["params"]) == [1.0, 1.0, 1.0]
    assert json.loads((tmp_path / "rv" / "worker1.json").read_text()) == {"rank": 1}
    with pytest.raises(RuntimeError, match="no worker 0's address within"):
        ProcessWorker(1, 2, 0.1, tmp_path / "other").receive("worker 0's address")


def test_peer_methods_run_one_process_per_host() -> None:
    st = _settings()
    ft = parse_method("torchft-h25")
    assert ft.peer == "torchft" and ft.sync_every == 25 and ft.label.endswith("(peer)")
    with pytest.raises(ValueError, match="takes only h<H>"):
        parse_method("hivemind-h25-int8")
    argv = suite.peer_throughput_argv(st, ft, "/py", Path("task.toml"), Path("/r"), 500)
    a0, a1 = argv(0, "10.77.0.1"), argv(1, "10.77.0.2")
    assert a0[:3] == ["/py", "-m", "scripts.bench.peers.torchft_diloco"]
    assert a0[-4:] == ["--rank", "0", "--host", "10.77.0.1"] and a1[-3] == "1"
    assert a0[a0.index("--rendezvous") + 1] == "/r" and a0[a0.index("--steps") + 1] == "500"


def _results(runs: list[dict[str, Any]], profile: str) -> dict[str, Any]:
    agg = aggregate.aggregate_quality(runs)
    task = suite.task_config(PROFILES["tune"], [], "cpu")
    return {
        "profile": profile,
        "command": [".venv/bin/python", "-m", "scripts.bench.suite", "--profile", profile],
        "machine": {"cpu_model": "Test CPU", "cpu_cores": 2, "torch": "x", "loadavg_1m": 1.0},
        "settings": {"task": task, "workers": 2, "threads_per_worker": 1, "device": "cpu",
                     "seeds": [0, 1], "throughput_steps": 100, "rates": []},
        "runs": {"quality": runs, "throughput": [], "peers": []},
        "aggregate": {"quality": agg, "throughput": {}, "peers": {}},
        "headline": [],
        "not_compared": [],
    }  # fmt: skip


def test_tuning_grid_spells_out_every_setting_and_draws_the_heat_map(tmp_path: Path) -> None:
    outer = [(1, 0), (0.7, 0.9), (1, 0.5), (0.7, 0)]
    runs = [_quality_run("ddp-ilr0.004", 0, [5.5, 2.0], 80000)]
    runs += [_quality_run("ddp-ilr0.001", 0, [5.5, 2.5], 80000)]
    runs += [
        _quality_run(f"diloco-h25-int8-ilr0.004-lr{lr}-m{m}", 0, [5.5, 2.1 + i / 100], 4000)
        for i, (lr, m) in enumerate(outer)
    ]
    runs.append(_quality_run("diloco-h25-int8", 0, [5.5, 3.0], 4000))  # the task's settings
    runs.append(_quality_run("diloco-h25-int8-ow30", 0, [5.5, 2.9], 4000))
    runs.append(_quality_run("ddp-bs8-ilr0.004", 0, [5.5, 2.05], 160000))
    res = _results(runs, "tune")
    rows = {r["method"]: r for r in grid.grid_rows(res)}
    task = res["settings"]["task"]
    plain = rows["diloco-h25-int8"]
    assert (plain["inner_lr"], plain["outer_lr"], plain["momentum"]) == (
        task["inner_lr"], task["outer_lr"], task["outer_momentum"],
    )  # fmt: skip
    assert rows["diloco-h25-int8-ilr0.004-lr1-m0.5"]["momentum"] == 0.5
    # The warm-up is spelled out too: the task's (none) unless the method names one.
    assert (plain["warmup"], rows["diloco-h25-int8-ow30"]["warmup"]) == (0, 30)
    assert rows["ddp-ilr0.001"]["warmup"] is None
    assert rows["ddp-ilr0.001"]["ratio"] == pytest.approx(2.5 / 2.0)  # against the best DP
    best = grid.best_rows(list(rows.values()))
    assert best["DP"]["method"] == "ddp-ilr0.004"
    # Another batch is a DP family of its own, and a DP all the same for "best DP".
    small = rows["ddp-bs8-ilr0.004"]
    assert (small["family"], small["batch"], small["dp"]) == ("DP batch 8", 8, True)
    assert small["ratio"] == pytest.approx(2.05 / 2.0) and rows["ddp-ilr0.004"]["batch"] == 16
    assert best["DiLoCo H=25 int8"]["method"] == "diloco-h25-int8-ilr0.004-lr1-m0"
    assert grid.plot_grid(res, tmp_path / "g.png") and (tmp_path / "g.png").stat().st_size
    res["plots"] = {"tuning_grid": "g.png"}
    text = report.render([(tmp_path / "results.json", res)], tmp_path)
    assert "## Tuning grid `tune`" in text and "![Tuning grid](g.png)" in text
    assert "**2.1000**" in text and "| 1.2500 |" in text
    assert "| outer warm-up |" in text and "| 16 | 0.002 | 0.7 | 0.9 | 30 | 2.9000 |" in text
    assert "| DP batch 8 | `ddp-bs8-ilr0.004` | 8 | 0.004 |" in text


def test_frontier_pairs_losses_by_seed_and_keeps_the_anchors_apart(tmp_path: Path) -> None:
    runs = [
        _quality_run("ddp", 0, [5.5, 2.0], 80000),
        _quality_run("ddp", 1, [5.5, 2.5], 80000),
        _quality_run("diloco-h20-int8", 0, [5.5, 2.2], 1000),
        _quality_run("diloco-h20-int8", 1, [5.5, 2.6], 1000),
    ]
    res = _results(runs, "unit")
    res["runs"]["peers"] = [
        {"library": "hivemind", "seed": 1,
         "summary": {"final_eval_loss": 3.0, "bytes_sent_estimate": 2000}},
    ]  # fmt: skip
    pts = {(p["name"], p["seed"]): p for p in plots.frontier_points(res)}
    assert pts[("diloco-h20-int8", 0)]["y"] == pytest.approx(1.1)
    assert pts[("diloco-h20-int8", 1)]["y"] == pytest.approx(2.6 / 2.5)
    assert pts[("diloco-h20-int8", 1)]["x"] == pytest.approx(80.0)
    assert pts[("hivemind", 1)]["x"] == pytest.approx(40.0) and pts[("hivemind", 1)]["peer"]
    assert all(name != "ddp" for name, _ in pts)
    plots.plot_frontier(res, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 0


def test_sparseloco_differences_show_the_measured_pairs() -> None:
    pair = next(d[3] for d in sparseloco.DIFFERENCES if d[0] == "value quantizer")
    assert pair is not None
    a, b = (parse_method(m).name for m in pair)  # results hold canonical names
    runs = [_quality_run(a, 0, [5.5, 2.0], 1000), _quality_run(b, 0, [5.5, 2.1], 500)]
    text = sparseloco.section(_results(runs, "tune"))
    assert text is not None and "2.0000 → " in text and "2.1000 (+5.0%)" in text
    assert "not run yet" in text  # the other pairs
    assert sparseloco.section(_results([_quality_run("ddp", 0, [5.5, 2.0], 1)], "t")) is None
    data = sparseloco.value_errors((64, 128))
    assert {r["spec"] for r in data["rows"]} == set(sparseloco.ERROR_SPECS)
    for r in data["rows"]:
        assert r["kept_fraction"] == pytest.approx(1 / 64)
        assert (r["rel_error_kept"] == 0) == (r["spec"] in ("topk:0.015625", "tiled:64:64:32"))


def test_report_spells_commands_recorded_by_path_as_the_module() -> None:
    # Results from before the suite was a package name the script by path; the document
    # gives the command that runs now.
    old = [".venv/bin/python", "scripts/bench_suite.py", "--profile", "headline"]
    assert report.suite_command(old) == [
        ".venv/bin/python", "-m", "scripts.bench.suite", "--profile", "headline",
    ]  # fmt: skip
    new = ["python", "-m", "scripts.bench.suite", "--steps", "4"]
    assert report.suite_command(new) == new


def test_benchmarks_md_is_generated_from_the_checked_in_results() -> None:
    # BENCHMARKS.md is output, never edited: regenerate it (python -m scripts.bench.report)
    # whenever the results or the report change.
    doc = REPO / "BENCHMARKS.md"
    assert report.default_doc(report.BENCH_DIR) == doc
    assert doc.read_text(encoding="utf-8") == report.document(report.BENCH_DIR, doc)


# --------------------------------------------------------------------------- codecs


def test_codec_ratios_to_memcpy_are_paired_by_pass() -> None:
    rows = [
        {"spec": "memcpy", "seconds": [1.0, 2.0, 10.0], "faults": [0, 0, 0]},
        {
            "spec": "int8",
            "encode_s": [1.0, 0.5, 15.0],
            "decode_s": [1.0, 0.5, 5.0],
            "encode_faults": [3, 1, 2],
            "decode_faults": [9, 9, 8],
        },
    ]
    memcpy, int8 = codecs.summarise(rows, numel=250_000_000)  # 1 GB of fp32
    assert memcpy["ratio_to_memcpy"] == {"median": 1.0, "min": 1.0, "max": 1.0}
    # Per pass: 1/2, 2/1, 10/20; the ratio of the medians would be 2/2 = 1.
    assert int8["ratio_to_memcpy"] == {"median": 0.5, "min": 0.5, "max": 2.0}
    assert int8["total_gbps"]["median"] == pytest.approx(0.5)  # 1 GB in 2 s
    assert int8["encode_gbps"]["max"] == pytest.approx(2.0)
    assert int8["faults"] == {"encode": 2, "decode": 9} and memcpy["faults"] == 0


def test_codec_sizes_parse_with_binary_suffixes() -> None:
    assert codecs.parse_size("4M") == 4 << 20 and codecs.parse_size("16m") == 16 << 20
    assert codecs.parse_size("1000") == 1000 and codecs.parse_size("2K") == 2048
    for bad in ("", "M", "-1M", "1.5M", "0"):
        with pytest.raises(ValueError, match="positive integer"):
            codecs.parse_size(bad)


def test_codec_benchmark_writes_results_and_their_table(tmp_path: Path) -> None:
    argv = ["--sizes", "64K", "--threads", "1", "--repeats", "2", "--specs", "int8,topk:0.01"]
    assert codecs.main([*argv, "--out-dir", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "codecs.json").read_text())
    (run,) = res["runs"]
    assert (run["numel"], run["threads"], run["repeats"]) == (64 << 10, 1, 2)
    rows = {r["spec"]: r for r in run["rows"]}
    assert list(rows) == ["memcpy", "clone", "int8", "topk:0.01"]
    assert rows["int8"]["bits_per_element"] == pytest.approx(8 + 32 / 128)
    assert 0 < rows["int8"]["rel_l2_error"] < 0.05
    assert all(len(r["encode_s"]) == len(r["decode_faults"]) == 2 for r in run["raw"][2:])
    assert rows["memcpy"]["faults"] == 0  # into a tensor that exists: no fresh pages
    assert res["command"][-len(argv) - 2 :] == [*argv, "--out-dir", str(tmp_path)]
    # The document beside results outside benchmarks/ is theirs alone; BENCHMARKS.md is not
    # touched.
    text = (tmp_path / "BENCHMARKS.md").read_text()
    ratio = rows["int8"]["ratio_to_memcpy"]
    assert f"**int8 encode + decode ÷ memcpy** (goal: at least 0.5): {ratio['median']:.2f}" in text
    bits = rows["topk:0.01"]["bits_per_element"]
    assert bits == pytest.approx(0.01 * 64, rel=0.01)  # 1% of values, each with an int32 index
    assert f"| `topk:0.01` | {bits:.3g} |" in text


# --------------------------------------------------------------------------- end to end


def _png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.dist
def test_smoke_suite_end_to_end_on_loopback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, doc, work = tmp_path / "out", tmp_path / "BENCH.md", tmp_path / "work"
    argv = [
        "--profile", "smoke", "--rates", "loopback", "--peers", "",
        "--work-dir", str(work), "--out", str(out), "--doc", str(doc),
    ]  # fmt: skip
    assert suite.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    quality = res["aggregate"]["quality"]
    assert set(quality) == {"ddp", "diloco-h4"}
    ddp, dil = quality["ddp"], quality["diloco-h4"]
    # Fair comparison: the same tokens at every evaluation, the same model at step 0.
    assert [p["tokens"] for p in ddp["curve"]] == [p["tokens"] for p in dil["curve"]]
    assert dil["curve"][0]["loss"]["mean"] == ddp["curve"][0]["loss"]["mean"]
    assert dil["curve"][0]["ratio_to_baseline"]["mean"] == 1.0
    assert all(
        q["curve"][-1]["loss"]["mean"] < q["curve"][0]["loss"]["mean"] - 0.3 for q in (ddp, dil)
    )
    # Bytes: DP is the ring estimate; DiLoCo with H=4 sends about 1/H of it.
    n, steps = ddp["num_params"], res["settings"]["task"]["steps"]
    assert ddp["bytes_sent"] == int(2 * (2 - 1) / 2 * 4 * n * steps) and ddp["bytes_sent_estimated"]
    assert ddp["bytes_sent"] / dil["bytes_sent"] == pytest.approx(4.0, rel=0.01)
    assert dil["outer_steps"] == steps // 4
    # Throughput: a ceiling and a ratio to it, on loopback (no interface counters).
    (block,) = res["aggregate"]["throughput"].values()
    t = block["methods"]["diloco-h4"]
    assert t["ratio_to_ceiling"] == pytest.approx(t["tokens_per_s"] / block["ceiling_tokens_per_s"])
    assert t["wire"] is None
    # Outputs: CSV rows, valid PNGs, and a generated document linking them.
    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["table"], r["method"]) for r in rows} >= {
        ("quality", "ddp"), ("quality", "diloco-h4"), ("throughput", "local"),
        ("throughput", "diloco-h4"),
    }  # fmt: skip
    for name in ("loss_vs_tokens", "loss_vs_bytes", "loss_gap", "throughput_vs_rate"):
        assert _png(out / f"{name}.png"), name
    text = doc.read_text()
    assert "GENERATED" in text and f"{dil['final_eval_loss']['mean']:.4f}" in text
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (doc.parent / link).exists(), link
    main_row = next(h for h in res["headline"] if h["id"] == "main")
    assert main_row["byte_ratio"] == pytest.approx(ddp["bytes_sent"] / dil["bytes_sent"])

    # A second invocation reuses every cached run and launches nothing.
    def no_launch(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a cached run was launched again")

    monkeypatch.setattr(launch, "run_workers", no_launch)
    assert suite.main(argv) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["aggregate"]["quality"] == res["aggregate"]["quality"]


def _can_shape() -> str | None:
    try:
        wansim.check_prerequisites()
    except (PermissionError, FileNotFoundError) as e:
        return str(e)
    return None


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.dist
def test_tiny_shaped_run_wire_bytes_agree_with_the_library(tmp_path: Path) -> None:
    why = _can_shape()
    if why is not None:
        pytest.skip(why)
    out = tmp_path / "out"
    argv = [
        "--profile", "smoke", "--phases", "throughput", "--rates", "20mbit",
        "--throughput-methods", "diloco-h4", "--work-dir", str(tmp_path / "work"),
        "--out", str(out), "--doc", str(tmp_path / "B.md"),
    ]  # fmt: skip
    try:
        assert suite.main(argv) == 0
    except RuntimeError as e:  # the container refused namespaces
        pytest.skip(f"network namespaces unavailable: {e}")
    res = json.loads((out / "results.json").read_text())
    t = res["aggregate"]["throughput"]["20mbit"]["methods"]["diloco-h4"]
    w = t["wire"]
    assert w is not None and w["from_step"] is not None and w["lib_bytes"] > 0
    # The interface carries the library's payload plus headers and framing, never less.
    assert w["wire_tx_bytes"] >= w["lib_bytes"]
    assert w["wire_over_lib_pct"] < 10.0
    assert abs(w["residual_after_headers_pct"]) < 3.0
    assert t["ratio_to_ceiling"] > 0 and math.isfinite(t["ratio_to_ceiling"])


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.dist
def test_torchft_peers_train_one_process_per_host_behind_shaped_links(tmp_path: Path) -> None:
    # Each worker in its own namespace, reached only at its host's address: the replica
    # group's store and the lighthouse must be advertised at that address, not loopback.
    why = _can_shape()
    if why is not None:
        pytest.skip(why)
    python = os.environ.get("LOWCOMM_TORCHFT_PYTHON") or suite.DEFAULT_TORCHFT_PYTHON
    if not Path(python).exists():
        pytest.skip(f"no torchft interpreter at {python} (make bench-peers)")
    out = tmp_path / "out"
    argv = [
        "--profile", "smoke", "--phases", "throughput", "--rates", "100mbit",
        "--throughput-methods", "torchft-h4", "--torchft-python", python,
        "--work-dir", str(tmp_path / "work"), "--out", str(out), "--doc", str(tmp_path / "B.md"),
    ]  # fmt: skip
    assert suite.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert not [x for x in res["not_compared"] if "torchft" in x["what"]]
    (run,) = [r for r in res["runs"]["throughput"] if r["method"] == "torchft-h4"]
    assert run["outer_steps"] == 16 // 4 and run["library"] == "torchft"
    assert [w["rank"] for w in run["workers"]] == [0, 1]
    assert all(0 <= w["blocked_fraction"] < 1 for w in run["workers"])
    # Its bytes crossed the shaped veths: at least the ring estimate of its all-reduces.
    assert run["wire"][0]["tx_bytes"] >= run["lib_bytes_sent_rank0"] > 0


def _swarm_argv(tmp_path: Path, rate: str) -> list[str]:
    return [
        "--profile", "smoke", "--phases", "throughput", "--rates", rate,
        "--throughput-methods", "swarm-h4", "--set", "round_seconds=5",
        "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
        "--doc", str(tmp_path / "B.md"),
    ]  # fmt: skip


def _check_swarm_peer(run_dir: Path, rank: int) -> dict[str, Any]:
    """Peer ``rank`` of a 2-peer swarm-h4 run: a world of one that met the other, ran every
    round, and reports the swarm's size, not its last round's; returns its last log record."""
    m = launch.read_metrics(run_dir if rank == 0 else run_dir / f"peer{rank}")
    summary, last = m["summary"], m["logs"][-1]
    assert summary["world_size"] == 1 and summary["bytes_sent"] > 0
    # `peers` is who was in a record's last average; `live_peers` (the heartbeat view) may
    # already have dropped to 1 when the other peer finished first and left.
    assert max(r["peers"] for r in m["logs"] if r["outer_steps"] > 0) == 2
    assert last["outer_steps"] == 16 // 4 and last["live_peers"] in (1, 2)
    assert summary["last_round_peers"] == last["peers"]
    # The per-step all-reduce it is compared with runs among the 2 peers, not among 1, also
    # when the last round was a lone one; and it says so.
    assert summary["swarm_peers"] == 2 and summary["allreduce_ratio"] > 1
    printed = (run_dir / f"rank{rank}.log").read_text()
    assert f"swarm peer (up to 2 per round, {last['peers']} in the last)" in printed
    return last


@pytest.mark.hivemind
@pytest.mark.parametrize(
    "rate", ["loopback", pytest.param("100mbit", marks=[pytest.mark.root, pytest.mark.slow])]
)
def test_swarm_method_trains_hivemind_peers_through_a_bootstrap_dht(
    tmp_path: Path, rate: str
) -> None:
    pytest.importorskip("hivemind")
    if rate != "loopback" and (why := _can_shape()) is not None:
        pytest.skip(why)
    assert suite.main(_swarm_argv(tmp_path, rate)) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    t = res["aggregate"]["throughput"][rate]["methods"]["swarm-h4"]
    assert t["tokens_per_s"] > 0
    # The phases left out are said to be left out, not silently missing from the report.
    (skipped,) = [nc for nc in res["not_compared"] if nc["what"].startswith("phases")]
    assert skipped["what"] == "phases quality, peers" and "--phases throughput" in skipped["why"]
    # Two peers, each a world of one in its own run directory, found each other through the
    # bootstrap DHT. Which rounds they share is up to the load: a peer late past the
    # matchmaking timeout makes each average that round alone (CI once saw that in the last
    # round; the next test forces it), so no one round is required to hold both.
    (metrics,) = (tmp_path / "work").glob("runs/throughput/**/swarm-h4/metrics.jsonl")
    for rank in (0, 1):
        _check_swarm_peer(metrics.parent, rank)
    if rate != "loopback":
        w = t["wire"]
        # The interface carries the payload plus DHT, heartbeats and libp2p framing.
        assert w["wire_tx_bytes"] >= w["lib_bytes"] > 0


def _peer_group(peer_dir: Path) -> int | None:
    """The process group of the swarm peer running in ``peer_dir`` (the peer and the children
    it forked share one session's group), or None if it is not running."""
    groups = {
        os.getpgid(p.pid)
        for p in psutil.process_iter(["cmdline"])
        if str(peer_dir) in (p.info["cmdline"] or []) and "--run-dir" in (p.info["cmdline"] or [])
    }
    assert len(groups) <= 1, groups
    return groups.pop() if groups else None


def _outer_steps_logged(metrics: Path) -> int:
    """The most outer steps any complete record of ``metrics`` reports (-1 before any)."""
    if not metrics.exists():
        return -1
    steps = [-1]
    for line in metrics.read_text().splitlines():
        try:
            steps.append(int(json.loads(line).get("outer_steps", -1)))
        except ValueError:  # a line still being written
            continue
    return max(steps)


def _freeze_peer_while(
    peer_dir: Path, outer_steps: int | None, until: Path | float, done: threading.Event
) -> bool:
    """Stop the swarm peer running in ``peer_dir`` (SIGSTOP on its process group: a frozen
    machine) once it logs at least ``outer_steps`` (a peer that adopted the other's state may
    skip a count), or as soon as its process exists when None; resume it once ``until`` holds
    a run summary, or after ``until`` seconds. False if the peer never got there before
    ``done`` was set (the suite ended). The others cannot meet it meanwhile, whatever the load."""
    deadline = time.monotonic() + 150

    def wait_for(ready: Callable[[], Any]) -> Any:
        while time.monotonic() < deadline and not done.is_set():
            if found := ready():
                return found
            time.sleep(0.02)
        return None

    def logged(path: Path, text: str) -> bool:
        return path.exists() and text in path.read_text()

    if outer_steps is not None and not wait_for(
        lambda: _outer_steps_logged(peer_dir / "metrics.jsonl") >= outer_steps
    ):
        return False
    group = wait_for(lambda: _peer_group(peer_dir))
    if group is None:
        return False
    os.killpg(group, signal.SIGSTOP)
    try:
        if isinstance(until, Path):
            return bool(wait_for(lambda: logged(until, '"summary/')))
        time.sleep(until)
        return True
    finally:
        os.killpg(group, signal.SIGCONT)


@pytest.mark.hivemind
def test_swarm_summary_counts_the_swarm_when_a_frozen_peer_left_the_last_round_alone(
    tmp_path: Path,
) -> None:
    # The fault CI once met by chance, forced: peer 1 freezes after its second round until
    # peer 0 has finished, so each averages its last rounds alone. Their summaries must
    # still count the swarm they trained in (2 peers), not 1.
    pytest.importorskip("hivemind")
    work = tmp_path / "work"
    peer1 = work / "runs" / "throughput" / "loopback" / "swarm-h4" / "peer1"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        done = threading.Event()
        froze = pool.submit(_freeze_peer_while, peer1, 2, peer1.parent / "metrics.jsonl", done)
        try:
            assert suite.main(_swarm_argv(tmp_path, "loopback")) == 0
        finally:
            done.set()
        assert froze.result(timeout=60)
    for rank in (0, 1):
        assert _check_swarm_peer(peer1.parent, rank)["peers"] == 1


@pytest.mark.hivemind
def test_swarm_peers_start_together_when_one_comes_up_late(tmp_path: Path) -> None:
    # Peer 1 comes up 12 s late (frozen from its first instant: a loaded machine, a slow
    # import). Alone, peer 0 would run every round by itself well within that (CI once saw
    # it end without having averaged once); the suite's peers wait for each other instead,
    # so the swarm it measures is one of 2.
    pytest.importorskip("hivemind")
    work = tmp_path / "work"
    peer1 = work / "runs" / "throughput" / "loopback" / "swarm-h4" / "peer1"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        done = threading.Event()
        froze = pool.submit(_freeze_peer_while, peer1, None, 12.0, done)
        try:
            assert suite.main(_swarm_argv(tmp_path, "loopback")) == 0
        finally:
            done.set()
        assert froze.result(timeout=60)
    for rank in (0, 1):
        _check_swarm_peer(peer1.parent, rank)
    waited = (peer1.parent / "rank0.log").read_text()
    assert "1 of 2 peers live; waiting for the rest" in waited


def test_sigterm_stops_the_suite_and_its_workers(tmp_path: Path) -> None:
    # `nohup ... &` leaves SIGINT ignored, so kill(1)'s SIGTERM is how a user stops a suite;
    # the workers run in sessions of their own and must not outlive it.
    work = tmp_path / "work"
    cmd = [
        sys.executable, "-m", "scripts.bench.suite", "--profile", "smoke",
        "--phases", "quality", "--methods", "diloco-h4", "--steps", "4000",
        "--work-dir", str(work), "--out", str(tmp_path / "out"), "--doc", str(tmp_path / "B.md"),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = work / "runs" / "quality" / "diloco-h4" / "seed0" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and "train/loss" in metrics.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, "no training started"
        time.sleep(0.2)
    workers = [p for p in psutil.process_iter(["cmdline"]) if str(metrics.parent) in " ".join(
        p.info["cmdline"] or [])]  # fmt: skip
    assert len(workers) == 2
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    gone, alive = psutil.wait_procs(workers, timeout=15)
    assert not alive, f"workers outlived the suite: {alive}"
