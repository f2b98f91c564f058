"""Atomic, per-rank training checkpoints with a manifest that marks them complete.

Layout under a run directory::

    checkpoints/
        step_000000400/
            rank00000.pt      # rank 0's state (model, optimizer, scheduler, RNG, counters)
            rank00001.pt      # rank 1's: its optimizer state differs from rank 0's
            manifest.json     # written last, by rank 0: the checkpoint is complete

Every file is written to a temporary name in the same directory, fsynced, and moved into
place with ``os.replace`` (atomic on POSIX), then the directory is fsynced. Rank 0 writes the
manifest only once every rank's file is in place, so a crash at any point leaves either a
complete checkpoint or one without a manifest, which :func:`latest_checkpoint` ignores and
:func:`clean_incomplete` removes at the next start.

Call protocol: every rank calls :func:`save_checkpoint` with the same step; rank 0 waits (up
to ``timeout`` seconds) for the other ranks' files by polling the filesystem, so no
collective is involved and the ranks need not call it at the same moment. This assumes the
run directory is on a filesystem every rank sees (one machine, or a shared mount).

The manifest records the config fingerprint, the full config, the model's parameter names
and shapes and the world size; :func:`validate_manifest` compares them with the resuming run
and raises ``ValueError`` before any training happens.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import IO, Any

import torch

__all__ = [
    "MANIFEST",
    "atomic_save",
    "atomic_write_bytes",
    "checkpoint_root",
    "clean_incomplete",
    "latest_checkpoint",
    "list_checkpoints",
    "load_rank_state",
    "prune_checkpoints",
    "rank_file",
    "read_manifest",
    "resolve_resume",
    "save_checkpoint",
    "step_of",
    "validate_manifest",
]

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_PREFIX = "step_"


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files 0600; give finished files the mode open() would have.
_FILE_MODE = 0o666 & ~_current_umask()


def checkpoint_root(run_dir: str | os.PathLike[str]) -> Path:
    """The directory holding a run's checkpoints: ``run_dir/checkpoints``."""
    return Path(run_dir) / "checkpoints"


def rank_file(ckpt: str | os.PathLike[str], rank: int) -> Path:
    """Path of rank ``rank``'s file in checkpoint directory ``ckpt``."""
    return Path(ckpt) / f"rank{rank:05d}.pt"


def step_of(ckpt: str | os.PathLike[str]) -> int:
    """The inner step a checkpoint directory is named after (``step_000000400`` -> 400)."""
    name = Path(ckpt).name
    if not name.startswith(_PREFIX) or not name[len(_PREFIX) :].isdigit():
        raise ValueError(f"{ckpt} is not a checkpoint directory (expected {_PREFIX}<step>)")
    return int(name[len(_PREFIX) :])


def _fsync_dir(path: Path) -> None:
    # The rename is only durable once the directory entry is; not every platform allows
    # opening a directory, and there it is best effort.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or all of the new one.

    Writes a temporary file in the same directory, fsyncs it, renames it over ``path`` and
    fsyncs the directory.
    """
    _atomic_write(Path(path), lambda f: f.write(data))


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj)`` to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    _atomic_write(Path(path), lambda f: torch.save(obj, f))


def read_manifest(ckpt: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a complete checkpoint.

    Raises:
        ValueError: if ``ckpt`` has no manifest (an incomplete checkpoint) or a rank file it
            lists is missing.
    """
    path = Path(ckpt) / MANIFEST
    if not path.is_file():
        raise ValueError(f"{ckpt} is not a complete checkpoint: it has no {MANIFEST}")
    manifest: dict[str, Any] = json.loads(path.read_text())
    missing = [f for f in manifest.get("files", {}) if not (Path(ckpt) / f).is_file()]
    if missing:
        raise ValueError(f"checkpoint {ckpt} is missing files listed in its manifest: {missing}")
    return manifest


def _is_complete(ckpt: Path) -> bool:
    try:
        read_manifest(ckpt)
    except (ValueError, json.JSONDecodeError):
        return False
    return True


def _step_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        try:
            step_of(p)
        except ValueError:
            continue
        if p.is_dir():
            out.append(p)
    return sorted(out, key=step_of)


def list_checkpoints(root: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints under ``root`` (a ``checkpoints`` directory), oldest first."""
    return [p for p in _step_dirs(Path(root)) if _is_complete(p)]


def latest_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint under ``root``, or None. Incomplete ones are ignored."""
    done = list_checkpoints(root)
    return done[-1] if done else None


def prune_checkpoints(root: str | os.PathLike[str], keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints, and incomplete ones older
    than the newest complete one (left by crashes). Returns what was deleted.

    Incomplete checkpoints newer than the newest complete one are left alone: other ranks
    may still be writing them.
    """
    if keep < 1:
        raise ValueError(f"keep ({keep}) must be >= 1")
    complete = list_checkpoints(root)
    if not complete:
        return []
    kept = {p.name for p in complete[-keep:]}
    newest = step_of(complete[-1])
    doomed = [p for p in _step_dirs(Path(root)) if p.name not in kept and step_of(p) < newest]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def clean_incomplete(root: str | os.PathLike[str], after_step: int = -1) -> list[Path]:
    """Delete checkpoints without a manifest, and any (complete or not) past ``after_step``.

    Call on rank 0 at start-up, before the first collective, so that files left by an
    earlier attempt are gone before this attempt's ranks write theirs.

    Args:
        root: a ``checkpoints`` directory.
        after_step: checkpoints with a larger step are removed too (the step being resumed
            from, so that the new run's history does not interleave with an abandoned one).
    """
    doomed = [
        p
        for p in _step_dirs(Path(root))
        if not _is_complete(p) or (after_step >= 0 and step_of(p) > after_step)
    ]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def save_checkpoint(
    root: str | os.PathLike[str],
    step: int,
    state: Mapping[str, Any],
    *,
    rank: int,
    world_size: int,
    manifest: Mapping[str, Any],
    keep: int,
    timeout: float = 600.0,
    poll_interval: float = 0.05,
) -> Path:
    """Write this rank's ``state``; on rank 0, then write the manifest and prune.

    Args:
        root: the ``checkpoints`` directory.
        step: the inner step the state is at (names the checkpoint).
        state: this rank's state (anything ``torch.save`` takes).
        rank: this rank.
        world_size: number of ranks writing files for this checkpoint.
        manifest: JSON-able metadata for the manifest (config, fingerprint, signature, ...).
        keep: complete checkpoints to keep.
        timeout: seconds rank 0 waits for the other ranks' files.
        poll_interval: seconds between rank 0's looks at the filesystem.

    Returns:
        The checkpoint directory.

    Raises:
        TimeoutError: on rank 0, if some rank's file did not appear within ``timeout``.
    """
    ckpt = Path(root) / f"{_PREFIX}{step:09d}"
    ckpt.mkdir(parents=True, exist_ok=True)
    atomic_save(dict(state), rank_file(ckpt, rank))
    if rank != 0:
        return ckpt
    files = [rank_file(ckpt, r) for r in range(world_size)]
    deadline = time.monotonic() + timeout
    while True:
        missing = [f.name for f in files if not f.exists()]
        if not missing:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"checkpoint {ckpt}: rank files {missing} did not appear within {timeout} s"
            )
        time.sleep(poll_interval)
    body = {
        **manifest,
        "step": step,
        "world_size": world_size,
        "files": {f.name: f.stat().st_size for f in files},
        "time": time.time(),
    }
    atomic_write_bytes(ckpt / MANIFEST, json.dumps(body, indent=1, sort_keys=True).encode())
    for p in prune_checkpoints(root, keep):
        logger.debug("deleted old checkpoint %s", p)
    return ckpt


def resolve_resume(spec: str, run_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint a ``--resume`` value names.

    Args:
        spec: ``auto`` (the latest complete checkpoint in ``run_dir``, or None if there is
            none), a checkpoint directory, or a run directory (its latest checkpoint).
        run_dir: this run's directory.

    Raises:
        ValueError: if ``spec`` is a path that holds no complete checkpoint.
    """
    if spec == "auto":
        return latest_checkpoint(checkpoint_root(run_dir))
    path = Path(spec).expanduser()
    if (path / MANIFEST).exists():
        read_manifest(path)
        return path
    for root in (checkpoint_root(path), path):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise ValueError(f"--resume {spec}: no complete checkpoint there (a {MANIFEST} marks one)")


def load_rank_state(
    ckpt: str | os.PathLike[str], rank: int, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load rank ``rank``'s state from a complete checkpoint.

    Only tensors and plain containers are unpickled (``weights_only=True``).
    """
    read_manifest(ckpt)
    state: dict[str, Any] = torch.load(
        rank_file(ckpt, rank), map_location=map_location, weights_only=True
    )
    return state


def validate_manifest(
    manifest: Mapping[str, Any],
    *,
    config: Mapping[str, Any],
    fingerprint: str,
    signature: Mapping[str, list[int]],
    world_size: int,
    resumable_keys: Collection[str] = (),
) -> None:
    """Check that a checkpoint fits the run that wants to resume from it.

    Args:
        manifest: from :func:`read_manifest`.
        config: this run's config as a dict.
        fingerprint: this run's config fingerprint.
        signature: this run's model ``{name: shape}``.
        world_size: this run's number of ranks.
        resumable_keys: config keys allowed to differ.

    Raises:
        ValueError: naming every mismatch (config keys with both values, parameters, world
            size).
    """
    problems = []
    if manifest.get("world_size") != world_size:
        problems.append(
            f"world size is {manifest.get('world_size')} in the checkpoint but {world_size} now "
            "(every rank's data shard and optimizer state are saved per rank)"
        )
    saved_sig = manifest.get("signature", {})
    if dict(saved_sig) != {k: list(v) for k, v in signature.items()}:
        # Parameter order, so the first mismatches listed are the first layers'.
        only_ckpt = [k for k in saved_sig if k not in signature]
        only_now = [k for k in signature if k not in saved_sig]
        shapes = [
            f"{k}: {saved_sig[k]} vs {list(signature[k])}"
            for k in signature
            if k in saved_sig and list(saved_sig[k]) != list(signature[k])
        ]
        problems.append(
            "the model differs: "
            + "; ".join(
                s
                for s in (
                    f"only in checkpoint {only_ckpt[:5]}" if only_ckpt else "",
                    f"only in this model {only_now[:5]}" if only_now else "",
                    f"shapes {shapes[:5]}" if shapes else "",
                )
                if s
            )
        )
    if manifest.get("fingerprint") != fingerprint:
        saved_cfg = manifest.get("config", {})
        diffs = [
            f"{k} ({saved_cfg.get(k)!r} in checkpoint, {config.get(k)!r} now)"
            for k in sorted(set(saved_cfg) | set(config))
            if k not in resumable_keys and saved_cfg.get(k) != config.get(k)
        ]
        problems.append(
            "the config differs in "
            + (", ".join(diffs) if diffs else "keys this version does not know")
            + f"; only {', '.join(sorted(resumable_keys))} may change on resume"
        )
    if problems:
        raise ValueError("cannot resume from this checkpoint: " + " | ".join(problems))
