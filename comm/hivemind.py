"""hivemind swarm backend: volunteers average pseudo-gradients over a DHT, joining and leaving.

Peers find each other under a run id on a hivemind 1.1.12 DHT. Each outer step every peer
looks for a group keyed by that step (matchmaking with a timeout), and the group runs
hivemind's butterfly all-reduce (each peer reduces a slice: ``2 (N-1)/N`` times the payload
per peer, the ring bound) with lowcomm's compressors as the wire format. A round proceeds
with whoever showed up; a peer that ends up alone keeps its own tensors and learns from the
DHT that it is behind, then downloads the swarm's state (:meth:`HivemindBackend.sync_state`).

Start a swarm::

    from lowcomm.comm.hivemind import HivemindBackend, start_bootstrap_dht
    dht, maddrs = start_bootstrap_dht()             # on a machine others can reach
    backend = HivemindBackend("my-run", initial_peers=maddrs, run_key="secret")
    opt = DiLoCo(model, inner, sync_every=500, backend=backend)

Requires ``pip install lowcomm[hivemind]``; hivemind is imported only when a backend or DHT
is built. hivemind's DHT and averagers are ``multiprocessing`` children that must be forked
(a ``spawn`` start fails with ``cannot pickle '_thread.lock'``); they are tied to the process
that started them (Linux ``PR_SET_PDEATHSIG``), so killing it, even with SIGKILL, takes its
averagers and ``p2pd`` daemon with it.

This module holds the public API and the backend's protocol; the concepts it is built from
live beside it, one module each: ``_swarm_membership`` (heartbeat records, who is live, the
run key's MACs), ``_swarm_state`` (snapshots, digests, the resync rule, state downloads),
``_swarm_averaging`` (a round's wire format, in flight and its result), ``_swarm_timeouts``
(:class:`SwarmTimeouts`), ``_swarm_procs`` (starting and stopping the processes) and
``_hivemind_subclasses`` (the subclasses of hivemind's internals; the only module that
imports hivemind at its top, and only once a backend or DHT is built).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import importlib.metadata
import logging
import math
import signal
import threading
import time
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from lowcomm.comm._swarm_averaging import (
    AGGREGATIONS,
    _Admission,
    _Contribution,
    _Rounds,
    _SwarmWork,
)
from lowcomm.comm._swarm_membership import (
    _TIMEOUTS,
    RunInfo,
    _Membership,
    _parse_info,
    _Peer,
    _run_prefix,
)
from lowcomm.comm._swarm_procs import (
    _FAILURES,
    _make_dht,
    _Processes,
    _sigterm_to_exit,
    _subclasses,
    start_bootstrap_dht,
)
from lowcomm.comm._swarm_state import _is_current, _SharedState
from lowcomm.comm._swarm_timeouts import SwarmTimeouts
from lowcomm.comm.base import DoneWork, WireStats
from lowcomm.comm.reduce import Identity

if TYPE_CHECKING:
    from lowcomm.comm.compression.base import Compressor

__all__ = [
    "HivemindBackend",
    "RunInfo",
    "SwarmTimeouts",
    "fetch_run_info",
    "start_bootstrap_dht",
]

logger = logging.getLogger(__name__)


# -- the backend -------------------------------------------------------------------------------


class HivemindBackend:
    """Averages over a hivemind swarm: peers join, leave and die, and the run goes on.

    Every outer step is a round keyed by the step number. A peer that calls :meth:`average`
    declares itself in the DHT under ``(run, model fingerprint, tensor layout, compressor,
    round)`` and waits up to ``matchmaking_time`` for others; the group that forms runs a
    butterfly all-reduce in which every peer reduces a slice of the vector and sends the same
    averaged bytes back to all, so all members end with bit-identical tensors. The weighted
    mean is ``sum_i w_i dec(C(x_i)) / sum_i w_i`` (then encoded once more for the return trip),
    the arithmetic of :func:`lowcomm.comm.reduce.dense_average`, summed in arrival order.

    Faults: a member killed mid-average makes the all-reduce fail on the others (nobody keeps
    a partial result), who retry the round together until ``matchmaking_timeout``; a peer
    that finds nobody keeps its own tensors (``num_peers=1``; once it has seen no other peer
    for ``peer_ttl`` it stops waiting and such rounds return at once). A peer whose state then
    differs from the swarm's learns so from :meth:`needs_resync` (heartbeats carry each peer's
    state version, recent digests and group sizes) and catches up with :meth:`sync_state`,
    instead of drifting away.

    Call protocol:
        * Construction joins the DHT (bounded by ``start_timeout``); then, as for every
          backend: ``check_consistent(fingerprint)`` once, ``sync_state(state)`` once, then
          ``average`` / ``wait`` per fragment per outer step.
        * ``average(..., step=n)`` names the round; peers only group with peers at the same
          ``n``. Without ``step``, the k-th call for a tensor layout after ``sync_state`` is
          round ``meta.outer_step + k`` (``meta.outer_step`` taken from the synced state, else
          0): right for lockstep peers that call once per outer step.
        * ``publish_state(state)`` after each applied outer step: the snapshot (and its
          version, ``meta.outer_step`` or a count of publishes) that joiners download. Without
          it, joiners get the state as of the last ``sync_state``.
        * ``needs_resync()`` after ``publish_state``: True if this peer is behind or its state
          differs from the swarm's majority at the same version; then call ``sync_state`` again.
        * ``set_round_seconds(seconds)`` when the measured round time is known; every timeout
          follows it (:class:`SwarmTimeouts`). ``set_round_clock(seconds)`` when rounds are
          keyed by the clock.
        * ``close()`` (also at exit and on SIGTERM) shuts the averagers and the DHT down.

    What goes through: dense compressors (``FP16``, ``BF16``, ``Int8``/``Int4``/``Int2``, your
    own with ``dense = True``) byte for byte as their payloads, or fp32 without one. Sparse
    compressors (top-k) need an all-gather, which hivemind's all-reduce does not do: refused
    with ValueError.

    Validation: each reducer checks every incoming part (size, finite values, L2 norm at most
    ``max_norm`` and at most ``norm_ratio`` times its own part's, per inner step behind
    each, weight as declared at matchmaking, counted at most up to the bound :meth:`bound_weights` sets); a bad part
    drops its sender from that reducer's slice from that part on (logged), and every member
    still gets the same bytes. A reducer combines what it accepted by ``aggregation``.
    The drop is per slice: the sender's parts at other reducers still count (the result's
    ``num_peers``/``total_weight`` then report the least complete part). Parts coming back
    are checked too; a bad one fails the round for that member, which then resyncs. A
    non-finite contribution of this peer's own is sent as zeros with weight 0.

    Not supported: sparse compressors; client-mode peers (behind NAT without a relay: every
    peer must accept connections, or use hivemind's relay options via ``announce_maddrs``);
    bandwidth-aware load balancing (slices are equal). Each ``publish_state`` copies the
    state and hashes it (about 0.6 GB/s on one core), and the averagers hold a shared copy
    of each averaged vector. Sums run in arrival order: bit-identical across a group, but
    not the same bits as ``TorchDistBackend``'s rank-order sums.

    Access: with ``run_key`` (a shared secret) every DHT record, join request and group is
    authenticated with an HMAC bound to the sender's libp2p peer id, and state is only served
    to peers with a valid record. Without it anyone who knows the DHT address and the run id
    can join.

    Byte counters (``stats``) count the tensor payload bytes (compressor output) handed to and
    received from other peers in the all-reduce, including the averaged parts sent back; not
    protobuf/libp2p framing, matchmaking, heartbeats or state downloads (``state_bytes``).

    Reference: Ryabinin et al. 2021, "Moshpit SGD: Communication-Efficient Decentralized
    Training on Heterogeneous Unreliable Devices" (the matchmaking and all-reduce), and
    Douillard et al. 2023, "DiLoCo" (what is averaged).

    Args:
        run_id: the run's name; peers with the same ``run_id`` (and ``run_key``) meet.
        initial_peers: multiaddrs of live DHT peers (a ``lowcomm dht`` or any other peer);
            empty to start a new swarm.
        run_key: shared secret of a private run, or None for an open one.
        round_seconds: estimate of one outer round's wall time; the timeouts follow it.
        host_maddrs: where this peer listens (``/ip4/0.0.0.0/tcp/0``: all interfaces, any port).
        announce_maddrs: public addresses to announce (behind NAT).
        start_timeout: seconds to join the DHT before failing with ConnectionError.
        wait_for_peers: the first :meth:`sync_state` returns only once this many peers of the
            run and configuration (this one included) are live, so that a run starts as the
            swarm it is meant to be instead of one peer training alone while the others still
            start (e.g. a benchmark's peers, or a run that should not begin below N machines).
            1 (the default): start at once. Later joins and departures never wait.
        wait_for_peers_timeout: seconds that wait may take before TimeoutError.
        max_norm: refuse a part (of a contribution, or of an average coming back from a
            reducer) whose L2 norm exceeds this (None: no absolute bound).
        norm_ratio: refuse a part whose norm is more than this many times the norm of this
            peer's own part of the same slice (None: no relative bound), scaled up by the
            inner steps behind the part over this peer's own where they are more (a
            pseudo-gradient grows at most linearly with its steps: a peer that took 1 step
            in a deadline round does not refuse one that took 30). Scale-free, so it needs
            no tuning per model: honest pseudo-gradients of one model and config have norms
            of one scale per step. The default, 10, stops scaled-up contributions and a
            reducer that returns a scaled mean.
        aggregation: how each reducer combines the parts it accepted: ``"mean"`` (weighted;
            the default), ``"trimmed_mean"`` (per coordinate, the largest and smallest
            quarter dropped, unweighted) or ``"centered_clip"`` (centered clipping around
            the coordinate-wise median: Karimireddy et al. 2021, "Learning from History for
            Byzantine Robust Optimization"; used by BTARD, Gorbunov et al. 2022). The robust
            rules are for swarms whose peers are not all trusted; every peer of a run must
            use the same rule.
        handle_sigterm: turn SIGTERM into ``SystemExit`` (so ``close`` runs) when this is
            the main thread and no other SIGTERM handler is installed.
        run_info: a JSON text describing the run (the recipe publishes its config) that this
            peer publishes, signed, beside its heartbeat, with its lowcomm version, so that a
            volunteer can join by address alone (:func:`fetch_run_info`). None: nothing.

    Attributes:
        stats: wire counters (:class:`~lowcomm.comm.base.WireStats`).
        state_bytes: bytes of state downloaded by :meth:`sync_state`.
        last_num_peers: peers in the last average (this one included).
        timeouts: the current :class:`SwarmTimeouts`.
        maddrs: this peer's own multiaddrs (others can use them as ``initial_peers``).
    """

    elastic = True

    def __init__(
        self,
        run_id: str,
        initial_peers: Sequence[str] = (),
        *,
        run_key: str | bytes | None = None,
        round_seconds: float = 60.0,
        host_maddrs: Sequence[str] = ("/ip4/0.0.0.0/tcp/0",),
        announce_maddrs: Sequence[str] | None = None,
        start_timeout: float = 60.0,
        max_norm: float | None = None,
        norm_ratio: float | None = 10.0,
        aggregation: str = "mean",
        handle_sigterm: bool = True,
        run_info: str | None = None,
        wait_for_peers: int = 1,
        wait_for_peers_timeout: float = 600.0,
    ) -> None:
        if not isinstance(run_id, str) or not run_id:
            raise ValueError(f"run_id ({run_id!r}) must be a non-empty string")
        if isinstance(wait_for_peers, bool) or not isinstance(wait_for_peers, int):
            raise ValueError(f"wait_for_peers ({wait_for_peers!r}) must be an int >= 1")
        if wait_for_peers < 1:
            raise ValueError(f"wait_for_peers ({wait_for_peers}) must be >= 1")
        if not (wait_for_peers_timeout > 0 and math.isfinite(wait_for_peers_timeout)):
            raise ValueError(
                f"wait_for_peers_timeout ({wait_for_peers_timeout}) must be a positive number"
            )
        if isinstance(initial_peers, str):
            initial_peers = [initial_peers]
        if max_norm is not None and not (max_norm > 0 and math.isfinite(max_norm)):
            raise ValueError(f"max_norm ({max_norm}) must be a positive finite number or None")
        if norm_ratio is not None and not (norm_ratio >= 1 and math.isfinite(norm_ratio)):
            raise ValueError(f"norm_ratio ({norm_ratio}) must be a finite number >= 1 or None")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation ({aggregation!r}) must be one of {AGGREGATIONS}")
        self.run_id = run_id
        timeouts = SwarmTimeouts.from_round_seconds(round_seconds)
        self.max_norm = max_norm
        self.wait_for_peers = wait_for_peers
        self.wait_for_peers_timeout = float(wait_for_peers_timeout)
        key = (run_key.encode() if isinstance(run_key, str) else run_key) or None
        self.stats = WireStats()
        self._closed = False
        self._previous_sigterm: Any = None

        dht = _make_dht(list(initial_peers), host_maddrs, announce_maddrs, start_timeout)
        try:
            peer = str(dht.peer_id)
            self.maddrs = [str(m) for m in dht.get_visible_maddrs()]
        except BaseException:
            dht.shutdown()
            raise
        # The run key goes into every DHT key, so a stranger without it cannot even find them.
        me = _Peer(run_id, peer, key, _run_prefix(run_id, key), timeouts)
        me.run_info, me.version = run_info, lowcomm_version()
        me.admission = _Admission(max_norm, norm_ratio, None, aggregation)
        self._me = me
        self._procs = _Processes(self, dht, me.lock, run_key=key, peers_key=me.records_key)
        self._state = _SharedState(me, self._procs)
        self._rounds = _Rounds(me, self._procs, self.stats)
        self._members = _Membership(me, dht, self._state, self._rounds)
        atexit.register(_close_at_exit, weakref.ref(self))
        if handle_sigterm:
            self._previous_sigterm = _sigterm_to_exit()
        logger.info(
            "hivemind peer %s joined run %r; others can join through %s",
            me.id,
            run_id,
            self.maddrs,
        )

    # -- Backend protocol: identity ------------------------------------------------------------

    @property
    def rank(self) -> int:
        """0: every swarm peer is a full copy (no peer is special)."""
        return 0

    @property
    def world_size(self) -> int:
        """Live peers of this run and configuration (this one included), per the last heartbeat."""
        return self._members.num_live()

    @property
    def peer_id(self) -> str:
        """This peer's libp2p id."""
        return self._me.id

    @property
    def timeouts(self) -> SwarmTimeouts:
        """The current timeouts (:meth:`set_round_seconds` re-derives them)."""
        return self._me.timeouts

    @property
    def last_num_peers(self) -> int:
        """Peers in the last average (this one included)."""
        return self._rounds.last_num_peers

    @property
    def state_bytes(self) -> int:
        """Bytes of state downloaded by :meth:`sync_state`."""
        return self._state.bytes_downloaded

    # -- Backend protocol: consistency and state -----------------------------------------------

    def check_consistent(self, fingerprint: str) -> None:
        """Refuse to join a run whose live peers have another model or config.

        Reads the run's heartbeat records before and after publishing this peer's, so two
        peers starting together also see each other.

        The rules this peer's reducers apply (norm bounds, weight bound, aggregation) are
        part of what must match: peers that would combine the same parts differently never
        group.

        Raises:
            ConsistencyError: a live peer of this run has a different ``fingerprint`` or
                other rules.
        """
        self._check_open()
        rules = hashlib.sha256(repr(self._me.admission).encode()).hexdigest()[:8]
        self._members.join(f"{fingerprint}+{rules}")

    def sync_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Make ``tensors`` equal (in place, bit for bit) to the swarm's state, if it has one.

        The reference is the newest state that a strict majority of the other live peers
        hold (the one live peer, if there is only one; see ``_resync_plan`` for the rule when
        this peer diverged). On clock-keyed rounds (:meth:`set_round_clock`), a peer whose
        state is more than two rounds behind the clock (it was stopped, or its rounds
        finished late) counts only the peers that are current: it follows the state that
        most of them hold and keep, even when they are fewer than the peers behind. If this peer already holds it, or no other peer is alive,
        ``tensors`` are kept. Otherwise exactly that state (its digest) is downloaded from a
        peer serving it, preferring peers that are not mid-average; when its holders move on
        meanwhile, the plan is made again, for up to the wait timeout. Either way ``tensors``
        become this peer's served state (as :meth:`publish_state`). One peer that advertises
        a far newer version cannot make the others adopt its state, as long as honest peers
        are the majority.

        Args:
            tensors: every tensor to make equal: ``"param.*"``, outer optimizer state, and
                ``"meta.outer_step"`` (a 1-element integer tensor, the state's version).

        Raises:
            ConsistencyError: the downloaded state has other names, shapes or dtypes.
        """
        self._check_open()
        members, state = self._members, self._state
        first = not members.heartbeat_started or not state.history
        state.take_snapshot(tensors)
        state.server()  # from now on this peer serves its state to joiners
        refresh = "publishing and reading the run's records"
        if first and self.wait_for_peers > 1:
            records = members.await_peers(self.wait_for_peers, self.wait_for_peers_timeout)
        else:
            records = members.patiently(refresh, members.refresh)
        if first and len(records) <= 1:
            # Peers started together may not have published yet: give them one heartbeat.
            time.sleep(min(self.timeouts.heartbeat_period, 2.0))
            records = members.patiently(refresh, members.refresh)
        members.start_heartbeat()
        plan = state.plan(records)
        clock = self._me.round_clock
        if first and plan is None and clock is not None:
            # A first state that nobody's replaces (the swarm's first peer, or one that
            # agrees with the others): it is current now.
            with self._me.lock:
                state.round = max(state.round, math.floor(time.time() / clock))
        deadline = time.monotonic() + self.timeouts.wait_timeout
        tried: list[str] = []
        while plan is not None:
            version, digest, candidates = plan
            if not all(records[p].busy for p in candidates) or time.monotonic() > deadline:
                rounds = {p: records[p].round for p in candidates if p in records}
                if state.download(tensors, version, digest, candidates, rounds):
                    self._rounds.last_round = -1  # its own rounds were on the state replaced
                    with contextlib.suppress(*_FAILURES):
                        members.publish()
                    break
                tried = candidates
            if time.monotonic() > deadline:
                logger.warning(
                    "hivemind run %r: could not download the swarm's state (version %d) from "
                    "%s; keeping this peer's own (needs_resync() stays True)",
                    self.run_id,
                    version,
                    tried,
                )
                break
            # Every holder is mid-average (its snapshot is about to be a round old), or the
            # holders moved on between the plan and the download: look again.
            time.sleep(0.2)
            with contextlib.suppress(*_TIMEOUTS):  # one slow read: the last ones still hold
                records = members.read()
                members.set_records(records)
            plan = state.plan(records)
        step = tensors.get("meta.outer_step")
        self._rounds.restart(int(step.reshape(-1)[0]) if step is not None else state.version)

    def publish_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Serve a snapshot of ``tensors`` to joiners; call after each applied outer step.

        The snapshot's version is ``meta.outer_step`` when present, else the count of
        publishes; its digest goes into this peer's heartbeat for :meth:`needs_resync`.
        """
        self._check_open()
        # The state holds the work of the rounds it was built from and of this peer's since.
        state = self._state
        newest = max(state.round, self._rounds.last_round)
        state.take_snapshot(tensors, bump=True, peers=self.last_num_peers, round=newest)
        with contextlib.suppress(*_FAILURES):
            self._members.publish()

    def needs_resync(self) -> bool:
        """True if this peer is behind the swarm or its state differs from the swarm's.

        Behind: a live peer serves a higher version. Different: at some version both hold,
        most live peers (ties: the highest peer id) hold another digest, e.g. after this peer
        averaged alone. Call :meth:`sync_state` with the full state when True.
        """
        self._check_open()
        try:
            records = self._members.refresh()
        except _FAILURES as e:
            logger.debug("hivemind needs_resync: DHT read failed: %r", e)
            return False
        return self._state.plan(records) is not None

    # -- Backend protocol: averaging -----------------------------------------------------------

    def check_compressor(self, compressor: Compressor | None) -> None:
        """Refuse sparse compressors: hivemind's all-reduce sums dense slices.

        Raises:
            ValueError: ``compressor`` is sparse (top-k).
        """
        if compressor is not None and not getattr(compressor, "dense", False):
            raise ValueError(
                f"{type(compressor).__name__} is a sparse compressor: hivemind's all-reduce sums "
                f"dense slices and cannot average sparse payloads. Use a dense one (fp16, bf16, "
                f"int8, int4, int2) with HivemindBackend, or TorchDistBackend for top-k"
            )

    def average(
        self,
        flat: torch.Tensor,
        *,
        weight: float = 1.0,
        compressor: Compressor | None = None,
        step: int | None = None,
    ) -> _SwarmWork | DoneWork:
        """Start a weighted average with whoever comes to this round.

        Args:
            flat: this peer's 1-D fp32 contribution; the same length on every peer.
            weight: this peer's weight (inner steps or samples it did); >= 0.
            compressor: a dense compressor for the wire; None sends fp32.
            step: the round (e.g. the global outer step, or the inner step the sync started
                at); peers group only within the same round. None: see the class docstring.

        Raises:
            ValueError: bad weight, an empty tensor, or a sparse compressor.
        """
        self._check_open()
        if not (weight >= 0 and math.isfinite(weight)):
            raise ValueError(f"weight ({weight}) must be a finite number >= 0")
        if flat.numel() == 0:
            raise ValueError("average() needs a non-empty tensor")
        self.check_compressor(compressor)
        codec: Compressor = compressor if compressor is not None else Identity()
        contribution = _Contribution.of(flat, weight, codec)
        round_id, slot = self._rounds.open(contribution, step)
        contribution.counts_round = self._base_counts(round_id)
        if self._members.alone_for() > self.timeouts.peer_ttl:
            # Nobody else has been alive for a while: no reason to wait out the matchmaking
            # timeout. (Right after start, others' records may just not be visible yet.)
            with contextlib.suppress(*_FAILURES):
                self._members.refresh()
            if self._members.alone_for() > self.timeouts.peer_ttl:
                return self._rounds.alone(contribution, round_id)
        work = self._rounds.start(slot, round_id, contribution)
        if isinstance(work, _SwarmWork):
            with contextlib.suppress(*_FAILURES):
                self._members.publish()  # busy: joiners prefer peers that are not mid-average
        return work

    def _base_counts(self, round_id: int) -> bool:
        """Whether round ``round_id`` makes this peer's state current (clock-keyed rounds):
        the state it starts from is current, or no live peer's is (a swarm that was stopped
        as a whole goes on from where it is). A round averaged on a state the others left
        rounds ago, e.g. one that took long to download, leaves the state behind: the next
        look makes the peer follow the current ones (``_resync_plan``)."""
        if self._me.round_clock is None:
            return True
        with self._me.lock:
            base = max(self._state.round, self._rounds.last_round)
            others = [r for p, r in self._members.records.items() if p != self._me.id]
        if _is_current(base, round_id):
            return True
        return not any(r.digest and _is_current(r.round, round_id) for r in others)

    def bound_weights(self, max_weight: float) -> None:
        """Count every contribution with a weight of at most ``max_weight`` from the next
        round on (DiLoCo sets it to the inner steps a round can hold): a peer declaring a
        huge weight cannot make the average its own vector.

        Raises:
            ValueError: ``max_weight`` is not a positive finite number.
        """
        if not (max_weight > 0 and math.isfinite(max_weight)):
            raise ValueError(f"max_weight ({max_weight}) must be a positive finite number")
        admission = self._me.admission
        self._me.admission = _Admission(
            admission.max_norm, admission.norm_ratio, float(max_weight), admission.aggregation
        )

    def set_round_clock(self, seconds_per_round: float | None) -> None:
        """Say that rounds are keyed by the clock: round ``k`` starts at ``k *
        seconds_per_round`` (epoch seconds), as :class:`~lowcomm.DeadlineSchedule` keys them
        (DiLoCo calls this). A peer that comes to such a round before it starts (at most
        ``matchmaking_timeout`` before) holds its group open until the start plus
        ``matchmaking_time``, the same instant on every peer: they all pick the same leader,
        and a peer whose last step ends just before the start still finds the group.
        None: rounds are step counts (the default).

        Raises:
            ValueError: ``seconds_per_round`` is not a positive finite number or None.
        """
        if seconds_per_round is not None and not (
            seconds_per_round > 0 and math.isfinite(seconds_per_round)
        ):
            raise ValueError(f"seconds_per_round ({seconds_per_round}) must be a positive number")
        self._me.round_clock = seconds_per_round

    def set_round_seconds(self, round_seconds: float) -> None:
        """Re-derive every timeout from a measured round time (:class:`SwarmTimeouts`)."""
        self._me.timeouts = SwarmTimeouts.from_round_seconds(round_seconds)
        self._rounds.reconfigure(self._me.timeouts)

    # -- lifecycle -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("HivemindBackend is closed")

    def close(self) -> None:
        """Leave the swarm: withdraw the heartbeat, stop the averagers and the DHT. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._members.leave()
        self._procs.close()
        if self._previous_sigterm is not None and (
            threading.current_thread() is threading.main_thread()
        ):
            with contextlib.suppress(*_FAILURES):
                signal.signal(signal.SIGTERM, self._previous_sigterm)

    def __enter__(self) -> HivemindBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close_at_exit(ref: weakref.ref[HivemindBackend]) -> None:
    backend = ref()
    if backend is not None:
        with contextlib.suppress(*_FAILURES):
            backend.close()


def lowcomm_version() -> str:
    """The installed lowcomm's version (what peers compare before they train together)."""
    try:
        return importlib.metadata.version("lowcomm")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a source tree only
        return "0+unknown"


def fetch_run_info(
    run_id: str,
    initial_peers: Sequence[str],
    *,
    run_key: str | bytes | None = None,
    host_maddrs: Sequence[str] = ("/ip4/0.0.0.0/tcp/0",),
    announce_maddrs: Sequence[str] | None = None,
    timeout: float = 30.0,
    start_timeout: float = 60.0,
) -> list[RunInfo]:
    """What the live peers of ``run_id`` publish about it (their :class:`RunInfo`).

    Joins the DHT briefly (a client of its own, shut down before returning) and reads the
    run's info entries, keeping only those signed for their peer with ``run_key`` (when the
    run has one) and signed recently. Looks again for up to ``timeout`` seconds while none is
    found (records of peers that just started may not be visible yet). Starting the DHT
    client has its own bound, ``start_timeout`` (as :class:`HivemindBackend`'s): a short
    look must not also cut short a start that a loaded machine makes slow.

    Returns:
        One entry per live peer that publishes run info; empty if none does.

    Raises:
        ConnectionError: the DHT client did not start within ``start_timeout`` seconds.
    """
    key = (run_key.encode() if isinstance(run_key, str) else run_key) or None
    info_key = f"{_run_prefix(run_id, key)}_info"
    dht = _make_dht(list(initial_peers), host_maddrs, announce_maddrs, start_timeout)
    try:
        peer_id = _subclasses().PeerID
        deadline = time.monotonic() + timeout
        while True:
            found = dht.get(info_key, latest=True)
            infos = []
            if found is not None and isinstance(found.value, dict):
                for subkey, entry in found.value.items():
                    with contextlib.suppress(Exception):
                        info = _parse_info(key, str(peer_id(subkey)), entry.value)
                        if info is not None:
                            infos.append(info)
            if infos or time.monotonic() > deadline:
                return sorted(infos, key=lambda i: i.peer)
            time.sleep(1.0)
    finally:
        dht.shutdown()
