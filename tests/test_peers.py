"""Smoke tests of the peer-library baselines in ``scripts.bench.peers`` against a replay oracle.

Each baseline runs as a subprocess on the tiny config (a few inner steps) and its JSON lines are
checked against an independent single-process replay of the same task (the recipe's GPT,
AdamW, schedule and ``sample_batch`` streams; plain torch for the outer step):

* torchft (needs an interpreter with torch + torchft + lowcomm: ``$LOWCOMM_TORCHFT_PYTHON``,
  this interpreter or ``.venv-torchft`` (``make bench-peers``); skipped otherwise): torchft's DiLoCo with 2
  workers must land on the replay's global parameters (eval loss to 1e-4), with exactly
  steps/H committed rounds, identical workers and the expected all-reduce payload.
* hivemind (this interpreter): one peer never averages, so it must equal local AdamW training;
  two peers run end to end, and the counters must be consistent with each other.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from recipes import train_lm as recipe
from scripts.bench import REPO

PEERS = "scripts.bench.peers"
TINY = REPO / "recipes" / "configs" / "tiny.toml"

pytestmark = pytest.mark.slow


def _config(steps: int, sync_every: int) -> Any:
    from lowcomm.config import load_config

    return load_config(
        ["--config", str(TINY), "--steps", str(steps), "--sync-every", str(sync_every)]
    )


def replay(cfg: Any, workers: int, average: bool) -> float:
    """Eval loss after ``cfg.steps`` steps of DiLoCo (or of rank 0 alone, ``average=False``)."""
    from lowcomm.data import eval_batches, load_corpus, sample_batch
    from lowcomm.gpt import GPT, GPTConfig

    corpus = load_corpus(cfg.dataset, cache_dir=cfg.data_dir, heldout_fraction=cfg.heldout_fraction)
    evals = eval_batches(
        corpus.val, num_batches=cfg.eval_batches, batch_size=cfg.batch_size, seq_len=cfg.seq_len
    )

    def model() -> torch.nn.Module:
        torch.manual_seed(cfg.seed)
        shape = GPTConfig(
            block_size=cfg.seq_len,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            n_embd=cfg.n_embd,
            tie_weights=cfg.tie_weights,
        )
        return GPT(shape)

    glob = model()
    outer = torch.optim.SGD(
        glob.parameters(), lr=cfg.outer_lr, momentum=cfg.outer_momentum, nesterov=cfg.nesterov
    )
    locals_ = [model() for _ in range(workers)]
    inners = [recipe.make_inner_optimizer(cfg, m) for m in locals_]
    scheds = [
        torch.optim.lr_scheduler.LambdaLR(o, lambda s: recipe.lr_factor(cfg, s)) for o in inners
    ]
    for step in range(cfg.steps):
        for rank, (m, opt, sched) in enumerate(zip(locals_, inners, scheds)):
            x, y = sample_batch(
                corpus.train,
                batch_size=cfg.batch_size,
                seq_len=cfg.seq_len,
                seed=cfg.seed,
                rank=rank,
                world_size=workers,
                step=step,
            )
            _, loss = m(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
        if average and (step + 1) % cfg.sync_every == 0:
            with torch.no_grad():
                for g, *ls in zip(glob.parameters(), *(m.parameters() for m in locals_)):
                    g.grad = torch.stack([g - p for p in ls]).mean(0)
            outer.step()
            outer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for m in locals_:
                    for g, p in zip(glob.parameters(), m.parameters()):
                        p.copy_(g)
    final = glob if average else locals_[0]
    return float(recipe.evaluate(final, evals, torch.device("cpu"), contextlib.nullcontext))


def _run(python: str, module: str, out: Path, *args: str, timeout: float = 150) -> list[dict]:
    cmd = [python, "-m", f"{PEERS}.{module}", "--config", str(TINY), "--out", str(out), *args]
    cmd += ["--timeout", str(timeout - 30)]
    # The script's own --timeout kills its workers first; this one only guards the test.
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return [json.loads(line) for line in out.read_text().splitlines()]


def _torchft_python() -> str | None:
    candidates = [
        os.environ.get("LOWCOMM_TORCHFT_PYTHON"),
        sys.executable,
        str(REPO / ".venv-torchft" / "bin" / "python"),  # make bench-peers
    ]
    for python in candidates:
        if python and Path(python).exists():
            probe = subprocess.run(
                [python, "-c", "import torchft, lowcomm"], capture_output=True, timeout=120
            )
            if probe.returncode == 0:
                return python
    return None


@pytest.mark.dist
def test_torchft_diloco_matches_replay(tmp_path: Path) -> None:
    python = _torchft_python()
    if python is None:
        pytest.skip(
            "torchft not importable (set LOWCOMM_TORCHFT_PYTHON to an interpreter with "
            "torch, torchft==0.2.0 and lowcomm; `make bench-peers` builds .venv-torchft)"
        )
    steps, sync_every = 8, 4
    lines = _run(
        python,
        "torchft_diloco",
        tmp_path / "ft.jsonl",
        *f"--workers 2 --steps {steps} --sync-every {sync_every}".split(),
    )
    *evals, summary = lines
    assert summary["summary"] and summary["library"] == "torchft"
    assert [e["step"] for e in evals] == [0, 8]  # tiny.toml: eval_every 8
    assert summary["averaging_rounds_per_worker"] == [steps // sync_every] * 2
    assert summary["max_abs_param_diff_between_workers"] == 0.0
    assert summary["allreduce_payload_bytes"] == steps // sync_every * 4 * summary["num_params"]
    assert summary["bytes_sent"] is None
    expected = replay(_config(steps, sync_every), workers=2, average=True)
    assert summary["final_eval_loss"] == pytest.approx(expected, abs=1e-4)
    assert summary["final_eval_loss"] < summary["first_eval_loss"]


@pytest.mark.dist
def test_torchft_one_process_per_worker_matches_replay(tmp_path: Path) -> None:
    # Launched as the suite launches it behind shaped links (one process per host, --rank),
    # here on loopback: the same training as the forked launch, so the same oracle.
    python = _torchft_python()
    if python is None:
        pytest.skip("torchft not importable (see test_torchft_diloco_matches_replay)")
    steps, sync_every = 8, 4
    out, rendezvous = tmp_path / "ft.jsonl", tmp_path / "rv"
    cmd = [python, "-m", f"{PEERS}.torchft_diloco", "--config", str(TINY), "--out", str(out)]
    cmd += [*f"--workers 2 --steps {steps} --sync-every {sync_every} --timeout 120".split()]
    cmd += ["--rendezvous", str(rendezvous)]
    procs = [
        subprocess.Popen([*cmd, "--rank", str(r)], cwd=REPO, stderr=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=150)
        assert p.returncode == 0, err[-4000:]
    *evals, summary = [json.loads(line) for line in out.read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 8]
    assert summary["averaging_rounds_per_worker"] == [steps // sync_every] * 2
    assert summary["max_abs_param_diff_between_workers"] == 0.0
    expected = replay(_config(steps, sync_every), workers=2, average=True)
    assert summary["final_eval_loss"] == pytest.approx(expected, abs=1e-4)
    # Each worker left its training window and blocked seconds, as the recipe does.
    for r in range(2):
        window = json.loads((rendezvous / f"worker{r}.json").read_text())
        assert window["rank"] == r and 0 <= window["blocked_seconds"] < window["train_seconds"]


def test_torchft_script_exits_2_without_torchft(tmp_path: Path) -> None:
    probe = subprocess.run([sys.executable, "-c", "import torchft"], capture_output=True)
    if probe.returncode == 0:
        pytest.skip("torchft is importable in this interpreter")
    cmd = [sys.executable, "-m", f"{PEERS}.torchft_diloco", "--out", str(tmp_path / "x")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "torchft is not importable" in proc.stderr


@pytest.mark.hivemind
def test_hivemind_single_peer_is_local_adamw(tmp_path: Path) -> None:
    pytest.importorskip(
        "hivemind", reason="hivemind not installed (pip install 'lowcomm[hivemind]')"
    )
    steps = 8
    lines = _run(
        sys.executable,
        "hivemind_optimizer",
        tmp_path / "hm1.jsonl",
        *f"--workers 1 --steps {steps} --sync-every 4".split(),
    )
    summary = lines[-1]
    assert summary["library"] == "hivemind"
    # A swarm of one never averages, so the run is rank 0's AdamW alone.
    assert summary["averaging_rounds"] == 0
    expected = replay(_config(steps, 4), workers=1, average=False)
    assert summary["final_eval_loss"] == pytest.approx(expected, abs=1e-4)


@pytest.mark.hivemind
def test_hivemind_two_peers_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip(
        "hivemind", reason="hivemind not installed (pip install 'lowcomm[hivemind]')"
    )
    lines = _run(
        sys.executable,
        "hivemind_optimizer",
        tmp_path / "hm2.jsonl",
        *["--workers", "2", "--steps", "16", "--sync-every", "4"],
    )
    *evals, summary = lines
    assert [e["step"] for e in evals] == [0, 8, 16]
    assert summary["summary"] and summary["workers"] == 2
    assert summary["target_batch_size"] == 2 * 4 * summary["batch_size"]
    # How many rounds hivemind runs is up to its progress tracker (that is what is measured);
    # what it reports must be consistent.
    rounds = summary["averaging_rounds"]
    assert rounds == len(summary["group_sizes_rank0"])
    assert all(size == 2 for size in summary["group_sizes_rank0"])
    assert summary["bytes_sent"] is None
    assert summary["bytes_sent_estimate"] == int(
        rounds * 2 * (2 - 1) / 2 * 4 * summary["num_params"]
    )
    assert evals[-1]["averaging_rounds"] <= rounds
    assert summary["final_eval_loss"] < summary["first_eval_loss"]
