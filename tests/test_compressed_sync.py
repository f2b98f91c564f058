"""Compression through the torch.distributed backend and inside DiLoCo training."""

from __future__ import annotations

import hashlib

import pytest
import torch

from lowcomm.comm.compression import ErrorFeedback, Int8, TopK, parse_compression
from lowcomm.comm.compression.base import PayloadError
from lowcomm.comm.reduce import Identity, chunk_bounds
from lowcomm.comm.torch_dist import TorchDistBackend
from lowcomm.optim.diloco import DiLoCo
from lowcomm.testing import run_ranks

from .oracle import batch, loss_fn, make_model


def _contribution(rank: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + rank)
    # Blocks of very different scales, as pseudo-gradients of different layers have.
    return torch.randn(n, generator=g) * torch.logspace(-3, 1, n).flip(0)


def _average(rank: int, world: int, spec: str, n: int):
    backend = TorchDistBackend()
    comp = parse_compression(spec)
    result = backend.average(_contribution(rank, n), compressor=comp).wait()
    backend.close()
    return result.mean, result.bytes_sent, result.bytes_received, backend.stats.bytes_sent


@pytest.mark.dist
@pytest.mark.parametrize("world", [2, 3])
def test_int8_average_across_ranks_is_within_the_quantization_bound(world):
    n, block = 10_000, 128
    results = run_ranks(_average, world, "int8:128", n)
    inputs = [_contribution(r, n) for r in range(world)]
    exact = sum(inputs) / world

    def blockmax(x: torch.Tensor) -> torch.Tensor:
        # Per element, the absmax of its int8 block, with blocks restarting at each chunk.
        out = torch.empty_like(x)
        for lo, hi in chunk_bounds(n, world, block):
            for b in range(lo, hi, block):
                e = min(b + block, hi)
                out[b:e] = x[b:e].abs().max()
        return out

    # Round to nearest: each encode errs by at most half a step, blockmax/254; the mean of
    # the decoded contributions inherits their mean error, then is encoded once more.
    bound = sum(blockmax(x) for x in inputs) / world / 254 + blockmax(exact) * (1.01 / 254)
    for mean, *_ in results:
        assert ((mean - exact).abs() <= bound + 1e-7).all()
        assert torch.equal(mean, results[0][0])  # bit-identical on every rank


@pytest.mark.dist
@pytest.mark.parametrize("spec", ["none", "fp16", "int8:128", "topk:0.01"])
def test_bytes_on_the_wire_are_the_bandwidth_optimal_count(spec):
    n, world = 50_000, 3
    results = run_ranks(_average, world, spec, n)
    comp = parse_compression(spec) or Identity()
    size = comp.nbytes(n)
    if comp.dense:
        expect = 2 * (world - 1) / world * size  # reduce-scatter + all-gather
    else:
        expect = (world - 1) * size  # all-gather of whole payloads
    for _, sent, received, counted in results:
        assert sent == counted
        assert sent == pytest.approx(expect, rel=0.01)
        assert received == pytest.approx(expect, rel=0.01)


def _bad_payload(rank: int, world: int):
    class Liar(Int8):
        """Announces one size, sends one byte fewer."""

        def compress(self, tensor):
            p = super().compress(tensor)
            return type(p)(p.data[:-1], p.numel)

    backend = TorchDistBackend()
    try:
        backend.average(torch.ones(300), compressor=Liar() if rank == 1 else Int8()).wait()
    except Exception as e:  # rank 1: the liar is caught; rank 0: its partner left
        return f"{type(e).__name__}: {e}"
    finally:
        backend.close()
    return "no error"


@pytest.mark.dist
def test_a_payload_of_the_wrong_length_raises_before_sending():
    honest, liar = run_ranks(_bad_payload, 2, timeout=30)
    assert liar.startswith("PayloadError") and "must be" in liar, liar
    assert honest != "no error"


def test_decompress_rejects_wrong_length():
    with pytest.raises(PayloadError):
        Int8().decompress(
            type(Int8().compress(torch.ones(10)))(torch.zeros(3, dtype=torch.uint8), 10)
        )


# -- DiLoCo with every compressor: θ stays bit-identical on every rank ----------------------

MODES = [
    ("fp16", {}),
    ("bf16", {}),
    ("int8", {}),
    ("int4", {}),
    ("topk:0.1", {}),
    ("topk:0.1+int8", {}),
    ("ef:topk:0.1", {}),
    ("sparseloco", {"outer_optimizer": lambda p: torch.optim.SGD(p, lr=0.7)}),
    ("int8", {"fragments": 2, "overlap_steps": 1}),
    ("ef:int4", {"overlap_mode": "delayed"}),
]


def _hash(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _train_compressed(rank: int, world: int, spec: str, kw: dict):
    model = make_model(0)
    params = list(model.parameters())
    comp = spec
    if spec.startswith("ef:"):
        comp = ErrorFeedback(parse_compression(spec[3:]))
    else:
        comp = parse_compression(spec)
    opt = DiLoCo(model, torch.optim.AdamW(params, lr=1e-2), sync_every=4, compression=comp, **kw)
    for step in range(1, 17):
        x, y = batch(0, rank, step)
        loss_fn(params, x, y).backward()
        opt.step()
        opt.zero_grad()
    out = _hash(opt.global_tensors()), opt.stats.compression_ratio, opt.stats.fragment_syncs
    opt.close()
    return out


@pytest.mark.dist
@pytest.mark.parametrize("spec,kw", MODES, ids=[m[0] + str(sorted(m[1])) for m in MODES])
def test_every_compressed_mode_keeps_global_parameters_bit_identical(spec, kw):
    results = run_ranks(_train_compressed, 3, spec, kw)
    assert len({r[0] for r in results}) == 1, results
    assert results[0][2] >= 4
    if spec not in ("none",):
        assert results[0][1] > 1.0


def test_topk_fraction_must_be_in_unit_interval():
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            TopK(bad)


def test_unknown_spec_lists_valid_ones():
    with pytest.raises(ValueError, match="int8"):
        parse_compression("int7")
