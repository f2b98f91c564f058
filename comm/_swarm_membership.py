"""Membership of a swarm run: the heartbeat records that say which peers are live.

Every peer publishes a :class:`_Record` under the run's DHT key each heartbeat period (its
config fingerprint, state version and recent digests, whether it is mid-average), signed
with the run key and bound to its libp2p peer id; a record expires ``peer_ttl`` after its
last heartbeat, and a peer without one is gone. Here: the record format and its MAC
(:func:`_sign_record`, :func:`_record_ok`, :func:`_parse_records`), the MAC helpers that the
join requests and the served state reuse, the protocol tag in every DHT key, and the
heartbeat thread (:func:`_heartbeat_loop`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lowcomm.comm._swarm_procs import _FAILURES

if TYPE_CHECKING:
    from lowcomm.comm.hivemind import HivemindBackend

# The backend's own logger, whichever of its modules the message comes from.
logger = logging.getLogger("lowcomm.comm.hivemind")

# Bumped whenever the hivemind backend's wire format changes: it is part of every DHT key, so
# peers of different lowcomm versions never meet.
_PROTOCOL = "lc1"


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
    round apart can still compare the states they both had.
    """

    peer: str
    fingerprint: str
    version: int
    digest: str
    busy: bool
    history: dict[int, tuple[str, int]]


def _history_text(history: Any) -> str:
    return ",".join(f"{int(v)}:{d}:{int(n)}" for v, d, n in history)


def _record_ok(run_key: bytes | None, peer: str, value: list[Any]) -> bool:
    if len(value) != 7 or value[0] != _PROTOCOL:
        return False
    _, fingerprint, version, digest, busy, history, mac = value
    try:
        fields = f"{fingerprint}|{version}|{digest}|{busy}|{_history_text(history)}"
    except (TypeError, ValueError):
        return False
    return _mac_ok(run_key, f"peer|{peer}|{fields}", mac)


def _sign_record(
    key: bytes | None,
    peer: str,
    fingerprint: str,
    version: int,
    digest: str,
    busy: bool,
    history: list[list[Any]],
) -> list[Any]:
    """The DHT value of ``peer``'s heartbeat, with its MAC (checked by :func:`_record_ok`)."""
    fields = f"{fingerprint}|{version}|{digest}|{busy}|{_history_text(history)}"
    mac = _mac(key, f"peer|{peer}|{fields}")
    return [_PROTOCOL, fingerprint, version, digest, busy, history, mac]


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
    )


# -- heartbeat thread --------------------------------------------------------------------------


def _heartbeat_loop(ref: weakref.ref[HivemindBackend], stop: threading.Event) -> None:
    """Publish and read the backend's DHT record every heartbeat period until ``stop``.

    Holds the backend only weakly between beats, so an abandoned backend can be collected.
    """
    while True:
        backend = ref()
        if backend is None:
            return
        period = backend.timeouts.heartbeat_period
        try:
            backend._refresh()
        except _FAILURES as e:
            logger.debug("hivemind heartbeat failed: %r", e)
        del backend
        if stop.wait(period):
            return
