"""TiledTopK (SparseLoCo's compressor as its reference runs it), against independent oracles."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lowcomm import DiLoCo, LocalBackend
from lowcomm.comm.compression import (
    Compressor,
    ErrorFeedback,
    LayoutCompressor,
    Payload,
    PayloadError,
    TiledTopK,
    TopK,
    compression_spec,
    parse_compression,
)
from lowcomm.comm.compression.tiled import largest_divisor

SHAPES = [(192, 128), (128,), (64, 3, 4), (7,), (5, 5)]


def _numel(shapes: list[tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes)


def _oracle_positions(x: torch.Tensor, shapes: list[tuple[int, ...]], k: int, tile: int) -> set:
    """Flat positions kept: per tensor, per tile, the k largest magnitudes (plain loops)."""
    kept: set[int] = set()
    offset = 0
    for shape in shapes:
        n = math.prod(shape)
        rows = shape[0] if len(shape) >= 2 else 1
        cols = n // rows
        h = max(d for d in range(1, tile + 1) if rows % d == 0)
        w = max(d for d in range(1, tile + 1) if cols % d == 0)
        t = x[offset : offset + n].view(rows, cols)
        for r0 in range(0, rows, h):
            for c0 in range(0, cols, w):
                block = t[r0 : r0 + h, c0 : c0 + w].abs().reshape(-1)
                for j in torch.topk(block, min(k, h * w)).indices.tolist():
                    kept.add(offset + (r0 + j // w) * cols + c0 + j % w)
        offset += n
    return kept


def test_largest_divisor_matches_the_reference_split() -> None:
    # templar's _get_smaller_split: the largest divisor of n not above the target.
    assert [largest_divisor(n, 64) for n in (384, 128, 64, 96, 257, 8, 1)] == [
        64, 64, 64, 48, 1, 8, 1,
    ]  # fmt: skip


@pytest.mark.parametrize(("k", "tile"), [(64, 64), (5, 16), (3, 4)])
def test_each_tile_of_each_tensor_keeps_its_largest_entries(k: int, tile: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(_numel(SHAPES))
    comp = TiledTopK(k, tile, bits=None).for_layout(SHAPES)
    y = comp.decompress(comp.compress(x))
    positions = set(torch.nonzero(y).flatten().tolist())
    assert positions == _oracle_positions(x, SHAPES, k, tile)
    assert torch.equal(y[list(positions)], x[list(positions)])  # fp32 values are exact
    assert len(positions) == comp.num_kept(x.numel())


def test_no_tile_spans_two_tensors() -> None:
    # A small-magnitude tensor between two large ones: a flat chunked top-k (one chunk over
    # all three) spends every slot on the large ones; per-tensor tiles keep the small one's.
    shapes = [(32, 32), (32,), (32, 32)]
    x = torch.cat([torch.randn(1024) * 100, torch.randn(32) * 1e-3, torch.randn(1024) * 100])
    tiled = TiledTopK(16, 32, bits=None).for_layout(shapes)
    flat = TopK(tiled.num_kept(x.numel()) / x.numel(), chunk_size=x.numel())
    small = slice(1024, 1056)
    assert int((tiled.decompress(tiled.compress(x))[small] != 0).sum()) == 16
    assert not bool((flat.decompress(flat.compress(x))[small] != 0).any())


def test_values_decode_to_their_bin_means_over_six_sigma() -> None:
    torch.manual_seed(1)
    shapes = [(64, 64)]
    x = torch.randn(4096) * torch.rand(4096) ** 3
    comp = TiledTopK(64, 64, bits=2).for_layout(shapes)
    exact = TiledTopK(64, 64, bits=None).for_layout(shapes)
    y, kept = comp.decompress(comp.compress(x)), exact.decompress(exact.compress(x))
    mask = kept != 0
    v = kept[mask]
    # The reference quantizer, written out: 4 bins of width 6 sigma / 4 around the mean,
    # codes round(c / width) + 2 clamped to 0..3, each decoded to the mean of its members.
    shift = v.mean()
    c = v - shift
    width = 6 * (c.norm() / math.sqrt(v.numel() - 1)) / 4
    codes = torch.round(c / width + 2).clamp(0, 3).long()
    want = torch.stack(
        [c[codes == b].mean() if (codes == b).any() else c.new_zeros(()) for b in range(4)]
    )
    assert torch.allclose(y[mask], want[codes] + shift, atol=1e-6)
    assert torch.equal(y[~mask], torch.zeros_like(y[~mask]))
    # Bin means are the least-squares decode of a bin: far better than a signed absmax grid.
    assert (y[mask] - v).norm() < 0.5 * v.norm()


def test_payload_is_exactly_nbytes_with_12_bit_indices() -> None:
    shapes = [(128, 128), (128,)]
    comp = TiledTopK(64, 64, bits=2).for_layout(shapes)
    data = comp.compress(torch.randn(_numel(shapes))).data
    # 4 tiles of 64x64, 64 kept each: 2-bit codes, 12-bit indices, shift + 4 bin means; the
    # 1-D tensor (tiles of 64, all kept): 2-bit codes, 6-bit indices, its own 5 floats.
    assert (
        data.numel()
        == comp.nbytes(_numel(shapes))
        == ((4 * 5 + 256 * 2 // 8 + 256 * 12 // 8) + (4 * 5 + 128 * 2 // 8 + 128 * 6 // 8))
    )
    fp32 = TiledTopK(64, 64, bits=None).for_layout(shapes)
    assert fp32.nbytes(_numel(shapes)) == (256 * 4 + 256 * 12 // 8) + (128 * 4 + 128 * 6 // 8)


def test_bad_payloads_are_rejected() -> None:
    comp = TiledTopK(4, 8, bits=2).for_layout([(8, 8)])  # 4 kept of 64, 6-bit indices
    payload = comp.compress(torch.randn(64))
    with pytest.raises(PayloadError):
        comp.decompress(Payload(payload.data[:-1], 64))
    data = payload.data.clone()
    data[-3:] = 0  # the last indices become 0: not increasing within the tile
    with pytest.raises(PayloadError, match="strictly increasing"):
        comp.decompress(Payload(data, 64))
    odd = TiledTopK(2, 8, bits=None).for_layout([(3, 5)])  # tiles of 15: 4-bit indices
    data = odd.compress(torch.randn(15)).data.clone()
    data[-1] = 0xFF  # index 15 in a tile of 15
    with pytest.raises(PayloadError, match="outside their tile"):
        odd.decompress(Payload(data, 15))
    with pytest.raises(ValueError, match="bound to 1 tensors of 64"):
        comp.compress(torch.randn(65))


def test_unbound_is_one_1d_tensor_and_arguments_are_checked() -> None:
    x = torch.randn(256)
    assert torch.equal(
        TiledTopK(8).decompress(TiledTopK(8).compress(x)),
        TiledTopK(8).for_layout([(256,)]).decompress(TiledTopK(8).for_layout([(256,)]).compress(x)),
    )
    assert isinstance(TiledTopK(), LayoutCompressor) and isinstance(TiledTopK(), Compressor)
    assert not isinstance(TopK(0.1), LayoutCompressor)
    for bad in ({"k": 0}, {"tile": 0}, {"bits": 9}, {"range_sigmas": 0.0}, {"shapes": []}):
        with pytest.raises(ValueError):
            TiledTopK(**bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        TiledTopK(k=1.5)  # type: ignore[arg-type]


def test_spec_parses_and_round_trips() -> None:
    assert parse_compression("tiled:64") == TiledTopK(64, 64, 2, 6.0)
    assert parse_compression("tiled:32:16:32") == TiledTopK(32, 16, None)
    ef = parse_compression("ef@0.95:tiled:64:64:2")
    assert isinstance(ef, ErrorFeedback) and ef.compressor == TiledTopK()
    for obj in (TiledTopK(), TiledTopK(8, 32, None, 4.0), ef):
        spec = compression_spec(obj)
        assert compression_spec(parse_compression(spec)) == spec
    with pytest.raises(ValueError, match="compression spec"):
        parse_compression("tiled:64:64:2:6:1")


def test_diloco_binds_each_fragment_to_its_tensors() -> None:
    # One inner and one outer SGD step at lr 1: the bias moves by exactly what was decoded of
    # its gradient. Its gradient is 1000x smaller than the weight's. Bound to the layout, the
    # bias is a tensor of its own and keeps its 16 largest entries; unbound (one 1-D tensor,
    # runs of 62 elements) its first run also holds 12 weight entries, which take 12 of the
    # 16 slots.
    torch.manual_seed(0)

    def bias_update(comp: TiledTopK) -> torch.Tensor:
        model = nn.Linear(30, 50)  # weight 50x30 = 1500 elements, then a bias of 50
        inner = torch.optim.SGD(model.parameters(), lr=1.0)
        opt = DiLoCo(
            model,
            inner,
            sync_every=1,
            backend=LocalBackend(),
            compression=comp,
            outer_optimizer=lambda p: torch.optim.SGD(p, lr=1.0),
        )
        start = model.bias.detach().clone()
        model.weight.grad = torch.randn(50, 30)
        model.bias.grad = torch.randn(50) * 1e-3
        opt.step()
        return model.bias.detach() - start

    class Unbound(TiledTopK):
        def for_layout(self, shapes: object) -> TiledTopK:  # type: ignore[override]
            return self

    assert int((bias_update(TiledTopK(16, 64, bits=None)) != 0).sum()) == 16
    assert int((bias_update(Unbound(16, 64, bits=None)) != 0).sum()) == 4
