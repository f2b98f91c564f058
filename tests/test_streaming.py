"""Streaming DiLoCo: schedules, fragments, overlap, eager and delayed updates."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowcomm.comm import LocalBackend
from lowcomm.optim.diloco import DiLoCo
from lowcomm.optim.fragments import check_partition, fragment_bytes, partition
from lowcomm.optim.schedule import StaggeredSchedule
from lowcomm.testing import run_ranks

from .oracle import Config, batch, loss_fn, make_model, replay_overlapped
from .test_diloco import assert_close, outer_sgd

# -- schedule ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "h,p",
    [(1, 1), (12, 1), (12, 3), (12, 4), (12, 12), (100, 5), (10, 3), (50, 4), (7, 6), (13, 13)],
)
def test_each_fragment_syncs_exactly_once_per_h_steps(h, p):
    sched = StaggeredSchedule(h, p)
    for start in range(1, 3 * h):
        window = [f for s in range(start, start + h) for f in sched.due(s)]
        assert sorted(window) == list(range(p)), (start, window)
    # Offsets round_down(p*H/P): fragment f first syncs after step f*H//P (fragment 0 after H).
    first = {}
    for s in range(1, 2 * h + 1):
        for f in sched.due(s):
            first.setdefault(f, s)
    assert first == {f: (f * h // p or h) for f in range(p)}
    assert [sched.offset(f) for f in range(p)] == [f * h // p for f in range(p)]


@pytest.mark.parametrize("h", range(1, 25))
def test_spacing_is_the_smallest_gap_between_syncs(h):
    for p in range(1, h + 1):
        sched = StaggeredSchedule(h, p)
        steps = [s for s in range(1, 4 * h + 1) for _ in sched.due(s)]
        gaps = [b - a for a, b in zip(steps, steps[1:])]
        assert sched.spacing == min(gaps) == h // p, (h, p, steps)


@pytest.mark.parametrize("h,p", [(1, 1), (4, 2), (12, 3), (12, 4), (50, 5), (100, 4), (8, 8)])
def test_divisible_schedules_are_unchanged(h, p):
    # The evenly spaced rule as it was before offsets were rounded: bit-identical training
    # needs the same fragment after the same steps.
    spacing = h // p
    sched = StaggeredSchedule(h, p)
    for step in range(-1, 5 * h):
        before = [(step % h) // spacing] if step >= 1 and step % spacing == 0 else []
        assert sched.due(step) == before, step
    assert sched.spacing == spacing


def test_p1_schedule_is_plain_diloco():
    sched = StaggeredSchedule(5, 1)
    assert [s for s in range(1, 21) if sched.due(s)] == [5, 10, 15, 20]


@pytest.mark.parametrize(
    "h,p,match", [(3, 4, "must be <= sync_every"), (0, 1, "sync_every"), (4, 0, ">= 1")]
)
def test_bad_schedules_raise(h, p, match):
    with pytest.raises(ValueError, match=match):
        StaggeredSchedule(h, p)


class RecordingBackend(LocalBackend):
    """A world of one that records the step and weight of every average it is asked for.

    With ``joined_at`` it is an elastic backend (a swarm) whose state download puts the
    joiner at that inner step.
    """

    def __init__(self, joined_at: int = 0) -> None:
        super().__init__()
        self.calls: list[tuple[int | None, float]] = []
        self.joined_at = joined_at
        self.elastic = joined_at > 0

    def average(self, flat, *, weight=1.0, compressor=None, step=None):
        self.calls.append((step, weight))
        return super().average(flat, weight=weight, compressor=compressor, step=step)

    def sync_state(self, tensors):
        # A joiner downloads the swarm's counters: it continues at inner step joined_at.
        if "meta.inner_steps" in tensors:
            tensors["meta.inner_steps"].fill_(self.joined_at)

    def publish_state(self, tensors):
        pass

    def needs_resync(self):
        return False

    def set_round_seconds(self, round_seconds):
        pass

    def bound_weights(self, max_weight):
        pass


def _train_rounded(backend: RecordingBackend, steps: int) -> DiLoCo:
    model = TinyGPT(4, d=16)
    inner = torch.optim.SGD(model.parameters(), lr=0.01)
    opt = DiLoCo(model, inner, sync_every=10, fragments=4, overlap_steps=1, backend=backend)
    for _ in range(steps):
        for q in model.parameters():
            q.grad = torch.randn_like(q)
        opt.step()
    return opt


def test_diloco_follows_a_rounded_schedule():
    # H=10, P=4: offsets 0, 2, 5, 7; each sync weighs the steps since that fragment's last.
    backend = RecordingBackend()
    opt = _train_rounded(backend, 21)
    first_round = [(2, 2), (5, 5), (7, 7), (10, 10)]
    assert backend.calls == first_round + [(12, 10), (15, 10), (17, 10), (20, 10)]
    assert opt.stats.fragment_syncs == 8 and opt.stats.outer_steps == 2
    opt.close()


def test_a_joiner_continues_a_rounded_schedule():
    # Joined at step 23: fragments last synced at 20, 22, 15, 17, so each next sync (25, 27,
    # 30, 32) carries a whole period of steps, as on the peers that were there all along.
    backend = RecordingBackend(joined_at=23)
    opt = _train_rounded(backend, 10)
    assert backend.calls == [(25, 10), (27, 10), (30, 10), (32, 10)]
    opt.close()


# -- fragments --------------------------------------------------------------------------------


class TinyGPT(nn.Module):
    """Shaped like a byte-level GPT: embeddings, a ModuleList of blocks, a head."""

    def __init__(self, n_layer: int = 4, d: int = 64, vocab: int = 256, ctx: int = 128) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(d),
                nn.Linear(d, 3 * d),
                nn.Linear(d, d),
                nn.LayerNorm(d),
                nn.Linear(d, 4 * d),
                nn.Linear(4 * d, d),
            )
            for _ in range(n_layer)
        )
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)


@pytest.mark.parametrize("strategy", ["strided", "sequential"])
@pytest.mark.parametrize("n_layer,p", [(4, 1), (4, 2), (4, 4), (8, 4), (6, 4), (3, 2)])
def test_fragments_partition_parameters_exactly(strategy, n_layer, p):
    model = TinyGPT(n_layer)
    params = list(model.parameters())
    frags = partition(model, params, p, strategy)
    assert len(frags) == p
    check_partition(params, frags)
    flat = [id(q) for f in frags for q in f]
    assert sorted(flat) == sorted(id(q) for q in params) and len(set(flat)) == len(params)


@pytest.mark.parametrize("n_layer", [4, 8])
def test_strided_fragments_span_the_depth_and_balance_bytes(n_layer):
    # Parameters are not split, so the peak is at least one block plus the largest embedding;
    # at d=128 that is within 1.1 x total/P (at d=64 a 256x64 embedding alone is 7% of it).
    model = TinyGPT(n_layer, d=128)
    params = list(model.parameters())
    frags = partition(model, params, 4, "strided")
    total = sum(fragment_bytes(frags))
    assert max(fragment_bytes(frags)) <= 1.1 * total / 4
    block_of = {id(q): i for i, b in enumerate(model.blocks) for q in b.parameters()}
    for p, frag in enumerate(frags):
        blocks = sorted({block_of[id(q)] for q in frag if id(q) in block_of})
        assert blocks == list(range(p, n_layer, 4))
    # The embeddings and head do not pile into one fragment.
    homes = {
        i for i, f in enumerate(frags) for q in f if q is model.wte.weight or q is model.head.weight
    }
    assert len(homes) == 2


def test_uneven_blocks_still_balance():
    model = TinyGPT(6)
    frags = partition(model, list(model.parameters()), 4, "strided")
    sizes = fragment_bytes(frags)
    assert max(sizes) <= 1.4 * sum(sizes) / 4  # 6 equal blocks on 4 fragments: 2,2,1+rest,1+rest


def test_fragment_errors():
    model = make_model()
    params = list(model.parameters())
    with pytest.raises(ValueError, match="must not exceed"):
        partition(model, params, 5)
    with pytest.raises(ValueError, match="not one of"):
        partition(model, params, 2, "random")
    with pytest.raises(ValueError, match="exactly one"):
        check_partition(params, [params, params[:1]])
    with pytest.raises(ValueError, match="in no fragment"):
        check_partition(params, [params[:2]])
    with pytest.raises(ValueError, match="empty"):
        check_partition(params, [params, []])


def test_diloco_fragment_and_overlap_errors():
    model = make_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="fragments \\(0\\)"):
        DiLoCo(model, inner, sync_every=4, fragments=0)
    with pytest.raises(ValueError, match="must not exceed"):
        DiLoCo(model, inner, sync_every=10, fragments=5)
    with pytest.raises(ValueError, match="less than the fragment spacing"):
        DiLoCo(model, inner, sync_every=8, fragments=2, overlap_steps=4)
    with pytest.raises(ValueError, match="overlap_mode='mix'"):
        DiLoCo(model, inner, sync_every=8, overlap_mode="eager", overlap_steps=1)


def test_stats_show_peak_bytes_near_one_pth_and_overlap():
    model = TinyGPT(4, d=128)
    inner = torch.optim.SGD(model.parameters(), lr=0.01)
    opt = DiLoCo(model, inner, sync_every=8, fragments=4, overlap_steps=1)
    for _ in range(17):  # the sync launched after step 16 lands after step 17
        for q in model.parameters():
            q.grad = torch.randn_like(q)
        opt.step()
    s = opt.stats
    total = s.dense_bytes_per_sync
    assert s.fragment_syncs == 8 and s.outer_steps == 2
    assert s.max_in_flight_bytes <= 1.1 * total / 4
    assert s.overlap_steps == 1 and s.mean_overlap_steps == 1.0


# -- eager and delayed --------------------------------------------------------------------------


def _overlapped(rank: int, world: int, cfg: Config, mode: str, flush: bool = False):
    model = make_model(cfg.seed)
    params = list(model.parameters())
    opt = DiLoCo(
        model,
        torch.optim.SGD(params, lr=cfg.inner_lr),
        sync_every=cfg.sync_every,
        outer_optimizer=outer_sgd(cfg.outer_lr, cfg.momentum),
        fragments=[[params[i] for i in f] for f in cfg.fragments],
        overlap_mode=mode,
    )
    for step in range(1, cfg.steps + 1):
        x, y = batch(cfg.seed, rank, step)
        loss_fn(params, x, y).backward()
        opt.step()
        opt.zero_grad()
    flushed = opt.flush() if flush else 0
    out = [g.clone() for g in opt.global_tensors()], [q.detach().clone() for q in params], flushed
    opt.close()
    return out


@pytest.mark.dist
@pytest.mark.parametrize("mode", ["eager", "delayed"])
@pytest.mark.parametrize("fragments", [((0, 1, 2, 3),), ((0, 2), (1, 3))])
@pytest.mark.parametrize("flush", [False, True])
def test_eager_and_delayed_match_replay(mode, fragments, flush):
    cfg = Config(workers=2, steps=16, sync_every=4, fragments=fragments, flush=flush)
    results = run_ranks(_overlapped, 2, cfg, mode, flush)
    ref_glob, ref_local = replay_overlapped(
        [q.detach() for q in make_model(0).parameters()], cfg, mode
    )
    for rank, (glob, local, flushed) in enumerate(results):
        assert_close(glob, ref_glob[rank])
        assert_close(local, ref_local[rank])
        assert flushed == (len(fragments) if flush else 0)
    same = all(torch.equal(a, b) for a, b in zip(results[0][0], results[1][0]))
    # Delayed keeps θ identical on all workers; eager lets it differ (each worker's outer
    # momentum has seen its own fresh pseudo-gradient first), flushed or not.
    assert same == (mode == "delayed")
