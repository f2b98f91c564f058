"""recipes/train_lm.py end to end: training, bit-identical resume, modes, accelerate, torchrun."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from lowcomm import checkpoint as ckpt

from .test_checkpoint import hold_run_dir

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "train_lm.py"
TINY = REPO / "recipes" / "configs" / "tiny.toml"


@pytest.fixture(scope="module")
def recipe() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lowcomm_recipe_train_lm", RECIPE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Any:
    # The tiny model gains nothing from intra-op threads, and on a shared 2-core machine
    # spinning OpenMP workers slow every in-process run down many times over.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The same cache as tests/test_data.py within one session: the corpus is built once.
    return tmp_path_factory.getbasetemp() / "lowcomm-data"


def tiny(data_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--config", str(TINY), "--data-dir", str(data_dir), "--run-dir", str(run_dir), *extra]


def final_state(run_dir: Path, rank: int = 0) -> dict[str, Any]:
    latest = ckpt.latest_checkpoint(ckpt.checkpoint_root(run_dir))
    assert latest is not None, f"no checkpoint in {run_dir}"
    return ckpt.load_rank_state(latest, rank)


def without_wire_counters(state: dict[str, Any]) -> dict[str, Any]:
    """A rank state minus the traffic counters of the process that wrote it.

    DiLoCo's byte and time counters come from the backend of the running process, so a
    resumed process counts from zero; everything that determines training is kept.
    """
    state = {**state, "optimizer": dict(state["optimizer"])}
    lowcomm = state["optimizer"].get("lowcomm")
    if lowcomm is not None:
        worker = lowcomm["worker"]
        stats = {
            k: v
            for k, v in worker["stats"].items()
            if k not in ("bytes_sent", "bytes_received", "comm_seconds")
        }
        state["optimizer"]["lowcomm"] = {**lowcomm, "worker": {**worker, "stats": stats}}
    return state


def global_params(state: dict[str, Any]) -> list[torch.Tensor]:
    """The global parameters θ in a rank's checkpoint state, in model order."""
    lowcomm = state["optimizer"]["lowcomm"]
    return [lowcomm["shared"][f"param.{n}"] for n in lowcomm["layout"]["names"]]


def assert_identical(a: Any, b: Any, path: str = "") -> None:
    """Exact equality of nested state (tensors bit for bit)."""
    assert type(a) is type(b), f"{path}: {type(a)} vs {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"{path}: tensors differ"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path}: keys {a.keys()} vs {b.keys()}"
        for k in a:
            assert_identical(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def test_help(recipe: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    assert recipe.main(["--help"]) == {}
    out = capsys.readouterr().out
    assert "torchrun --standalone --nproc_per_node 2 recipes/train_lm.py" in out
    assert "--sync-every" in out


def test_one_process_run(recipe: ModuleType, data_dir: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    summary = recipe.main(tiny(data_dir, run))
    assert summary["mode"] == "diloco" and summary["world_size"] == 1
    assert summary["steps"] == 16 and summary["outer_steps"] == 4
    assert [s for s, _ in summary["evals"]] == [0, 8, 16]
    # ln(256) = 5.55 nats for a uniform guess; 16 steps of the tiny model get well below.
    assert summary["first_eval_loss"] > 5.4
    assert summary["final_eval_loss"] < summary["first_eval_loss"] - 1.0
    assert summary["bytes_sent"] == 0 and summary["allreduce_bytes"] == 0
    assert "eval loss: " in capsys.readouterr().out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [4, 8, 12, 16]
    assert [r["eval/loss"] for r in records if "eval/loss" in r] == [e for _, e in summary["evals"]]
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == [
        "step_000000008",
        "step_000000016",
    ]
    assert json.loads((run / "config.json").read_text())["n_layer"] == 2


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--fragments", "2", "--overlap-steps", "1", "--compression", "int8", "--error-feedback"],
        ["--mode", "ddp"],
    ],
    ids=["diloco", "streaming-int8-ef", "ddp"],
)
def test_resume_is_bit_identical(
    recipe: ModuleType, data_dir: Path, tmp_path: Path, extra: list[str]
) -> None:
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    recipe.main(tiny(data_dir, whole, *extra))
    # The interrupted run: only the mid-run checkpoint survived; --resume auto finds it.
    middle = ckpt.checkpoint_root(whole) / "step_000000008"
    shutil.copytree(middle, ckpt.checkpoint_root(resumed) / middle.name)
    summary = recipe.main(tiny(data_dir, resumed, "--resume", "auto", *extra))
    assert summary["steps_run"] == 8
    a, b = final_state(whole), final_state(resumed)
    assert a["step"] == b["step"] == 16
    # Model, inner + outer optimizer state, schedule, RNG, eval history; not the process's
    # own timing counters (comm_seconds also times the hand-off to the backend).
    assert_identical(without_wire_counters(a), without_wire_counters(b))


def test_resume_rejects_another_config_before_training(
    recipe: ModuleType, data_dir: Path, tmp_path: Path
) -> None:
    first = tmp_path / "first"
    recipe.main(tiny(data_dir, first))
    mid = str(ckpt.checkpoint_root(first) / "step_000000008")
    for bad, match in (
        (["--n-embd", "64"], r"model differs.*wte.weight.*n_embd \(32 in checkpoint, 64 now\)"),
        (["--seed", "3"], r"config differs in seed \(0 in checkpoint, 3 now\)"),
        (["--sync-every", "8"], "sync_every"),
    ):
        other = tmp_path / f"other{bad[0]}"
        with pytest.raises(ValueError, match=match):
            recipe.main(tiny(data_dir, other, "--resume", mid, *bad))
        assert not (other / "metrics.jsonl").exists()  # nothing was trained or logged
    # Run length and cadence may change: continue to step 24.
    longer = recipe.main(tiny(data_dir, tmp_path / "longer", "--resume", mid, "--steps", "24"))
    assert longer["steps"] == 24 and longer["steps_run"] == 16


def test_run_dir_guard(recipe: ModuleType, data_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    recipe.main(tiny(data_dir, run, "--steps", "8"))
    with pytest.raises(ValueError, match="already holds checkpoints"):
        recipe.main(tiny(data_dir, run, "--steps", "8"))
    # A leftover of a crash (no manifest) and the old run are cleared with --overwrite.
    (ckpt.checkpoint_root(run) / "step_000000004").mkdir()
    summary = recipe.main(tiny(data_dir, run, "--steps", "8", "--overwrite", "--seed", "1"))
    assert summary["steps_run"] == 8
    assert [p.name for p in ckpt.checkpoint_root(run).iterdir()] == ["step_000000008"]
    assert final_state(run)["step"] == 8


def flip_bytes(path: Path) -> None:
    """Flip 16 bytes inside the largest tensor: the file keeps its size and still loads."""
    with zipfile.ZipFile(path) as z:
        record = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack_from("<HH", data, record.header_offset + 26)
    at = record.header_offset + 30 + name_len + extra_len + record.file_size // 2
    data[at : at + 16] = bytes(b ^ 0xFF for b in data[at : at + 16])
    path.write_bytes(data)


def test_resume_skips_checkpoints_that_do_not_verify(
    recipe: ModuleType, data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    recipe.main(tiny(data_dir, run))
    root = ckpt.checkpoint_root(run)
    newest = root / "step_000000016"
    flip_bytes(ckpt.rank_file(newest, 0))

    other = tmp_path / "other"
    with pytest.raises(ValueError, match=r"^--resume \S+step_000000016: .*digest mismatch"):
        recipe.main(tiny(data_dir, other, "--resume", str(newest)))
    assert not (other / "metrics.jsonl").exists()
    # auto falls back to step 8, says so, replaces the damaged step 16 with a good one.
    with caplog.at_level(logging.WARNING):
        summary = recipe.main(tiny(data_dir, run, "--resume", "auto"))
    assert "skipping checkpoint step_000000016, it does not verify" in caplog.text
    assert summary["steps_run"] == 8
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_000000008", "step_000000016"]
    ckpt.verify_checkpoint(newest)
    # The damaged one was moved aside, not deleted.
    (aside,) = (run / "damaged").iterdir()
    assert aside.name.startswith("step_000000016.") and ckpt.rank_file(aside, 0).exists()

    for p in ckpt.list_checkpoints(root):
        flip_bytes(ckpt.rank_file(p, 0))
    with pytest.raises(ValueError, match="none of them verifies"):
        recipe.main(tiny(data_dir, run, "--resume", "auto"))


def test_a_live_run_holds_its_run_dir(
    recipe: ModuleType, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    with hold_run_dir(run, 0) as first:
        # Every rank of a 2-worker second run stops before any collective (local mode has
        # none at all, so each rank can run here alone).
        monkeypatch.setenv("WORLD_SIZE", "2")
        for rank in (0, 1):
            monkeypatch.setenv("RANK", str(rank))
            with pytest.raises(ValueError, match=f"in use by another live run.*pid {first.pid}"):
                recipe.main(tiny(data_dir, run, "--mode", "local"))
        monkeypatch.delenv("WORLD_SIZE")
        monkeypatch.delenv("RANK")
    assert not (run / "metrics.jsonl").exists() and not ckpt.checkpoint_root(run).exists()
    # The holder is gone (killed): the directory is free, and free again after each run.
    for _ in range(2):
        recipe.main(tiny(data_dir, run, "--steps", "4", "--overwrite"))


def test_modes_agree_in_one_process(recipe: ModuleType, data_dir: Path, tmp_path: Path) -> None:
    # One worker: DDP is plain AdamW, so is local mode; DiLoCo with H=1, outer SGD lr 1 and no
    # momentum reduces to the inner optimizer (up to fp32 rounding of θ - (θ - θ_i)).
    ddp = recipe.main(tiny(data_dir, tmp_path / "ddp", "--mode", "ddp"))
    local = recipe.main(tiny(data_dir, tmp_path / "local", "--mode", "local"))
    reduced = recipe.main(
        tiny(
            data_dir,
            tmp_path / "diloco",
            "--sync-every", "1", "--outer-lr", "1", "--outer-momentum", "0", "--ckpt-every", "16",
        )
    )  # fmt: skip
    assert ddp["final_eval_loss"] < ddp["first_eval_loss"] - 0.5
    assert_identical(
        final_state(tmp_path / "ddp")["model"], final_state(tmp_path / "local")["model"]
    )
    assert ddp["final_eval_loss"] == local["final_eval_loss"]
    a, b = final_state(tmp_path / "ddp")["model"], final_state(tmp_path / "diloco")["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5, msg=name)
    assert reduced["outer_steps"] == 16


def test_accelerate_matches_plain(recipe: ModuleType, data_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState

    plain = recipe.main(tiny(data_dir, tmp_path / "plain"))
    try:
        acc = recipe.main(tiny(data_dir, tmp_path / "acc", "--accelerate"))
    finally:
        AcceleratorState._reset_state(True)  # a process-wide singleton; do not leak it
    assert acc["final_eval_loss"] == plain["final_eval_loss"]
    assert_identical(
        without_wire_counters(final_state(tmp_path / "plain")),
        without_wire_counters(final_state(tmp_path / "acc")),
    )


def test_wandb_offline(
    recipe: ModuleType, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    recipe.main(tiny(data_dir, run, "--wandb", "--steps", "4", "--warmup-steps", "1"))
    offline_runs = list((run / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    assert any(offline_runs[0].rglob("*.wandb"))


# -- torchrun ------------------------------------------------------------------------------------


def torchrun(*args: str, cwd: Path, timeout: float = 150, nproc: int = 2) -> str:
    """Run the recipe under torchrun with ``nproc`` ranks; return its output. Reaps the group."""
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    cmd.append(str(nproc))
    proc = subprocess.Popen(
        [*cmd, str(RECIPE), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"torchrun timed out after {timeout} s:\n{out[-4000:]}") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.mark.dist
@pytest.mark.parametrize("shard", ["ddp", "fsdp"])
def test_torchrun_replicas_of_two_ranks_train_like_two_single_rank_workers(
    data_dir: Path, tmp_path: Path, shard: str
) -> None:
    plain, replicated = tmp_path / "plain", tmp_path / "replicated"
    torchrun(*tiny(data_dir, plain, "--steps", "8"), cwd=tmp_path)
    out = torchrun(
        *tiny(data_dir, replicated, "--steps", "8", "--replicas", "2", "--shard", shard),
        cwd=tmp_path,
        nproc=4,
    )
    assert f"2 replicas of 2 ranks ({shard})" in out
    # Replica r (ranks 2r, 2r+1, half a batch each) against worker r of the plain run.
    for r in range(2):
        want = global_params(final_state(plain, r))
        halves = [global_params(final_state(replicated, 2 * r + i)) for i in (0, 1)]
        got = halves[0] if shard == "ddp" else [torch.cat(p) for p in zip(*halves)]
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # One average per outer step among the 2 replicas, not among 4 ranks.
    logs = [json.loads(line) for line in (replicated / "metrics.jsonl").read_text().splitlines()]
    assert {r["peers"] for r in logs if "peers" in r} == {2}


@pytest.mark.dist
def test_torchrun_two_ranks_and_bit_identical_resume(data_dir: Path, tmp_path: Path) -> None:
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    out = torchrun(*tiny(data_dir, whole, "--log-every", "2"), cwd=tmp_path)
    assert "== diloco: 2 worker(s), 16 inner steps" in out
    # Both workers count as peers, before the first average (step 2) and after it.
    lines = (whole / "metrics.jsonl").read_text().splitlines()
    logs = [r for r in map(json.loads, lines) if "peers" in r]
    assert logs[0]["outer_steps"] == 0 and len(logs) == 16 // 2
    assert all(r["peers"] == 2 for r in logs)
    # H=4 and a 2-worker ring: DiLoCo sends 1/H of a per-step fp32 gradient all-reduce.
    assert "ratio: 4.0x fewer bytes" in out
    ranks = [final_state(whole, r) for r in range(2)]
    # After the last outer step every worker holds the same global and local parameters ...
    assert_identical(ranks[0]["model"], ranks[1]["model"])
    assert_identical(global_params(ranks[0]), global_params(ranks[1]))
    # ... but its own inner optimizer state, from its own data shard.
    assert not torch.equal(
        ranks[0]["optimizer"]["state"][0]["exp_avg"], ranks[1]["optimizer"]["state"][0]["exp_avg"]
    )
    middle = ckpt.checkpoint_root(whole) / "step_000000008"
    torchrun(*tiny(data_dir, resumed, "--resume", str(middle)), cwd=tmp_path)
    for rank in range(2):
        assert_identical(
            without_wire_counters(final_state(whole, rank)),
            without_wire_counters(final_state(resumed, rank)),
        )


@pytest.mark.dist
@pytest.mark.slow
def test_torchrun_ddp(data_dir: Path, tmp_path: Path) -> None:
    out = torchrun(*tiny(data_dir, tmp_path / "run", "--mode", "ddp"), cwd=tmp_path)
    assert "== ddp: 2 worker(s), 16 inner steps" in out
    a, b = final_state(tmp_path / "run", 0), final_state(tmp_path / "run", 1)
    assert_identical(a["model"], b["model"])  # gradients were all-reduced every step
    assert a["evals"][-1][1] < a["evals"][0][1] - 0.5


def test_syncs_in_flight_at_the_end_are_landed(
    recipe: ModuleType, data_dir: Path, tmp_path: Path
) -> None:
    # P=2, H=4, tau=1: the sync started at step 16 would land at step 17; the recipe flushes
    # it, so all 8 fragment syncs (4 outer steps) are in the final model and the counters.
    summary = recipe.main(
        tiny(data_dir, tmp_path / "run", "--fragments", "2", "--overlap-steps", "1")
    )
    assert summary["outer_steps"] == 4
    state = final_state(tmp_path / "run")["optimizer"]["lowcomm"]
    assert int(state["shared"]["meta.outer_step"]) == 8
    assert not state["worker"]["pending"]


def test_every_worker_records_its_window_and_timeline(
    recipe: ModuleType, data_dir: Path, tmp_path: Path
) -> None:
    from lowcomm.comm.timeline import TIMELINE

    run = tmp_path / "run"
    TIMELINE.clear()
    TIMELINE.enable()
    try:
        summary = recipe.main(tiny(data_dir, run, "--eval-every", "16"))
    finally:
        TIMELINE.enable(False)
        TIMELINE.clear()
    worker = json.loads((run / "worker0.json").read_text())
    assert worker["rank"] == 0 and worker["end"] > worker["start"]
    assert worker["train_seconds"] == pytest.approx(worker["end"] - worker["start"])
    assert worker["blocked_seconds"] == pytest.approx(summary["comm_seconds"])
    assert 0 <= worker["flush_seconds"] <= worker["blocked_seconds"]
    assert worker["blocked_fraction"] == pytest.approx(
        worker["blocked_seconds"] / worker["train_seconds"]
    )
    lines = [json.loads(x) for x in (run / "timeline.rank0.jsonl").read_text().splitlines()]
    assert lines[0]["header"] and lines[0]["rank"] == 0
    # The recipe's forward/backward and DiLoCo's inner step: two compute spans per step, all
    # inside the window (the evaluations before and after it are not).
    compute = [s for s in lines[1:] if s["kind"] == "compute"]
    assert len(compute) == 2 * 16
    assert all(worker["start"] <= s["start"] <= s["end"] <= worker["end"] for s in compute)
    assert sum(s["kind"] == "prepare" for s in lines[1:]) == summary["outer_steps"]
