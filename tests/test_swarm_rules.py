"""The swarm's rules without a swarm: signed records, served state, what a reducer admits.

Pure functions of lowcomm's hivemind backend, tested with forged, tampered and replayed
inputs (no DHT, no processes; hivemind need not be installed).
"""

from __future__ import annotations

import time

import pytest
import torch

from lowcomm.comm._swarm_averaging import _Admission
from lowcomm.comm._swarm_membership import (
    _RECORD_MAX_AGE,
    _mac,
    _parse_record,
    _record_ok,
    _sign_record,
)
from lowcomm.comm._swarm_state import _download_problem, _state_hash, _state_metadata
from lowcomm.comm.base import ConsistencyError

KEY = b"run-secret"


def _signed(key: bytes | None = KEY, peer: str = "QmPeer", **kw) -> list:  # type: ignore[type-arg]
    fields = dict(fingerprint="fp", version=7, digest="d7", busy=False, history=[[7, "d7", 3]])
    fields.update(kw)
    return _sign_record(key, peer, **fields)  # type: ignore[arg-type]


def test_a_record_signed_with_the_run_key_parses():
    rec = _parse_record(KEY, "QmPeer", _signed(round=41))
    assert rec is not None and rec.version == 7 and rec.history == {7: ("d7", 3)}
    assert rec.round == 41


def test_forged_records_are_refused():
    # Signed with another key, or for another peer id, or not signed at all.
    assert _parse_record(KEY, "QmPeer", _signed(key=b"guess")) is None
    assert _parse_record(KEY, "QmOther", _signed()) is None
    unsigned = _signed(key=None)
    assert _parse_record(KEY, "QmPeer", unsigned) is None
    # Without a run key, anyone's record is taken (an open run), but it must be well formed.
    assert _parse_record(None, "QmPeer", unsigned) is not None
    assert _parse_record(None, "QmPeer", unsigned[:-1]) is None


@pytest.mark.parametrize(
    "field,value", [(2, 10**6), (3, "bogus"), (4, True), (5, [[10**6, "bogus", 99]]), (6, 99)]
)
def test_tampered_records_are_refused(field, value):
    record = _signed()
    record[field] = value
    assert _parse_record(KEY, "QmPeer", record) is None


def test_replayed_records_are_refused():
    # hivemind's DHT lets anyone store under any subkey: an old record stored again with a
    # late expiration would pin a peer to its old state.
    now = time.time()
    old = _signed(signed_at=now - _RECORD_MAX_AGE - 1)
    assert not _record_ok(KEY, "QmPeer", old, now=now)
    assert _record_ok(KEY, "QmPeer", _signed(signed_at=now - 5), now=now)
    future = _signed(signed_at=now + 3600)
    assert not _record_ok(KEY, "QmPeer", future, now=now)


def _served(digest_of: dict[str, torch.Tensor], version: int = 5, key: bytes | None = KEY):
    digest = _state_hash(digest_of)
    names = sorted(digest_of)
    meta = _state_metadata(key, "QmHolder", "fp", names, version, digest)
    return meta, [digest_of[n] for n in names], digest


def test_served_state_must_be_the_one_the_swarm_agreed_on():
    mine = {"param.w": torch.zeros(3), "meta.outer_step": torch.tensor([4])}
    theirs = {"param.w": torch.ones(3), "meta.outer_step": torch.tensor([5])}
    meta, received, digest = _served(theirs)
    ok = _download_problem(KEY, "fp", "QmHolder", meta, received, mine, 5, digest)
    assert ok is None
    # Another digest than the agreed one (the holder moved on, or serves something else).
    assert "not the swarm's" in _download_problem(
        KEY, "fp", "QmHolder", meta, received, mine, 5, "other"
    )
    # Tensors that do not match the digest they came with.
    tampered = [received[0], received[1] * 1000]
    assert "do not match" in _download_problem(
        KEY, "fp", "QmHolder", meta, tampered, mine, 5, digest
    )
    # Metadata signed by someone without the run key, or for another peer.
    forged, _, _ = _served(theirs, key=b"guess")
    assert "signature" in _download_problem(
        KEY, "fp", "QmHolder", forged, received, mine, 5, digest
    )
    assert "signature" in _download_problem(KEY, "fp", "QmThief", meta, received, mine, 5, digest)
    other_names = {"param.v": torch.ones(3), "meta.outer_step": torch.tensor([5])}
    meta2, received2, digest2 = _served(other_names)
    problem = _download_problem(KEY, "fp", "QmHolder", meta2, received2, mine, 5, digest2)
    assert isinstance(problem, ConsistencyError)


def test_the_digest_leaves_out_a_peers_own_step_count_but_a_download_checks_it():
    # On deadline rounds peers that averaged together took other numbers of inner steps.
    shared = {"param.w": torch.ones(3), "meta.outer_step": torch.tensor([5])}
    a = {**shared, "meta.inner_steps": torch.tensor([700])}
    b = {**shared, "meta.inner_steps": torch.tensor([735])}
    assert _state_hash(a) == _state_hash(b)
    assert _state_hash(a) != _state_hash({**a, "param.w": torch.full((3,), 2.0)})
    mine = {**shared, "meta.inner_steps": torch.tensor([0])}
    meta, received, digest = _served(b)
    assert _download_problem(KEY, "fp", "QmHolder", meta, received, mine, 5, digest) is None
    lying = {**shared, "meta.inner_steps": torch.tensor([-1])}
    meta, received, digest = _served(lying)
    problem = _download_problem(KEY, "fp", "QmHolder", meta, received, mine, 5, digest)
    assert "not a count" in problem


def test_join_macs_bind_peer_and_round():
    good = _mac(KEY, "join|QmPeer|prefix.0b101")
    assert good != _mac(KEY, "join|QmPeer|prefix.0b110")  # another round
    assert good != _mac(KEY, "join|QmThief|prefix.0b101")  # another peer
    assert _mac(None, "anything") == ""


# -- what a reducer admits, and how it combines it ------------------------------------------------


def test_norm_bounds_absolute_and_relative_to_this_peers_own_part():
    own = torch.full((100,), 0.1)  # norm 1
    rules = _Admission(max_norm=50.0, norm_ratio=10.0)
    assert rules.problem(own * 5, 100, own) is None
    assert "norm_ratio" in rules.problem(own * 20, 100, own)
    assert "max_norm" in rules.problem(own * 60, 100, None)
    assert "non-finite" in rules.problem(own * float("inf"), 100, own)
    assert "elements" in rules.problem(own[:10], 100, own)
    # A peer whose own part is zero (it sat the round out) has no scale to compare with.
    assert rules.problem(own * 20, 100, torch.zeros(100)) is None


def test_the_relative_bound_grows_with_the_steps_behind_a_part():
    # A peer that took 1 step (deadline rounds, or it just caught up) must not refuse an
    # honest part of 30 steps, whose norm is up to 30 times its own; a scaled-up part of as
    # many steps as its own is still refused, and a claimed weight counts up to the bound.
    own = torch.full((100,), 0.01)
    rules = _Admission(norm_ratio=10.0, max_weight=40.0)
    assert rules.steps_ratio(30.0, 1.0) == 30.0
    assert rules.problem(own * 250, 100, own, rules.steps_ratio(30.0, 1.0)) is None
    assert "scaled by 30" in rules.problem(own * 350, 100, own, rules.steps_ratio(30.0, 1.0))
    assert "norm_ratio" in rules.problem(own * 20, 100, own, rules.steps_ratio(1.0, 1.0))
    assert rules.steps_ratio(1e9, 1.0) == 40.0
    # Fewer steps than ours, an unknown weight or nothing sent by this peer: no scaling.
    assert rules.steps_ratio(1.0, 30.0) < 1
    assert "norm_ratio" in rules.problem(own * 20, 100, own, rules.steps_ratio(1.0, 30.0))
    assert rules.steps_ratio(float("nan"), 1.0) == rules.steps_ratio(5.0, 0.0) == 1.0


def test_weights_count_up_to_the_bound():
    assert _Admission(max_weight=25.0).weight(1e9) == 25.0
    assert _Admission(max_weight=25.0).weight(10.0) == 10.0
    assert _Admission().weight(1e9) == 1e9


def test_the_mean_cannot_overflow_on_large_weights():
    parts = [torch.full((4,), 3e38), torch.full((4,), 1.0)]
    out = _Admission().combine(parts, [1e6, 1e6])
    assert bool(torch.isfinite(out).all())
    torch.testing.assert_close(out, torch.full((4,), 1.5e38))


@pytest.mark.parametrize("rule", ["trimmed_mean", "centered_clip"])
def test_robust_rules_resist_one_scaled_garbage_contribution_of_four(rule):
    g = torch.Generator().manual_seed(0)
    honest = [torch.randn(1000, generator=g) * 0.01 + 1.0 for _ in range(3)]
    garbage = torch.randn(1000, generator=g) * 50.0
    truth = torch.stack(honest).mean(0)
    robust = _Admission(aggregation=rule).combine(honest + [garbage], [1.0] * 4)
    plain = _Admission().combine(honest + [garbage], [1.0] * 4)
    assert float((plain - truth).norm()) > 100 * float((robust - truth).norm())
    assert float((robust - truth).abs().max()) < 0.1


def test_robust_rules_on_honest_contributions_stay_near_the_mean():
    g = torch.Generator().manual_seed(1)
    honest = [torch.randn(1000, generator=g) for _ in range(4)]
    mean = torch.stack(honest).mean(0)
    for rule in ("trimmed_mean", "centered_clip"):
        out = _Admission(aggregation=rule).combine(honest, [1.0] * 4)
        # Unbiased on symmetric noise: within a fraction of the spread of the inputs.
        assert float((out - mean).norm()) < 0.5 * float(torch.stack(honest).std(0).norm())


def test_zero_weight_contributions_are_left_out_by_every_rule():
    parts = [torch.ones(4), torch.full((4,), 1e6)]
    for rule in ("mean", "trimmed_mean", "centered_clip"):
        assert torch.equal(_Admission(aggregation=rule).combine(parts, [1.0, 0.0]), torch.ones(4))
    assert torch.equal(_Admission().combine(parts, [0.0, 0.0]), torch.zeros(4))


def test_a_peer_early_for_a_clock_round_holds_its_group_until_the_start(monkeypatch):
    # Rounds keyed by the clock (DeadlineSchedule): a peer whose last step ended before the
    # round starts counts matchmaking from the start, the same instant on every peer.
    from lowcomm.comm._swarm_averaging import _Rounds
    from lowcomm.comm._swarm_membership import _Peer
    from lowcomm.comm.hivemind import SwarmTimeouts

    me = _Peer("run", "me", None, "prefix", SwarmTimeouts.from_round_seconds(10.0))
    rounds = _Rounds(me, procs=None, stats=None)  # type: ignore[arg-type]
    monkeypatch.setattr(time, "time", lambda: 1004.5)
    assert rounds.early(201) == 0.0  # rounds are step counts: nothing to wait for
    me.round_clock = 5.0
    assert rounds.early(201) == pytest.approx(0.5)  # starts at 1005
    assert rounds.early(200) == 0.0  # started already
    assert rounds.early(202) == 0.0  # 5.5 s ahead, past the matchmaking timeout (3 s)
