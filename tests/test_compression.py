"""Compressors, error feedback and the spec registry, against independent oracles."""

from __future__ import annotations

import io
import math

import pytest
import torch

from lowcomm.comm.compression import (
    BF16,
    FP16,
    MAX_NUMEL,
    SPEC_FORMS,
    Compressor,
    ErrorFeedback,
    Int2,
    Int4,
    Int8,
    Payload,
    PayloadError,
    TopK,
    compression_spec,
    parse_compression,
    sparseloco,
)

# Small blocks and chunks so that a few thousand elements span many of them.
COMPRESSORS: list[Compressor] = [
    FP16(),
    BF16(),
    Int8(),
    Int8(24),
    Int4(),
    Int4(6),
    Int2(),
    Int2(12),
    TopK(0.05, 64),
    TopK(0.07, 100),
    TopK(1.0, 16),
    TopK(0.3, 7),
    TopK(0.02, 128, values=Int8(16)),
    TopK(0.1, 100, values=Int2(8)),
    TopK(0.05, 64, values=FP16()),
    sparseloco(0.05, 64).compressor,
]
IDS = [repr(c) for c in COMPRESSORS]
NUMELS = [0, 1, 2, 3, 5, 7, 31, 63, 64, 65, 127, 128, 129, 1000, 4097]
# Largest error per element, as a multiple of the block's absmax (round to nearest).
BLOCK_BOUNDS = {Int8: 1 / 254, Int4: 1 / 14, Int2: 1 / 3}


def heavy_tailed(numel: int, seed: int = 0) -> torch.Tensor:
    """Entries of widely different magnitudes, like a pseudo-gradient."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(numel, generator=g) * 2)
    return torch.randn(numel, generator=g) * scale


def block_absmax(x: torch.Tensor, block: int) -> torch.Tensor:
    """Per-element absmax of the block each element is in (last block may be short)."""
    num_blocks = -(-x.numel() // block)
    padded = torch.zeros(num_blocks * block, dtype=x.dtype)
    padded[: x.numel()] = x.abs()
    return padded.view(num_blocks, block).amax(1).repeat_interleave(block)[: x.numel()]


def topk_oracle(x: torch.Tensor, fraction: float, chunk: int) -> torch.Tensor:
    """Dense tensor holding x at each chunk's ceil(fraction*len) largest |x|, zeros elsewhere."""
    ref = torch.zeros_like(x)
    for start in range(0, x.numel(), chunk):
        piece = x[start : start + chunk]
        k = max(1, math.ceil(round(fraction * piece.numel(), 9)))
        idx = torch.topk(piece.abs(), k).indices + start
        ref[idx] = x[idx]
    return ref


# -- sizes and layouts -----------------------------------------------------------------------


@pytest.mark.parametrize("comp", COMPRESSORS, ids=IDS)
def test_payload_has_exactly_nbytes(comp: Compressor) -> None:
    for numel in NUMELS:
        payload = comp.compress(heavy_tailed(numel, seed=numel))
        assert payload.data.dtype == torch.uint8 and payload.data.dim() == 1
        assert payload.numel == numel
        assert payload.nbytes == comp.nbytes(numel), (comp, numel)
        out = comp.decompress(payload)
        assert out.dtype == torch.float32 and out.shape == (numel,)


def test_nbytes_formulas() -> None:
    for n in [1, 5, 127, 128, 129, 1000, 10_000]:
        assert FP16().nbytes(n) == BF16().nbytes(n) == 2 * n
        assert Int8().nbytes(n) == n + 4 * math.ceil(n / 128)
        assert Int8(256).nbytes(n) == n + 4 * math.ceil(n / 256)
        assert Int4().nbytes(n) == math.ceil(n / 2) + 4 * math.ceil(n / 64)
        assert Int2().nbytes(n) == math.ceil(n / 4) + 4 * math.ceil(n / 64)
    # 10_000 = 2 chunks of 4096 (41 kept each) + 1808 (ceil(18.08) = 19 kept).
    kept = 41 + 41 + 19
    assert TopK(0.01).num_kept(10_000) == kept
    assert TopK(0.01).nbytes(10_000) == 8 * kept
    assert TopK(0.01, values=Int8()).nbytes(10_000) == 4 * kept + kept + 4
    # Binary floating point: 0.07 * 100 = 7.000000000000001 still keeps 7 per chunk.
    assert TopK(0.07, 100).num_kept(250) == 7 + 7 + 4
    assert TopK(1e-9, 64).num_kept(100) == 2
    assert TopK(0.5).nbytes(0) == 0


def test_int8_payload_layout_is_scales_then_codes() -> None:
    x = heavy_tailed(300)
    comp = Int8(128)
    data = comp.compress(x).data
    scales = data[:12].view(torch.float32)
    codes = data[12:].view(torch.int8).float()
    torch.testing.assert_close(scales, block_absmax(x, 128)[::128] / 127, rtol=0, atol=0)
    expected = codes * scales.repeat_interleave(128)[:300]
    assert torch.equal(comp.decompress(Payload(data, 300)), expected)


def test_topk_payload_layout_is_indices_then_values() -> None:
    x = heavy_tailed(200)
    comp = TopK(0.1, 64)  # chunks 64, 64, 64, 8 keep 7, 7, 7, 1
    data = comp.compress(x).data
    idx = data[: 4 * 22].view(torch.int32).long()
    vals = data[4 * 22 :].view(torch.float32)
    assert torch.equal(vals, x[idx])
    for c in range(3):
        chunk_idx = idx[7 * c : 7 * (c + 1)]
        assert bool((chunk_idx.diff() > 0).all())
        assert chunk_idx.min() >= 64 * c and chunk_idx.max() < 64 * (c + 1)
    assert idx[-1] >= 192


# -- error bounds ------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [Int8, Int4, Int2])
@pytest.mark.parametrize("block", [4, 64, 128])
def test_block_quantizer_error_bound(cls: type[Int8], block: int) -> None:
    for numel in [1, 3, block - 1, block + 3, 1001, 20_001]:
        x = heavy_tailed(numel, seed=numel)
        x[: min(block, numel)] = 0.0  # an all-zero block
        comp = cls(block)
        y = comp.decompress(comp.compress(x))
        m = block_absmax(x, block)
        err = (y - x).abs()
        # Round to nearest: half a grid step, plus fp32 rounding of scale and product.
        assert bool((err <= m * BLOCK_BOUNDS[cls] * (1 + 1e-4)).all()), (cls, block, numel)
        assert bool(torch.isfinite(y).all())
        if cls is not Int2:  # Int2 has no zero level, but a zero block still has scale 0
            assert bool((y[x == 0] == 0).all())
        assert bool((y[: min(block, numel)] == 0).all())


def test_int8_error_at_most_blockmax_over_127() -> None:
    x = heavy_tailed(10_000) * 1e-3
    y = Int8().decompress(Int8().compress(x))
    assert bool(((y - x).abs() <= block_absmax(x, 128) / 127).all())


def test_all_zero_tensor_decodes_to_zero() -> None:
    for comp in COMPRESSORS:
        y = comp.decompress(comp.compress(torch.zeros(777)))
        assert torch.equal(y, torch.zeros(777)), comp


def test_half_precision_relative_error() -> None:
    g = torch.Generator().manual_seed(1)
    # Normal range of fp16: relative error is the format's unit roundoff.
    x = (
        torch.exp(torch.empty(5000).uniform_(-6.0, 9.0, generator=g))
        * torch.randn(5000, generator=g).sign()
    )
    for comp, rel in [(FP16(), 2.0**-11), (BF16(), 2.0**-8)]:
        y = comp.decompress(comp.compress(x))
        assert bool(((y - x).abs() <= rel * x.abs()).all()), comp


def test_fp16_saturates_instead_of_overflowing() -> None:
    x = torch.tensor([1e6, -1e6, float("inf"), 1.0])
    y = FP16().decompress(FP16().compress(x))
    assert y.tolist() == [65504.0, -65504.0, 65504.0, 1.0]


@pytest.mark.parametrize("comp", COMPRESSORS, ids=IDS)
def test_non_finite_input_does_not_crash(comp: Compressor) -> None:
    x = heavy_tailed(300)
    x[5], x[150], x[299] = float("nan"), float("inf"), -float("inf")
    out = comp.decompress(comp.compress(x))
    assert out.shape == (300,)


def test_low_precision_inputs_are_accepted() -> None:
    x = heavy_tailed(1000)
    for comp in COMPRESSORS:
        for dtype in (torch.bfloat16, torch.float16, torch.float64):
            xd = x.clamp(-6e4, 6e4).to(dtype)
            expected = comp.decompress(comp.compress(xd.float()))
            assert torch.equal(comp.decompress(comp.compress(xd)), expected), (comp, dtype)


# -- top-k against an independent torch.topk oracle ---------------------------------------------


@pytest.mark.parametrize(
    ("fraction", "chunk"), [(0.01, 4096), (0.05, 64), (0.07, 100), (0.3, 7), (1.0, 16), (0.5, 1)]
)
def test_topk_keeps_the_largest_magnitudes_of_each_chunk(fraction: float, chunk: int) -> None:
    for numel in [1, chunk - 1 if chunk > 1 else 1, chunk, 3 * chunk + chunk // 3 + 1, 9000]:
        x = heavy_tailed(numel, seed=numel)
        comp = TopK(fraction, chunk)
        y = comp.decompress(comp.compress(x))
        assert torch.equal(y, topk_oracle(x, fraction, chunk)), (fraction, chunk, numel)


def test_topk_quantized_values_keep_the_oracle_positions() -> None:
    x = heavy_tailed(5000)
    ref = topk_oracle(x, 0.05, 64)
    for values, rel in [(FP16(), 2.0**-11), (Int8(16), 1 / 127)]:
        y = TopK(0.05, 64, values=values).decompress(TopK(0.05, 64, values=values).compress(x))
        kept = ref != 0
        assert torch.equal(y != 0, kept)
        # Int8 over the kept values: within 1/127 of the largest kept value of its block.
        assert bool(((y - ref).abs()[kept] <= rel * ref.abs().max()).all())


def test_topk_argument_validation() -> None:
    for bad in [0, 0.0, -0.1, 1.0001, 2, float("nan"), float("inf")]:
        with pytest.raises(ValueError, match=r"fraction .* must be in \(0, 1\]"):
            TopK(bad)
    with pytest.raises(TypeError):
        TopK("0.1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunk_size"):
        TopK(0.1, 0)
    with pytest.raises(ValueError, match="dense"):
        TopK(0.1, values=TopK(0.5))
    assert TopK(1.0).k == 4096
    with pytest.raises(ValueError, match="at most"):
        TopK(0.1).nbytes(MAX_NUMEL + 1)
    TopK(0.1).nbytes(MAX_NUMEL)


def test_block_size_validation() -> None:
    for cls, bad in [(Int8, 0), (Int4, 3), (Int2, 6), (Int2, -4)]:
        with pytest.raises(ValueError, match="block_size"):
            cls(bad)
    with pytest.raises(TypeError):
        Int8(1.5)  # type: ignore[arg-type]


def test_input_validation() -> None:
    for comp in [FP16(), Int8(), TopK(0.1)]:
        with pytest.raises(ValueError, match="1-D"):
            comp.compress(torch.zeros(4, 4))
        with pytest.raises(TypeError, match="floating"):
            comp.compress(torch.zeros(4, dtype=torch.int64))


# -- chunked compression decodes exactly like the whole tensor ----------------------------------


def decode_in_pieces(comp: Compressor, x: torch.Tensor, cuts: list[int]) -> torch.Tensor:
    bounds = [0, *cuts, x.numel()]
    pieces = [x[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.cat([comp.decompress(comp.compress(p)) for p in pieces])


@pytest.mark.parametrize("comp", COMPRESSORS, ids=IDS)
def test_chunked_compression_equals_whole(comp: Compressor) -> None:
    g = comp.granularity
    assert g >= 1
    # A length that is not a multiple of anything, so the last piece is short and ragged.
    numel = 5 * g + max(1, g // 3) + 7
    x = heavy_tailed(numel, seed=g)
    whole = comp.decompress(comp.compress(x))
    rng = torch.Generator().manual_seed(0)
    random_cuts = sorted({g * int(i) for i in torch.randint(1, 6, (3,), generator=rng)})
    for cuts in [[g], [g, 3 * g], [2 * g, 4 * g, 5 * g], random_cuts, list(range(g, numel, g))]:
        assert torch.equal(decode_in_pieces(comp, x, cuts), whole), (comp, cuts)


def test_topk_granularity_aligns_value_blocks() -> None:
    # k = 41 kept per chunk, value blocks of 128: a piece must hold 128 chunks.
    assert TopK(0.01, 4096, values=Int8(128)).granularity == 128 * 4096
    assert TopK(0.01, 4096, values=FP16()).granularity == 4096
    assert TopK(1 / 64, 4096, values=Int2(64)).granularity == 4096
    assert sparseloco().compressor.granularity == 4096


# -- payload validation --------------------------------------------------------------------------


@pytest.mark.parametrize("comp", COMPRESSORS, ids=IDS)
def test_wrong_payloads_are_rejected(comp: Compressor) -> None:
    data = comp.compress(heavy_tailed(1000)).data
    with pytest.raises(PayloadError, match="bytes"):
        comp.decompress(Payload(data[:-1], 1000))
    with pytest.raises(PayloadError, match="bytes"):
        comp.decompress(Payload(torch.cat([data, data[:4]]), 1000))
    with pytest.raises(PayloadError, match="bytes"):
        comp.decompress(Payload(data, 2000))
    with pytest.raises(PayloadError, match="uint8"):
        comp.decompress(Payload(data.view(torch.int8), 1000))
    with pytest.raises(PayloadError, match="uint8"):
        comp.decompress(Payload(data.float(), 1000))
    with pytest.raises(PayloadError, match="1-D"):
        comp.decompress(Payload(data.view(1, -1), 1000))


@pytest.mark.parametrize("comp", COMPRESSORS, ids=IDS)
def test_misaligned_payload_slice_decodes(comp: Compressor) -> None:
    x = heavy_tailed(333)
    data = comp.compress(x).data
    buffer = torch.cat([torch.zeros(1, dtype=torch.uint8), data])
    assert torch.equal(
        comp.decompress(Payload(buffer[1:], 333)), comp.decompress(Payload(data, 333))
    )


@pytest.mark.parametrize("values", [None, Int8(16)])
def test_topk_bad_indices_are_rejected(values: Compressor | None) -> None:
    comp = TopK(0.1, 64, values=values)  # 1000 = 15 chunks of 64 (7 kept) + 40 (4 kept)
    numel = 1000
    good = comp.compress(heavy_tailed(numel)).data
    kept = comp.num_kept(numel)
    assert kept == 15 * 7 + 4

    def tampered(position: int, value: int) -> Payload:
        data = good.clone()
        data[: 4 * kept].view(torch.int32)[position] = value
        return Payload(data, numel)

    comp.decompress(Payload(good, numel))
    idx = good[: 4 * kept].view(torch.int32)
    cases = {
        "past the end": (kept - 1, numel),
        "negative": (0, -1),
        "into the next chunk": (6, 64),
        "into the previous chunk": (7, 63),
        "duplicate": (1, int(idx[0])),
        "out of order": (0, int(idx[1]) + 1 if int(idx[1]) + 1 < 64 else 63),
        "huge": (3, 2**31 - 1),
    }
    for name, (pos, value) in cases.items():
        with pytest.raises(PayloadError, match="indices"):
            comp.decompress(tampered(pos, value))
            pytest.fail(name)


# -- error feedback -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "comp", [TopK(0.1, 32), Int2(8), TopK(0.05, 64, values=Int8(16))], ids=repr
)
def test_error_feedback_conserves_what_is_sent(comp: Compressor) -> None:
    ef = ErrorFeedback(comp)
    total_in = torch.zeros(500, dtype=torch.float64)
    total_sent = torch.zeros(500, dtype=torch.float64)
    for step in range(6):
        delta = heavy_tailed(500, seed=step) * 1e-3
        x = ef.prepare("frag0", delta)
        sent = ef.roundtrip(x)
        ef.record("frag0", x, sent)
        total_in += delta.double()
        total_sent += sent.double()
        # Something was dropped, or error feedback would be trivial.
        assert not torch.equal(sent, x)
    residual = ef.residual("frag0")
    assert residual is not None and residual.dtype == torch.float32
    torch.testing.assert_close(total_sent + residual.double(), total_in, rtol=1e-6, atol=1e-6)


def test_error_feedback_decay_and_keys() -> None:
    ef = ErrorFeedback(TopK(0.25, 8), decay=0.5)
    d1, d2 = heavy_tailed(64, 1), heavy_tailed(64, 2)
    x1 = ef.prepare("a", d1)
    assert torch.equal(x1, d1) and x1.data_ptr() != d1.data_ptr()
    sent1 = ef.roundtrip(x1)
    assert torch.equal(sent1, topk_oracle(x1, 0.25, 8))
    ef.record("a", x1, sent1)
    assert torch.equal(ef.prepare("a", d2), d2 + 0.5 * (x1 - sent1))
    # Keys are independent: "b" starts from zero.
    assert torch.equal(ef.prepare("b", d2), d2)
    assert ef.keys() == ["a"]
    ef.reset()
    assert ef.keys() == [] and torch.equal(ef.prepare("a", d2), d2)


def test_error_feedback_shapes_and_types() -> None:
    ef = ErrorFeedback(Int8())
    x = ef.prepare("w", torch.randn(4, 8))
    ef.record("w", x, ef.roundtrip(x))
    assert ef.roundtrip(x).shape == (4, 8)
    low = torch.randn(16, dtype=torch.bfloat16)
    assert ef.prepare("bf16", low).dtype == torch.float32
    with pytest.raises(ValueError, match="shape"):
        ef.prepare("w", torch.randn(32))
    with pytest.raises(ValueError, match="shape"):
        ef.record("w", x, torch.zeros(32))
    with pytest.raises(TypeError):
        ef.prepare(0, torch.randn(3))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ErrorFeedback(None)  # type: ignore[arg-type]
    for bad in [-0.1, 1.5]:
        with pytest.raises(ValueError, match="decay"):
            ErrorFeedback(Int8(), decay=bad)


def test_error_feedback_state_dict_round_trip() -> None:
    ef = ErrorFeedback(TopK(0.1, 16), decay=0.9)
    for key in ["f0", "f1"]:
        x = ef.prepare(key, heavy_tailed(100, seed=len(key)))
        ef.record(key, x, ef.roundtrip(x))
    sd = ef.state_dict()
    assert sd["compressor"] == "topk:0.1:16" and sd["decay"] == 0.9
    for key, value in sd["residuals"].items():
        assert value.device.type == "cpu" and value.dtype == torch.float32
        assert torch.equal(value, ef.residual(key))
    # A clone: later rounds do not change the saved state.
    saved = sd["residuals"]["f0"].clone()
    x = ef.prepare("f0", heavy_tailed(100, seed=9))
    ef.record("f0", x, ef.roundtrip(x))
    assert torch.equal(sd["residuals"]["f0"], saved)
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    restored = ErrorFeedback(TopK(0.1, 16), decay=0.9)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    delta = heavy_tailed(100, seed=5)
    # "f1" did not change since the save; "f0" comes back as it was saved.
    assert torch.equal(restored.prepare("f1", delta), ef.prepare("f1", delta))
    assert torch.equal(restored.prepare("f0", delta), torch.add(delta, saved, alpha=0.9))
    assert sorted(restored.keys()) == ["f0", "f1"]
    with pytest.raises(ValueError, match="residuals"):
        restored.load_state_dict({"decay": 1.0})


def test_sparseloco_is_decayed_feedback_over_topk_with_2bit_values() -> None:
    ef = sparseloco()
    assert isinstance(ef, ErrorFeedback) and ef.decay == 0.95
    comp = ef.compressor
    assert isinstance(comp, TopK) and comp.chunk_size == 4096 and comp.k == 64
    assert comp.values == Int2(64)
    # 64 kept of 4096: 32-bit index + 2-bit value + one fp32 scale per chunk.
    assert comp.nbytes(4096 * 10) == 10 * (64 * 4 + 64 // 4 + 4)
    assert sparseloco(0.03).compressor.values == Int2(492)  # lcm(123, 4)


# -- registry --------------------------------------------------------------------------------------


def test_parse_valid_specs() -> None:
    cases = {
        "none": None,
        "fp16": FP16(),
        "BF16": BF16(),
        "int8": Int8(128),
        "int8:256": Int8(256),
        "int4": Int4(64),
        "int4:32": Int4(32),
        "int2": Int2(64),
        "topk:0.01": TopK(0.01),
        "topk:0.01:1024": TopK(0.01, 1024),
        "topk:0.01+int8": TopK(0.01, values=Int8()),
        " topk:0.02 + int4:16 ": TopK(0.02, values=Int4(16)),
    }
    for spec, expected in cases.items():
        assert parse_compression(spec) == expected, spec
    ef = parse_compression("sparseloco")
    assert isinstance(ef, ErrorFeedback)
    assert compression_spec(ef) == compression_spec(sparseloco())
    ef2 = parse_compression("ef@0.9:topk:0.1+int8")
    assert isinstance(ef2, ErrorFeedback) and ef2.decay == 0.9
    assert ef2.compressor == TopK(0.1, values=Int8())
    ef3 = parse_compression("ef:int4")
    assert isinstance(ef3, ErrorFeedback) and ef3.decay == 1.0


def test_spec_round_trips() -> None:
    objects: list[Compressor | ErrorFeedback | None] = [
        None,
        *COMPRESSORS,
        sparseloco(),
        sparseloco(0.03, 1024, 0.9),
        ErrorFeedback(TopK(0.1, values=BF16())),
    ]
    for obj in objects:
        spec = compression_spec(obj)
        again = parse_compression(spec)
        assert compression_spec(again) == spec, spec
        if not isinstance(obj, ErrorFeedback):
            assert again == obj, spec
    assert compression_spec(TopK(0.01, values=Int8())) == "topk:0.01:4096+int8:128"
    assert compression_spec(parse_compression("int8")) == compression_spec(Int8(128))


def test_parse_invalid_specs_list_valid_names() -> None:
    for spec in ["int9", "top-k:0.1", "", "gzip"]:
        with pytest.raises(ValueError) as info:
            parse_compression(spec)
        for form in SPEC_FORMS:
            assert form in str(info.value)
    for spec in [
        "int8:abc",
        "topk",
        "topk:0",
        "topk:1.5",
        "topk:0.1+topk:0.1",
        "fp16:2",
        "int4:3",
        "ef:none",
        "ef@2:int8",
        "int8+fp16",
        "sparseloco:0.1:4096:0.9:7",
    ]:
        with pytest.raises(ValueError, match="compression spec"):
            parse_compression(spec)
    with pytest.raises(TypeError):
        parse_compression(8)  # type: ignore[arg-type]


def test_spec_of_a_user_compressor_is_stable() -> None:
    class Half:
        dense = True
        granularity = 1

        def __init__(self) -> None:
            self.bits = 16
            self._cache: dict[int, int] = {}

        def nbytes(self, numel: int) -> int:
            return 2 * numel

        def compress(self, tensor: torch.Tensor) -> Payload:
            return Payload(tensor.half().view(torch.uint8), tensor.numel())

        def decompress(self, payload: Payload) -> torch.Tensor:
            return payload.data.view(torch.float16).float()

    assert isinstance(Half(), Compressor)
    spec = compression_spec(Half())
    assert spec == compression_spec(Half())
    assert spec.endswith("Half(bits=16)") and "test_compression" in spec
    assert compression_spec(ErrorFeedback(Half())) == f"ef@1.0:{spec}"


# -- accelerator ---------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("comp", COMPRESSORS, ids=IDS)
def test_cuda_matches_cpu(comp: Compressor) -> None:
    x = heavy_tailed(20_000)
    payload = comp.compress(x.cuda())
    assert payload.data.is_cuda and payload.nbytes == comp.nbytes(20_000)
    y = comp.decompress(payload)
    assert y.is_cuda
    expected = comp.decompress(comp.compress(x))
    torch.testing.assert_close(y.cpu(), expected, rtol=1e-6, atol=0)
    # Chunked on the device too.
    g = comp.granularity
    numel = 3 * g + 5
    xd = heavy_tailed(numel).cuda()
    whole = comp.decompress(comp.compress(xd))
    assert torch.equal(decode_in_pieces(comp, xd, [g, 2 * g]), whole)
    ef = ErrorFeedback(comp)
    xe = ef.prepare("k", xd)
    ef.record("k", xe, ef.roundtrip(xe))
    residual = ef.residual("k")
    assert residual is not None and residual.is_cuda
    sd = ef.state_dict()
    assert sd["residuals"]["k"].device.type == "cpu"
    fresh = ErrorFeedback(comp)
    fresh.load_state_dict(sd)
    assert fresh.prepare("k", xd).is_cuda
