"""Pinned payload bytes and decoded values of the block quantizers (Int8, Int4, Int2).

The wire format is a contract between peers that may run different lowcomm versions, and
the codecs are optimised for speed: these tests pin the exact bytes each one produces for a
fixed input, and the exact fp32 values it decodes them to, so that a faster implementation
is also a bit-identical one. The input is built from integers (no RNG, no libm) and spans
several chunks of the CPU loop, with an all-zero block, exact ties of the int8 grid, a block
of subnormal values and a short last block.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from lowcomm.comm.compression import Compressor, Int2, Int4, Int8


def fixed_input(numel: int) -> torch.Tensor:
    """Exact fp32 values: signed integers below 2**12 times powers of two in [2**-30, 2**-7]."""
    i = torch.arange(numel, dtype=torch.int64)
    h = (i * 2654435761 + 12345) % (1 << 31)
    mantissa = (h % 8192 - 4096).to(torch.float32)
    x = torch.ldexp(mantissa, (h // 8192 % 24 - 30).to(torch.float32))
    x[128:256] = 0.0  # a zero block: scale 0
    x[256:384] = (torch.arange(128) - 64).float() + 0.5  # ties to even once scaled by 1
    x[383] = 127.0  # absmax 127: the scale is exactly 1
    x[384:512] *= 2.0**-130  # subnormal absmax: the capped inverse scale
    return x


NUMEL = 3 * (1 << 18) + 4321  # three CPU chunks and a ragged tail

# sha256 of (payload bytes, decoded fp32 bytes), recorded from the implementation of
# comm/compression/int8.py before it was optimised.
PINNED = [
    (
        Int8(),
        "750490f3d38afb9ad0d61258945199529f69d44bfcd7421d59f82d16b6c14770",
        "5b09295ce692667d5289400e33d3436aa212ed0d15002b656cd9f5e075192cb5",
    ),
    (
        Int8(64),
        "fbb71f0a3e8c5c7f6e159e4512dcaf5a38613e7fa8edca07c2daa76f66b1bae8",
        "2cd58648988fbd6ea2df08f295edb8fc0b586d0edf79142d51438a2795ac7dd2",
    ),
    (
        Int4(),
        "5984a55ddd37fcf6326ddaaa0eeeb92967c9b9b7ef39e5a6f54a098b7de4db26",
        "d4825ca52832893153f31d73f865b2f82b0b75ef92acba0386806d223a13e5c0",
    ),
    (
        Int2(),
        "0163c6ea37591bdb548636351dcbb52b365303030d5fe977eaa1f85a5bcf22f6",
        "31ae0c295a3a682a14ae4f4f4b958da5886f1b3797985388a139c5779baa5936",
    ),
]


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


@pytest.mark.parametrize(("comp", "payload_sha", "decoded_sha"), PINNED, ids=repr)
@pytest.mark.parametrize("threads", [1, 2])
def test_block_quantizer_bytes_and_values_are_pinned(
    comp: Compressor, payload_sha: str, decoded_sha: str, threads: int
) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        payload = comp.compress(fixed_input(NUMEL))
        decoded = comp.decompress(payload)
    finally:
        torch.set_num_threads(before)
    assert payload.nbytes == comp.nbytes(NUMEL)
    assert _sha(payload.data) == payload_sha
    assert _sha(decoded) == decoded_sha


def test_int8_payload_bytes_by_hand() -> None:
    # Blocks of 4: [127, -63.5, 0.5, 1.5] has scale 1 and rounds ties to even; a zero block
    # has scale 0; the short last block [3] has scale 3/127 and code 127.
    x = torch.tensor([127.0, -63.5, 0.5, 1.5, 0, 0, 0, 0, 3.0])
    data = Int8(4).compress(x).data
    scales = [0, 0, 128, 63] + [0, 0, 0, 0] + list(torch.tensor([3 / 127]).view(torch.uint8))
    codes = [127, 256 - 64, 0, 2, 0, 0, 0, 0, 127]
    assert data.tolist() == [int(b) for b in scales] + codes
