"""The CUDA paths, end to end. Skipped without a GPU (CI has none); run them on a GPU machine::

    GLOO_SOCKET_IFNAME=lo python -m pytest -q -m gpu tests/

Two ranks share one GPU over gloo (gloo stages CUDA tensors through the host on the comm
stream), which runs every CUDA code path of lowcomm except NCCL itself; with two GPUs and
``LOWCOMM_TEST_NCCL=1`` the ranks use NCCL, one GPU each.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from lowcomm import DiLoCo, Int8, LocalBackend, TorchDistBackend
from lowcomm.testing import run_ranks

from .oracle import batch, loss_fn, make_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _train(rank: int, world: int, device: str, **kw) -> dict:  # type: ignore[no-untyped-def]
    nccl = os.environ.get("LOWCOMM_TEST_NCCL") == "1"
    dev = torch.device("cuda", rank if nccl else 0) if device == "cuda" else torch.device("cpu")
    backend = None
    if device == "cuda" and nccl:
        torch.cuda.set_device(dev)
        group = dist.new_group(list(range(world)), backend="nccl")
        backend = TorchDistBackend(group=group)
    model = make_model(0).to(dev)
    params = list(model.parameters())
    opt = DiLoCo(
        model,
        torch.optim.AdamW(params, lr=0.01),
        sync_every=4,
        fragments=[params[:2], params[2:]],
        backend=backend,
        **kw,
    )
    for step in range(1, 17):
        x, y = batch(0, rank, step)
        loss_fn(params, x.to(dev), y.to(dev)).backward()
        opt.step()
        opt.zero_grad()
    opt.flush()
    out = {
        "theta": [g.detach().cpu().clone() for g in opt.global_tensors()],
        "device_bytes": opt.memory().device_bytes,
        "sent": opt.stats.bytes_sent,
    }
    opt.close()
    return out


@pytest.mark.parametrize(
    "kw",
    [
        {"overlap_steps": 1, "compression": Int8()},
        {"overlap_mode": "eager"},
        {"overlap_steps": 1, "global_device": "cpu"},
    ],
    ids=["mix-int8", "eager", "host-theta"],
)
def test_two_ranks_on_cuda_match_two_ranks_on_cpu(kw):
    on_gpu = run_ranks(_train, 2, "cuda", timeout=180, **kw)
    on_cpu = run_ranks(_train, 2, "cpu", timeout=180, **{**kw, "global_device": None})
    for a, b in zip(on_gpu[0]["theta"], on_cpu[0]["theta"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(on_gpu[0]["theta"], on_gpu[1]["theta"], strict=True):
        assert torch.equal(a, b)
    assert on_gpu[0]["sent"] == on_cpu[0]["sent"]


def test_host_theta_holds_nothing_on_the_gpu_between_syncs():
    out = run_ranks(_train, 2, "cuda", timeout=180, global_device="cpu")
    assert all(r["device_bytes"] == 0 for r in out)


def test_no_host_sync_on_steps_without_a_sync_start():
    # torch.cuda.set_sync_debug_mode raises on any synchronizing call made by the caller's
    # thread; DiLoCo's inner steps without a sync start must make none.
    model = make_model(0).cuda()
    params = list(model.parameters())
    opt = DiLoCo(
        model,
        torch.optim.AdamW(params, lr=0.01, capturable=True),
        sync_every=8,
        fragments=[params[:2], params[2:]],
        overlap_steps=2,
        backend=LocalBackend(),
    )
    for step in range(1, 25):
        x, y = batch(0, 0, step)
        loss_fn(params, x.cuda(), y.cuda()).backward()
        syncing = step % 4 == 0
        torch.cuda.set_sync_debug_mode(0 if syncing else "error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        opt.zero_grad()
    opt.close()
