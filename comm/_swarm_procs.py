"""The processes of a swarm peer: starting and stopping them, and where hivemind is imported.

Builds the DHT (:func:`_make_dht`) and the averagers (:func:`_build_averager`) as forked
children that ignore Ctrl-C and die with their parent (:func:`_die_with_parent`), turns
SIGTERM into a clean exit, and shuts everything down in order (:func:`_shutdown_swarm`).
:class:`_Processes` holds one peer's DHT and averagers and stops them together. Also the
bootstrap node (:func:`start_bootstrap_dht`, public through
:mod:`lowcomm.comm.hivemind`). :func:`_subclasses` imports
:mod:`lowcomm.comm._hivemind_subclasses` (and with it hivemind) on first use, so that
hivemind stays an optional extra; ``_FAILURES`` is what a call into those processes raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing as mp
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from lowcomm.comm._swarm_timeouts import SwarmTimeouts

if TYPE_CHECKING:
    from types import ModuleType

    from lowcomm.comm.compression.base import Compressor

# The backend's own logger, whichever of its modules the message comes from.
logger = logging.getLogger("lowcomm.comm.hivemind")

# What a failed step or RPC can raise here: hivemind forwards asyncio.CancelledError (a
# BaseException) from its event loop when a round is torn down at its deadline.
_FAILURES = (Exception, asyncio.CancelledError)
# Elements per all-reduce part before rounding to the compressor's granularity (512 KiB of
# fp32, under p2pd's 4 MiB message limit whatever the compressor).
_PART_ELEMS = 2**17

_INSTALL_HINT = "the hivemind backend needs hivemind: pip install 'lowcomm[hivemind]'"


def _subclasses() -> ModuleType:
    """:mod:`lowcomm.comm._hivemind_subclasses`, imported on first use: hivemind is optional.

    Raises:
        ImportError: hivemind is not installed (the message says how to install it).
    """
    try:
        import hivemind  # noqa: F401
    except ImportError as e:
        raise ImportError(_INSTALL_HINT) from e
    from lowcomm.comm import _hivemind_subclasses

    return _hivemind_subclasses


# -- process hygiene ---------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the thread that forked it exits."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _start_child(proc: mp.process.BaseProcess) -> None:
    """Start a forked child that ignores Ctrl-C (the parent shuts it down in order)."""
    if threading.current_thread() is not threading.main_thread():
        proc.start()
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        proc.start()
    finally:
        signal.signal(signal.SIGINT, previous)


def _sigterm_to_exit() -> Any:
    """Make SIGTERM raise SystemExit (so cleanup runs); return the handler it replaced.

    Only from the main thread and where nobody else handles SIGTERM; otherwise None.
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None

    def on_sigterm(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, on_sigterm)


# -- averagers ---------------------------------------------------------------------------------


def _build_averager(
    dht: Any,
    prefix: str,
    numel: int,
    codec: Compressor,
    timeouts: SwarmTimeouts,
    *,
    run_key: bytes | None,
    pdeathsig: bool,
    state_provider: Callable[[], Any] | None,
    peers_key: str,
) -> Any:
    """An averager (not started) of one ``numel``-element vector; serves state if given one."""
    hm = _subclasses()
    t = timeouts
    granularity = max(1, int(getattr(codec, "granularity", 1)))
    part = granularity * max(1, round(_PART_ELEMS / granularity))
    state = state_provider is not None
    averager = hm.Averager(
        [torch.zeros(numel, dtype=torch.float32)],
        dht,
        start=False,
        prefix=prefix,
        codec=codec,
        run_key=run_key,
        pdeathsig=pdeathsig,
        state_provider=state_provider,
        min_matchmaking_time=t.matchmaking_time,
        request_timeout=t.request_timeout,
        allreduce_timeout=t.averaging_timeout,
        next_chunk_timeout=t.next_chunk_timeout,
        compression=hm.WireCodec(codec),
        part_size_bytes=4 * part,
        allow_state_sharing=state,
        declare_state_period=max(10.0, t.peer_ttl),
        shutdown_timeout=5,
    )
    averager._lowcomm_peers_key = peers_key
    return averager


# -- DHT ---------------------------------------------------------------------------------------


def _make_dht(
    initial_peers: Sequence[str],
    host_maddrs: Sequence[str],
    announce_maddrs: Sequence[str] | None,
    start_timeout: float,
    identity_path: str | None = None,
) -> Any:
    hm = _subclasses()
    method = mp.get_start_method(allow_none=True)
    if method not in (None, "fork"):
        raise RuntimeError(
            f"hivemind's DHT and averagers must be forked, but this process's multiprocessing "
            f'start method is {method!r} (hivemind then fails with "cannot pickle '
            f"'_thread.lock'\" or hangs). Do not set_start_method('spawn') in a process that "
            f"runs a swarm peer, or call multiprocessing.set_start_method('fork', force=True) "
            f"before building the backend"
        )
    for maddr in initial_peers:
        if not isinstance(maddr, str) or "/p2p/" not in maddr:
            raise ValueError(
                f"initial peer {maddr!r} must be a multiaddr ending in /p2p/<peer id>, "
                f"e.g. /ip4/1.2.3.4/tcp/31337/p2p/12D3KooW... (printed by `lowcomm dht`)"
            )
    kwargs: dict[str, Any] = dict(host_maddrs=list(host_maddrs))
    if announce_maddrs:
        kwargs["announce_maddrs"] = list(announce_maddrs)
    if identity_path:
        kwargs["identity_path"] = identity_path
    dht = hm.SwarmDHT(
        initial_peers=list(initial_peers) or None,
        start=False,
        await_ready=False,
        **kwargs,
    )
    dht._lowcomm_pdeathsig = threading.current_thread() is threading.main_thread()
    _start_child(dht)
    t0 = time.monotonic()
    try:
        dht.wait_until_ready(timeout=start_timeout)
    except Exception as e:
        _stop_child(dht, 2)
        where = ", ".join(initial_peers) if initial_peers else "(no initial peers)"
        if isinstance(e, TimeoutError | mp.TimeoutError) or type(e).__name__ == "TimeoutError":
            raise ConnectionError(
                f"the hivemind DHT did not start within {start_timeout:.0f}s; initial peers "
                f"{where} did not answer"
            ) from None
        raise ConnectionError(
            f"could not join the hivemind DHT through {where} "
            f"({time.monotonic() - t0:.1f}s): {e}. Check that the addresses are right and "
            f"that a `lowcomm dht` or another peer is running there and reachable"
        ) from None
    return dht


# -- shutdown ----------------------------------------------------------------------------------


def _stop_child(proc: Any, wait: float) -> None:
    """Shut a DHT or averager process down; kill it if it still runs ``wait`` seconds later."""
    with contextlib.suppress(*_FAILURES):
        if proc.is_alive():
            proc.shutdown()
        proc.join(wait)
        if proc.is_alive():
            proc.kill()


def _shutdown_swarm(averagers: list[Any], dht: Any) -> None:
    """Stop ``averagers`` then ``dht``, killing whatever does not stop in time."""
    for averager in list(averagers):
        _stop_child(averager, SwarmTimeouts.AVERAGER_STOP_TIMEOUT)
    _stop_child(dht, 5)


class _Processes:
    """A peer's DHT and its averager processes, stopped together when the peer goes.

    Averagers are forked with ``lock`` held: the lock that guards the DHT pipe, so that no
    thread writes to it mid-fork. Everything started here is stopped by :meth:`close`, when
    ``owner`` is garbage collected, or at interpreter exit (``weakref.finalize``), averagers
    first, then the DHT.
    """

    def __init__(
        self,
        owner: object,
        dht: Any,
        lock: threading.RLock,
        *,
        run_key: bytes | None,
        peers_key: str,
    ) -> None:
        self._dht = dht
        self._lock = lock
        self._run_key = run_key
        self._peers_key = peers_key
        self._pdeathsig = threading.current_thread() is threading.main_thread()
        self._averagers: list[Any] = []
        self._finalizer = weakref.finalize(owner, _shutdown_swarm, self._averagers, dht)

    def start_averager(
        self,
        prefix: str,
        numel: int,
        codec: Compressor,
        timeouts: SwarmTimeouts,
        state_provider: Callable[[], Any] | None = None,
    ) -> Any:
        """A started averager of one ``numel``-element vector (serving state if given one)."""
        with self._lock:  # no heartbeat on the DHT pipe while forking
            averager = _build_averager(
                self._dht,
                prefix,
                numel,
                codec,
                timeouts,
                run_key=self._run_key,
                pdeathsig=self._pdeathsig,
                state_provider=state_provider,
                peers_key=self._peers_key,
            )
            _start_child(averager)
            self._averagers.append(averager)
        averager.wait_until_ready(timeout=timeouts.AVERAGER_START_TIMEOUT)
        return averager

    def stop_averager(self, averager: Any) -> None:
        with self._lock:
            if averager in self._averagers:
                self._averagers.remove(averager)
        _stop_child(averager, SwarmTimeouts.AVERAGER_STOP_TIMEOUT)

    def close(self) -> None:
        """Stop every averager, then the DHT. Idempotent."""
        self._finalizer()


# -- bootstrap node ----------------------------------------------------------------------------


def start_bootstrap_dht(
    host_maddrs: Sequence[str] = ("/ip4/0.0.0.0/tcp/0",),
    announce_maddrs: Sequence[str] | None = None,
    initial_peers: Sequence[str] = (),
    identity_path: str | None = None,
    start_timeout: float = 30.0,
) -> tuple[Any, list[str]]:
    """Start a DHT node that peers can use as their initial peer (what ``lowcomm dht`` runs).

    It stores nothing of its own and does no training; it only keeps the swarm's address book.
    Keep the returned object alive and call ``dht.shutdown()`` when done.

    Args:
        host_maddrs: where to listen, e.g. ``/ip4/0.0.0.0/tcp/31337`` for a fixed port.
        announce_maddrs: public addresses to announce (behind NAT or in a container).
        initial_peers: other bootstrap nodes to connect to (for redundancy).
        identity_path: a private key file, so the peer id (and the multiaddrs) survive restarts.
        start_timeout: seconds to wait for the daemon (and the initial peers) before failing.

    Returns:
        ``(dht, multiaddrs)``: the running DHT and the addresses to pass as ``initial_peers``.

    Raises:
        ConnectionError: if it cannot start or reach ``initial_peers`` within ``start_timeout``.
    """
    dht = _make_dht(initial_peers, host_maddrs, announce_maddrs, start_timeout, identity_path)
    return dht, [str(m) for m in dht.get_visible_maddrs()]
