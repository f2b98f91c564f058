"""Bytes per parameter that DiLoCo holds beside the model and its inner optimizer.

Run from a checkout (CPU is enough: the figures are the sizes of what DiLoCo keeps, which do
not depend on where it runs)::

    python scripts/memory_report.py            # prints the markdown table README shows

Each configuration trains the demo model (``recipes/configs/demo.toml``'s 875k-parameter
byte GPT) for two rounds alone (``LocalBackend``) and reads ``opt.memory()``, whose
``bytes_by_device`` says what lives where. On a GPU the same tensors live with the model
(``global_device=None``) or in host memory (``global_device="cpu"``), except the buffers
of a sync in flight, which always live with the model.
"""

from __future__ import annotations

import functools

import torch

from lowcomm import DiLoCo, ErrorFeedback, Int8, LocalBackend
from lowcomm.gpt import GPT, GPTConfig

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


if __name__ == "__main__":
    main()
