"""Membership of a swarm run: who this peer is, its heartbeat record, and who is live.

Every peer publishes a :class:`_Record` under the run's DHT key each heartbeat period (its
config fingerprint, state version and recent digests, whether it is mid-average), signed
with the run key and bound to its libp2p peer id; a record expires ``peer_ttl`` after its
last heartbeat, and a peer without one is gone. Here: the record format and its MAC
(:func:`_sign_record`, :func:`_record_ok`, :func:`_parse_records`), the MAC helpers that the
join requests and the served state reuse, the protocol tag in every DHT key, :class:`_Peer`
(this peer's identity and settings, shared by the backend's parts) and :class:`_Membership`
(publishing, reading and waiting for records; the heartbeat thread; the consistency check).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import hmac
import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lowcomm.comm._swarm_procs import _FAILURES, _subclasses
from lowcomm.comm.base import ConsistencyError

if TYPE_CHECKING:
    from lowcomm.comm._swarm_averaging import _Rounds
    from lowcomm.comm._swarm_state import _SharedState
    from lowcomm.comm._swarm_timeouts import SwarmTimeouts

# The backend's own logger, whichever of its modules the message comes from.
logger = logging.getLogger("lowcomm.comm.hivemind")

# What a DHT call that took too long raises (one class from Python 3.11 on; three before).
_TIMEOUTS = (TimeoutError, concurrent.futures.TimeoutError, asyncio.TimeoutError)

# Bumped whenever the hivemind backend's wire format changes: it is part of every DHT key, so
# peers of different lowcomm versions never meet.
_PROTOCOL = "lc3"
# A record is republished every heartbeat (at most every 30 s) and expires from the DHT after
# peer_ttl (at most 92 s); one signed longer ago than this, plus a minute for clocks that
# disagree, is a replay of an old record (hivemind's DHT lets anyone store under any subkey).
_RECORD_MAX_AGE = 150.0
_CLOCK_SKEW = 60.0


# -- MACs --------------------------------------------------------------------------------------


def _mac(key: bytes | None, message: str) -> str:
    if key is None:
        return ""
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


def _mac_ok(key: bytes | None, message: str, mac: object) -> bool:
    return key is None or (isinstance(mac, str) and hmac.compare_digest(_mac(key, message), mac))


# -- heartbeat records -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Record:
    """What a peer publishes in the DHT every heartbeat.

    ``history`` maps this peer's last few state versions to ``(digest, peers)`` (the current
    one included; ``peers`` averaged in the round that produced it, 0 if unknown), so peers a
    round apart can still compare the states they both had. ``round`` is the key of the
    newest round this peer's current state holds work of (the last round it contributed to
    with a weight, or the holder's when it downloaded the state; -1 if none): on clock-keyed
    rounds, a peer whose state is rounds older than the clock is behind.
    """

    peer: str
    fingerprint: str
    version: int
    digest: str
    busy: bool
    history: dict[int, tuple[str, int]]
    round: int = -1


def _history_text(history: Any) -> str:
    return ",".join(f"{int(v)}:{d}:{int(n)}" for v, d, n in history)


def _record_fields(value: list[Any]) -> str:
    _, fingerprint, version, digest, busy, history, round_, signed_at, _ = value
    fields = f"{fingerprint}|{version}|{digest}|{busy}|{_history_text(history)}|{int(round_)}"
    return f"{fields}|{signed_at!r}"


def _record_ok(
    run_key: bytes | None, peer: str, value: list[Any], now: float | None = None
) -> bool:
    """True if ``value`` is ``peer``'s record: signed with the run key for that peer id, and
    signed recently (an old record stored again is refused)."""
    if len(value) != 9 or value[0] != _PROTOCOL:
        return False
    try:
        fields = _record_fields(value)
        signed_at = float(value[7])
    except (TypeError, ValueError):
        return False
    now = time.time() if now is None else now
    if not now - _RECORD_MAX_AGE <= signed_at <= now + _CLOCK_SKEW:
        return False
    return _mac_ok(run_key, f"peer|{peer}|{fields}", value[8])


def _sign_record(
    key: bytes | None,
    peer: str,
    fingerprint: str,
    version: int,
    digest: str,
    busy: bool,
    history: list[list[Any]],
    round: int = -1,
    signed_at: float | None = None,
) -> list[Any]:
    """The DHT value of ``peer``'s heartbeat, with its time and MAC (see :func:`_record_ok`)."""
    signed_at = time.time() if signed_at is None else signed_at
    value = [_PROTOCOL, fingerprint, version, digest, busy, history, round, signed_at, ""]
    value[8] = _mac(key, f"peer|{peer}|{_record_fields(value)}")
    return value


def _parse_records(
    key: bytes | None, entries: dict[Any, Any], peer_id: Callable[[Any], Any]
) -> list[tuple[str, _Record]]:
    """``(peer, record)`` for each validly signed record of the run's DHT entry, in order.

    ``entries`` maps DHT subkeys (peer id bytes, made into ids by ``peer_id``) to values.
    """
    out = []
    for subkey, entry in entries.items():
        value = getattr(entry, "value", None)
        if not isinstance(value, list):
            continue
        try:
            peer = str(peer_id(subkey))
        except Exception:
            continue
        rec = _parse_record(key, peer, value)
        if rec is not None:
            out.append((peer, rec))
    return out


def _parse_record(key: bytes | None, peer: str, value: object) -> _Record | None:
    """``peer``'s heartbeat from its DHT value, or None if it is not a valid signed record."""
    if not isinstance(value, list) or not _record_ok(key, peer, value):
        return None
    return _Record(
        peer,
        str(value[1]),
        int(value[2]),
        str(value[3]),
        bool(value[4]),
        {int(v): (str(d), int(n)) for v, d, n in value[5]},
        int(value[6]),
    )


# -- run info --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunInfo:
    """What a live peer says about its run: a JSON text (the recipe's config) and the
    lowcomm version it runs, both signed with the run key when the run has one.

    Attributes:
        peer: the publishing peer's id.
        text: the JSON text as published (parse it with ``json.loads``: data, never code).
        version: the publishing peer's lowcomm version.
    """

    peer: str
    text: str
    version: str


def _sign_info(
    key: bytes | None, peer: str, text: str, version: str, signed_at: float | None = None
) -> list[Any]:
    """The DHT value of ``peer``'s run info, with its time and MAC (see :func:`_parse_info`)."""
    signed_at = time.time() if signed_at is None else signed_at
    mac = _mac(key, f"info|{peer}|{version}|{signed_at!r}|{text}")
    return [_PROTOCOL, text, version, signed_at, mac]


def _parse_info(
    key: bytes | None, peer: str, value: object, now: float | None = None
) -> RunInfo | None:
    """``peer``'s run info from its DHT value, or None unless validly signed and recent."""
    if not isinstance(value, list) or len(value) != 5 or value[0] != _PROTOCOL:
        return None
    _, text, version, signed_at, mac = value
    if not isinstance(text, str) or not isinstance(version, str):
        return None
    try:
        signed_at = float(signed_at)
    except (TypeError, ValueError):
        return None
    now = time.time() if now is None else now
    if not now - _RECORD_MAX_AGE <= signed_at <= now + _CLOCK_SKEW:
        return None
    if not _mac_ok(key, f"info|{peer}|{version}|{signed_at!r}|{text}", mac):
        return None
    return RunInfo(peer, text, version)


def _run_prefix(run_id: str, key: bytes | None) -> str:
    """The start of every DHT key of a run; the run key goes into it, so a stranger without
    the key cannot even find the run's records."""
    salt = hashlib.sha256(f"{_PROTOCOL}|{run_id}".encode() + (key or b"")).hexdigest()
    return f"lowcomm{salt[:20]}"


# -- this peer -------------------------------------------------------------------------------


@dataclass
class _Peer:
    """This peer as its parts (membership, shared state, rounds) all see it.

    Attributes:
        run_id: the run's name (for messages).
        id: this peer's libp2p id (base58).
        key: the run key, or None for an open run.
        prefix: the start of every DHT key of the run (derived from the run key).
        timeouts: the current timeouts (``set_round_seconds`` replaces them).
        lock: guards the DHT pipe (no fork while a thread writes to it) and the parts' tables.
        fingerprint: the model/config fingerprint, set by ``check_consistent``.
        admission: what this peer's reducers accept and how they combine it (sent to the
            averager with every round, so a bound set later applies from the next round).
        run_info: the JSON text this peer publishes about its run (None: nothing).
        version: this peer's lowcomm version, published with the run info.
        round_clock: seconds per round key when rounds are keyed by the clock (round ``k``
            starts at ``k * round_clock``, epoch seconds); None: rounds are step counts.
    """

    run_id: str
    id: str
    key: bytes | None
    prefix: str
    timeouts: SwarmTimeouts
    lock: threading.RLock = field(default_factory=threading.RLock)
    fingerprint: str = ""
    admission: Any = None
    run_info: str | None = None
    version: str = ""
    round_clock: float | None = None

    @property
    def records_key(self) -> str:
        """The run's DHT key, under which every live peer keeps its record."""
        return f"{self.prefix}_peers"

    @property
    def info_key(self) -> str:
        """The run's DHT key for run info (:class:`RunInfo`), one entry per peer."""
        return f"{self.prefix}_info"


# -- membership --------------------------------------------------------------------------------


class _Membership:
    """This peer's heartbeat record in the run's DHT entry, and the live peers read from it.

    The record carries what :class:`_SharedState` advertises (version, recent digests) and
    whether :class:`_Rounds` has an average in flight; a thread republishes it and rereads
    the others' every heartbeat period once :meth:`start_heartbeat` ran.
    """

    def __init__(self, me: _Peer, dht: Any, state: _SharedState, rounds: _Rounds) -> None:
        self._me = me
        self._dht = dht
        self._peer_bytes = dht.peer_id.to_bytes()
        self._state = state
        self._rounds = rounds
        self.records: dict[str, _Record] = {}
        self._last_seen_other = time.monotonic()  # start as if others might be around
        self._mismatch_warned: set[str] = set()
        self._heartbeat: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def heartbeat_started(self) -> bool:
        """True once :meth:`start_heartbeat` ran (``check_consistent`` or a first sync)."""
        return self._heartbeat is not None

    def num_live(self) -> int:
        """Live peers of this run and configuration (this one included), per the last read."""
        with self._me.lock:
            return 1 + sum(1 for p in self.records if p != self._me.id)

    def _record(self) -> list[Any]:
        me = self._me
        with me.lock:
            busy = self._rounds.busy > 0
            history = [[v, d, n] for v, (d, n) in sorted(self._state.history.items())[-4:]]
            fingerprint, version, digest = me.fingerprint, self._state.version, self._state.digest
            round_ = self._state.round
        return _sign_record(me.key, me.id, fingerprint, version, digest, busy, history, round_)

    def _dht_call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with self._me.lock:
            future = fn(*args, return_future=True, **kwargs)
        return future.result(timeout=self._me.timeouts.dht_timeout)

    def publish(self) -> None:
        """Store this peer's record, and its run info if it has one (valid for ``peer_ttl``)."""
        get_dht_time = _subclasses().get_dht_time
        me = self._me
        expiration = get_dht_time() + me.timeouts.peer_ttl
        self._dht_call(
            self._dht.store,
            me.records_key,
            subkey=self._peer_bytes,
            value=self._record(),
            expiration_time=expiration,
        )
        if me.run_info is not None:
            info = _sign_info(me.key, me.id, me.run_info, me.version)
            self._dht_call(
                self._dht.store,
                me.info_key,
                subkey=self._peer_bytes,
                value=info,
                expiration_time=expiration,
            )

    def withdraw(self) -> None:
        """Replace this peer's record by an empty one, so others see it leave at once."""
        get_dht_time = _subclasses().get_dht_time
        with contextlib.suppress(*_FAILURES):
            self._dht_call(
                self._dht.store,
                self._me.records_key,
                subkey=self._peer_bytes,
                value=None,
                expiration_time=get_dht_time() + self._me.timeouts.peer_ttl + 1,
            )

    def read(self, any_fingerprint: bool = False) -> dict[str, _Record]:
        """Live peers' records (valid signatures only), this peer's own included."""
        me = self._me
        found = self._dht_call(self._dht.get, self._me.records_key, latest=True)
        records: dict[str, _Record] = {}
        if found is None or not isinstance(found.value, dict):
            return records
        for peer, rec in _parse_records(me.key, found.value, _subclasses().PeerID):
            if any_fingerprint or rec.fingerprint == me.fingerprint:
                records[peer] = rec
            elif rec.fingerprint not in self._mismatch_warned and peer != me.id:
                self._mismatch_warned.add(rec.fingerprint)
                logger.warning(
                    "hivemind run %r: peer %s has another model/config (fingerprint %s, ours "
                    "%s); it will never be averaged with",
                    me.run_id,
                    peer,
                    rec.fingerprint,
                    me.fingerprint,
                )
        return records

    def refresh(self) -> dict[str, _Record]:
        """Publish this peer's record, then read (and keep) everyone's."""
        self.publish()
        records = self.read()
        self.set_records(records)
        return records

    def set_records(self, records: dict[str, _Record]) -> None:
        with self._me.lock:
            self.records = records
            if any(p != self._me.id for p in records):
                self._last_seen_other = time.monotonic()

    def alone_for(self) -> float:
        """Seconds since another live peer of this run was last seen (0 if one is now)."""
        with self._me.lock:
            if any(p != self._me.id for p in self.records):
                return 0.0
            return time.monotonic() - self._last_seen_other

    def join(self, fingerprint: str) -> None:
        """Publish this peer's record under ``fingerprint``, unless live peers have another.

        Reads the records before and after publishing, so two peers starting together also
        see each other; then starts the heartbeat.

        Raises:
            ConsistencyError: a live peer of this run has a different ``fingerprint``.
        """
        me = self._me
        for attempt in range(2):
            records = self.patiently("reading the run's records", self.read, True)
            others = {
                r.fingerprint
                for p, r in records.items()
                if p != me.id and r.fingerprint != fingerprint
            }
            if others:
                if attempt:
                    self.withdraw()
                raise ConsistencyError(
                    f"hivemind run {me.run_id!r} already has live peers with another model or "
                    f"config (fingerprints {sorted(others)}; this peer's is {fingerprint}). Every "
                    f"peer of a run must build the same model with the same DiLoCo settings: use "
                    f"another run id for a different config, or wait "
                    f"{me.timeouts.peer_ttl:.0f}s for the records of peers that left to expire"
                )
            if attempt == 0:
                me.fingerprint = fingerprint
                self.patiently("publishing this peer's record", self.publish)
        self.start_heartbeat()

    def patiently(self, what: str, call: Callable[..., Any], *args: Any) -> Any:
        """``call(*args)``, tried again while a DHT call times out, for up to
        ``timeouts.dht_patience`` (at least ``DHT_TRIES`` calls' worth).

        The heartbeat shrugs off one slow DHT call (the next beat tries again); joining and
        ``sync_state`` must too: on a loaded machine a read can take longer than its timeout
        once, and a volunteer should not die of it.

        Raises:
            ConnectionError: every try timed out (with the last error as its cause).
        """
        me = self._me
        patience = me.timeouts.dht_patience
        deadline = time.monotonic() + patience
        tries = 0
        while True:
            tries += 1
            try:
                return call(*args)
            except _TIMEOUTS as e:
                if time.monotonic() >= deadline:
                    raise ConnectionError(
                        f"hivemind run {me.run_id!r}: {what} timed out {tries} times in "
                        f"{patience:.0f}s; is the DHT reachable, the machine "
                        f"overloaded?"
                    ) from e
                logger.warning(
                    "hivemind run %r: %s timed out (try %d); trying again", me.run_id, what, tries
                )
                time.sleep(min(1.0, me.timeouts.heartbeat_period))

    def await_peers(self, wanted: int, timeout: float) -> dict[str, _Record]:
        """The run's records once ``wanted`` peers (this one included) are live.

        Raises:
            TimeoutError: fewer were live after ``timeout`` seconds.
        """
        me = self._me
        deadline = time.monotonic() + timeout
        records: dict[str, _Record] = {}
        said = -1
        while True:
            with contextlib.suppress(*_FAILURES):  # one slow DHT call is not the end of the wait
                records = self.refresh()
            live = max(len(records), 1)
            if live >= wanted:
                return records
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"hivemind run {me.run_id!r}: {live} of the {wanted} peers it waits for "
                    f"(wait_for_peers) were live after {timeout:g}s. Start the others with the "
                    f"same run id, config and initial peers, or lower wait_for_peers"
                )
            if live != said:
                said = live
                logger.info(
                    "hivemind run %r: %d of %d peers live; waiting for the rest (up to %gs)",
                    me.run_id,
                    live,
                    wanted,
                    timeout,
                )
            time.sleep(0.5)

    def start_heartbeat(self) -> None:
        if self._heartbeat is not None:
            return
        self._heartbeat = threading.Thread(
            target=_heartbeat_loop,
            args=(weakref.ref(self), self._stop),
            name="lowcomm-heartbeat",
            daemon=True,
        )
        self._heartbeat.start()

    def leave(self) -> None:
        """Stop the heartbeat and withdraw this peer's record."""
        self._stop.set()
        self.withdraw()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)


def _heartbeat_loop(ref: weakref.ref[_Membership], stop: threading.Event) -> None:
    """Publish and read the peer's DHT record every heartbeat period until ``stop``.

    Holds the membership only weakly between beats, so an abandoned backend can be collected.
    """
    while True:
        members = ref()
        if members is None:
            return
        period = members._me.timeouts.heartbeat_period
        try:
            members.refresh()
        except _FAILURES as e:
            logger.debug("hivemind heartbeat failed: %r", e)
        del members
        if stop.wait(period):
            return
