"""Shared state of a swarm run: snapshots, digests, the resync rule, serving and downloading.

Each peer serves a snapshot of its state (global parameters, outer optimizer state, the
outer step as its version) and advertises its digest in its heartbeat; a peer that is
behind, or that holds another digest than most peers at a version they share, downloads
the state from a peer that holds the swarm's. Here: the digest (:func:`_state_hash`), the
signed metadata served beside the state (:func:`_state_metadata`) and its check
(:func:`_download_problem`), the rule that picks the swarm's state (:func:`_resync_plan`),
one download (:func:`_fetch_state`), and :class:`_SharedState`, which holds this peer's
snapshot and history, serves them, and downloads the swarm's.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from typing import TYPE_CHECKING, Any

import torch

from lowcomm.comm._swarm_membership import _PROTOCOL, _mac, _mac_ok, _Record
from lowcomm.comm._swarm_procs import _FAILURES, _subclasses
from lowcomm.comm.base import ConsistencyError
from lowcomm.comm.reduce import Identity

if TYPE_CHECKING:
    from lowcomm.comm._swarm_membership import _Peer
    from lowcomm.comm._swarm_procs import _Processes

# The backend's own logger, whichever of its modules the message comes from.
logger = logging.getLogger("lowcomm.comm.hivemind")


# Entries of a shared state that count this peer's own progress, not the swarm's state: on
# deadline rounds each peer takes the inner steps its machine manages, so two peers that
# averaged together hold one state with other counts. The digest leaves them out (else every
# peer but one would download the swarm's state after every round); a download still brings
# the server's count, checked for being a count.
_LOCAL_ENTRIES = frozenset({"meta.inner_steps"})


def _state_hash(tensors: dict[str, torch.Tensor]) -> str:
    """A digest of names, dtypes, shapes and bytes, but for :data:`_LOCAL_ENTRIES`: equal iff
    the states are bit-identical in everything the peers must agree on."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(set(tensors) - _LOCAL_ENTRIES):
        t = tensors[name].detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)};".encode())
        if t.numel():
            data: Any = t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            h.update(data)  # the buffer itself, no copy
    return h.hexdigest()


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
    digest: str,
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
    for name, value in zip(names, received):
        if name in _LOCAL_ENTRIES and (value.numel() != 1 or int(value.reshape(-1)[0]) < 0):
            return f"its {name} is not a count ({value.tolist()})"
    if metadata.get("h") != digest or int(metadata.get("v", -1)) != version:
        # Only the state the swarm agreed on is taken: a holder that moved on since (or one
        # that serves something else) is skipped, and the next look finds the new target.
        return f"it serves version {metadata.get('v')} ({metadata.get('h')}), not the swarm's {version} ({digest})"
    return None


# On clock-keyed rounds, a state whose newest round is more than this many round keys
# before the clock's is behind (a peer that was stopped, or whose last rounds finished
# late); a peer whose state is at most this far back is current.
_BEHIND_ROUNDS = 2


def _is_current(state_round: int, now_round: int) -> bool:
    """Whether a state whose newest round is ``state_round`` is current at round key
    ``now_round`` (at most :data:`_BEHIND_ROUNDS` behind, at most one ahead)."""
    return now_round - _BEHIND_ROUNDS <= state_round <= now_round + 1


def _resync_plan(
    me: str,
    my_version: int,
    my_history: dict[int, tuple[str, int]],
    records: dict[str, _Record],
    my_round: int = -1,
    now_round: int | None = None,
) -> tuple[int, str, list[str]] | None:
    """(version, digest, peers to download from) if peer ``me`` must resync, else None.

    Behind: a newer state counts only when a strict majority of the other live peers hold
    that exact ``(version, digest)`` (in their current state or their recent history), so
    one peer that advertises a higher version cannot make the others adopt its state; the
    newest such state is the target. With a single other peer there is nobody to outvote
    it, and it is trusted.
    Behind by the clock (rounds keyed by the clock, ``now_round`` the current key; this
    rule comes first): when this peer's state (its newest round ``my_round``) is more than
    :data:`_BEHIND_ROUNDS` rounds old, only the *current* other peers vote (their state's
    round within that many of the clock, and at most one ahead of it): the newest state
    newer than this peer's that a strict majority of them hold (now or in their history) is
    followed to where its holders are now, if that holder keeps it (its own plan, with this
    peer among its others, is to stay). The peers that kept training while this one was
    stopped carry the swarm's rounds, even when they are fewer than the peers that were
    stopped with it; staying on the old state would split the swarm in two lineages, and
    the smaller would lose its rounds later. A current peer never takes a state by this
    rule. So a peer that lies about being current steers only peers that are behind, and
    only when the current peers' majority state is in its history (it can then claim to
    have moved on from it); the current peers, and the others' diverged rule below, bring
    those back.
    Diverged: at the newest version both this peer and others have held, most peers (this
    one included; ties: the state a larger group produced, then the highest peer id) held
    another digest, e.g. because this peer averaged alone. An older state than this peer's
    is not taken from a holder that will take this peer's state by the rule above (the two
    would swap states, and the one ahead would lose its rounds).
    Only peers that serve the target now (their current version and digest) are returned
    to download from; when none does, there is nothing to do until the next look.
    """
    # A record without a digest is a peer that has not synced yet: it holds no state.
    others = [r for p, r in records.items() if p != me and r.digest]
    if not others:
        return None

    def servers(version: int, digest: str) -> list[str]:
        # Prefer peers that are not mid-average.
        ready = [r for r in others if r.version == version and r.digest == digest]
        return [r.peer for r in sorted(ready, key=lambda r: (r.busy, r.peer))]

    if now_round is not None and my_round < now_round - _BEHIND_ROUNDS:
        current = [r for r in others if _is_current(r.round, now_round)]
        votes: dict[tuple[int, str], int] = {}
        for r in current:
            for version, (digest, _) in r.history.items():
                if version > my_version:
                    votes[(version, digest)] = votes.get((version, digest), 0) + 1
        chosen = [vd for vd, count in votes.items() if count >= len(current) // 2 + 1]
        if chosen:
            version, digest = max(chosen)
            on = [r for r in current if r.history.get(version, ("",))[0] == digest]
            ahead = max(on, key=lambda r: (r.version, r.peer))
            # Only a state its holder keeps: one it averaged alone against the current
            # majority's, and is about to give up, would leave this peer on a lineage that
            # nobody carries on. Seen from the holder, this peer is one of its others.
            my_digest = my_history.get(my_version, ("",))[0]
            view = {r.peer: r for r in others if r.peer != ahead.peer}
            view[me] = _Record(me, "", my_version, my_digest, False, my_history, my_round)
            plan = _resync_plan(
                ahead.peer, ahead.version, ahead.history, view, ahead.round, now_round
            )
            if plan is None:
                ranked = servers(ahead.version, ahead.digest)
                return (ahead.version, ahead.digest, ranked) if ranked else None

    held: dict[tuple[int, str], int] = {}
    for r in others:
        for version, (digest, _) in r.history.items():
            held[(version, digest)] = held.get((version, digest), 0) + 1
    quorum = len(others) // 2 + 1
    newer = [vd for vd, count in held.items() if vd[0] > my_version and count >= quorum]
    if newer:
        version, digest = max(newer)
        ranked = servers(version, digest)
        return (version, digest, ranked) if ranked else None

    def majority(version: int) -> str:
        holders: dict[str, list[tuple[str, int]]] = {}
        for r in others:
            if version in r.history:
                digest, peers = r.history[version]
                holders.setdefault(digest, []).append((r.peer, peers))
        digest, peers = my_history[version]
        holders.setdefault(digest, []).append((me, peers))
        # Most holders; then the state a larger group produced (a round that did happen
        # beats one averaged alone); then the highest peer id, so every peer picks alike.
        return max(
            holders,
            key=lambda d: (
                len(holders[d]),
                max(n for _, n in holders[d]),
                max(p for p, _ in holders[d]),
            ),
        )

    common = {v for r in others for v in r.history} & set(my_history)
    if not common:
        return None
    version = max(common)
    digest = majority(version)
    if digest == my_history[version][0]:
        return None
    # The swarm's state at this version, or, if its holders have moved on, theirs now.
    ranked = servers(version, digest)
    if ranked:
        target = (version, digest, ranked)
    else:
        moved = [r for r in others if r.history.get(version, ("",))[0] == digest]
        if not moved:
            return None
        ahead = max(moved, key=lambda r: (r.version, r.peer))
        ranked = servers(ahead.version, ahead.digest)
        if not ranked:
            return None
        target = (ahead.version, ahead.digest, ranked)
    if target[0] < my_version and _would_adopt(me, my_version, my_history, others, ranked[0]):
        # An older state, whose holder will take this peer's newer one by the rule above (a
        # quorum of its others holds it): taking each other's would swap the two states, and
        # the peer ahead would lose its rounds. It keeps its state; the holder comes to it.
        return None
    return target


def _would_adopt(
    me: str,
    my_version: int,
    my_history: dict[int, tuple[str, int]],
    others: list[_Record],
    holder: str,
) -> bool:
    """Whether peer ``holder`` takes ``me``'s current state as newer (the quorum rule of
    :func:`_resync_plan`, seen from ``holder``: its others are everyone else, ``me`` included)."""
    mine = (my_version, my_history.get(my_version, ("",))[0])
    if not mine[1]:
        return False
    rest = [r for r in others if r.peer != holder]
    count = 1 + sum(1 for r in rest if r.history.get(mine[0], ("",))[0] == mine[1])
    return count >= (len(rest) + 1) // 2 + 1


# -- downloads ---------------------------------------------------------------------------------


def _fetch_state(
    server: Any,
    peer: str,
    timeout: float,
    key: bytes | None,
    fingerprint: str,
    tensors: dict[str, torch.Tensor],
    version: int,
    digest: str,
) -> tuple[Any, list[torch.Tensor]] | None:
    """``(metadata, tensors)`` downloaded from ``peer`` through ``server``, checked; else None.

    A failed download or a bad state is logged (the caller tries the next peer).

    Raises:
        ConsistencyError: ``peer`` serves a state with other names, shapes or dtypes.
    """
    try:
        metadata, received = server.lowcomm_download(
            _subclasses().PeerID.from_base58(peer).to_bytes(), timeout
        )
    except _FAILURES as e:
        logger.info("hivemind: state download from %s failed: %s", peer, e)
        return None
    problem = _download_problem(
        key, fingerprint, peer, metadata, received, tensors, version, digest
    )
    if problem is not None:
        if isinstance(problem, ConsistencyError):
            raise problem
        logger.warning("hivemind: state from %s rejected: %s", peer, problem)
        return None
    return metadata, received


# -- this peer's state -------------------------------------------------------------------------


class _SharedState:
    """The snapshot this peer serves to joiners, the digests it advertises, and downloads.

    ``version`` is the snapshot's ``meta.outer_step`` (else a count of publishes);
    ``history`` maps the last few versions to ``(digest, peers in the round that made it)``,
    which the heartbeat record carries so that peers a round apart can still compare.
    """

    def __init__(self, me: _Peer, procs: _Processes) -> None:
        self._me = me
        self._procs = procs
        self.version = 0
        self.digest = ""
        self.history: dict[int, tuple[str, int]] = {}
        self.round = -1  # the newest round key the snapshot holds work of (see _Record)
        self._snapshot: dict[str, torch.Tensor] = {}
        self._server: Any = None
        self.bytes_downloaded = 0

    def take_snapshot(
        self,
        tensors: dict[str, torch.Tensor],
        bump: bool = False,
        peers: int = 0,
        round: int | None = None,
    ) -> None:
        """Serve a copy of ``tensors`` from now on; ``bump``: a new version without a step;
        ``round``: the newest round key it holds work of (None: unchanged)."""
        snapshot = {k: t.detach().to("cpu", copy=True) for k, t in tensors.items()}
        digest = _state_hash(snapshot)
        step = snapshot.get("meta.outer_step")
        with self._me.lock:
            if round is not None:
                self.round = round
            if step is not None and step.numel() == 1:
                self.version = int(step.reshape(-1)[0])
            elif bump:
                self.version += 1
            self._snapshot = snapshot
            self.digest = digest
            self.history[self.version] = (digest, peers)
            for old in sorted(self.history)[:-8]:
                del self.history[old]

    def plan(self, records: dict[str, _Record]) -> tuple[int, str, list[str]] | None:
        """(version, digest, peers to download from) if this peer must resync, else None.

        The rule is :func:`_resync_plan`'s: behind a higher version, or diverged from the
        majority at the newest version held in common; on clock-keyed rounds, behind the
        clock.
        """
        clock = self._me.round_clock
        now_round = None if clock is None else math.floor(time.time() / clock)
        with self._me.lock:
            my_version, my_history, my_round = self.version, dict(self.history), self.round
        return _resync_plan(self._me.id, my_version, my_history, records, my_round, now_round)

    def _serve(self) -> Any:
        # Called by the state averager, on hivemind's state-fetching thread in this process.
        me = self._me
        with me.lock:
            names = sorted(self._snapshot)
            tensors = [self._snapshot[n].clone() for n in names]
            version, digest = self.version, self.digest
        metadata = _state_metadata(me.key, me.id, me.fingerprint, names, version, digest)
        return metadata, tensors, None

    def server(self) -> Any:
        """The averager that serves this peer's snapshot (and downloads others'), started once."""
        if self._server is None:
            me = self._me
            tag = hashlib.sha256(me.fingerprint.encode()).hexdigest()[:8]
            self._server = self._procs.start_averager(
                f"{me.prefix}{tag}st", 1, Identity(), me.timeouts, state_provider=self._serve
            )
        return self._server

    def download(
        self,
        tensors: dict[str, torch.Tensor],
        version: int,
        digest: str,
        candidates: list[str],
        rounds: dict[str, int] | None = None,
    ) -> bool:
        """Copy the state ``version`` (``digest``) into ``tensors`` from the first candidate
        that serves it (checked); False if none did. ``rounds``: each candidate's state round
        (its record's), which the downloaded state takes.

        Raises:
            ConsistencyError: a candidate serves a state with other names, shapes or dtypes.
        """
        me = self._me
        server = self.server()
        timeout = me.timeouts.download_timeout
        for peer in candidates[: me.timeouts.DOWNLOAD_TRIES]:
            t0 = time.monotonic()
            fetched = _fetch_state(
                server, peer, timeout, me.key, me.fingerprint, tensors, version, digest
            )
            if fetched is None:
                continue
            metadata, received = fetched
            with torch.no_grad():
                for name, value in zip(metadata["names"], received):
                    tensors[name].copy_(value.to(tensors[name].device))
            self.bytes_downloaded += sum(t.numel() * t.element_size() for t in received)
            with me.lock:
                self.history.clear()  # digests of the state this peer no longer holds
            self.take_snapshot(tensors, round=(rounds or {}).get(peer, -1))
            logger.info(
                "hivemind: downloaded the swarm's state, version %d, from %s in %.2fs",
                metadata["v"],
                peer,
                time.monotonic() - t0,
            )
            return True
        return False
