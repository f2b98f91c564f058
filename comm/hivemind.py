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
import logging
import math
import signal
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from lowcomm.comm._swarm_averaging import _alone_result, _codec_spec, _SwarmWork
from lowcomm.comm._swarm_membership import (
    _PROTOCOL,
    _heartbeat_loop,
    _mac,
    _parse_records,
    _Record,
    _sign_record,
)
from lowcomm.comm._swarm_procs import (
    _FAILURES,
    _build_averager,
    _make_dht,
    _shutdown_averager,
    _shutdown_swarm,
    _sigterm_to_exit,
    _start_child,
    _subclasses,
    start_bootstrap_dht,
)
from lowcomm.comm._swarm_state import _fetch_state, _resync_plan, _state_hash, _state_metadata
from lowcomm.comm._swarm_timeouts import SwarmTimeouts
from lowcomm.comm.base import AverageResult, ConsistencyError, DoneWork, WireStats
from lowcomm.comm.reduce import Identity

if TYPE_CHECKING:
    from lowcomm.comm.compression.base import Compressor

__all__ = ["HivemindBackend", "SwarmTimeouts", "start_bootstrap_dht"]

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
          follows it (:class:`SwarmTimeouts`).
        * ``close()`` (also at exit and on SIGTERM) shuts the averagers and the DHT down.

    What goes through: dense compressors (``FP16``, ``BF16``, ``Int8``/``Int4``/``Int2``, your
    own with ``dense = True``) byte for byte as their payloads, or fp32 without one. Sparse
    compressors (top-k) need an all-gather, which hivemind's all-reduce does not do: refused
    with ValueError.

    Validation: each reducer checks every incoming part (size, finite values, L2 norm at most
    ``max_norm``, weight as declared at matchmaking); a bad part drops its sender from that
    reducer's slice from that part on (logged), and every member still gets the same bytes.
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
        max_norm: reject incoming parts whose L2 norm exceeds this (None: finite check only).
        handle_sigterm: turn SIGTERM into ``SystemExit`` (so ``close`` runs) when this is
            the main thread and no other SIGTERM handler is installed.

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
        handle_sigterm: bool = True,
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
        self.run_id = run_id
        self.timeouts = SwarmTimeouts.from_round_seconds(round_seconds)
        self.max_norm = max_norm
        self.wait_for_peers = wait_for_peers
        self.wait_for_peers_timeout = float(wait_for_peers_timeout)
        key = run_key.encode() if isinstance(run_key, str) else run_key
        self._key: bytes | None = key or None
        salt = hashlib.sha256(f"{_PROTOCOL}|{run_id}".encode() + (self._key or b"")).hexdigest()
        # The run key goes into every DHT key, so a stranger without it cannot even find them.
        self._prefix = f"lowcomm{salt[:20]}"
        self._peers_key = f"{self._prefix}_peers"
        self.stats = WireStats()
        self.state_bytes = 0
        self.last_num_peers = 1
        self._closed = False
        self._lock = threading.RLock()  # guards the DHT pipe, averager table and counters
        self._fingerprint = ""
        self._version = 0
        self._digest = ""
        self._history: dict[int, tuple[str, int]] = {}
        self._snapshot: dict[str, torch.Tensor] = {}
        self._busy = 0
        self._inflight: dict[tuple[Any, ...], _SwarmWork] = {}
        self._averagers: dict[tuple[Any, ...], Any] = {}
        self._calls: dict[tuple[Any, ...], int] = {}
        self._round_base = 0
        self._records: dict[str, _Record] = {}
        self._last_seen_other = time.monotonic()  # start as if others might be around
        self._mismatch_warned: set[str] = set()
        self._last_round_failed = False
        self._state_averager: Any = None
        self._heartbeat: threading.Thread | None = None
        self._stop = threading.Event()
        self._previous_sigterm: Any = None

        self._pdeathsig = threading.current_thread() is threading.main_thread()
        self._dht = _make_dht(list(initial_peers), host_maddrs, announce_maddrs, start_timeout)
        try:
            self._peer = str(self._dht.peer_id)
            self._peer_bytes = self._dht.peer_id.to_bytes()
            self.maddrs = [str(m) for m in self._dht.get_visible_maddrs()]
        except BaseException:
            self._dht.shutdown()
            raise
        self._finalizer: weakref.finalize[..., HivemindBackend] = weakref.finalize(
            self, _shutdown_swarm, [], self._dht
        )
        atexit.register(_close_at_exit, weakref.ref(self))
        if handle_sigterm:
            self._previous_sigterm = _sigterm_to_exit()
        logger.info(
            "hivemind peer %s joined run %r; others can join through %s",
            self._peer,
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
        with self._lock:
            return 1 + sum(1 for p in self._records if p != self._peer)

    @property
    def peer_id(self) -> str:
        """This peer's libp2p id."""
        return self._peer

    # -- DHT records ---------------------------------------------------------------------------

    def _my_record(self) -> list[Any]:
        with self._lock:
            busy = self._busy > 0
            history = [[v, d, n] for v, (d, n) in sorted(self._history.items())[-4:]]
            fingerprint, version, digest = self._fingerprint, self._version, self._digest
        return _sign_record(self._key, self._peer, fingerprint, version, digest, busy, history)

    def _dht_call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            future = fn(*args, return_future=True, **kwargs)
        return future.result(timeout=max(5.0, self.timeouts.request_timeout * 4))

    def _publish(self) -> None:
        get_dht_time = _subclasses().get_dht_time
        self._dht_call(
            self._dht.store,
            self._peers_key,
            subkey=self._peer_bytes,
            value=self._my_record(),
            expiration_time=get_dht_time() + self.timeouts.peer_ttl,
        )

    def _withdraw(self) -> None:
        get_dht_time = _subclasses().get_dht_time
        with contextlib.suppress(*_FAILURES):
            self._dht_call(
                self._dht.store,
                self._peers_key,
                subkey=self._peer_bytes,
                value=None,
                expiration_time=get_dht_time() + self.timeouts.peer_ttl + 1,
            )

    def _read(self, any_fingerprint: bool = False) -> dict[str, _Record]:
        """Live peers' records (valid signatures only), this peer's own included."""
        found = self._dht_call(self._dht.get, self._peers_key, latest=True)
        records: dict[str, _Record] = {}
        if found is None or not isinstance(found.value, dict):
            return records
        for peer, rec in _parse_records(self._key, found.value, _subclasses().PeerID):
            if any_fingerprint or rec.fingerprint == self._fingerprint:
                records[peer] = rec
            elif rec.fingerprint not in self._mismatch_warned and peer != self._peer:
                self._mismatch_warned.add(rec.fingerprint)
                logger.warning(
                    "hivemind run %r: peer %s has another model/config (fingerprint %s, ours "
                    "%s); it will never be averaged with",
                    self.run_id,
                    peer,
                    rec.fingerprint,
                    self._fingerprint,
                )
        return records

    def _refresh(self) -> dict[str, _Record]:
        self._publish()
        records = self._read()
        self._set_records(records)
        return records

    def _set_records(self, records: dict[str, _Record]) -> None:
        with self._lock:
            self._records = records
            if any(p != self._peer for p in records):
                self._last_seen_other = time.monotonic()

    def _alone_for(self) -> float:
        """Seconds since another live peer of this run was last seen (0 if one is now)."""
        with self._lock:
            if any(p != self._peer for p in self._records):
                return 0.0
            return time.monotonic() - self._last_seen_other

    def _start_heartbeat(self) -> None:
        if self._heartbeat is not None:
            return
        self._heartbeat = threading.Thread(
            target=_heartbeat_loop,
            args=(weakref.ref(self), self._stop),
            name="lowcomm-heartbeat",
            daemon=True,
        )
        self._heartbeat.start()

    # -- Backend protocol: consistency and state -----------------------------------------------

    def check_consistent(self, fingerprint: str) -> None:
        """Refuse to join a run whose live peers have another model or config.

        Reads the run's heartbeat records before and after publishing this peer's, so two
        peers starting together also see each other.

        Raises:
            ConsistencyError: a live peer of this run has a different ``fingerprint``.
        """
        self._check_open()
        fingerprint = str(fingerprint)
        for attempt in range(2):
            others = {
                r.fingerprint
                for p, r in self._read(any_fingerprint=True).items()
                if p != self._peer and r.fingerprint != fingerprint
            }
            if others:
                if attempt:
                    self._withdraw()
                raise ConsistencyError(
                    f"hivemind run {self.run_id!r} already has live peers with another model or "
                    f"config (fingerprints {sorted(others)}; this peer's is {fingerprint}). Every "
                    f"peer of a run must build the same model with the same DiLoCo settings: use "
                    f"another run id for a different config, or wait "
                    f"{self.timeouts.peer_ttl:.0f}s for the records of peers that left to expire"
                )
            if attempt == 0:
                self._fingerprint = fingerprint
                self._publish()
        self._start_heartbeat()

    def sync_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Make ``tensors`` equal (in place, bit for bit) to the swarm's state, if it has one.

        The reference is the state of the highest version any live peer serves (the one most
        peers agree on at that version; ties go to the highest peer id). If this peer already
        holds it, or no other peer is alive, ``tensors`` are kept. Otherwise the state is
        downloaded from a peer holding it, preferring peers that are not mid-average, checked
        against its digest, and copied in. Either way ``tensors`` become this peer's served
        state (as :meth:`publish_state`).

        Args:
            tensors: every tensor to make equal: ``"param.*"``, outer optimizer state, and
                ``"meta.outer_step"`` (a 1-element integer tensor, the state's version).

        Raises:
            ConsistencyError: the downloaded state has other names, shapes or dtypes.
        """
        self._check_open()
        first = self._heartbeat is None or not self._history
        self._take_snapshot(tensors)
        self._state_server()  # from now on this peer serves its state to joiners
        records = self._await_peers() if first and self.wait_for_peers > 1 else self._refresh()
        if first and len(records) <= 1:
            # Peers started together may not have published yet: give them one heartbeat.
            time.sleep(min(self.timeouts.heartbeat_period, 2.0))
            records = self._refresh()
        self._start_heartbeat()
        plan = self._plan(records)
        deadline = time.monotonic() + self.timeouts.wait_timeout
        while (
            plan is not None
            and plan[2]
            and all(records[p].busy for p in plan[2])
            and time.monotonic() < deadline
        ):
            # Every holder is mid-average: its snapshot is about to be one round old. Wait
            # for one to finish and publish the new state.
            time.sleep(0.2)
            records = self._read()
            self._set_records(records)
            plan = self._plan(records)
        if plan is not None:
            version, digest, candidates = plan
            if not self._download(tensors, version, digest, candidates):
                logger.warning(
                    "hivemind run %r: could not download the swarm's state (version %d) from "
                    "%s; keeping this peer's own (needs_resync() stays True)",
                    self.run_id,
                    version,
                    candidates,
                )
        step = tensors.get("meta.outer_step")
        self._round_base = int(step.reshape(-1)[0]) if step is not None else self._version
        with self._lock:
            self._calls.clear()

    def _await_peers(self) -> dict[str, _Record]:
        """The run's records once ``wait_for_peers`` peers (this one included) are live.

        Raises:
            TimeoutError: fewer were live after ``wait_for_peers_timeout`` seconds.
        """
        deadline = time.monotonic() + self.wait_for_peers_timeout
        records: dict[str, _Record] = {}
        said = -1
        while True:
            with contextlib.suppress(*_FAILURES):  # one slow DHT call is not the end of the wait
                records = self._refresh()
            live = max(len(records), 1)
            if live >= self.wait_for_peers:
                return records
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"hivemind run {self.run_id!r}: {live} of the {self.wait_for_peers} peers "
                    f"it waits for (wait_for_peers) were live after "
                    f"{self.wait_for_peers_timeout:g}s. Start the others with the same run id, "
                    f"config and initial peers, or lower wait_for_peers"
                )
            if live != said:
                said = live
                logger.info(
                    "hivemind run %r: %d of %d peers live; waiting for the rest (up to %gs)",
                    self.run_id,
                    live,
                    self.wait_for_peers,
                    self.wait_for_peers_timeout,
                )
            time.sleep(0.5)

    def publish_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Serve a snapshot of ``tensors`` to joiners; call after each applied outer step.

        The snapshot's version is ``meta.outer_step`` when present, else the count of
        publishes; its digest goes into this peer's heartbeat for :meth:`needs_resync`.
        """
        self._check_open()
        self._take_snapshot(tensors, bump=True, peers=self.last_num_peers)
        with contextlib.suppress(*_FAILURES):
            self._publish()

    def needs_resync(self) -> bool:
        """True if this peer is behind the swarm or its state differs from the swarm's.

        Behind: a live peer serves a higher version. Different: at some version both hold,
        most live peers (ties: the highest peer id) hold another digest, e.g. after this peer
        averaged alone. Call :meth:`sync_state` with the full state when True.
        """
        self._check_open()
        try:
            records = self._refresh()
        except _FAILURES as e:
            logger.debug("hivemind needs_resync: DHT read failed: %r", e)
            return False
        return self._plan(records) is not None

    def _take_snapshot(
        self, tensors: dict[str, torch.Tensor], bump: bool = False, peers: int = 0
    ) -> None:
        snapshot = {k: t.detach().to("cpu", copy=True) for k, t in tensors.items()}
        digest = _state_hash(snapshot)
        step = snapshot.get("meta.outer_step")
        with self._lock:
            if step is not None and step.numel() == 1:
                self._version = int(step.reshape(-1)[0])
            elif bump:
                self._version += 1
            self._snapshot = snapshot
            self._digest = digest
            self._history[self._version] = (digest, peers)
            for old in sorted(self._history)[:-8]:
                del self._history[old]

    def _plan(self, records: dict[str, _Record]) -> tuple[int, str, list[str]] | None:
        """(version, digest, peers to download from) if this peer must resync, else None.

        The rule is :func:`~lowcomm.comm._hivemind_records._resync_plan`'s: behind a higher
        version, or diverged from the majority at the newest version held in common.
        """
        with self._lock:
            my_version, my_history = self._version, dict(self._history)
        return _resync_plan(self._peer, my_version, my_history, records)

    def _serve(self) -> Any:
        with self._lock:
            names = sorted(self._snapshot)
            tensors = [self._snapshot[n].clone() for n in names]
            version, digest = self._version, self._digest
        metadata = _state_metadata(self._key, self._peer, self._fingerprint, names, version, digest)
        return metadata, tensors, None

    def _state_server(self) -> Any:
        if self._state_averager is None:
            self._state_averager = self._new_averager(
                f"{self._prefix}{hashlib.sha256(self._fingerprint.encode()).hexdigest()[:8]}st",
                1,
                Identity(),
                state=True,
            )
        return self._state_averager

    def _download(
        self, tensors: dict[str, torch.Tensor], version: int, digest: str, candidates: list[str]
    ) -> bool:
        server = self._state_server()
        timeout = max(30.0, self.timeouts.averaging_timeout)
        for peer in candidates:
            t0 = time.monotonic()
            fetched = _fetch_state(
                server, peer, timeout, self._key, self._fingerprint, tensors, version
            )
            if fetched is None:
                continue
            metadata, received = fetched
            with torch.no_grad():
                for name, value in zip(metadata["names"], received):
                    tensors[name].copy_(value.to(tensors[name].device))
            self.state_bytes += sum(t.numel() * t.element_size() for t in received)
            with self._lock:
                self._history.clear()  # digests of the state this peer no longer holds
            self._take_snapshot(tensors)
            logger.info(
                "hivemind: downloaded state version %d (%s) from %s in %.2fs",
                metadata["v"],
                "the swarm's" if metadata["h"] == digest else "newer",
                peer,
                time.monotonic() - t0,
            )
            with contextlib.suppress(*_FAILURES):
                self._publish()
            return True
        return False

    # -- Backend protocol: averaging -----------------------------------------------------------

    def average(
        self,
        tensors: Sequence[torch.Tensor],
        *,
        weight: float = 1.0,
        compressor: Compressor | None = None,
        step: int | None = None,
    ) -> _SwarmWork | DoneWork:
        """Start a weighted average with whoever comes to this round.

        Args:
            tensors: floating tensors; the same shapes on every peer.
            weight: this peer's weight (inner steps or samples it did); >= 0.
            compressor: a dense compressor for the wire; None sends fp32.
            step: the round (e.g. the global outer step, or the inner step the sync started
                at); peers group only within the same round. None: see the class docstring.

        Raises:
            ValueError: bad weight, no tensors, or a sparse compressor.
        """
        self._check_open()
        if not (weight >= 0 and math.isfinite(weight)):
            raise ValueError(f"weight ({weight}) must be a finite number >= 0")
        if not tensors:
            raise ValueError("average() needs at least one tensor")
        codec: Compressor = compressor if compressor is not None else Identity()
        if not getattr(codec, "dense", False):
            raise ValueError(
                f"{type(codec).__name__} is a sparse compressor: hivemind's all-reduce sums "
                f"dense slices and cannot average sparse payloads. Use a dense one (fp16, bf16, "
                f"int8, int4, int2) with HivemindBackend, or TorchDistBackend for top-k"
            )
        shapes = [t.shape for t in tensors]
        device = tensors[0].device
        flat = torch.cat([t.detach().reshape(-1).to("cpu", torch.float32) for t in tensors])
        if not bool(torch.isfinite(flat).all()):
            logger.warning("hivemind: non-finite contribution; sending zeros with weight 0")
            flat = torch.zeros_like(flat)
            weight = 0.0
        layout = (flat.numel(), _codec_spec(codec))
        with self._lock:
            if step is None:
                round_id = self._round_base + self._calls.get(layout, 0)
            else:
                round_id = int(step)
            if round_id < 0:
                raise ValueError(f"step ({round_id}) must be >= 0")
            self._calls[layout] = self._calls.get(layout, 0) + 1
            slot_index = sum(1 for s in self._inflight if s[:2] == layout)
            slot = (*layout, slot_index)
            self._busy += 1
        if self._alone_for() > self.timeouts.peer_ttl:
            # Nobody else has been alive for a while: no reason to wait out the matchmaking
            # timeout. (Right after start, others' records may just not be visible yet.)
            with contextlib.suppress(*_FAILURES):
                self._refresh()
            if self._alone_for() > self.timeouts.peer_ttl:
                result = _alone_result(flat, shapes, device, weight, codec)
                self._finish(None, result)
                return DoneWork(result)
        try:
            averager = self._averager_for(slot, flat.numel(), codec)
            with averager.get_tensors() as buffers:
                buffers[0].copy_(flat)
            mac = _mac(self._key, f"join|{self._peer}|{averager.prefix}.0b{round_id:b}")
            control = averager.lowcomm_step(
                f"{round_id:b}",
                float(weight),
                {"p": _PROTOCOL, "w": float(weight), "mac": mac},
                timeout=self.timeouts.matchmaking_timeout,
                init_timeout=max(10.0, self.timeouts.request_timeout * 4),
            )
        except _FAILURES as e:
            logger.warning("hivemind round %d: could not start averaging (%s)", round_id, e)
            self._discard_averager(slot)
            result = _alone_result(flat, shapes, device, weight, codec)
            self._finish(None, result)
            return DoneWork(result)
        work = _SwarmWork(
            self, slot, averager, control, flat, shapes, device, weight, codec, round_id
        )
        with self._lock:
            self._inflight[slot] = work
        with contextlib.suppress(*_FAILURES):
            self._publish()  # busy: joiners prefer peers that are not mid-average
        return work

    def _finish(self, slot: tuple[Any, ...] | None, result: AverageResult) -> None:
        with self._lock:
            if slot is not None:
                self._inflight.pop(slot, None)
            self._busy = max(0, self._busy - 1)
            self.last_num_peers = result.num_peers
        self.stats.record(result.bytes_sent, result.bytes_received)

    def set_round_seconds(self, round_seconds: float) -> None:
        """Re-derive every timeout from a measured round time (:class:`SwarmTimeouts`)."""
        self.timeouts = SwarmTimeouts.from_round_seconds(round_seconds)
        with self._lock:
            averagers = list(self._averagers.values())
        for averager in averagers:
            try:
                averager.lowcomm_configure(self.timeouts, wait=10.0)
            except _FAILURES as e:
                logger.debug("hivemind: could not reconfigure an averager: %r", e)

    # -- averager processes --------------------------------------------------------------------

    def _new_averager(self, prefix: str, numel: int, codec: Compressor, state: bool) -> Any:
        with self._lock:  # no heartbeat on the DHT pipe while forking
            averager = _build_averager(
                self._dht,
                prefix,
                numel,
                codec,
                self.timeouts,
                run_key=self._key,
                max_norm=self.max_norm,
                pdeathsig=self._pdeathsig,
                state_provider=self._serve if state else None,
                peers_key=self._peers_key,
            )
            _start_child(averager)
        averager.wait_until_ready(timeout=60)
        self._finalizer.detach()
        self._finalizer = weakref.finalize(
            self, _shutdown_swarm, self._all_averagers() + [averager], self._dht
        )
        return averager

    def _all_averagers(self) -> list[Any]:
        out = list(self._averagers.values())
        if self._state_averager is not None:
            out.append(self._state_averager)
        return out

    def _averager_for(self, slot: tuple[Any, ...], numel: int, codec: Compressor) -> Any:
        with self._lock:
            averager = self._averagers.get(slot)
        if averager is not None and averager.is_alive():
            return averager
        if averager is not None:
            self._discard_averager(slot)
        tag = hashlib.sha256(repr((self._fingerprint, slot)).encode()).hexdigest()[:12]
        averager = self._new_averager(f"{self._prefix}{tag}", numel, codec, state=False)
        with self._lock:
            self._averagers[slot] = averager
        return averager

    def _discard_averager(self, slot: tuple[Any, ...]) -> None:
        with self._lock:
            averager = self._averagers.pop(slot, None)
        if averager is not None:
            _shutdown_averager(averager)

    # -- lifecycle -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("HivemindBackend is closed")

    def close(self) -> None:
        """Leave the swarm: withdraw the heartbeat, stop the averagers and the DHT. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._withdraw()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)
        with self._lock:
            averagers = self._all_averagers()
            self._averagers.clear()
            self._state_averager = None
        self._finalizer.detach()
        _shutdown_swarm(averagers, self._dht)
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
