"""The averaging arithmetic against explicit formulas: weights, chunk boundaries, own decode.

Several of these exist because a planted bug survived the suite: the weighted mean made
unweighted, and chunk boundaries that ignore the codec's granularity (which leaves the
error-feedback residual wrong by the codec's error, silently).
"""

from __future__ import annotations

import pytest
import torch

from lowcomm import LocalBackend, TorchDistBackend
from lowcomm.comm import reduce
from lowcomm.comm.compression import FP16, Int4, Int8, TopK
from lowcomm.testing import run_ranks

WEIGHTS = [1.0, 3.0, 0.0]  # unequal, and one worker left out


def _x(rank: int, n: int = 1001) -> torch.Tensor:
    g = torch.Generator().manual_seed(7 + rank)
    return torch.randn(n, generator=g) * torch.logspace(-2, 1, n)


def _weighted(rank: int, world: int, spec: str) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    comp = {"none": None, "int8": Int8(32), "topk": TopK(0.2, 100)}[spec]
    backend = TorchDistBackend()
    try:
        r = backend.average(_x(rank), weight=WEIGHTS[rank], compressor=comp).wait()
    finally:
        backend.close()
    return r.mean, r.own, r.total_weight, r.num_peers


@pytest.mark.dist
@pytest.mark.parametrize("spec", ["none", "int8", "topk"])
def test_unequal_weights_and_a_zero_weight_give_the_weighted_mean(spec):
    results = run_ranks(_weighted, 3, spec, timeout=60)
    comp = {"none": reduce.Identity(), "int8": Int8(32), "topk": TopK(0.2, 100)}[spec]

    def roundtrip(x: torch.Tensor) -> torch.Tensor:
        return comp.decompress(comp.compress(x))

    expected = (roundtrip(_x(0)) * 1 + roundtrip(_x(1)) * 3) / 4
    if spec != "topk":  # dense: the reduced chunks are encoded again for the trip back
        expected = roundtrip(expected)
    for rank, (mean, own, total, peers) in enumerate(results):
        assert total == 4.0 and peers == 2
        torch.testing.assert_close(mean, expected, atol=1e-6, rtol=1e-6)
        if WEIGHTS[rank]:
            # What the others decoded of this rank's contribution: its own roundtrip.
            assert torch.equal(own, roundtrip(_x(rank)))
        else:
            assert torch.equal(own, torch.zeros_like(own))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][0], results[2][0])


def test_a_non_finite_contribution_counts_with_weight_zero():
    x = torch.ones(8)
    x[3] = float("nan")
    assert reduce.finite_weight(x, 2.0).item() == 0.0
    assert reduce.finite_weight(torch.ones(8), 2.0).item() == 2.0
    r = LocalBackend().average(x, weight=2.0).wait()
    assert r.own_weight == 0.0 and r.total_weight == 0.0


def _one_nan(rank: int, world: int, spec: str) -> tuple[torch.Tensor, float, int]:
    comp = {"none": None, "int8": Int8(32)}[spec]
    x = _x(rank)
    if rank == 1:
        x[5] = float("nan")
    backend = TorchDistBackend()
    try:
        r = backend.average(x, weight=2.0, compressor=comp).wait()
    finally:
        backend.close()
    return r.mean, r.total_weight, r.num_peers


@pytest.mark.dist
@pytest.mark.parametrize("spec", ["none", "int8"])
def test_a_nan_contribution_does_not_reach_the_others_mean(spec):
    # Weight 0 must mean "not summed at all": 0 * NaN is NaN.
    comp = {"none": reduce.Identity(), "int8": Int8(32)}[spec]
    for mean, total, peers in run_ranks(_one_nan, 2, spec, timeout=60):
        assert total == 2.0 and peers == 1
        expected = comp.decompress(comp.compress(comp.decompress(comp.compress(_x(0)))))
        assert torch.equal(mean, expected)


def test_large_finite_contributions_do_not_overflow_the_weighted_sum():
    # Weights are inner steps (tens to thousands): a value near float32's largest times
    # one overflows unless the weights are scaled down before the sum.
    x = torch.full((8,), 3e38)
    r = LocalBackend().average(x, weight=1000.0).wait()
    assert torch.equal(r.mean, x) and r.total_weight == 1000.0


@pytest.mark.parametrize("granularity", [1, 4, 128, 1000])
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_chunk_bounds_cut_at_the_granularity_and_cover_everything(granularity, world):
    numel = 4099
    bounds = reduce.chunk_bounds(numel, world, granularity)
    assert len(bounds) == world and bounds[0][0] == 0 and bounds[-1][1] == numel
    for (lo, hi), (nxt, _) in zip(bounds, bounds[1:]):
        assert hi == nxt and lo <= hi
    for lo, hi in bounds:
        assert lo % granularity == 0 and (hi % granularity == 0 or hi == numel)
    sizes = [hi - lo for lo, hi in bounds]
    assert sizes == sorted(sizes, reverse=True)  # front-loaded: chunk 0 bounds the padding


@pytest.mark.parametrize("codec", [Int8(64), Int4(32), FP16()], ids=repr)
@pytest.mark.parametrize("world", [2, 3])
def test_own_contribution_decodes_like_the_whole_tensor(codec, world):
    # The backend encodes chunk by chunk; error feedback relies on that decoding exactly
    # like encoding the whole vector at once.
    x = _x(0, 3001)
    bounds = reduce.chunk_bounds(x.numel(), world, codec.granularity)
    sizes = [codec.nbytes(hi - lo) for lo, hi in bounds]
    send = torch.cat([codec.compress(x[lo:hi]).data for lo, hi in bounds])
    own = reduce._own(codec, x, 1.0, send, sizes, bounds, rank=0, own_chunk=None)
    assert torch.equal(own, codec.decompress(codec.compress(x)))
