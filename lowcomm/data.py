"""Byte-level data: corpora cached as flat ``uint8`` files, and batches as pure functions.

A corpus is two flat byte arrays, ``train`` and ``val`` (held out), memory-mapped from a cache
directory. Tokens are bytes (vocabulary 256), so there is no tokenizer to ship or version.

Where the bytes come from (:func:`load_corpus`):

* ``"stdlib"`` (the default): the Python standard library's own ``*.py`` sources, which every
  Python installation has, so the recipes run with no download. Files are taken in sorted
  order of their path relative to the stdlib root; ``site-packages`` and test directories are
  skipped.
* a local text file, directory (recursively, hidden files skipped) or glob;
* a directory written by ``datasets.Dataset.save_to_disk``;
* any other string is a Hugging Face dataset for ``datasets.load_dataset`` (optionally
  ``streaming``, in which case only the first ``max_bytes`` bytes are read).

Each document goes to the held-out split when a hash of its name (relative path, or index in
the dataset) falls below ``heldout_fraction``, so the split never depends on file order,
machine or run. If that leaves one side empty (a single file, say), the last
``heldout_fraction`` of the bytes is held out instead.

The cache is keyed by what the corpus is made of (for the stdlib: the Python version and
path) and built atomically: files are written under temporary names, fsynced and renamed,
and ``meta.json`` is written last, so concurrent builders (every rank of a launch) and
interrupted builds never leave a half-written corpus that looks complete.

Batches (:func:`sample_batch`) are a pure function of ``(seed, rank, step)``: each rank draws
from its own contiguous shard of ``train`` with a generator seeded from those three numbers,
so a resumed run sees exactly the batches an uninterrupted one would, and DDP, DiLoCo and
local runs with the same config see the same tokens.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import sys
import sysconfig
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

__all__ = [
    "Corpus",
    "default_cache_dir",
    "eval_batches",
    "is_heldout",
    "load_corpus",
    "sample_batch",
    "shard_bounds",
    "stdlib_files",
    "stdlib_root",
]

logger = logging.getLogger(__name__)

#: Bumped when the cache layout or document encoding changes, so old caches are not reused.
_FORMAT = 1
_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)


@dataclass
class Corpus:
    """A tokenised corpus: flat byte arrays for training and held-out evaluation.

    Attributes:
        train: ``uint8`` array (memory-mapped) of training bytes.
        val: ``uint8`` array (memory-mapped) of held-out bytes.
        name: what was loaded (``stdlib``, a path or a dataset name).
        path: the cache directory holding ``train.bin``, ``val.bin`` and ``meta.json``.
        num_docs: documents in each split, ``{"train": n, "val": m}``.
    """

    train: np.ndarray
    val: np.ndarray
    name: str
    path: Path
    num_docs: dict[str, int]


def default_cache_dir() -> Path:
    """``$LOWCOMM_CACHE`` if set, else ``~/.cache/lowcomm``."""
    return Path(os.environ.get("LOWCOMM_CACHE", "~/.cache/lowcomm")).expanduser()


def stdlib_root() -> Path:
    """The directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: str | os.PathLike[str] | None = None) -> list[str]:
    """The standard library's ``*.py`` files, as sorted POSIX paths relative to ``root``.

    Args:
        root: the stdlib directory (default :func:`stdlib_root`).

    Returns:
        Relative paths, skipping ``site-packages`` and test directories.
    """
    base = Path(root) if root is not None else stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                out.append((Path(dirpath) / name).relative_to(base).as_posix())
    return sorted(out)


def is_heldout(key: str, fraction: float) -> bool:
    """Whether the document named ``key`` belongs to the held-out split.

    A hash, not a random draw: the same name is always on the same side, on every machine.

    Args:
        key: a stable document name (relative path, or dataset index as a string).
        fraction: the expected held-out fraction, in (0, 1).
    """
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _open_bin(path: Path) -> np.ndarray:
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r")


def _open_cached(path: Path, name: str) -> Corpus | None:
    meta_path = path / "meta.json"
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != _FORMAT:
        return None
    return Corpus(
        train=_open_bin(path / "train.bin"),
        val=_open_bin(path / "val.bin"),
        name=name,
        path=path,
        num_docs=meta["num_docs"],
    )


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files 0600; a shared cache wants the mode open() would have given.
_FILE_MODE = 0o666 & ~_current_umask()


def _fsync_replace(tmp: str, dst: Path, f: IO[bytes]) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()
    os.chmod(tmp, _FILE_MODE)
    os.replace(tmp, dst)


def _tail_split(train_f: IO[bytes], val_f: IO[bytes], fraction: float) -> None:
    """Move the last ``fraction`` of the bytes written to ``train_f`` into (empty) ``val_f``."""
    size = train_f.tell()
    cut = size - max(1, int(size * fraction)) if size else 0
    train_f.flush()
    train_f.seek(cut)
    val_f.write(train_f.read())
    train_f.truncate(cut)
    train_f.seek(cut)


def _build(
    path: Path,
    name: str,
    docs: Iterable[tuple[str, bytes]],
    fraction: float,
    max_bytes: int,
    meta: dict[str, Any],
) -> Corpus:
    """Write ``docs`` into ``path`` atomically (unless a complete copy is already there)."""
    cached = _open_cached(path, name)
    if cached is not None:
        return cached
    path.mkdir(parents=True, exist_ok=True)
    logger.info("building corpus %s in %s", name, path)
    fds = {s: tempfile.mkstemp(dir=path, prefix=f".{s}.", suffix=".tmp") for s in ("train", "val")}
    files = {s: os.fdopen(fd, "w+b") for s, (fd, _) in fds.items()}
    counts = {"train": 0, "val": 0}
    total = 0
    try:
        for key, data in docs:
            if max_bytes and total + len(data) + 1 > max_bytes:
                data = data[: max(0, max_bytes - total - 1)]
            # A newline after every document: byte-level models see document boundaries as
            # line breaks, as in the source files themselves.
            split = "val" if is_heldout(key, fraction) else "train"
            files[split].write(data + b"\n")
            counts[split] += 1
            total += len(data) + 1
            if max_bytes and total >= max_bytes:
                break
        if total == 0:
            raise ValueError(f"dataset {name} holds no bytes")
        if files["train"].tell() == 0 or files["val"].tell() == 0:
            # Too few documents for a hash split: hold out the tail of the bytes instead.
            if files["train"].tell() == 0:
                files["train"], files["val"] = files["val"], files["train"]
                fds["train"], fds["val"] = fds["val"], fds["train"]
            files["val"].seek(0)
            files["val"].truncate(0)
            _tail_split(files["train"], files["val"], fraction)
            counts = {"train": sum(counts.values()), "val": 0}
        # meta.json goes last: its presence is what marks the cache as complete.
        for split in ("val", "train"):
            _fsync_replace(fds[split][1], path / f"{split}.bin", files[split])
        meta = {**meta, "format": _FORMAT, "num_docs": counts, "num_bytes": total}
        fd, tmp = tempfile.mkstemp(dir=path, prefix=".meta.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(meta, indent=1, sort_keys=True).encode())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path / "meta.json")
    finally:
        for split, fh in files.items():
            if not fh.closed:
                fh.close()
            if os.path.exists(fds[split][1]):
                os.unlink(fds[split][1])
    corpus = _open_cached(path, name)
    assert corpus is not None
    return corpus


def _read_files(root: Path, rel: list[str]) -> Iterator[tuple[str, bytes]]:
    for r in rel:
        yield r, (root / r).read_bytes()


def _local_files(spec: str) -> tuple[Path, list[str]] | None:
    """(root, sorted relative paths) for a local file, directory or glob; None if not local."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path.parent, [path.name]
    if path.is_dir():
        rel = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for fname in filenames:
                if not fname.startswith("."):
                    rel.append((Path(dirpath) / fname).relative_to(path).as_posix())
        if not rel:
            raise ValueError(f"dataset directory {spec} holds no (non-hidden) files")
        return path, sorted(rel)
    if glob.has_magic(spec):
        matches = sorted(
            Path(p)
            for p in glob.glob(os.path.expanduser(spec), recursive=True)
            if Path(p).is_file()
        )
        if not matches:
            raise ValueError(f"dataset glob {spec!r} matches no files")
        root = Path(os.path.commonpath([p.parent for p in matches]))
        return root, [p.relative_to(root).as_posix() for p in matches]
    return None


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any(
        (path / f).exists() for f in ("dataset_dict.json", "state.json", "dataset_info.json")
    )


def _hf_docs(ds: Any, text_field: str, name: str) -> Iterator[tuple[str, bytes]]:
    columns = getattr(ds, "column_names", None)
    if columns is not None and text_field not in columns:
        raise ValueError(f"dataset {name} has no column {text_field!r}; columns: {columns}")
    for i, row in enumerate(ds):
        if text_field not in row:
            raise ValueError(f"dataset {name} has no field {text_field!r}; fields: {sorted(row)}")
        yield str(i), str(row[text_field]).encode("utf-8")


def load_corpus(
    dataset: str = "stdlib",
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    heldout_fraction: float = 0.02,
    split: str = "train",
    text_field: str = "text",
    dataset_config: str | None = None,
    data_files: str | None = None,
    streaming: bool = False,
    max_bytes: int = 0,
) -> Corpus:
    """Load (building the cache on first use) a byte-level corpus with a held-out split.

    Safe to call from every rank at once: each builds under temporary names and the renames
    are atomic, so the cache ends up complete and identical whoever finishes first.

    Args:
        dataset: ``stdlib``, a local file/directory/glob, a ``save_to_disk`` directory, or a
            Hugging Face dataset name.
        cache_dir: where corpora are cached (default :func:`default_cache_dir`).
        heldout_fraction: expected fraction of documents held out, in (0, 1).
        split: split of a Hugging Face dataset to read.
        text_field: column of a Hugging Face dataset holding the text.
        dataset_config: the ``name`` argument of ``datasets.load_dataset``.
        data_files: the ``data_files`` argument of ``datasets.load_dataset``.
        streaming: stream the Hugging Face dataset (requires ``max_bytes`` > 0).
        max_bytes: stop after this many bytes (0: all).

    Returns:
        The corpus, memory-mapped from the cache.

    Raises:
        ValueError: for an invalid fraction, a glob matching nothing, a missing text column,
            or streaming without ``max_bytes``.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction ({heldout_fraction}) must be in (0, 1)")
    if max_bytes < 0:
        raise ValueError(f"max_bytes ({max_bytes}) must be >= 0")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    common = {"fraction": heldout_fraction, "max_bytes": max_bytes, "format": _FORMAT}

    if dataset == "stdlib":
        root = stdlib_root()
        rel = stdlib_files(root)
        version = "{}.{}.{}".format(*sys.version_info[:3])
        key = f"stdlib-py{version}-{_digest({**common, 'root': str(root), 'files': rel})}"
        meta: dict[str, Any] = {"source": "stdlib", "python": version, "root": str(root)}
        return _build(
            cache / key, "stdlib", _read_files(root, rel), heldout_fraction, max_bytes, meta
        )

    path = Path(dataset).expanduser()
    if not _is_saved_dataset(path):
        local = _local_files(dataset)
        if local is not None:
            root, rel = local
            stats = [(r, (root / r).stat().st_size, (root / r).stat().st_mtime_ns) for r in rel]
            key = f"files-{_digest({**common, 'root': str(root.resolve()), 'files': stats})}"
            meta = {
                "source": "files",
                "root": str(root.resolve()),
                "num_files": len(rel),
            }
            return _build(
                cache / key, dataset, _read_files(root, rel), heldout_fraction, max_bytes, meta
            )

    if streaming and max_bytes == 0:
        raise ValueError(
            "streaming reads the first max_bytes bytes of the stream: set max_bytes > 0"
        )
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is an optional extra
        raise ValueError(
            f"dataset {dataset!r} is not a local path, and loading it needs the `datasets` "
            "package (pip install 'lowcomm[datasets]')"
        ) from e
    if _is_saved_dataset(path):
        ds: Any = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"dataset {dataset} has no split {split!r}; splits: {list(ds)}")
            ds = ds[split]
    else:
        ds = datasets.load_dataset(
            dataset, dataset_config, split=split, data_files=data_files, streaming=streaming
        )
    spec = {
        **common,
        "dataset": dataset,
        "config": dataset_config,
        "split": split,
        "data_files": data_files,
        "text_field": text_field,
        "streaming": streaming,
        # Non-streaming datasets carry a content fingerprint; streams are keyed by name only.
        "fingerprint": getattr(ds, "_fingerprint", None),
    }
    meta = {
        "source": "datasets",
        **{k: spec[k] for k in ("dataset", "config", "split", "text_field")},
    }
    docs = _hf_docs(ds, text_field, dataset)
    return _build(cache / f"hf-{_digest(spec)}", dataset, docs, heldout_fraction, max_bytes, meta)


def shard_bounds(num_tokens: int, rank: int, world_size: int) -> tuple[int, int]:
    """The ``[lo, hi)`` slice of a ``num_tokens`` array that is rank ``rank``'s shard.

    Args:
        num_tokens: length of the training array.
        rank: this worker's rank.
        world_size: number of workers.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank ({rank}) must be in [0, world_size={world_size})")
    return num_tokens * rank // world_size, num_tokens * (rank + 1) // world_size


def _windows(
    data: np.ndarray, offsets: np.ndarray, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    buf = np.stack([np.asarray(data[o : o + seq_len + 1]) for o in offsets]).astype(np.int64)
    return torch.from_numpy(buf[:, :-1].copy()), torch.from_numpy(buf[:, 1:].copy())


def sample_batch(
    data: np.ndarray,
    *,
    batch_size: int,
    seq_len: int,
    seed: int,
    rank: int,
    world_size: int,
    step: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-byte targets for one inner step of one rank.

    A pure function of ``(seed, rank, world_size, step)`` and the data: windows start at
    offsets drawn uniformly from rank ``rank``'s shard (:func:`shard_bounds`) by a generator
    seeded with ``[seed, rank, step]``.

    Args:
        data: the training bytes.
        batch_size: sequences in the batch.
        seq_len: bytes per sequence.
        seed: the run's seed.
        rank: this worker's rank.
        world_size: number of workers (the number of shards).
        step: the inner step this batch is for.

    Returns:
        ``(x, y)``, int64 tensors of shape ``(batch_size, seq_len)``, ``y`` shifted by one.

    Raises:
        ValueError: if the shard is shorter than one sequence.
    """
    lo, hi = shard_bounds(len(data), rank, world_size)
    span = hi - lo - (seq_len + 1)
    if span < 0:
        raise ValueError(
            f"rank {rank}'s shard holds {hi - lo} bytes, fewer than seq_len + 1 ({seq_len + 1}); "
            f"use more data, fewer workers ({world_size}) or a shorter seq_len"
        )
    rng = np.random.default_rng([seed, rank, step])
    offsets = lo + rng.integers(0, span + 1, size=batch_size)
    return _windows(data, offsets, seq_len)


def eval_batches(
    data: np.ndarray, *, num_batches: int, batch_size: int, seq_len: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed evaluation batches: windows evenly spaced over the held-out bytes.

    The same on every rank and every call, so eval losses are comparable across steps, runs
    and modes.

    Args:
        data: the held-out bytes.
        num_batches: batches to return.
        batch_size: sequences per batch.
        seq_len: bytes per sequence.

    Raises:
        ValueError: if the held-out split is shorter than one sequence.
    """
    last = len(data) - (seq_len + 1)
    if last < 0:
        raise ValueError(
            f"held-out split holds {len(data)} bytes, fewer than seq_len + 1 ({seq_len + 1}); "
            "use more data or a larger heldout_fraction"
        )
    offsets = np.linspace(0, last, num_batches * batch_size).round().astype(np.int64)
    return [
        _windows(data, offsets[i * batch_size : (i + 1) * batch_size], seq_len)
        for i in range(num_batches)
    ]
