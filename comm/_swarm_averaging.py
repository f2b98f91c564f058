"""Averaging in a swarm: rounds, matchmaking, and what a group's all-reduce gives back.

Every outer step is a round. :class:`_Rounds` numbers the rounds, keeps one averager process
per slot of averages in flight, and asks it to find a group for the round (matchmaking
keyed by the round, a join MAC bound to the run key); :class:`_SwarmWork` waits for that
group's butterfly all-reduce and turns its summary into an
:class:`~lowcomm.comm.base.AverageResult` (:func:`_group_result`), or, when nobody else came,
into this peer's own (:meth:`_Contribution.alone`). The wire format's helpers live here too:
one encode per contribution (:func:`_roundtrip`), decoding a part (:func:`_decode`), and
:class:`_Admission`: the checks every part passes on its way into and back out of an
average, and the rule that combines the accepted ones, used by the all-reduce in
:mod:`lowcomm.comm._hivemind_subclasses`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lowcomm.comm._swarm_membership import _PROTOCOL, _mac
from lowcomm.comm._swarm_procs import _FAILURES
from lowcomm.comm.base import AverageResult, DoneWork, Timer
from lowcomm.comm.compression.base import Payload
from lowcomm.comm.reduce import Identity

if TYPE_CHECKING:
    from lowcomm.comm._swarm_membership import _Peer
    from lowcomm.comm._swarm_procs import _Processes
    from lowcomm.comm._swarm_timeouts import SwarmTimeouts
    from lowcomm.comm.base import WireStats
    from lowcomm.comm.compression.base import Compressor

# The backend's own logger, whichever of its modules the message comes from.
logger = logging.getLogger("lowcomm.comm.hivemind")


def _codec_spec(codec: Compressor) -> str:
    if isinstance(codec, Identity):
        return "none"
    try:
        from lowcomm.comm.compression.registry import compression_spec

        return str(compression_spec(codec))
    except Exception:  # a user's own compressor: its repr must identify it
        return f"{type(codec).__module__}.{type(codec).__qualname__}:{codec!r}"


def _roundtrip(codec: Compressor, flat: torch.Tensor) -> torch.Tensor:
    if isinstance(codec, Identity) or flat.numel() == 0:
        return flat.clone()
    return codec.decompress(codec.compress(flat)).to(torch.float32)


def _decode(codec: Compressor, buffer: bytes, numel: int) -> torch.Tensor:
    data = torch.frombuffer(bytearray(buffer), dtype=torch.uint8) if buffer else torch.empty(0)
    return codec.decompress(Payload(data.to(torch.uint8), numel)).to(torch.float32)


AGGREGATIONS = ("mean", "trimmed_mean", "centered_clip")


@dataclass(frozen=True)
class _Admission:
    """What a reducer accepts into a part of the average, and how it combines what it took.

    Attributes:
        max_norm: a part whose L2 norm exceeds this is refused (None: no absolute bound).
        norm_ratio: a part more than this many times the norm of the receiver's own part
            of the same slice is refused (None: no relative bound), that norm first scaled
            by ``max(1, w_sender / w_own)``: honest pseudo-gradients of one model have norms
            of one scale per inner step, and a pseudo-gradient grows at most linearly in the
            steps it holds, so a peer that took 30 steps is not refused by one that took 1
            (deadline rounds, a peer that just caught up). A scaled-up one is refused.
        max_weight: a contribution counts with at most this weight (None: as declared).
        aggregation: ``"mean"`` (weighted), ``"trimmed_mean"`` (per coordinate, the largest
            and smallest quarter dropped) or ``"centered_clip"`` (Karimireddy et al. 2021;
            BTARD, Gorbunov et al. 2022).
    """

    max_norm: float | None = None
    norm_ratio: float | None = None
    max_weight: float | None = None
    aggregation: str = "mean"

    def problem(
        self,
        part: torch.Tensor,
        numel: int,
        reference: torch.Tensor | None,
        steps_ratio: float = 1.0,
    ) -> str | None:
        """Why ``part`` must not enter (or come back from) an average, or None if it may.

        ``reference`` is this peer's own part of the same slice (None: not known);
        ``steps_ratio`` is the weight (inner steps) behind ``part`` over this peer's own, at
        least 1 where it counts: the relative bound grows with it.
        """
        if part.dtype != torch.float32 or part.numel() != numel:
            return f"dtype {part.dtype} and {part.numel()} elements (expected float32, {numel})"
        if not bool(torch.isfinite(part).all()):
            return "non-finite values (NaN/Inf)"
        norm = float(part.norm())
        # Quantization moves a norm by far less than this slack.
        if self.max_norm is not None and norm > self.max_norm * 1.01:
            return f"L2 norm {norm:.4g} above max_norm {self.max_norm:.4g}"
        if self.norm_ratio is not None and reference is not None:
            own = float(reference.float().norm())
            scale = max(1.0, steps_ratio) if math.isfinite(steps_ratio) else 1.0
            if own > 0 and norm > self.norm_ratio * own * scale:
                per = f" scaled by {scale:.3g} for the steps behind each" if scale > 1 else ""
                return (
                    f"L2 norm {norm:.4g}, more than norm_ratio ({self.norm_ratio:g}) times this "
                    f"peer's own part ({own:.4g}{per})"
                )
        return None

    def steps_ratio(self, weight: float | None, own_weight: float) -> float:
        """The steps behind a part over this peer's own (``own_weight``): ``weight`` is a
        sender's declared weight or an average's total weight, counted at most up to the
        bound; 1 where either is unknown or this peer sent nothing. :meth:`problem` scales
        its relative norm bound by it."""
        mine = self.weight(own_weight)
        if weight is None or not math.isfinite(weight) or not mine > 0:
            return 1.0
        return self.weight(weight) / mine

    def weight(self, declared: float) -> float:
        """The weight a contribution declared as ``declared`` counts with."""
        return declared if self.max_weight is None else min(declared, self.max_weight)

    def combine(self, parts: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
        """The aggregate of ``parts`` (weight-0 parts left out); zeros if none is left."""
        kept = [(p, w) for p, w in zip(parts, weights) if w > 0]
        if not kept:
            return torch.zeros_like(parts[0])
        if self.aggregation == "trimmed_mean":
            return _trimmed_mean(torch.stack([p for p, _ in kept]))
        if self.aggregation == "centered_clip":
            return _centered_clip([p for p, _ in kept], [w for _, w in kept])
        return _weighted_mean([p for p, _ in kept], [w for _, w in kept])


def _weighted_mean(parts: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    # Weights scaled by the largest before the sum: see lowcomm.comm.reduce.
    top = max(weights)
    acc = torch.zeros_like(parts[0], dtype=torch.float32)
    total = 0.0
    for p, w in zip(parts, weights):
        acc.add_(p, alpha=w / top)
        total += w / top
    return acc.div_(total)


def _trimmed_mean(stacked: torch.Tensor) -> torch.Tensor:
    """Per coordinate, the mean of what is left once the largest and smallest quarter (at
    least one each from 3 contributions on) are dropped; the median below 3."""
    count = stacked.shape[0]
    if count < 3:
        return stacked.median(dim=0).values if count == 2 else stacked[0].clone()
    cut = max(1, count // 4)
    ordered = stacked.sort(dim=0).values
    return ordered[cut : count - cut].mean(dim=0)


def _centered_clip(
    parts: list[torch.Tensor], weights: list[float], rounds: int = 3
) -> torch.Tensor:
    """Centered clipping: start at the coordinate-wise median, then move towards each
    contribution by at most ``tau`` (the median distance to the centre), weighted."""
    stacked = torch.stack(parts)
    centre = stacked.median(dim=0).values
    total = sum(weights)
    for _ in range(rounds):
        diffs = stacked - centre
        norms = diffs.flatten(1).norm(dim=1)
        tau = float(norms.median())
        if tau == 0:
            break
        scale = torch.clamp(tau / norms.clamp_min(1e-30), max=1.0)
        w = torch.tensor(weights, dtype=stacked.dtype) / total
        centre = centre + (diffs * (scale * w).view(-1, *([1] * (stacked.dim() - 1)))).sum(0)
    return centre


# -- round results ---------------------------------------------------------------------------


@dataclass
class _Contribution:
    """This peer's part of one round: one flat fp32 vector, its weight, and its wire format."""

    flat: torch.Tensor
    device: torch.device
    weight: float
    codec: Compressor
    # Whether the round makes this peer's state current (see _Rounds.finish): False when
    # the state it started from was behind the clock while others were current.
    counts_round: bool = True

    @classmethod
    def of(cls, flat: torch.Tensor, weight: float, codec: Compressor) -> _Contribution:
        """``flat`` on the host; a non-finite one becomes zeros of weight 0."""
        device = flat.device
        flat = flat.detach().reshape(-1).to("cpu", torch.float32)
        if not bool(torch.isfinite(flat).all()):
            logger.warning("hivemind: non-finite contribution; sending zeros with weight 0")
            flat = torch.zeros_like(flat)
            weight = 0.0
        return cls(flat, device, weight, codec)

    @property
    def layout(self) -> tuple[int, str]:
        """What peers must share to average together: vector size and compressor."""
        return self.flat.numel(), _codec_spec(self.codec)

    def own(self) -> torch.Tensor:
        """What the others decode of this contribution (its averager encodes it once more,
        in its own process; the values are the same)."""
        if self.weight <= 0:
            return torch.zeros_like(self.flat)
        return _roundtrip(self.codec, self.flat)

    def alone(self) -> AverageResult:
        """The result of a round this peer averaged by itself."""
        # The same encode/decode as a real average of one, so error feedback stays right.
        own = self.own()
        mean = _roundtrip(self.codec, own)
        used = float(self.weight) if self.weight > 0 else 0.0
        return AverageResult(
            mean.to(self.device), own.to(self.device), 1 if used > 0 else 0, used, used
        )


def _group_result(
    summary: dict[str, Any], out: torch.Tensor, contribution: _Contribution, round_id: int
) -> AverageResult:
    """The result of a group's all-reduce (``out``), from the averager's summary of it."""
    parts = summary.get("part_stats") or [(summary["declared_weight"], summary["group_size"])]
    total = min(float(w) for w, _ in parts)
    complete = all(
        math.isclose(float(w), summary["declared_weight"], rel_tol=1e-9, abs_tol=1e-12)
        for w, _ in parts
    )
    num_peers = summary["positive_peers"] if complete else min(int(c) for _, c in parts)
    if not complete:
        logger.warning(
            "hivemind round %d: some contributions were dropped from parts of the average "
            "(%s); total weight %.4g of %.4g declared",
            round_id,
            "; ".join(summary.get("dropped", [])) or "a peer failed mid-average",
            total,
            summary["declared_weight"],
        )
    return AverageResult(
        out.to(contribution.device),
        contribution.own().to(contribution.device),
        num_peers,
        total,
        float(contribution.weight),
        int(summary["bytes_sent"]),
        int(summary["bytes_received"]),
    )


# -- rounds ------------------------------------------------------------------------------------


class _SwarmWork:
    """An average in flight in a hivemind averager process."""

    def __init__(
        self,
        rounds: _Rounds,
        slot: tuple[Any, ...],
        averager: Any,
        control: Any,
        contribution: _Contribution,
        round_id: int,
        early: float = 0.0,
    ) -> None:
        self._rounds = rounds
        self._slot = slot
        self._averager = averager
        self._control = control
        self._contribution = contribution
        self._round = round_id
        self._early = early  # seconds the group waits for the round's start
        self._result: AverageResult | None = None

    def wait(self) -> AverageResult:
        if self._result is not None:
            return self._result
        rounds = self._rounds
        summary = None
        with Timer(rounds.stats):
            try:
                timeout = rounds.timeouts.wait_timeout + self._early
                summary = self._control.result(timeout=timeout)
            except _FAILURES as e:
                reason = str(e) or type(e).__name__
                if "could not find a group" in reason:
                    reason = "nobody else came to this round within the matchmaking timeout"
                logger.info("hivemind round %d: averaging alone (%s)", self._round, reason)
                if not self._control.done():
                    # The averager is wedged (it outlived every timeout): replace it.
                    with contextlib.suppress(*_FAILURES):
                        self._control.cancel()
                    rounds.discard(self._slot)
            if summary is not None:
                with self._averager.get_tensors() as buffers:
                    out = buffers[0].clone()
        if summary is None:
            self._result = self._contribution.alone()
        else:
            self._result = _group_result(summary, out, self._contribution, self._round)
        rounds.finish(self._slot, self._result, self._round, self._contribution.counts_round)
        return self._result


class _Rounds:
    """This peer's rounds: which round an average joins, its averager, what is in flight.

    Each average runs in an averager process of its own slot: ``(vector size, compressor,
    index among the averages of that layout in flight)``, so that averages in flight at once
    (fragments, overlap) never share one. Without an explicit ``step``, the k-th average of a
    layout since :meth:`restart` is round ``round_base + k``.
    """

    def __init__(self, me: _Peer, procs: _Processes, stats: WireStats) -> None:
        self._me = me
        self._procs = procs
        self.stats = stats
        self.busy = 0  # averages started and not yet finished
        self.last_num_peers = 1
        # The newest round key this peer contributed to with a weight, from a current state
        # (-1: none yet); a round sat out (weight 0) adds nothing of this peer's to the state.
        self.last_round = -1
        self._inflight: dict[tuple[Any, ...], _SwarmWork] = {}
        self._averagers: dict[tuple[Any, ...], Any] = {}
        self._calls: dict[tuple[Any, ...], int] = {}
        self._round_base = 0

    @property
    def timeouts(self) -> SwarmTimeouts:
        return self._me.timeouts

    def restart(self, round_base: int) -> None:
        """Number the rounds of every layout from ``round_base`` again (after a state sync)."""
        self._round_base = round_base
        with self._me.lock:
            self._calls.clear()

    def open(self, contribution: _Contribution, step: int | None) -> tuple[int, tuple[Any, ...]]:
        """``(round, slot)`` of a new average, which counts as busy until :meth:`finish`.

        Raises:
            ValueError: ``step`` is negative.
        """
        layout = contribution.layout
        with self._me.lock:
            if step is None:
                round_id = self._round_base + self._calls.get(layout, 0)
            else:
                round_id = int(step)
            if round_id < 0:
                raise ValueError(f"step ({round_id}) must be >= 0")
            self._calls[layout] = self._calls.get(layout, 0) + 1
            slot_index = sum(1 for s in self._inflight if s[:2] == layout)
            self.busy += 1
        return round_id, (*layout, slot_index)

    def alone(self, contribution: _Contribution, round_id: int) -> DoneWork:
        """Finish round ``round_id`` (opened by :meth:`open`) with this peer's own
        contribution."""
        result = contribution.alone()
        self.finish(None, result, round_id, contribution.counts_round)
        return DoneWork(result)

    def start(
        self, slot: tuple[Any, ...], round_id: int, contribution: _Contribution
    ) -> _SwarmWork | DoneWork:
        """Look for a group for ``round_id`` in the slot's averager; alone if that fails."""
        me = self._me
        try:
            averager = self._averager_for(slot, contribution)
            with averager.get_tensors() as buffers:
                buffers[0].copy_(contribution.flat)
            mac = _mac(me.key, f"join|{me.id}|{averager.prefix}.0b{round_id:b}")
            weight = float(contribution.weight)
            early = self.early(round_id)
            control = averager.lowcomm_step(
                f"{round_id:b}",
                weight,
                {"p": _PROTOCOL, "w": weight, "mac": mac},
                me.admission,
                timeout=me.timeouts.matchmaking_timeout,
                init_timeout=me.timeouts.start_timeout,
                early=early,
            )
        except _FAILURES as e:
            logger.warning("hivemind round %d: could not start averaging (%s)", round_id, e)
            self.discard(slot)
            return self.alone(contribution, round_id)
        work = _SwarmWork(self, slot, averager, control, contribution, round_id, early)
        with me.lock:
            self._inflight[slot] = work
        return work

    def early(self, round_id: int) -> float:
        """Seconds before round ``round_id`` starts, when rounds are keyed by the clock and
        it starts within the matchmaking timeout (else 0). Every peer that comes early
        holds its group open until the start plus ``matchmaking_time``: the same instant on
        every peer, so they all pick the same leader instead of forming groups of their
        own, and a peer whose last step ends just before the start still finds the group."""
        clock = self._me.round_clock
        if clock is None:
            return 0.0
        ahead = round_id * clock - time.time()
        return ahead if 0.0 < ahead <= self._me.timeouts.matchmaking_timeout else 0.0

    def finish(
        self,
        slot: tuple[Any, ...] | None,
        result: AverageResult,
        round_id: int,
        counts: bool = True,
    ) -> None:
        """Round ``round_id`` is done. It moves :attr:`last_round` if this peer's part had a
        weight and ``counts`` (its state was current when the round started)."""
        with self._me.lock:
            if slot is not None:
                self._inflight.pop(slot, None)
            self.busy = max(0, self.busy - 1)
            self.last_num_peers = result.num_peers
            if result.own_weight > 0 and counts:
                self.last_round = max(self.last_round, round_id)
        self.stats.record(result.bytes_sent, result.bytes_received)

    def reconfigure(self, timeouts: SwarmTimeouts) -> None:
        """Push ``timeouts`` into every running averager."""
        with self._me.lock:
            averagers = list(self._averagers.values())
        for averager in averagers:
            try:
                averager.lowcomm_configure(timeouts, wait=10.0)
            except _FAILURES as e:
                logger.debug("hivemind: could not reconfigure an averager: %r", e)

    def _averager_for(self, slot: tuple[Any, ...], contribution: _Contribution) -> Any:
        me = self._me
        with me.lock:
            averager = self._averagers.get(slot)
        if averager is not None and averager.is_alive():
            return averager
        if averager is not None:
            self.discard(slot)
        tag = hashlib.sha256(repr((me.fingerprint, slot)).encode()).hexdigest()[:12]
        averager = self._procs.start_averager(
            f"{me.prefix}{tag}", contribution.flat.numel(), contribution.codec, me.timeouts
        )
        with me.lock:
            self._averagers[slot] = averager
        return averager

    def discard(self, slot: tuple[Any, ...]) -> None:
        """Stop the slot's averager (a new one starts with the slot's next average)."""
        with self._me.lock:
            averager = self._averagers.pop(slot, None)
        if averager is not None:
            self._procs.stop_averager(averager)
