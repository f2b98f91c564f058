"""Checkpoints: atomic writes, the manifest as completion marker, keep-last-k, validation,
integrity (sizes and digests), the run directory lock."""

from __future__ import annotations

import builtins
import errno
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from lowcomm import checkpoint as ckpt
from lowcomm import rundir
from lowcomm.config import RESUMABLE_KEYS, TrainConfig
from lowcomm.gpt import GPT, GPTConfig, parameter_signature


def weights(step: int) -> torch.Tensor:
    """A tensor whose bytes are easy to find in a rank file."""
    return torch.arange(256, dtype=torch.float32) + step


def save(root: Path, step: int, world_size: int = 1, keep: int = 10, **kw) -> Path:
    out = None
    # Higher ranks first, as if rank 0 were the slowest: its manifest must still come last.
    for rank in reversed(range(world_size)):
        out = ckpt.save_checkpoint(
            root,
            step,
            {"rank": rank, "w": torch.full((3,), float(step)), "big": weights(step)},
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


def test_manifest_listing_a_missing_file_is_incomplete(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = save(tmp_path, 1, world_size=2)
    second = save(tmp_path, 2, world_size=2)
    third = save(tmp_path, 3, world_size=2)
    (second / "rank00001.pt").unlink()
    # A manifest that forgets a rank's file: that rank alone would refuse it.
    manifest = json.loads((third / ckpt.MANIFEST).read_text())
    del manifest["files"]["rank00001.pt"]
    (third / ckpt.MANIFEST).write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="lowcomm.checkpoint"):
        assert ckpt.latest_checkpoint(tmp_path) == first
    assert "skipping checkpoint step_000000002" in caplog.text
    assert "missing file rank00001.pt" in caplog.text
    assert "its manifest lists no rank00001.pt" in caplog.text


def test_manifest_records_the_streamed_digest_of_every_rank_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = builtins.open

    def no_reading_back(file, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
        assert not (str(file).endswith(".pt") and "r" in mode), f"{file} was read back"
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_reading_back)
    path = save(tmp_path, 4, world_size=3)
    monkeypatch.undo()
    files = ckpt.read_manifest(path)["files"]
    for rank in range(3):
        data = ckpt.rank_file(path, rank).read_bytes()
        digest = hashlib.sha256(data).hexdigest()  # the oracle: sha256sum of the file
        assert files[f"rank{rank:05d}.pt"] == {"size": len(data), "sha256": digest}
    assert sorted(p.name for p in path.iterdir())[-1] == "rank00002.pt"  # no sidecars left
    assert ckpt.verify_checkpoint(path)["step"] == 4


def one_line_error(excinfo: pytest.ExceptionInfo[ValueError]) -> str:
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)  # as a full disk or a kill could


def flip_16_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    at = data.find(weights(16).numpy().tobytes())
    assert at > 0
    for i in range(at + 512, at + 528):
        data[i] ^= 0xFF
    path.write_bytes(data)
    # Why sizes are not enough: torch loads the damaged tensor without a word.
    loaded = torch.load(path, weights_only=True)["big"]
    assert loaded.shape == weights(16).shape and not torch.equal(loaded, weights(16))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (truncate, "size mismatch: rank00001.pt has"),
        (flip_16_bytes, "digest mismatch: rank00001.pt"),
    ],
    ids=["truncated", "flipped-bytes"],
)
def test_damaged_rank_file_falls_back_to_the_previous_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: Callable[[Path], None], reason: str
) -> None:
    run = tmp_path / "run"
    root = ckpt.checkpoint_root(run)
    good = save(root, 8, world_size=2)
    bad = save(root, 16, world_size=2)
    damage(ckpt.rank_file(bad, 1))

    with caplog.at_level(logging.WARNING, logger="lowcomm.checkpoint"):
        assert ckpt.resolve_resume("auto", run) == good
    assert "skipping checkpoint step_000000016, it does not verify" in caplog.text
    assert reason in caplog.text
    with pytest.raises(ValueError) as explicit:
        ckpt.resolve_resume(str(bad), run)
    assert f"--resume {bad}: checkpoint {bad}: {reason}" in one_line_error(explicit)
    with pytest.raises(ValueError, match=reason):
        ckpt.load_rank_state(bad, 1)  # not torch's unpickling traceback, nor a silent load
    assert torch.equal(ckpt.load_rank_state(good, 1)["big"], weights(8))
    # Complete means sizes only: a truncated checkpoint is incomplete (cleaned at start-up),
    # one with flipped bytes is not (a resume skips it; the recipe then deletes it).
    assert (bad in ckpt.list_checkpoints(root)) == (damage is flip_16_bytes)


def test_half_written_manifest_is_incomplete(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    root = ckpt.checkpoint_root(run)
    good = save(root, 8)
    bad = save(root, 16)
    manifest = bad / ckpt.MANIFEST
    manifest.write_bytes(manifest.read_bytes()[:40])

    with caplog.at_level(logging.WARNING, logger="lowcomm.checkpoint"):
        assert ckpt.resolve_resume("auto", run) == good
    assert "unreadable manifest.json" in caplog.text
    with pytest.raises(ValueError) as explicit:
        ckpt.resolve_resume(str(bad), run)
    assert f"checkpoint {bad}: unreadable manifest.json (JSONDecodeError" in one_line_error(
        explicit
    )
    assert ckpt.list_checkpoints(root) == [good]
    assert ckpt.clean_incomplete(root) == [bad]


def test_manifest_without_digests_is_checked_for_sizes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # As an older lowcomm wrote it: {file: size}.
    old = save(tmp_path, 8, world_size=2)
    manifest = json.loads((old / ckpt.MANIFEST).read_text())
    manifest["files"] = {name: e["size"] for name, e in manifest["files"].items()}
    (old / ckpt.MANIFEST).write_text(json.dumps(manifest))

    with caplog.at_level(logging.WARNING, logger="lowcomm.checkpoint"):
        assert ckpt.latest_checkpoint(tmp_path) == old
        assert ckpt.load_rank_state(old, 1)["rank"] == 1
    assert caplog.text.count("records no file digests") == 1  # once per checkpoint
    damaged = ckpt.rank_file(old, 1)
    os.truncate(damaged, 100)
    assert ckpt.latest_checkpoint(tmp_path) is None


def test_full_disk_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = save(tmp_path, 8, world_size=2)

    def disk_full(obj: object, f: object) -> None:
        f.write(b"x" * 100)  # type: ignore[attr-defined]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    for rank in (1, 0):
        with pytest.raises(OSError, match="No space left"):
            ckpt.save_checkpoint(
                tmp_path, 16, {}, rank=rank, world_size=2, manifest={}, keep=1, timeout=1
            )
    monkeypatch.undo()
    assert list((tmp_path / "step_000000016").iterdir()) == []  # no partial file, no sidecar
    assert ckpt.latest_checkpoint(tmp_path) == good
    assert ckpt.clean_incomplete(tmp_path) == [tmp_path / "step_000000016"]


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


# -- the run directory lock ----------------------------------------------------------------------

_HOLD = """
import sys, time
from lowcomm import checkpoint as ckpt
from lowcomm import rundir
locks = [rundir.lock_run_dir(sys.argv[1], int(r), run_id="first-run") for r in sys.argv[2:]]
print("locked", flush=True)
time.sleep(300)
"""


@contextmanager
def hold_run_dir(run_dir: Path, *ranks: int) -> Iterator[subprocess.Popen[str]]:
    """Another process holds ``run_dir`` for ``ranks`` of its run (run id ``first-run``)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(run_dir), *map(str, ranks)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_run_dir_lock_excludes_every_rank_of_another_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with hold_run_dir(run, 0) as first:
        # A second run with more ranks than the first: rank 0 collides with the first run's
        # rank 0, rank 1 collides with nothing of its own but still sees the first run.
        for rank in (0, 1):
            with pytest.raises(ValueError) as busy:
                rundir.lock_run_dir(run, rank, run_id="second-run")
            assert (
                f"run_dir {run} is in use by another live run: .lock.rank00000 is held by pid "
                f"{first.pid} on host {socket.gethostname()} (its rank 0)"
            ) in one_line_error(busy)
        # The first run's own ranks share the directory.
        with rundir.lock_run_dir(run, 1, run_id="first-run"):
            pass
    # The first run died without releasing anything: the kernel released its lock.
    with (
        rundir.lock_run_dir(run, 0, run_id="second-run") as lock,
        rundir.lock_run_dir(run, 1, run_id="second-run"),
    ):
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        with pytest.raises(ValueError, match=f"held by pid {os.getpid()}"):
            rundir.lock_run_dir(run, 0, run_id="third-run")
    rundir.lock_run_dir(run, 0, run_id="third-run").release()  # free again after the with
