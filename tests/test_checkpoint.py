"""Checkpoints: atomic writes, the manifest as completion marker, keep-last-k, validation."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import torch

from lowcomm import checkpoint as ckpt
from lowcomm.config import RESUMABLE_KEYS, TrainConfig
from lowcomm.gpt import GPT, GPTConfig, parameter_signature


def save(root: Path, step: int, world_size: int = 1, keep: int = 10, **kw) -> Path:
    out = None
    # Higher ranks first, as if rank 0 were the slowest: its manifest must still come last.
    for rank in reversed(range(world_size)):
        out = ckpt.save_checkpoint(
            root,
            step,
            {"rank": rank, "w": torch.full((3,), float(step))},
            rank=rank,
            world_size=world_size,
            manifest={"fingerprint": "f", **kw},
            keep=keep,
            timeout=5,
        )
    assert out is not None
    return out


def test_atomic_write_keeps_old_file_on_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "f.bin"
    ckpt.atomic_write_bytes(path, b"old")

    def crash(src: str, dst: str) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        ckpt.atomic_write_bytes(path, b"new")
    monkeypatch.undo()
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]  # the temporary file is gone too


def test_save_and_load_per_rank(tmp_path: Path) -> None:
    path = save(tmp_path, 40, world_size=3, extra=1)
    assert sorted(p.name for p in path.iterdir()) == [
        "manifest.json",
        "rank00000.pt",
        "rank00001.pt",
        "rank00002.pt",
    ]
    manifest = ckpt.read_manifest(path)
    assert manifest["step"] == 40 and manifest["world_size"] == 3 and manifest["extra"] == 1
    for rank in range(3):
        state = ckpt.load_rank_state(path, rank)
        assert state["rank"] == rank and torch.equal(state["w"], torch.full((3,), 40.0))
    assert ckpt.step_of(path) == 40


def test_checkpoint_without_manifest_is_ignored(tmp_path: Path) -> None:
    good = save(tmp_path, 10, world_size=2)
    # Crash after rank 1 wrote its file but before rank 0 wrote the manifest.
    ckpt.save_checkpoint(
        tmp_path, 20, {"x": 1}, rank=1, world_size=2, manifest={}, keep=5, timeout=1
    )
    assert (tmp_path / "step_000000020" / "rank00001.pt").exists()
    assert ckpt.latest_checkpoint(tmp_path) == good
    assert ckpt.resolve_resume("auto", tmp_path.parent) is None  # not the run dir's checkpoints/
    assert ckpt.resolve_resume(str(tmp_path), tmp_path) == good
    with pytest.raises(ValueError, match="no manifest.json"):
        ckpt.read_manifest(tmp_path / "step_000000020")
    removed = ckpt.clean_incomplete(tmp_path)
    assert [p.name for p in removed] == ["step_000000020"]
    assert [p.name for p in tmp_path.iterdir()] == ["step_000000010"]


def test_manifest_listing_a_missing_file_is_incomplete(tmp_path: Path) -> None:
    first = save(tmp_path, 1, world_size=2)
    second = save(tmp_path, 2, world_size=2)
    (second / "rank00001.pt").unlink()
    assert ckpt.latest_checkpoint(tmp_path) == first


def test_rank0_waits_for_other_ranks(tmp_path: Path) -> None:
    with pytest.raises(TimeoutError, match="rank00001.pt"):
        ckpt.save_checkpoint(
            tmp_path, 5, {}, rank=0, world_size=2, manifest={}, keep=2, timeout=0.2
        )
    assert ckpt.latest_checkpoint(tmp_path) is None

    # Rank 1 arrives while rank 0 is waiting: the manifest appears after both files.
    def late_rank1() -> None:
        ckpt.save_checkpoint(tmp_path, 6, {}, rank=1, world_size=2, manifest={}, keep=2)

    timer = threading.Timer(0.3, late_rank1)
    timer.start()
    path = ckpt.save_checkpoint(
        tmp_path, 6, {}, rank=0, world_size=2, manifest={}, keep=2, timeout=10
    )
    timer.join()
    assert ckpt.read_manifest(path)["files"].keys() == {"rank00000.pt", "rank00001.pt"}


def test_keep_last_k(tmp_path: Path) -> None:
    for step in range(1, 6):
        save(tmp_path, step * 10, keep=2)
    assert [ckpt.step_of(p) for p in ckpt.list_checkpoints(tmp_path)] == [40, 50]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000000040", "step_000000050"]
    with pytest.raises(ValueError, match="keep"):
        ckpt.prune_checkpoints(tmp_path, 0)


def test_prune_leaves_newer_incomplete_alone(tmp_path: Path) -> None:
    save(tmp_path, 10)
    (tmp_path / "step_000000005").mkdir()  # crashed earlier attempt: older, incomplete
    (tmp_path / "step_000000030").mkdir()  # another rank is writing it right now
    save(tmp_path, 20, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000000020", "step_000000030"]


def test_resolve_resume(tmp_path: Path) -> None:
    root = ckpt.checkpoint_root(tmp_path / "run")
    assert ckpt.resolve_resume("auto", tmp_path / "run") is None
    a = save(root, 3)
    b = save(root, 7)
    assert ckpt.resolve_resume("auto", tmp_path / "run") == b
    assert ckpt.resolve_resume(str(a), tmp_path / "elsewhere") == a
    assert ckpt.resolve_resume(str(tmp_path / "run"), tmp_path / "elsewhere") == b
    with pytest.raises(ValueError, match="no complete checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "nothing"), tmp_path / "run")


def _manifest_for(cfg: TrainConfig, model: torch.nn.Module, world_size: int = 2) -> dict:
    return {
        "fingerprint": cfg.fingerprint(),
        "config": cfg.to_dict(),
        "signature": parameter_signature(model),
        "world_size": world_size,
    }


def _validate(
    manifest: dict, cfg: TrainConfig, model: torch.nn.Module, world_size: int = 2
) -> None:
    ckpt.validate_manifest(
        json.loads(json.dumps(manifest)),  # as read back from disk
        config=cfg.to_dict(),
        fingerprint=cfg.fingerprint(),
        signature=parameter_signature(model),
        world_size=world_size,
        resumable_keys=RESUMABLE_KEYS,
    )


def test_validate_manifest() -> None:
    cfg = TrainConfig(n_layer=2, n_embd=32, n_head=2)
    model = GPT(GPTConfig(n_layer=2, n_embd=32, n_head=2, block_size=cfg.seq_len))
    saved = _manifest_for(cfg, model)
    _validate(saved, cfg, model)
    # Harmless keys may change.
    _validate(saved, TrainConfig(n_layer=2, n_embd=32, n_head=2, steps=5000, wandb=True), model)

    with pytest.raises(ValueError, match=r"batch_size \(16 in checkpoint, 8 now\)"):
        _validate(saved, TrainConfig(n_layer=2, n_embd=32, n_head=2, batch_size=8), model)
    other_cfg = TrainConfig(n_layer=2, n_embd=64, n_head=2)
    wider = GPT(GPTConfig(n_layer=2, n_embd=64, n_head=2, block_size=cfg.seq_len))
    with pytest.raises(
        ValueError, match=r"model differs.*shapes.*wte.weight: \[256, 32\] vs \[256, 64\]"
    ):
        _validate(saved, other_cfg, wider)
    deeper = GPT(GPTConfig(n_layer=3, n_embd=32, n_head=2, block_size=cfg.seq_len))
    with pytest.raises(ValueError, match=r"only in this model \['blocks.2"):
        _validate(saved, TrainConfig(n_layer=3, n_embd=32, n_head=2), deeper)
    with pytest.raises(ValueError, match="world size is 2 in the checkpoint but 4 now"):
        _validate(saved, cfg, model, world_size=4)
