"""WAN simulator: N hosts in Linux network namespaces behind rate-limited links.

Run from the repository root (as root; needs iproute2's ``ip`` and ``tc``)::

    python -m scripts.bench.wansim --hosts 2 --rate 100mbit -- \\
        torchrun --nnodes 2 --node-rank {rank} --nproc-per-node 1 \\
        --master-addr {addr0} --master-port 29500 train.py
    python -m scripts.bench.wansim measure --rate 100mbit --seconds 3
    python -m scripts.bench.wansim cleanup --prefix lcwan

Topology (a star, one access link per host)::

    netns <tag>-h0            netns <tag>-br                 netns <tag>-h1
    lo, <tag>h0 10.77.0.1 ==veth== <tag>p0 -+- <tag>br -+- <tag>p1 ==veth== <tag>h1 10.77.0.2, lo

``<tag>`` is ``prefix`` plus four random hex digits, so parallel runs and leftovers never
collide. The bridge lives in its own namespace, not the root one: the simulator never adds,
changes or routes anything in the root namespace, the host namespaces have no default route
(traffic can only reach the other simulated hosts), and removing a run is removing its
namespaces. Each veth gets a ``tbf`` qdisc on BOTH ends: the host end shapes what the host
sends (upload), the bridge end shapes what it receives (download). ``netem`` is not assumed;
latency, if wanted, belongs in the process.

The names, addresses and ``ip``/``tc`` command lines come from :mod:`scripts.bench.topology` (pure,
testable without root); this module runs them and re-exports every public name.

As a library::

    with WanSim(num_hosts=3, rate="100mbit", prefix="lcbench") as sim:
        procs = [sim.popen(i, ["python", "x.py"]) for i in range(3)]  # env: sim.env(i)
        for p in procs:
            p.wait(timeout=600)
        wire = sim.counters()  # per host: tx_bytes, rx_bytes of its veth

Teardown always happens: on leaving the ``with`` block (normally or by an exception), on
SIGINT/SIGTERM/SIGHUP while the simulator is active (handlers are installed for its
lifetime), and at interpreter exit. It kills the worker process groups first, then every
process still inside the namespaces, then deletes links and namespaces.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import logging
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import IO, Any

from scripts.bench.topology import (
    DEFAULT_PREFIX,
    DEFAULT_SUBNET,
    SUFFIX_HEX_DIGITS,
    SimNames,
    _check_prefix,
    _network,
    host_address,
    make_names,
    parse_rate,
    setup_commands,
    substitute,
    tbf_command,
    tbf_params,
    teardown_commands,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_PREFIX",
    "DEFAULT_SUBNET",
    "SimNames",
    "WanSim",
    "check_prerequisites",
    "cleanup",
    "host_address",
    "leftover_patterns",
    "main",
    "make_names",
    "measure_throughput",
    "parse_rate",
    "setup_commands",
    "substitute",
    "tbf_command",
    "tbf_params",
    "teardown_commands",
]

_HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_EXTRA_TOOL_PATH = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")


# --------------------------------------------------------------------------- running commands


def _tool_path(tool: str) -> str | None:
    path = os.environ.get("PATH", os.defpath) + os.pathsep + os.pathsep.join(_EXTRA_TOOL_PATH)
    return shutil.which(tool, path=path)


def check_prerequisites() -> None:
    """Checks that we may and can create namespaces and qdiscs.

    Raises:
        PermissionError: If not running as root (``ip netns``/``tc`` need CAP_SYS_ADMIN and
            CAP_NET_ADMIN).
        FileNotFoundError: If ``ip`` or ``tc`` (package iproute2) is not installed.
    """
    if os.geteuid() != 0:
        raise PermissionError(
            "wansim needs root (euid 0) to create network namespaces with `ip netns` and "
            "shape links with `tc`; rerun with sudo, e.g. "
            "`sudo -E .venv/bin/python -m scripts.bench.wansim ...` from the repository root"
        )
    missing = [t for t in ("ip", "tc") if _tool_path(t) is None]
    if missing:
        raise FileNotFoundError(
            f"wansim needs {' and '.join(f'`{t}`' for t in missing)} from iproute2 on PATH "
            "(e.g. `apt-get install iproute2`)"
        )


def _run(argv: Sequence[str], check: bool = True, timeout: float = 30.0) -> str:
    """Runs one tool command; returns stdout. Failure raises (check) or is logged."""
    exe = _tool_path(argv[0]) or argv[0]
    try:
        res = subprocess.run(
            [exe, *argv[1:]], capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        if check:
            raise RuntimeError(f"wansim: `{' '.join(argv)}` failed: {e}") from e
        logger.debug("ignored failure of %s: %s", " ".join(argv), e)
        return ""
    if res.returncode != 0:
        if check:
            raise RuntimeError(
                f"wansim: `{' '.join(argv)}` exited {res.returncode}: {res.stderr.strip()}"
            )
        logger.debug("ignored failure of %s: %s", " ".join(argv), res.stderr.strip())
    return res.stdout


def _list_netns() -> list[str]:
    # `ip netns list` prints "name (id: N)" for namespaces with an id; keep the name.
    return [line.split()[0] for line in _run(["ip", "netns", "list"]).splitlines() if line]


def _netns_pids(netns: str) -> list[int]:
    return [int(p) for p in _run(["ip", "netns", "pids", netns], check=False).split()]


def _kill_pids(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def leftover_patterns(prefix: str) -> tuple[re.Pattern[str], re.Pattern[str]]:
    """Regexes (for ``fullmatch``) of the namespace and interface names a prefix owns.

    Exactly the :class:`SimNames` scheme, so a shorter prefix never claims a longer one's
    runs (``lc`` + 4 hex digits cannot be followed by ``an...`` of ``lcwan``).
    """
    _check_prefix(prefix)
    tag = re.escape(prefix) + rf"[0-9a-f]{{{SUFFIX_HEX_DIGITS}}}"
    return re.compile(tag + r"-(?:br|h\d+)"), re.compile(tag + r"(?:br|[hp]\d+)")


def cleanup(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Removes leftovers of simulator runs whose prefix is ``prefix``.

    Only names that fit the simulator's scheme exactly (``<prefix><4 hex>-br``,
    ``<prefix><4 hex>-h<i>``) are touched, so ``cleanup("lc")`` leaves ``lcwan...`` runs and
    anything not made by this tool alone. Processes still inside a matching namespace are
    killed (SIGKILL) before it is deleted.

    Args:
        prefix: The ``prefix`` the runs were started with.

    Returns:
        Names of the namespaces and root-namespace links that were removed.

    Raises:
        PermissionError, FileNotFoundError: See :func:`check_prerequisites`.
    """
    ns_re, dev_re = leftover_patterns(prefix)
    check_prerequisites()
    removed: list[str] = []
    for ns in _list_netns():
        if ns_re.fullmatch(ns):
            _kill_pids(_netns_pids(ns), signal.SIGKILL)
            _run(["ip", "netns", "del", ns], check=False)
            removed.append(ns)
    # Never created in the root namespace by this tool; removed in case an older or
    # interrupted tool did.
    for link in json.loads(_run(["ip", "-j", "link", "show"]) or "[]"):
        name = link.get("ifname", "")
        if dev_re.fullmatch(name):
            _run(["ip", "link", "del", "dev", name], check=False)
            removed.append(name)
    if removed:
        logger.info("wansim cleanup removed %s", ", ".join(removed))
    return removed


# --------------------------------------------------------------------------- the simulator


class WanSim:
    """N hosts in network namespaces, each behind a ``tbf``-shaped access link to a bridge.

    Call protocol: use as a context manager (or ``start()`` / ``close()``) in the process that
    owns the run. Between enter and exit, start workers with :meth:`popen` (host ``i``'s
    namespace, own process group, env from :meth:`env`), read wire counters with
    :meth:`counters`. Exit kills all workers and removes the network. While active (main
    thread only), SIGINT raises KeyboardInterrupt and SIGTERM/SIGHUP raise
    ``SystemExit(128 + signum)``, so the ``with`` unwinds through the teardown; a signal that
    arrives during teardown is re-delivered to the previous handler afterwards. Interpreter
    exit also tears down. Needs root.

    The link model is the one behind the communication-bound regime that DiLoCo (Douillard
    et al., 2023, arXiv:2311.08105) and Streaming DiLoCo (Douillard et al., 2025,
    arXiv:2501.18512) target: each worker has its own upload and download capacity ``rate``;
    the bridge is non-blocking, so the bottleneck is always an access link.

    Args:
        num_hosts: Number of hosts (namespaces).
        rate: Per-direction rate of every access link (``"100mbit"``, int bit/s) or None for
            unshaped veths.
        prefix: Name prefix (see :class:`SimNames`); :func:`cleanup` takes the same prefix.
        subnet: Private IPv4 network; host ``i`` gets its ``(i+1)``-th address.
        kill_timeout: Seconds between SIGTERM and SIGKILL for workers at teardown.
        suffix: Fixed instance suffix (4 hex digits); random when None.
    """

    def __init__(
        self,
        num_hosts: int,
        rate: str | int | None,
        prefix: str = DEFAULT_PREFIX,
        subnet: str = DEFAULT_SUBNET,
        kill_timeout: float = 5.0,
        suffix: str | None = None,
    ) -> None:
        self.names = make_names(prefix, num_hosts, suffix)
        self._fixed_suffix = suffix is not None
        self.rate_bps = None if rate is None else parse_rate(rate)
        self.rate = rate
        self.subnet = subnet
        _network(subnet, num_hosts)
        if kill_timeout < 0:
            raise ValueError(f"kill_timeout ({kill_timeout}) must be >= 0")
        self.kill_timeout = kill_timeout
        self.processes: list[tuple[int, subprocess.Popen[Any]]] = []
        self._started = False
        self._closing = False
        self._closed = False
        self._owns_names = False
        self._deferring = False
        self._old_handlers: dict[int, Any] = {}
        self._pending_signal: int | None = None

    @property
    def num_hosts(self) -> int:
        """Number of simulated hosts."""
        return self.names.num_hosts

    # -- lifecycle

    def __enter__(self) -> WanSim:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> WanSim:
        """Checks prerequisites, installs signal handlers, creates the network.

        Returns:
            self.

        Raises:
            PermissionError, FileNotFoundError: See :func:`check_prerequisites`.
            RuntimeError: If a setup command fails (what was created is removed first).
        """
        if self._started:
            raise RuntimeError("WanSim.start() called twice; use a new instance")
        check_prerequisites()
        self._started = True
        self._install_handlers()
        atexit.register(self.close)
        # Signals wait until setup is done, so the bookkeeping of what exists stays exact.
        self._deferring = True
        try:
            existing = set(_list_netns())
            for _ in range(16):
                if not existing & set(self.names.all_netns()):
                    break
                if self._fixed_suffix:
                    raise RuntimeError(
                        f"namespaces of {self.names.tag!r} exist already; "
                        f"run `python -m scripts.bench.wansim cleanup --prefix {self.names.prefix}`"
                    )
                self.names = make_names(self.names.prefix, self.num_hosts)
            for k, argv in enumerate(setup_commands(self.names, self.rate, self.subnet)):
                _run(argv)
                # The first command creates the bridge namespace atomically (O_EXCL): once it
                # succeeded the tag is ours; if it failed, the names may be another run's.
                self._owns_names = self._owns_names or k == 0
            self._deferring = False
            pending, self._pending_signal = self._pending_signal, None
            if pending is not None:
                self._raise_for(pending)
        except BaseException:
            self._deferring = False
            self.close()
            raise
        logger.info(
            "wansim %s up: %d hosts at %s per direction",
            self.names.tag,
            self.num_hosts,
            self.rate if self.rate is not None else "unshaped",
        )
        return self

    def close(self) -> None:
        """Kills workers and removes the network. Idempotent; never raises for cleanup."""
        if self._closed or not self._started:
            return
        self._closing = True
        try:
            # Without the names we started nothing and may touch nothing: they are another run's.
            if self._owns_names:
                self._kill_workers()
                for argv in teardown_commands(self.names):
                    _run(argv, check=False)
                logger.info("wansim %s torn down", self.names.tag)
        finally:
            self._closed = True
            atexit.unregister(self.close)
            self._restore_handlers()
            pending, self._pending_signal = self._pending_signal, None
            if pending is not None:
                # A signal that arrived during teardown goes to whoever handled it before us
                # (for SIGTERM usually the default action: die, now that nothing is left).
                signal.raise_signal(pending)

    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            logger.warning("wansim started outside the main thread: no signal handlers")
            return
        for sig in _HANDLED_SIGNALS:
            old = signal.signal(sig, self._on_signal)
            # None: a handler set outside Python, which cannot be reinstalled from here.
            self._old_handlers[sig] = signal.SIG_DFL if old is None else old

    def _restore_handlers(self) -> None:
        for sig, old in self._old_handlers.items():
            # Only if still ours: a nested instance started later owns the slot until it ends.
            if signal.getsignal(sig) == self._on_signal:
                signal.signal(sig, old)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._closed:
            # Stale: a nested instance restored us after we ended. Act as our predecessor.
            old = self._old_handlers.get(signum, signal.SIG_DFL)
            if callable(old):
                old(signum, frame)
            else:
                signal.signal(signum, old)
                signal.raise_signal(signum)
            return
        if self._closing or self._deferring:
            self._pending_signal = signum
            return
        self._raise_for(signum)

    def _raise_for(self, signum: int) -> None:
        logger.warning("wansim %s: got signal %d, tearing down", self.names.tag, signum)
        # Unwinding through the caller's `with` (or our own start()) runs close().
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    def _kill_workers(self) -> None:
        live = [p for _, p in self.processes if p.poll() is None]
        netns = [self.names.host_netns(i) for i in range(self.num_hosts)]
        # Groups first (a worker and its children, e.g. torchrun's); then anything else still
        # inside our namespaces (daemonised children), which only we can have put there.
        for p in live:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGTERM)
        strays = [pid for ns in netns for pid in _netns_pids(ns)]
        _kill_pids(strays, signal.SIGTERM)
        deadline = time.monotonic() + self.kill_timeout
        for p in live:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
        while strays and time.monotonic() < deadline:
            strays = [pid for ns in netns for pid in _netns_pids(ns)]
            if strays:
                time.sleep(0.05)
        for p in live:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)
        _kill_pids([pid for ns in netns for pid in _netns_pids(ns)], signal.SIGKILL)
        for p in live:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5.0)

    # -- per host

    def _check_host(self, i: int) -> None:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.num_hosts:
            raise ValueError(f"host index {i!r} must be an int in [0, {self.num_hosts})")

    def host_address(self, i: int) -> str:
        """IPv4 address of host ``i`` (reachable from every other host)."""
        self._check_host(i)
        return host_address(i, self.subnet)

    def ifname(self, i: int) -> str:
        """Name of host ``i``'s network interface, inside its namespace."""
        self._check_host(i)
        return self.names.host_dev(i)

    def placeholders(self, i: int) -> dict[str, object]:
        """Values for :func:`substitute` on host ``i``."""
        return {
            "rank": i,
            "addr0": self.host_address(0),
            "addr": self.host_address(i),
            "num_hosts": self.num_hosts,
            "ifname": self.ifname(i),
        }

    def env(self, i: int) -> dict[str, str]:
        """Environment variables for a worker on host ``i``.

        ``LOWCOMM_WAN_{RANK,NUM_HOSTS,ADDR,ADDR0,IFNAME,RATE}``, ``MASTER_ADDR`` (host 0, for
        torch ``env://`` / torchrun rendezvous) and ``GLOO_SOCKET_IFNAME`` /
        ``NCCL_SOCKET_IFNAME`` / ``TP_SOCKET_IFNAME`` (the veth, so collectives use the shaped
        link). No port is set: each namespace is fresh, so any fixed port is free there.
        """
        dev = self.ifname(i)
        return {
            "LOWCOMM_WAN_RANK": str(i),
            "LOWCOMM_WAN_NUM_HOSTS": str(self.num_hosts),
            "LOWCOMM_WAN_ADDR": self.host_address(i),
            "LOWCOMM_WAN_ADDR0": self.host_address(0),
            "LOWCOMM_WAN_IFNAME": dev,
            "LOWCOMM_WAN_RATE": "" if self.rate_bps is None else str(self.rate_bps),
            "MASTER_ADDR": self.host_address(0),
            "GLOO_SOCKET_IFNAME": dev,
            "NCCL_SOCKET_IFNAME": dev,
            "TP_SOCKET_IFNAME": dev,
        }

    def netns_argv(self, i: int, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run in host ``i``'s namespace (``ip netns exec``)."""
        self._check_host(i)
        if not argv:
            raise ValueError("argv must not be empty")
        return [_tool_path("ip") or "ip", "netns", "exec", self.names.host_netns(i), *argv]

    def popen(
        self, i: int, argv: Sequence[str], env: Mapping[str, str] | None = None, **kwargs: Any
    ) -> subprocess.Popen[Any]:
        """Starts ``argv`` on host ``i`` in a new process group; teardown will kill it.

        Args:
            i: Host index.
            argv: Command; ``ip netns exec`` execs it, so the returned pid is the command's.
            env: Extra environment, applied over ``os.environ`` and :meth:`env` ``(i)``.
            **kwargs: Passed to :class:`subprocess.Popen` (``stdout``, ``cwd``, ...);
                ``start_new_session`` is always True.

        Returns:
            The process.
        """
        if not self._started or self._closing:
            raise RuntimeError("WanSim is not running; use `with WanSim(...) as sim:`")
        full_env = {**os.environ, **self.env(i), **(env or {})}
        kwargs["start_new_session"] = True
        proc = subprocess.Popen(self.netns_argv(i, argv), env=full_env, **kwargs)
        self.processes.append((i, proc))
        return proc

    def counters(self) -> list[dict[str, Any]]:
        """Byte and packet counters of each host's veth (rtnl_link_stats64, via netlink).

        tx is what host ``i`` sent, rx what it received; read them before and after a phase
        and subtract. veth passes GSO/GRO super-packets of up to 64 KiB and counts each
        once with its headers, so a bulk TCP transfer shows ~0.15% over its payload, not the
        ~4.5% that per-frame headers (MTU 1500) add on a real wire; the tbf shaper, in
        contrast, charges per-frame bytes, so TCP payload gets ~95.6% of ``rate``.

        Returns:
            Per host: ``rank``, ``addr``, ``ifname``, ``tx_bytes``, ``rx_bytes``,
            ``tx_packets``, ``rx_packets``.
        """
        if not self._started or self._closed:
            raise RuntimeError("WanSim is not running; counters exist only while it is")
        out = []
        for i in range(self.num_hosts):
            argv = ["ip", "-n", self.names.host_netns(i), "-s", "-j", "link", "show"]
            (link,) = json.loads(_run([*argv, "dev", self.names.host_dev(i)]))
            stats = link["stats64"]
            out.append(
                {
                    "rank": i,
                    "addr": self.host_address(i),
                    "ifname": self.names.host_dev(i),
                    "tx_bytes": stats["tx"]["bytes"],
                    "rx_bytes": stats["rx"]["bytes"],
                    "tx_packets": stats["tx"]["packets"],
                    "rx_packets": stats["rx"]["packets"],
                }
            )
        return out


# --------------------------------------------------------------------------- measurement

# Tiny stdlib-only peers run with `python -S -c`, so they start in milliseconds and need
# nothing from this file's import path.
_RECEIVER = r"""
import json, socket, sys, time
addr, timeout = sys.argv[1], float(sys.argv[2])
srv = socket.socket()
srv.bind((addr, 0))
srv.listen(1)
srv.settimeout(timeout)
print(json.dumps({"port": srv.getsockname()[1]}), flush=True)
conn, _ = srv.accept()
conn.settimeout(timeout)
buf = bytearray(1 << 20)
total = timed = 0
first = last = None
deadline = time.monotonic() + timeout
try:
    while time.monotonic() < deadline:
        n = conn.recv_into(buf)
        if not n:
            break
        last = time.monotonic()
        if first is None:
            first = last
        else:
            timed += n
        total += n
except OSError as e:
    print(json.dumps({"error": repr(e)}), flush=True)
    sys.exit(1)
span = (last - first) if first is not None else 0.0
print(json.dumps({"bytes": total, "timed_bytes": timed, "seconds": span}), flush=True)
"""

_SENDER = r"""
import json, socket, sys, time
addr, port, seconds, max_bytes = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
s = socket.create_connection((addr, port), timeout=10.0)
chunk = memoryview(bytes(1 << 16))
sent = 0
t0 = time.monotonic()
end = t0 + seconds
while sent < max_bytes and time.monotonic() < end:
    sent += s.send(chunk[: min(len(chunk), max_bytes - sent)])
s.shutdown(socket.SHUT_WR)
s.close()
print(json.dumps({"sent": sent, "seconds": time.monotonic() - t0}), flush=True)
"""


def _read_line(stream: IO[str], timeout: float) -> str:
    ready, _, _ = select.select([stream], [], [], timeout)
    if not ready:
        raise TimeoutError(f"no output within {timeout} s")
    return stream.readline()


def measure_throughput(
    rate: str | int | None,
    seconds: float = 3.0,
    prefix: str = DEFAULT_PREFIX,
    max_bytes: int | None = None,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """Measures one TCP stream from host 0 to host 1 through a 2-host simulated link.

    Bounded twice: the sender stops after ``seconds`` or ``max_bytes`` (default: 1.5x what
    the rate allows, plus 4 MiB; 2 GiB if unshaped), and every wait has ``timeout``.

    Args:
        rate: Link rate, or None for unshaped veths.
        seconds: How long the sender sends.
        prefix: Name prefix for the simulator.
        max_bytes: Cap on bytes sent.
        timeout: Seconds any single wait may take.

    Returns:
        ``goodput_mbit_s`` (TCP payload at the receiver, after its first read so the initial
        bucket burst is not counted; ~95.6% of the rate, as tbf charges Ethernet/IP/TCP
        headers per 1514-byte frame), ``counter_mbit_s`` (host 1's rx counter over the same
        span, see :meth:`WanSim.counters`), ``rate_mbit_s`` (nominal), bytes, seconds.

    Raises:
        RuntimeError: If a peer fails or reports an error.
    """
    if seconds <= 0:
        raise ValueError(f"seconds ({seconds}) must be positive")
    if max_bytes is None:
        max_bytes = (
            2 << 30 if rate is None else int(parse_rate(rate) / 8 * seconds * 1.5) + (4 << 20)
        )
    py = [sys.executable, "-S", "-c"]
    with WanSim(2, rate, prefix=prefix) as sim:
        recv = sim.popen(
            1,
            [*py, _RECEIVER, sim.host_address(1), str(timeout)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert recv.stdout is not None
        port = json.loads(_read_line(recv.stdout, timeout))["port"]
        before = sim.counters()
        send = sim.popen(
            0,
            [*py, _SENDER, sim.host_address(1), str(port), str(seconds), str(max_bytes)],
            stdout=subprocess.PIPE,
            text=True,
        )
        send_out, _ = send.communicate(timeout=seconds + timeout)
        recv_out, _ = recv.communicate(timeout=timeout)
        after = sim.counters()
    if send.returncode != 0 or recv.returncode != 0:
        raise RuntimeError(
            f"throughput peers failed: sender rc={send.returncode} {send_out.strip()!r}, "
            f"receiver rc={recv.returncode} {recv_out.strip()!r}"
        )
    sent = json.loads(send_out.strip().splitlines()[-1])
    got = json.loads(recv_out.strip().splitlines()[-1])
    span = got["seconds"]
    wire = {k: after[i][k] - before[i][k] for i, k in ((0, "tx_bytes"), (1, "rx_bytes"))}
    return {
        "rate_mbit_s": None if rate is None else parse_rate(rate) / 1e6,
        "goodput_mbit_s": got["timed_bytes"] * 8 / span / 1e6 if span > 0 else None,
        "counter_mbit_s": wire["rx_bytes"] * 8 / span / 1e6 if span > 0 else None,
        "seconds": span,
        "sent_bytes": sent["sent"],
        "received_bytes": got["bytes"],
        "tx_bytes_host0": wire["tx_bytes"],
        "rx_bytes_host1": wire["rx_bytes"],
    }


# --------------------------------------------------------------------------- CLI


def _parse_cli_rate(text: str) -> str | None:
    if text.lower() in ("none", "unshaped"):
        return None
    parse_rate(text)
    return text


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m scripts.bench.wansim",
        usage="%(prog)s [run] --hosts N --rate RATE [options] -- CMD [ARG ...]",
        description=(
            "Run CMD once per host, each in its own network namespace behind a tbf-shaped "
            "link (RATE per direction), then print per-host wire bytes as JSON. In CMD, "
            "{rank} {addr0} {addr} {num_hosts} {ifname} are replaced; the env has "
            "LOWCOMM_WAN_RANK, LOWCOMM_WAN_NUM_HOSTS, LOWCOMM_WAN_ADDR(0), MASTER_ADDR, "
            "GLOO_SOCKET_IFNAME. Needs root."
        ),
        epilog=(
            "other commands:\n"
            "  %(prog)s measure --rate 100mbit [--seconds 3]   TCP throughput host0->host1\n"
            "  %(prog)s cleanup [--prefix lcwan]               remove leftover namespaces"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--hosts", type=int, required=True, help="number of hosts")
    p.add_argument("--rate", required=True, help="per-direction rate, e.g. 100mbit; or none")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="name prefix (default %(default)s)")
    p.add_argument("--subnet", default=DEFAULT_SUBNET, help="default %(default)s")
    p.add_argument("--timeout", type=float, default=None, help="seconds before workers die")
    p.add_argument("--json", default=None, help="also write the JSON report to this file")
    return p


def _cmd_run(argv: list[str]) -> int:
    if argv and argv[0] == "run":
        argv = argv[1:]
    parser = _run_parser()
    if "--" in argv:
        split = argv.index("--")
        opts, cmd = argv[:split], argv[split + 1 :]
    else:
        opts, cmd = argv, []
    args = parser.parse_args(opts)
    if not cmd:
        parser.error("give the command after `--`")
    rate = _parse_cli_rate(args.rate)
    t0 = time.monotonic()
    status = 0
    with WanSim(args.hosts, rate, prefix=args.prefix, subnet=args.subnet) as sim:
        base = sim.counters()
        procs = [sim.popen(i, substitute(cmd, sim.placeholders(i))) for i in range(args.hosts)]
        deadline = None if args.timeout is None else t0 + args.timeout
        while True:
            codes = [p.poll() for p in procs]
            failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                logger.error("host(s) %s failed; stopping the others", failed)
                status = codes[failed[0]] or 1
                break
            if all(c == 0 for c in codes):
                break
            if deadline is not None and time.monotonic() > deadline:
                logger.error("timeout after %.0f s; stopping the workers", args.timeout)
                status = 124
                break
            time.sleep(0.1)
        end = sim.counters()
        tag = sim.names.tag
    report = {
        "tag": tag,
        "rate": args.rate,
        "num_hosts": args.hosts,
        "wall_seconds": round(time.monotonic() - t0, 3),
        "returncodes": [p.returncode for p in procs],
        "hosts": [
            {
                "rank": e["rank"],
                "addr": e["addr"],
                "tx_bytes": e["tx_bytes"] - b["tx_bytes"],
                "rx_bytes": e["rx_bytes"] - b["rx_bytes"],
            }
            for b, e in zip(base, end)
        ],
    }
    text = json.dumps(report)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print(text, flush=True)
    return status


def _cmd_measure(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m scripts.bench.wansim measure",
        description="Measure TCP throughput host0->host1 through a shaped 2-host link.",
    )
    p.add_argument("--rate", required=True, help="per-direction rate, e.g. 100mbit; or none")
    p.add_argument("--seconds", type=float, default=3.0, help="send duration (default 3)")
    p.add_argument("--prefix", default=DEFAULT_PREFIX)
    args = p.parse_args(argv)
    res = measure_throughput(_parse_cli_rate(args.rate), args.seconds, prefix=args.prefix)
    print(json.dumps(res), flush=True)
    return 0


def _cmd_cleanup(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m scripts.bench.wansim cleanup",
        description="Remove leftover simulator namespaces.",
    )
    p.add_argument("--prefix", default=DEFAULT_PREFIX)
    args = p.parse_args(argv)
    print(json.dumps({"removed": cleanup(args.prefix)}), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: ``[run] ... -- CMD``, ``measure ...`` or ``cleanup ...``.

    Returns:
        Exit status (the first failing worker's code, 124 on timeout, 2 on refusal, 130
        on Ctrl-C; SIGTERM exits 143 after teardown).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    commands = {"measure": _cmd_measure, "cleanup": _cmd_cleanup}
    try:
        if args and args[0] in commands:
            return commands[args[0]](args[1:])
        return _cmd_run(args)
    except (PermissionError, FileNotFoundError, ValueError) as e:
        print(f"wansim: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # already torn down by the time it gets here
        return 130


if __name__ == "__main__":
    sys.exit(main())
