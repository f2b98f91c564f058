"""Guards for the accelerator paths that run on CPU-only machines (CI has no GPU).

* every codec and the reduce run on ``device="meta"`` (no data: any host read, or any op
  that only exists for CPU tensors, fails there);
* a ``TorchDispatchMode`` counts host reads (``aten._local_scalar_dense``): DiLoCo adds
  none on inner steps where no sync starts;
* the sources never ask for ``current_stream()`` or ``synchronize()`` without a device;
* an NCCL group is never handed host tensors; torchrun's environment picks the transport
  from the model's device.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lowcomm import DiLoCo, ErrorFeedback, Int8, LocalBackend, TopK, TorchDistBackend
from lowcomm.comm import reduce
from lowcomm.comm.compression import BF16, FP16, Int2, Int4, sparseloco
from lowcomm.comm.torch_dist import init_process_group_from_env
from lowcomm.testing import run_ranks

from .oracle import batch, loss_fn, make_model

REPO = Path(__file__).resolve().parent.parent
CODECS = [
    FP16(),
    BF16(),
    Int8(),
    Int4(),
    Int2(),
    TopK(0.1),
    TopK(0.05, 256, values=Int8()),
    sparseloco().compressor,
    reduce.Identity(),
]


@pytest.mark.parametrize("codec", CODECS, ids=repr)
def test_every_codec_runs_on_the_meta_device(codec):
    x = torch.empty(10_000, device="meta")
    payload = codec.compress(x)
    assert payload.data.device.type == "meta" and payload.data.dtype == torch.uint8
    assert payload.data.numel() == codec.nbytes(10_000)
    out = codec.decompress(payload)
    assert out.device.type == "meta" and out.shape == (10_000,) and out.dtype == torch.float32


@pytest.mark.parametrize("codec", CODECS, ids=repr)
def test_the_reduce_runs_on_the_meta_device(codec):
    world, numel = 3, 9_001
    flat = torch.empty(numel, device="meta")

    def all_to_all(send: torch.Tensor, _s: list[int], recv: list[int]) -> torch.Tensor:
        return torch.empty(sum(recv), dtype=torch.uint8, device="meta")

    def all_gather(buf: torch.Tensor) -> torch.Tensor:
        return torch.empty(world * buf.numel(), dtype=buf.dtype, device="meta")

    weights = [1.0, 2.0, 0.0]
    if codec.dense:
        mean, own, _, _ = reduce.dense_average(flat, weights, 1, codec, all_to_all, all_gather)
    else:
        mean, own, _, _ = reduce.sparse_average(flat, weights, 1, codec, all_gather)
    result = reduce.average_result(mean, own, weights, 1, 0, 0)
    assert result.mean.device.type == "meta" and result.mean.shape == (numel,)
    assert result.own.shape == (numel,) and result.total_weight == 3.0


class HostReads(TorchDispatchMode):
    """Counts ``aten._local_scalar_dense`` (``.item()``, ``bool(t)``, ``.tolist()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _host_reads_per_step(backend_factory, **kw) -> list[tuple[int, int, int]]:  # type: ignore[no-untyped-def]
    """(step, host reads of DiLoCo.step, of the bare inner step) for a DiLoCo and a twin."""
    model, twin = make_model(0), make_model(0)
    params, twin_params = list(model.parameters()), list(twin.parameters())
    opt = DiLoCo(
        model,
        torch.optim.AdamW(params, lr=0.01),
        sync_every=8,
        fragments=[params[:2], params[2:]],
        backend=backend_factory(),
        **kw,
    )
    ref = torch.optim.AdamW(twin_params, lr=0.01)
    out = []
    for step in range(1, 25):
        x, y = batch(0, 0, step)
        loss_fn(params, x, y).backward()
        loss_fn(twin_params, x, y).backward()
        with HostReads() as mine:
            opt.step()
        with HostReads() as theirs:
            ref.step()
        opt.zero_grad()
        ref.zero_grad()
        out.append((step, mine.count, theirs.count))
    opt.close()
    return out


@pytest.mark.parametrize(
    "kw",
    [
        {"overlap_steps": 2, "compression": Int8()},
        {"overlap_steps": 1, "compression": ErrorFeedback(TopK(0.5)), "outer_optimizer": None},
        {"overlap_mode": "eager", "compression": Int8()},
    ],
    ids=["mix-int8", "mix-ef-topk", "eager"],
)
def test_no_host_reads_added_on_steps_where_no_sync_starts(kw):
    kw = {k: v for k, v in kw.items() if v is not None}
    schedule_starts = {s for s in range(1, 25) if s % 4 == 0}  # H=8, P=2: every 4 steps
    counts = _host_reads_per_step(LocalBackend, **kw)
    for step, mine, theirs in counts:
        if step not in schedule_starts:
            # Landing an overlapped sync (steps 5-6, 9-10, ...) must not read back either.
            assert mine == theirs, (step, mine, theirs)


def _over_gloo(rank: int, world: int) -> list[tuple[int, int, int]]:
    return _host_reads_per_step(TorchDistBackend, overlap_steps=2, compression=Int8())


@pytest.mark.dist
def test_no_host_reads_on_the_training_thread_over_gloo():
    # The comm thread reads weights and checks the mean; the training thread must not.
    for counts in run_ranks(_over_gloo, 2, timeout=60):
        for step, mine, theirs in counts:
            if step % 4:
                assert mine == theirs, (step, mine, theirs)


def _calls_without_device(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call) or node.args or node.keywords:
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        owner = ast.unparse(func.value) if isinstance(func, ast.Attribute) else ""
        if name == "current_stream" or (name == "synchronize" and owner.endswith("cuda")):
            found.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_stream_or_synchronize_call_without_a_device():
    # Without a device they mean "the current device", which on a comm thread is GPU 0:
    # every rank would sync (and open a context on) GPU 0.
    files = sorted((REPO / "comm").rglob("*.py")) + sorted((REPO / "optim").rglob("*.py"))
    assert len(files) > 10
    offenders = [hit for f in files for hit in _calls_without_device(f)]
    assert offenders == []
    # The check itself finds what it is meant to find.
    probe = REPO / "tests" / "_probe_stream.py"
    try:
        probe.write_text("import torch\ntorch.cuda.current_stream()\ntorch.cuda.synchronize()\n")
        assert len(_calls_without_device(probe)) == 2
    finally:
        probe.unlink()


def _nccl_refuses_host_tensors(rank: int, world: int) -> str:
    backend = TorchDistBackend()
    try:
        backend.transport = "nccl"  # what an NCCL group reports
        backend.average(torch.zeros(4))
    except ValueError as e:
        return str(e)
    finally:
        backend.close()
    return "accepted"


@pytest.mark.dist
def test_an_nccl_group_refuses_host_tensors_with_a_clear_error():
    (message,) = run_ranks(_nccl_refuses_host_tensors, 1, timeout=30)
    assert "moves only CUDA tensors" in message and "global_device='cpu'" in message


@pytest.mark.parametrize(
    ("device", "backend", "set_device"), [("cuda", "nccl", 3), ("cpu", "gloo", None)]
)
def test_torchrun_environment_picks_the_transport_by_device(
    monkeypatch, device, backend, set_device
):
    import torch.distributed as dist

    calls: dict[str, object] = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda b, **kw: calls.update(backend=b))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.update(device=d))
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert init_process_group_from_env(device) is True
    assert calls.get("backend") == backend and calls.get("device") == set_device
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_process_group_from_env(device) is False
