"""Bytes per parameter that DiLoCo holds beside the model and its inner optimizer, and the
transient bytes of one sync.

Run from a checkout (CPU is enough: the figures are the sizes of what DiLoCo keeps and
allocates, which do not depend on where it runs)::

    python scripts/memory_report.py            # prints the markdown tables README shows

Transient bytes are measured, not estimated: a ``TorchDispatchMode`` follows the storage of
every tensor created during the call (a weak reference drops it when freed) and records the
peak of the live total.

Each configuration trains the demo model (``recipes/configs/demo.toml``'s 875k-parameter
byte GPT) for two rounds alone (``LocalBackend``) and reads ``opt.memory()``, whose
``bytes_by_device`` says what lives where. On a GPU the same tensors live with the model
(``global_device=None``) or in host memory (``global_device="cpu"``), except the buffers
of a sync in flight, which always live with the model.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lowcomm import DiLoCo, ErrorFeedback, Int8, LocalBackend
from lowcomm.comm import reduce
from lowcomm.gpt import GPT, GPTConfig


class PeakAllocations(TorchDispatchMode):
    """The peak of the live bytes of tensors created while the mode is on (this thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)


def reduce_transient(codec: Any, world: int, numel: int = 1_000_000) -> float:
    """Peak bytes the reduce allocates for this worker (its mean and own contribution, which
    it returns, included), over the fp32 bytes of the vector; the transport is a stand-in
    that allocates what a real one receives."""
    flat = torch.randn(numel)

    def all_to_all(send: torch.Tensor, _s: list[int], recv: list[int]) -> torch.Tensor:
        return torch.empty(sum(recv), dtype=torch.uint8)

    def all_gather(buf: torch.Tensor) -> torch.Tensor:
        return buf.repeat(world)

    with PeakAllocations() as mode:
        reduce.dense_average(flat, [1.0] * world, 0, codec, all_to_all, all_gather)
    return mode.peak / (4 * numel)


CONFIGS = {
    "DiLoCo (Nesterov outer)": {},
    "+ error feedback (int8), outer SGD without momentum": {
        "compression": ErrorFeedback(Int8()),
        "outer_optimizer": functools.partial(torch.optim.SGD, lr=0.7),
    },
    "eager (a round in flight per fragment)": {"overlap_mode": "eager"},
    "streaming P=4, τ=1, int8": {"fragments": 4, "overlap_steps": 1, "compression": Int8()},
}


def held_bytes_per_param(dtype: torch.dtype, kw: dict) -> float:
    """Steady-state bytes per parameter after two rounds of training alone."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, n_layer=4, n_head=4, n_embd=128)).to(dtype)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = DiLoCo(model, inner, sync_every=8, backend=LocalBackend(), **kw)
    x = torch.randint(0, 256, (2, 128))
    for _ in range(2 * 8 + 3):
        _, loss = model(x, x)
        loss.float().backward()
        opt.step()
        opt.zero_grad()
    report = opt.memory()
    opt.close()
    return report.host_bytes_per_param + report.device_bytes_per_param


def main() -> None:
    print("| configuration | fp32 model | bf16 model |")
    print("|---|---|---|")
    for name, kw in CONFIGS.items():
        row = [held_bytes_per_param(dtype, kw) for dtype in (torch.float32, torch.bfloat16)]
        print(f"| {name} | {row[0]:.1f} B/param | {row[1]:.1f} B/param |")
    print()
    print("| sync's reduce, peak allocation / fragment's fp32 bytes | 2 workers | 4 workers |")
    print("|---|---|---|")
    for name, codec in (("fp32", reduce.Identity()), ("int8", Int8())):
        peaks = [reduce_transient(codec, world) for world in (2, 4)]
        print(f"| {name} | {peaks[0]:.2f}x | {peaks[1]:.2f}x |")


if __name__ == "__main__":
    main()
