"""Pure helpers of the hivemind backend: DHT records, MACs, state digests, round results.

Everything the backend signs or checks lives here, next to its counterpart: the heartbeat
record (:class:`_Record`, signed by :func:`_sign_record`, checked by :func:`_record_ok`), the
state metadata a peer serves (:func:`_state_metadata`, checked by :func:`_download_problem`),
the join MAC, and the rule that picks the swarm's state (:func:`_resync_plan`). So do the
compressor round trips, the assembly of an :class:`~lowcomm.comm.base.AverageResult`,
and :class:`SwarmTimeouts` (every timeout from the round length; public through
:mod:`lowcomm.comm.hivemind`).

Kept apart from :mod:`lowcomm.comm.hivemind` (the public backend) and
:mod:`lowcomm.comm._hivemind_subclasses` (the hivemind subclasses) because none of it touches
hivemind or a process: it is plain data and arithmetic, readable and testable on its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lowcomm.comm.base import AverageResult, ConsistencyError
from lowcomm.comm.compression.base import Payload
from lowcomm.comm.reduce import Identity

if TYPE_CHECKING:
    from lowcomm.comm.compression.base import Compressor

# The backend's own logger, whichever of its modules the message comes from.
logger = logging.getLogger("lowcomm.comm.hivemind")

# Bumped whenever the hivemind backend's wire format changes: it is part of every DHT key, so
# peers of different lowcomm versions never meet.
_PROTOCOL = "lc1"
# What a failed step or RPC can raise here: hivemind forwards asyncio.CancelledError (a
# BaseException) from its event loop when a round is torn down at its deadline.
_FAILURES = (Exception, asyncio.CancelledError)


# -- digests, MACs, codecs ---------------------------------------------------------------------


def _mac(key: bytes | None, message: str) -> str:
    if key is None:
        return ""
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


def _mac_ok(key: bytes | None, message: str, mac: object) -> bool:
    return key is None or (isinstance(mac, str) and hmac.compare_digest(_mac(key, message), mac))


def _state_hash(tensors: dict[str, torch.Tensor]) -> str:
    """A digest of names, dtypes, shapes and bytes: equal iff the states are bit-identical."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)};".encode())
        if t.numel():
            data: Any = t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            h.update(data)  # the buffer itself, no copy
    return h.hexdigest()


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


def _problem(part: torch.Tensor, numel: int, max_norm: float | None) -> str | None:
    """Why an incoming part must not enter the average, or None if it may."""
    if part.dtype != torch.float32 or part.numel() != numel:
        return f"dtype {part.dtype} and {part.numel()} elements (expected float32, {numel})"
    if not bool(torch.isfinite(part).all()):
        return "non-finite values (NaN/Inf)"
    if max_norm is not None:
        norm = float(part.norm())
        if norm > max_norm:
            return f"L2 norm {norm:.4g} above max_norm {max_norm:.4g}"
    return None


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


# -- state served to joiners -------------------------------------------------------------------


def _state_metadata(
    key: bytes | None, peer: str, fingerprint: str, names: list[str], version: int, digest: str
) -> dict[str, Any]:
    """What ``peer`` sends along with its state (checked by :func:`_download_problem`)."""
    mac = _mac(key, f"state|{peer}|{fingerprint}|{version}|{digest}")
    return dict(p=_PROTOCOL, names=names, v=version, h=digest, fp=fingerprint, mac=mac)


def _download_problem(
    key: bytes | None,
    fingerprint: str,
    peer: str,
    metadata: Any,
    received: list[torch.Tensor],
    tensors: dict[str, torch.Tensor],
    version: int,
) -> str | ConsistencyError | None:
    """Why state downloaded from ``peer`` must not replace ``tensors``, or None if it may.

    A string is a bad peer (try the next); a ConsistencyError is a state this peer can never
    take (other names, shapes or dtypes).
    """
    if not isinstance(metadata, dict) or metadata.get("p") != _PROTOCOL:
        return "no lowcomm metadata"
    fields = f"{peer}|{metadata.get('fp')}|{metadata.get('v')}|{metadata.get('h')}"
    if not _mac_ok(key, f"state|{fields}", metadata.get("mac")):
        return "its signature does not match the run key"
    if metadata.get("fp") != fingerprint:
        return f"fingerprint {metadata.get('fp')} differs from ours {fingerprint}"
    names = list(metadata.get("names", []))
    if len(names) != len(received):
        return f"{len(received)} tensors for {len(names)} names"
    if sorted(names) != sorted(tensors):
        return ConsistencyError(
            f"peer {peer} serves state {sorted(names)} but this peer holds {sorted(tensors)}"
        )
    for name, value in zip(names, received):
        mine = tensors[name]
        if value.shape != mine.shape or value.dtype != mine.dtype:
            return ConsistencyError(
                f"state tensor {name!r} is {tuple(value.shape)} {value.dtype} at peer {peer} "
                f"but {tuple(mine.shape)} {mine.dtype} here"
            )
    if _state_hash(dict(zip(names, received))) != metadata.get("h"):
        return "its tensors do not match its digest"
    if int(metadata.get("v", -1)) < version:
        return f"version {metadata.get('v')} is older than the swarm's {version}"
    return None


def _resync_plan(
    me: str,
    my_version: int,
    my_history: dict[int, tuple[str, int]],
    records: dict[str, _Record],
) -> tuple[int, str, list[str]] | None:
    """(version, digest, peers to download from) if peer ``me`` must resync, else None.

    Behind: some live peer is at a higher version; take the digest most peers hold there.
    Diverged: at the newest version both this peer and others have held, most peers (ties:
    the highest peer id) held another digest, e.g. because this peer averaged alone.
    """
    # A record without a digest is a peer that has not synced yet: it holds no state.
    others = [r for p, r in records.items() if p != me and r.digest]
    if not others:
        return None

    def majority(version: int) -> tuple[str, list[str]]:
        holders: dict[str, list[tuple[str, int]]] = {}
        for r in others:
            if version in r.history:
                digest, peers = r.history[version]
                holders.setdefault(digest, []).append((r.peer, peers))
        if version in my_history:
            digest, peers = my_history[version]
            holders.setdefault(digest, []).append((me, peers))
        # Most holders; then the state a larger group produced (a round that did happen
        # beats one averaged alone); then the highest peer id, so every peer picks alike.
        best = max(
            holders,
            key=lambda d: (
                len(holders[d]),
                max(n for _, n in holders[d]),
                max(p for p, _ in holders[d]),
            ),
        )
        # Prefer peers that are not mid-average, then the most recent state.
        ranked = sorted(
            (p for p, _ in holders[best] if p != me),
            key=lambda p: (records[p].busy, -records[p].version, p),
        )
        return best, ranked

    top = max(r.version for r in others)
    if top > my_version:
        digest, ranked = majority(top)
        return top, digest, ranked
    common = {v for r in others for v in r.history} & set(my_history)
    if not common:
        return None
    version = max(common)
    digest, ranked = majority(version)
    if digest != my_history[version][0] and ranked:
        return version, digest, ranked
    return None


# -- round results -----------------------------------------------------------------------------


def _split(
    flat: torch.Tensor, shapes: list[torch.Size], device: torch.device
) -> list[torch.Tensor]:
    out, offset = [], 0
    for shape in shapes:
        n = shape.numel()
        out.append(flat[offset : offset + n].view(shape).to(device))
        offset += n
    return out


def _alone_result(
    flat: torch.Tensor,
    shapes: list[torch.Size],
    device: torch.device,
    weight: float,
    codec: Compressor,
) -> AverageResult:
    """The result of a round this peer averaged by itself."""
    # The same encode/decode as a real average of one, so error feedback stays right.
    out = _roundtrip(codec, _roundtrip(codec, flat))
    return AverageResult(_split(out, shapes, device), 1 if weight > 0 else 0, float(weight))


def _group_result(
    summary: dict[str, Any],
    out: torch.Tensor,
    shapes: list[torch.Size],
    device: torch.device,
    round_id: int,
) -> AverageResult:
    """The result of a group's all-reduce, from the averager's summary of it."""
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
        _split(out, shapes, device),
        num_peers,
        total,
        int(summary["bytes_sent"]),
        int(summary["bytes_received"]),
    )


# -- timeouts ----------------------------------------------------------------------------------


def _clamp(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


@dataclass(frozen=True)
class SwarmTimeouts:
    """Every timeout of the swarm, derived from one number: the round length.

    With ``R = round_seconds``, the wall time of one outer round (``H`` inner steps):

    * ``matchmaking_time = clamp(0.1 R, 1, 30)``: the first peer to reach a round waits this
      long for the others, so peers up to 10% slower than the fastest still make the round.
    * ``request_timeout = matchmaking_time / 2``: a would-be group leader must answer a join
      request this fast (hivemind needs it below ``matchmaking_time`` to break A->B->A waits).
    * ``matchmaking_timeout = 3 matchmaking_time``: after this a peer gives up and proceeds
      alone; room for one more attempt when a group falls apart (a member killed mid-average).
    * ``averaging_timeout = max(R, 5)``: the all-reduce of a formed group; an average that
      takes longer than a round cannot keep up with training anyway.
    * ``next_chunk_timeout = clamp(0.25 averaging_timeout, 2, 60)``: a peer that sends no part
      for this long is dropped from the average (twice that for a peer reducing our parts).
    * ``heartbeat_period = clamp(0.1 R, 1, 30)``; a peer counts as gone ``3`` periods (+2 s)
      after its last heartbeat.

    Attributes:
        round_seconds: the estimate they derive from.
    """

    round_seconds: float
    matchmaking_time: float
    request_timeout: float
    matchmaking_timeout: float
    averaging_timeout: float
    next_chunk_timeout: float
    heartbeat_period: float
    peer_ttl: float

    @classmethod
    def from_round_seconds(cls, round_seconds: float) -> SwarmTimeouts:
        """Derive every timeout from ``round_seconds`` (the rule in the class docstring)."""
        r = float(round_seconds)
        if not math.isfinite(r) or r <= 0:
            raise ValueError(f"round_seconds ({round_seconds}) must be a positive number")
        mm = _clamp(0.1 * r, 1.0, 30.0)
        avg = max(r, 5.0)
        hb = _clamp(0.1 * r, 1.0, 30.0)
        return cls(
            round_seconds=r,
            matchmaking_time=mm,
            request_timeout=mm / 2,
            matchmaking_timeout=3 * mm,
            averaging_timeout=avg,
            next_chunk_timeout=_clamp(0.25 * avg, 2.0, 60.0),
            heartbeat_period=hb,
            peer_ttl=3 * hb + 2.0,
        )

    @property
    def wait_timeout(self) -> float:
        """The most ``AverageWork.wait`` can block: matchmaking, all-reduce, and slack."""
        return self.matchmaking_timeout + self.averaging_timeout + 10.0
