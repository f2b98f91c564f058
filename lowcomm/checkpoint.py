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

Integrity: the manifest also records each rank file's size and SHA-256 digest. Each rank
hashes its bytes as ``torch.save`` streams them (the file is never read back) and hands the
digest to rank 0 in a sidecar, ``rankNNNNN.pt.sha256``, written atomically after the rank
file; rank 0 polls for the sidecars (as it polls for the files), copies them into the
manifest and deletes them. A checkpoint is *complete* when its manifest parses and every file
it lists exists with the recorded size (cheap: :func:`list_checkpoints`, pruning, clean-up);
it *verifies* when, besides, every file's digest matches (:func:`verify_checkpoint`).
Resuming only uses checkpoints that verify: :func:`latest_checkpoint` (``--resume auto``)
skips newer ones that do not, with a warning naming each and why; an explicit checkpoint that
does not verify raises ``ValueError``; :func:`load_rank_state` checks the digest of the file
it loads before unpickling it. Manifests written before digests existed are size-checked only
(with a warning).

What that costs: saving hashes each rank's bytes once, in memory, as they are written.
Resuming costs more: every rank makes the same decision from the same files without talking
to the others, so at start-up every rank hashes every file of the candidate checkpoint (and
of each newer one it skips), then its own file once more when it loads it: world size + 1
files' worth of reading per rank, mostly from the page cache on one machine. SHA-256 runs at
about 0.7 GB/s per core on the 2-core test machine (BLAKE2b measured no faster there). No
cheaper rule is identical on every rank: a rank that checked only its own file could fall
back alone while the others resume the newer checkpoint, and sampling would miss 16 flipped
bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import IO, Any, cast

import torch

__all__ = [
    "DIGEST",
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
    "verify_checkpoint",
]

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
#: The ``hashlib`` digest the manifest records for each rank file (``sha256sum`` checks it too).
DIGEST = "sha256"
_PREFIX = "step_"
_READ_CHUNK = 1 << 20


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


class _HashingWriter:
    """A write-only file (all ``torch.save`` needs) that hashes the bytes passing through."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.hash = hashlib.new(DIGEST)
        self.size = 0

    def write(self, data: bytes) -> int:
        view = memoryview(data).cast("B")
        n = self._f.write(view)
        self.hash.update(view[:n])
        self.size += n
        return n

    def flush(self) -> None:
        self._f.flush()

    def entry(self) -> dict[str, Any]:
        return {"size": self.size, DIGEST: self.hash.hexdigest()}


def _atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> dict[str, Any]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            # Hashed as written: reading the file back would cost a second pass over it.
            out = _HashingWriter(f)
            write(cast(IO[bytes], out))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return out.entry()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or all of the new one.

    Writes a temporary file in the same directory, fsyncs it, renames it over ``path`` and
    fsyncs the directory.
    """
    _atomic_write(Path(path), lambda f: f.write(data))


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> dict[str, Any]:
    """``torch.save(obj)`` to ``path`` atomically (see :func:`atomic_write_bytes`).

    Returns:
        The file's manifest entry, ``{"size": bytes, "sha256": hex digest}``, of the bytes
        as ``torch.save`` streamed them (the file is not read back).
    """
    return _atomic_write(Path(path), lambda f: torch.save(obj, f))


def _parse_entry(name: str, entry: Any) -> tuple[int, str | None]:
    # Manifests written before digests existed record the size alone.
    if Path(name).name != name or name in ("", ".", ".."):
        raise ValueError(f"file name {name!r} is not a plain name")
    if isinstance(entry, int) and not isinstance(entry, bool):
        return entry, None
    if (
        isinstance(entry, dict)
        and isinstance(entry.get("size"), int)
        and isinstance(entry.get(DIGEST), str)
    ):
        return entry["size"], entry[DIGEST]
    raise ValueError(f"entry {name}: {entry!r} is neither a size nor {{size, {DIGEST}}}")


def _missing(ckpt: Path, name: str) -> ValueError:
    return ValueError(f"checkpoint {ckpt}: missing file {name} (listed in its manifest)")


def _complete_manifest(ckpt: Path) -> tuple[dict[str, Any], dict[str, tuple[int, str | None]]]:
    """The manifest and its ``{file: (size, digest or None)}``, once sizes are checked."""
    try:
        raw = (ckpt / MANIFEST).read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{ckpt} is not a complete checkpoint: it has no {MANIFEST}") from None
    except OSError as e:
        raise ValueError(f"checkpoint {ckpt}: unreadable {MANIFEST} ({e})") from None
    try:
        manifest = json.loads(raw)
        files = {name: _parse_entry(name, e) for name, e in manifest["files"].items()}
        # Every rank needs its file: otherwise one rank would refuse what the others accept.
        ranks = range(manifest.get("world_size", 0))
        unlisted = [f.name for f in (rank_file(ckpt, r) for r in ranks) if f.name not in files]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        # Truncated JSON included: treated as incomplete, whatever left it so.
        raise ValueError(
            f"checkpoint {ckpt}: unreadable {MANIFEST} ({type(e).__name__}: {e})"
        ) from None
    if unlisted:
        raise ValueError(f"checkpoint {ckpt}: its manifest lists no {unlisted[0]} (world size)")
    for name, (size, _) in files.items():
        try:
            actual = (ckpt / name).stat().st_size
        except FileNotFoundError:
            raise _missing(ckpt, name) from None
        if actual != size:
            raise ValueError(
                f"checkpoint {ckpt}: size mismatch: {name} has {actual} bytes, the manifest "
                f"records {size}"
            )
    return manifest, files


def _file_digest(path: Path) -> str:
    h = hashlib.new(DIGEST)
    buf = bytearray(_READ_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _check_digest(ckpt: Path, name: str, digest: str | None) -> None:
    if digest is None:
        _warn_no_digests(ckpt)
        return
    try:
        actual = _file_digest(ckpt / name)
    except FileNotFoundError:
        raise _missing(ckpt, name) from None
    except OSError as e:
        raise ValueError(f"checkpoint {ckpt}: cannot read {name} ({e})") from None
    if actual != digest:
        raise ValueError(
            f"checkpoint {ckpt}: digest mismatch: {name} has {DIGEST} {actual[:16]}..., the "
            f"manifest records {digest[:16]}..."
        )


_warned_no_digests: set[Path] = set()


def _warn_no_digests(ckpt: Path) -> None:
    key = ckpt.resolve()
    if key not in _warned_no_digests:
        _warned_no_digests.add(key)
        logger.warning(
            "checkpoint %s records no file digests (written by an older lowcomm): only file "
            "sizes are checked",
            ckpt,
        )


def read_manifest(ckpt: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a complete checkpoint: it parses, and every file it lists exists with
    the recorded size. Digests are not checked (see :func:`verify_checkpoint`).

    Raises:
        ValueError: if ``ckpt`` has no manifest (an incomplete checkpoint), its manifest is
            unreadable (e.g. truncated), or a file it lists is missing or has another size.
    """
    return _complete_manifest(Path(ckpt))[0]


def verify_checkpoint(ckpt: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a checkpoint that verifies: complete, and every file's digest matches.

    Reads every file of the checkpoint. A manifest without digests (an older lowcomm's) is
    checked for sizes only, with a warning.

    Raises:
        ValueError: one line saying why it does not verify (no or unreadable manifest,
            missing file, size mismatch, digest mismatch).
    """
    ckpt = Path(ckpt)
    manifest, files = _complete_manifest(ckpt)
    for name, (_, digest) in files.items():
        _check_digest(ckpt, name, digest)
    return manifest


def _is_complete(ckpt: Path) -> bool:
    try:
        read_manifest(ckpt)
    except ValueError:
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
    """Complete checkpoints under ``root`` (a ``checkpoints`` directory), oldest first.

    Complete: the manifest parses and lists files that exist with their recorded sizes.
    Digests are not checked here (that reads every file); :func:`latest_checkpoint` does.
    """
    return [p for p in _step_dirs(Path(root)) if _is_complete(p)]


def latest_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    """The newest checkpoint under ``root`` that verifies, or None.

    Checkpoints without a manifest (being written, or left by a crash) are passed over
    quietly; newer ones that have a manifest but do not verify are passed over with a
    warning saying why. Hashes every file of each checkpoint it looks at, newest first,
    until one verifies (see the module docstring for the cost).
    """
    for p in reversed(_step_dirs(Path(root))):
        if not (p / MANIFEST).exists():
            continue
        try:
            verify_checkpoint(p)
        except ValueError as e:
            logger.warning("skipping checkpoint %s, it does not verify: %s", p.name, e)
            continue
        return p
    return None


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
    mine = rank_file(ckpt, rank)
    entry = atomic_save(dict(state), mine)
    if rank != 0:
        # Renamed into place after the rank file: a sidecar rank 0 can read means the file
        # it describes is complete too.
        atomic_write_bytes(_sidecar(mine), json.dumps(entry).encode())
        return ckpt
    files = {mine.name: entry}
    others = [rank_file(ckpt, r) for r in range(1, world_size)]
    deadline = time.monotonic() + timeout
    while True:
        for f in others:
            if f.name not in files and (got := _read_sidecar(f)) is not None:
                files[f.name] = got
        missing = [f.name for f in others if f.name not in files]
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
        "files": dict(sorted(files.items())),
        "time": time.time(),
    }
    atomic_write_bytes(ckpt / MANIFEST, json.dumps(body, indent=1, sort_keys=True).encode())
    for f in others:
        _sidecar(f).unlink(missing_ok=True)
    for p in prune_checkpoints(root, keep):
        logger.debug("deleted old checkpoint %s", p)
    return ckpt


def _sidecar(path: Path) -> Path:
    return path.with_name(f"{path.name}.{DIGEST}")


def _read_sidecar(path: Path) -> dict[str, Any] | None:
    """The entry another rank left for its file ``path``; None until both are in place."""
    try:
        entry = json.loads(_sidecar(path).read_bytes())
        size, digest = _parse_entry(path.name, entry)
        # The size check catches a filesystem that shows the sidecar before the file.
        if digest is None or path.stat().st_size != size:
            return None
    except (OSError, ValueError):
        return None
    return {"size": size, DIGEST: digest}


def resolve_resume(spec: str, run_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint a ``--resume`` value names.

    Args:
        spec: ``auto`` (the latest checkpoint in ``run_dir`` that verifies, or None if there
            is none), a checkpoint directory (which must verify), or a run directory (its
            latest checkpoint that verifies).
        run_dir: this run's directory.

    Raises:
        ValueError: if ``spec`` is a path that holds no checkpoint that verifies; the
            message says why in one line.
    """
    if spec == "auto":
        return latest_checkpoint(checkpoint_root(run_dir))
    path = Path(spec).expanduser()
    if (path / MANIFEST).exists():
        try:
            verify_checkpoint(path)
        except ValueError as e:
            raise ValueError(f"--resume {spec}: {e}") from None
        return path
    for root in (checkpoint_root(path), path):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise ValueError(f"--resume {spec}: no complete checkpoint there (a {MANIFEST} marks one)")


def load_rank_state(
    ckpt: str | os.PathLike[str], rank: int, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load rank ``rank``'s state from a complete checkpoint, once its file verifies.

    Only tensors and plain containers are unpickled (``weights_only=True``).

    Raises:
        ValueError: if the checkpoint is incomplete or this rank's file is not listed in its
            manifest or does not match the recorded size and digest.
    """
    ckpt = Path(ckpt)
    _, files = _complete_manifest(ckpt)
    path = rank_file(ckpt, rank)
    if path.name not in files:
        raise ValueError(f"checkpoint {ckpt}: its manifest lists no {path.name} (rank {rank})")
    # Before unpickling: flipped bytes inside a tensor would otherwise load silently.
    _check_digest(ckpt, path.name, files[path.name][1])
    state: dict[str, Any] = torch.load(path, map_location=map_location, weights_only=True)
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
