"""Byte-level data: the stdlib corpus and its split, local and Hugging Face sources, batches."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from lowcomm.data import (
    eval_batches,
    is_heldout,
    load_corpus,
    sample_batch,
    shard_bounds,
    stdlib_files,
    stdlib_root,
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Shared by the modules of one session (same base temp): the stdlib corpus is built once.
    return tmp_path_factory.getbasetemp() / "lowcomm-data"


def test_stdlib_files_deterministic_and_filtered() -> None:
    files = stdlib_files()
    assert files == stdlib_files()
    assert files == sorted(files) and len(files) > 200
    assert all(f.endswith(".py") for f in files)
    parts = {p for f in files for p in f.split("/")[:-1]}
    assert not parts & {"site-packages", "test", "tests", "idle_test"}
    assert "os.py" in files and "json/__init__.py" in files


def test_is_heldout_is_a_stable_hash() -> None:
    keys = [f"pkg/mod{i}.py" for i in range(20000)]
    held = [k for k in keys if is_heldout(k, 0.02)]
    assert held == [k for k in keys if is_heldout(k, 0.02)]
    assert 0.015 < len(held) / len(keys) < 0.025
    # Monotone in the fraction: raising it only moves documents into the held-out side.
    assert set(held) <= {k for k in keys if is_heldout(k, 0.1)}


def test_stdlib_corpus_is_the_files_split_by_hash(cache: Path) -> None:
    corpus = load_corpus("stdlib", cache_dir=cache)
    root = stdlib_root()
    files = stdlib_files(root)
    val_files = [f for f in files if is_heldout(f, 0.02)]
    train_files = [f for f in files if not is_heldout(f, 0.02)]
    assert val_files and set(val_files).isdisjoint(train_files)
    # Oracle: the splits are exactly the files' bytes, each followed by a newline, in order.
    expect_val = b"".join((root / f).read_bytes() + b"\n" for f in val_files)
    expect_train = b"".join((root / f).read_bytes() + b"\n" for f in train_files)
    assert corpus.val.tobytes() == expect_val
    assert corpus.train.tobytes() == expect_train
    assert corpus.num_docs == {"train": len(train_files), "val": len(val_files)}
    assert corpus.train.dtype == np.uint8
    # Second load: the same cache, not rebuilt.
    meta = corpus.path / "meta.json"
    mtime = meta.stat().st_mtime_ns
    again = load_corpus("stdlib", cache_dir=cache)
    assert again.path == corpus.path and meta.stat().st_mtime_ns == mtime
    assert not [p for p in corpus.path.iterdir() if p.name.endswith(".tmp")]


def test_cache_without_meta_is_rebuilt(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(30):
        (src / f"f{i}.txt").write_text(f"document {i}\n" * 20)
    first = load_corpus(str(src), cache_dir=tmp_path / "cache")
    expected = (first.train.tobytes(), first.val.tobytes())
    # A crash before meta.json was written: the files are there but the cache is incomplete.
    (first.path / "meta.json").unlink()
    (first.path / "train.bin").write_bytes(b"garbage")
    second = load_corpus(str(src), cache_dir=tmp_path / "cache")
    assert (second.train.tobytes(), second.val.tobytes()) == expected


def test_local_directory_and_glob(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    docs = {f"sub/d{i:03d}.txt": f"text number {i}\n".encode() * 10 for i in range(200)}
    docs["top.md"] = b"# title\n"
    for rel, data in docs.items():
        (src / rel).write_bytes(data)
    (src / ".hidden").write_bytes(b"never")
    corpus = load_corpus(str(src), cache_dir=tmp_path / "cache", heldout_fraction=0.1)
    order = sorted(docs)
    val = b"".join(docs[r] + b"\n" for r in order if is_heldout(r, 0.1))
    train = b"".join(docs[r] + b"\n" for r in order if not is_heldout(r, 0.1))
    assert corpus.val.tobytes() == val and corpus.train.tobytes() == train
    # The split depends on names only, not on where the cache lives.
    other = load_corpus(str(src), cache_dir=tmp_path / "cache2", heldout_fraction=0.1)
    assert other.val.tobytes() == val
    globbed = load_corpus(
        str(src / "sub" / "*.txt"), cache_dir=tmp_path / "c3", heldout_fraction=0.1
    )
    sub = [r for r in order if r.startswith("sub/")]
    assert globbed.num_docs["train"] + globbed.num_docs["val"] == len(sub)
    with pytest.raises(ValueError, match="matches no files"):
        load_corpus(str(src / "*.nothing"), cache_dir=tmp_path / "c4")


def test_single_file_holds_out_its_tail(tmp_path: Path) -> None:
    path = tmp_path / "one.txt"
    data = bytes(range(256)) * 40
    path.write_bytes(data)
    corpus = load_corpus(str(path), cache_dir=tmp_path / "cache", heldout_fraction=0.05)
    whole = data + b"\n"
    assert len(corpus.val) == int(len(whole) * 0.05)
    assert corpus.train.tobytes() + corpus.val.tobytes() == whole


def test_max_bytes_caps_the_corpus(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(50):
        (src / f"{i:02d}.txt").write_bytes(b"x" * 100)
    corpus = load_corpus(str(src), cache_dir=tmp_path / "cache", max_bytes=1000)
    assert len(corpus.train) + len(corpus.val) == 1000


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    datasets = pytest.importorskip("datasets")
    # Read at import time: patch the module too, so nothing lands in ~/.cache/huggingface.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_hf_save_to_disk(tmp_path: Path, offline: None) -> None:
    datasets = pytest.importorskip("datasets")
    texts = [f"row {i} " * (i % 7 + 1) for i in range(300)]
    ds = datasets.Dataset.from_dict({"body": texts, "id": list(range(300))})
    ds.save_to_disk(str(tmp_path / "saved"))
    corpus = load_corpus(str(tmp_path / "saved"), cache_dir=tmp_path / "cache", text_field="body")
    val = b"".join(t.encode() + b"\n" for i, t in enumerate(texts) if is_heldout(str(i), 0.02))
    train = b"".join(
        t.encode() + b"\n" for i, t in enumerate(texts) if not is_heldout(str(i), 0.02)
    )
    assert corpus.val.tobytes() == val and corpus.train.tobytes() == train
    with pytest.raises(ValueError, match="no column 'text'"):
        load_corpus(str(tmp_path / "saved"), cache_dir=tmp_path / "cache")
    dd = datasets.DatasetDict({"train": ds})
    dd.save_to_disk(str(tmp_path / "saved_dict"))
    same = load_corpus(str(tmp_path / "saved_dict"), cache_dir=tmp_path / "c2", text_field="body")
    assert same.train.tobytes() == train


@pytest.mark.parametrize("streaming", [False, True])
def test_hf_text_builder(tmp_path: Path, offline: None, streaming: bool) -> None:
    pytest.importorskip("datasets")
    lines = [f"line {i}: " + "abc" * (i % 5) for i in range(400)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    corpus = load_corpus(
        "text",
        data_files=str(path),
        cache_dir=tmp_path / "cache",
        streaming=streaming,
        max_bytes=10**6 if streaming else 0,
    )
    train = b"".join(
        s.encode() + b"\n" for i, s in enumerate(lines) if not is_heldout(str(i), 0.02)
    )
    assert corpus.train.tobytes() == train
    meta = json.loads((corpus.path / "meta.json").read_text())
    assert meta["source"] == "datasets"


def test_streaming_needs_max_bytes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        load_corpus("text", data_files="x", streaming=True, cache_dir=tmp_path)


def test_sample_batch_is_a_pure_function_of_seed_rank_step() -> None:
    data = np.random.default_rng(0).integers(0, 256, size=5000, dtype=np.uint8)
    kw = {"batch_size": 4, "seq_len": 16, "world_size": 2}
    x, y = sample_batch(data, seed=1, rank=0, step=7, **kw)
    torch.manual_seed(123)  # global RNG state must not matter
    np.random.seed(99)
    x2, y2 = sample_batch(data, seed=1, rank=0, step=7, **kw)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert x.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    for other in (
        {"seed": 2, "rank": 0, "step": 7},
        {"seed": 1, "rank": 1, "step": 7},
        {"seed": 1, "rank": 0, "step": 8},
    ):
        assert not torch.equal(sample_batch(data, **other, **kw)[0], x), other


def test_each_rank_samples_only_its_shard() -> None:
    world = 3
    data = np.repeat(np.arange(world, dtype=np.uint8), 1000)
    assert [shard_bounds(len(data), r, world) for r in range(world)] == [
        (0, 1000),
        (1000, 2000),
        (2000, 3000),
    ]
    for rank in range(world):
        for step in range(20):
            x, y = sample_batch(
                data, batch_size=8, seq_len=50, seed=0, rank=rank, world_size=world, step=step
            )
            assert (x == rank).all() and (y == rank).all()
    with pytest.raises(ValueError, match="fewer than seq_len"):
        sample_batch(data, batch_size=1, seq_len=2000, seed=0, rank=0, world_size=world, step=0)


def test_eval_batches_are_fixed_and_cover_the_split() -> None:
    data = np.arange(3000, dtype=np.int64).astype(np.uint8)
    a = eval_batches(data, num_batches=3, batch_size=4, seq_len=20)
    b = eval_batches(data, num_batches=3, batch_size=4, seq_len=20)
    assert len(a) == 3 and all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    assert a[0][0][0, 0] == 0  # the first window starts at the beginning
    last = a[-1][1][-1]
    assert torch.equal(
        last, torch.from_numpy(data[-20:].astype(np.int64))
    )  # and the last ends at the end
    with pytest.raises(ValueError, match="held-out split"):
        eval_batches(data[:10], num_batches=1, batch_size=1, seq_len=20)


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from lowcomm.data import default_cache_dir

    monkeypatch.setenv("LOWCOMM_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("LOWCOMM_CACHE")
    assert default_cache_dir() == Path(os.path.expanduser("~/.cache/lowcomm"))
