"""The WAN simulator's topology as data and commands: names, addresses, rates, and the
``ip``/``tc`` command lines that build and remove it.

Pure: nothing here runs a command or touches the network, so all of it is testable without
root. :mod:`scripts.bench.wansim` runs these commands and re-exports every public name.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import secrets
from collections.abc import Mapping, Sequence

DEFAULT_PREFIX = "lcwan"
DEFAULT_SUBNET = "10.77.0.0/24"
IFNAME_MAX = 15  # Linux IFNAMSIZ (16) minus the terminating NUL
SUFFIX_HEX_DIGITS = 4
# veth offloads hand tbf GSO super-packets of up to 64 KiB (plus per-segment headers that
# qdisc_pkt_len counts). A bucket smaller than that makes tbf split every packet in software.
GSO_MAX_BYTES = 65536 + 4096
# Tokens that pile up while the dequeue timer fires late (softirq/scheduling jitter on a busy
# box can reach ~1 ms) are lost once the bucket is full, which shows up as under-rate.
BURST_SECONDS = 0.002
# The queue in front of the bucket, as time at line rate: deep enough that an incast
# (N-1 senders into one download link) is absorbed without loss storms, shallow enough that
# the queueing delay stays in the range of a real WAN bottleneck buffer.
QUEUE_SECONDS = 0.05
PLACEHOLDERS = ("rank", "addr0", "addr", "num_hosts", "ifname")
_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}


def parse_rate(rate: str | int) -> int:
    """Parses a tc-style rate into bits per second.

    Args:
        rate: An int (bits/s) or a string ``<number><unit>`` with unit ``bit``, ``kbit``,
            ``mbit``, ``gbit`` or ``tbit`` (SI, as in tc: ``1kbit`` = 1000 bit/s), e.g.
            ``"100mbit"``, ``"1.5gbit"``. tc's byte units (``kbps`` ...) are refused because
            they are easily mistaken for bits.

    Returns:
        The rate in bits per second (> 0).

    Raises:
        ValueError: If the rate is not positive or not in the form above.
        TypeError: If ``rate`` is neither str nor int.
    """
    if isinstance(rate, bool) or not isinstance(rate, (str, int)):
        raise TypeError(f"rate must be a str like '100mbit' or an int (bit/s), got {rate!r}")
    if isinstance(rate, int):
        bps = rate
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*", rate.lower())
        if m is None or m.group(2) not in _RATE_UNITS:
            raise ValueError(
                f"rate {rate!r} must be <number><unit> with unit one of "
                f"{', '.join(_RATE_UNITS)} (e.g. '100mbit')"
            )
        bps = round(float(m.group(1)) * _RATE_UNITS[m.group(2)])
    if bps <= 0:
        raise ValueError(f"rate {rate!r} must be positive")
    return bps


def tbf_params(
    rate_bps: int, burst_seconds: float = BURST_SECONDS, queue_seconds: float = QUEUE_SECONDS
) -> tuple[int, int]:
    """Derives the tbf bucket size and queue limit from the rate.

    ``burst = GSO_MAX_BYTES + rate * burst_seconds``: the bucket must hold one full GSO
    super-packet (else tbf segments every packet), plus the tokens that accumulate while the
    qdisc watchdog fires late (else they are lost at the cap and the link runs under rate).
    Both terms are small against any transfer worth shaping (at 20 Mbit/s the bucket is ~74 KB,
    i.e. 30 ms at line rate, once per idle period).
    ``limit = burst + rate * queue_seconds``: bytes that may wait in front of the bucket
    (tc's own ``latency`` semantics), i.e. a bottleneck buffer of ``queue_seconds``.
    On an idle 2-core box TCP goodput did not depend on the bucket (3 KB to 70 KB + 2 ms gave
    95.6-95.7 Mbit/s at 100mbit and 954-958 Mbit/s at 1gbit); the margins are for busy ones.

    Args:
        rate_bps: Rate in bits per second.
        burst_seconds: Timer slack to cover, in seconds of line rate.
        queue_seconds: Queue depth, in seconds of line rate.

    Returns:
        ``(burst_bytes, limit_bytes)``.

    Raises:
        ValueError: If an argument is not positive.
    """
    if rate_bps <= 0 or burst_seconds < 0 or queue_seconds <= 0:
        raise ValueError(
            f"rate_bps ({rate_bps}) and queue_seconds ({queue_seconds}) must be positive and "
            f"burst_seconds ({burst_seconds}) non-negative"
        )
    rate_bytes = rate_bps / 8
    burst = GSO_MAX_BYTES + int(rate_bytes * burst_seconds)
    limit = burst + int(rate_bytes * queue_seconds)
    return burst, limit


def tbf_command(
    dev: str,
    rate: str | int,
    netns: str | None = None,
    burst_seconds: float = BURST_SECONDS,
    queue_seconds: float = QUEUE_SECONDS,
) -> list[str]:
    """Builds the ``tc`` command that shapes ``dev``'s egress with a token bucket.

    Args:
        dev: Interface name.
        rate: Rate, see :func:`parse_rate`.
        netns: Namespace holding ``dev`` (``tc -n``); None for the current one.
        burst_seconds: See :func:`tbf_params`.
        queue_seconds: See :func:`tbf_params`.

    Returns:
        The argv, e.g. ``tc -n ns qdisc replace dev X root tbf rate 100000000bit burst 70536
        limit 695536``.
    """
    bps = parse_rate(rate)
    burst, limit = tbf_params(bps, burst_seconds, queue_seconds)
    ns = ["-n", netns] if netns else []
    return [
        "tc", *ns, "qdisc", "replace", "dev", dev, "root", "tbf",
        "rate", f"{bps}bit", "burst", str(burst), "limit", str(limit),
    ]  # fmt: skip


def _check_prefix(prefix: str) -> None:
    if not isinstance(prefix, str) or not re.fullmatch(r"[a-z][a-z0-9]*", prefix):
        raise ValueError(f"prefix {prefix!r} must match [a-z][a-z0-9]* (it names interfaces)")


@dataclasses.dataclass(frozen=True)
class SimNames:
    """Names of every namespace and interface of one simulator instance.

    ``tag = prefix + suffix``; namespaces ``<tag>-br`` (bridge) and ``<tag>-h<i>`` (hosts);
    interfaces ``<tag>br`` (bridge), ``<tag>p<i>`` (bridge end of host i's veth) and
    ``<tag>h<i>`` (host end, the only non-loopback interface in host i's namespace).

    Attributes:
        prefix: Lowercase alphanumeric prefix shared by a family of runs (``cleanup`` key).
        suffix: Four lowercase hex digits that make this instance unique.
        num_hosts: Number of hosts.
    """

    prefix: str
    suffix: str
    num_hosts: int

    def __post_init__(self) -> None:
        _check_prefix(self.prefix)
        if not re.fullmatch(rf"[0-9a-f]{{{SUFFIX_HEX_DIGITS}}}", self.suffix):
            raise ValueError(f"suffix {self.suffix!r} must be {SUFFIX_HEX_DIGITS} hex digits")
        if isinstance(self.num_hosts, bool) or not isinstance(self.num_hosts, int):
            raise TypeError(f"num_hosts must be an int, got {self.num_hosts!r}")
        if self.num_hosts < 1:
            raise ValueError(f"num_hosts ({self.num_hosts}) must be >= 1")
        longest = max([self.bridge_dev, self.host_dev(self.num_hosts - 1)], key=len)
        if len(longest) > IFNAME_MAX:
            room = IFNAME_MAX - (len(longest) - len(self.prefix))
            raise ValueError(
                f"prefix {self.prefix!r} with {self.num_hosts} hosts gives interface name "
                f"{longest!r} of {len(longest)} chars; Linux allows {IFNAME_MAX}, so use a "
                f"prefix of at most {room} chars"
            )

    @property
    def tag(self) -> str:
        """Prefix plus suffix; every name of this instance starts with it."""
        return self.prefix + self.suffix

    @property
    def bridge_netns(self) -> str:
        """Namespace holding the bridge and the bridge ends of the veths."""
        return f"{self.tag}-br"

    @property
    def bridge_dev(self) -> str:
        """The bridge interface."""
        return f"{self.tag}br"

    def host_netns(self, i: int) -> str:
        """Namespace of host ``i``."""
        return f"{self.tag}-h{i}"

    def host_dev(self, i: int) -> str:
        """Host ``i``'s end of its veth (inside ``host_netns(i)``)."""
        return f"{self.tag}h{i}"

    def port_dev(self, i: int) -> str:
        """The bridge end of host ``i``'s veth (inside ``bridge_netns``)."""
        return f"{self.tag}p{i}"

    def all_netns(self) -> list[str]:
        """Every namespace of this instance, bridge first."""
        return [self.bridge_netns] + [self.host_netns(i) for i in range(self.num_hosts)]

    def all_devs(self) -> list[str]:
        """Every interface name of this instance."""
        hosts = range(self.num_hosts)
        return [self.bridge_dev] + [f(i) for i in hosts for f in (self.port_dev, self.host_dev)]


def make_names(prefix: str, num_hosts: int, suffix: str | None = None) -> SimNames:
    """Returns the names for one instance; a random suffix unless one is given.

    Raises:
        ValueError: If the prefix is malformed or makes an interface name longer than 15.
    """
    return SimNames(prefix, suffix or secrets.token_hex(SUFFIX_HEX_DIGITS // 2), num_hosts)


def _network(subnet: str, num_hosts: int) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.ip_network(subnet, strict=True)
    except ValueError as e:
        raise ValueError(f"subnet {subnet!r} is not a network address like 10.77.0.0/24") from e
    if not isinstance(net, ipaddress.IPv4Network) or not net.is_private:
        raise ValueError(f"subnet {subnet!r} must be a private IPv4 network (e.g. 10.77.0.0/24)")
    if net.num_addresses - 2 < num_hosts:
        raise ValueError(f"subnet {subnet!r} has fewer than {num_hosts} host addresses")
    return net


def host_address(i: int, subnet: str = DEFAULT_SUBNET) -> str:
    """Address of host ``i``: the ``(i+1)``-th address of ``subnet`` (``10.77.0.1`` for 0)."""
    if i < 0:
        raise ValueError(f"host index ({i}) must be >= 0")
    net = _network(subnet, i + 1)
    return str(net.network_address + 1 + i)


def setup_commands(
    names: SimNames, rate: str | int | None, subnet: str = DEFAULT_SUBNET
) -> list[list[str]]:
    """Builds the commands that create the simulated network, in order.

    Per resource: create, configure, bring up. The links are kept silent so the byte counters
    hold only the workers' traffic: no IPv6 address generation (no router/neighbour
    solicitations) and no multicast snooping on the bridge (no IGMP/MLD reports).

    Args:
        names: Instance names (:func:`make_names`).
        rate: Per-direction link rate (:func:`parse_rate`), or None for unshaped links.
        subnet: Private IPv4 network for the hosts.

    Returns:
        A list of argv lists; run them in order as root.
    """
    net = _network(subnet, names.num_hosts)
    br_ns = names.bridge_netns
    br_ip = ["ip", "-n", br_ns]
    cmds: list[list[str]] = [
        ["ip", "netns", "add", br_ns],
        ["ip", "-n", br_ns, "link", "set", "lo", "up"],
        [*br_ip, "link", "add", "name", names.bridge_dev, "type", "bridge", "mcast_snooping", "0"],
        ["ip", "-n", br_ns, "link", "set", "dev", names.bridge_dev, "addrgenmode", "none"],
        ["ip", "-n", br_ns, "link", "set", "dev", names.bridge_dev, "up"],
    ]
    for i in range(names.num_hosts):
        h_ns, h_dev, p_dev = names.host_netns(i), names.host_dev(i), names.port_dev(i)
        addr = f"{host_address(i, subnet)}/{net.prefixlen}"
        cmds += [
            ["ip", "netns", "add", h_ns],
            ["ip", "-n", h_ns, "link", "set", "lo", "up"],
            # Created from the bridge namespace with the peer placed straight into the host
            # namespace, so neither end ever exists in the root namespace.
            ["ip", "-n", br_ns, "link", "add", "name", p_dev, "type", "veth",
             "peer", "name", h_dev, "netns", h_ns],
            ["ip", "-n", br_ns, "link", "set", "dev", p_dev, "addrgenmode", "none"],
            ["ip", "-n", h_ns, "link", "set", "dev", h_dev, "addrgenmode", "none"],
            ["ip", "-n", br_ns, "link", "set", "dev", p_dev, "master", names.bridge_dev],
            ["ip", "-n", h_ns, "addr", "add", addr, "dev", h_dev],
        ]  # fmt: skip
        if rate is not None:
            cmds += [tbf_command(h_dev, rate, netns=h_ns), tbf_command(p_dev, rate, netns=br_ns)]
        cmds += [
            ["ip", "-n", br_ns, "link", "set", "dev", p_dev, "up"],
            ["ip", "-n", h_ns, "link", "set", "dev", h_dev, "up"],
        ]
    return cmds


def teardown_commands(names: SimNames) -> list[list[str]]:
    """Builds the commands that remove what :func:`setup_commands` created, newest first.

    Links are deleted explicitly before their namespace: a process that survived in a
    namespace keeps it alive after ``ip netns del``, but not its links. Deleting one veth end
    deletes its peer and both qdiscs. Every command is safe to run when its resource is gone.
    """
    cmds: list[list[str]] = []
    for i in reversed(range(names.num_hosts)):
        cmds += [
            ["ip", "-n", names.bridge_netns, "link", "del", "dev", names.port_dev(i)],
            ["ip", "netns", "del", names.host_netns(i)],
        ]
    cmds += [
        ["ip", "-n", names.bridge_netns, "link", "del", "dev", names.bridge_dev],
        ["ip", "netns", "del", names.bridge_netns],
    ]
    return cmds


def substitute(argv: Sequence[str], values: Mapping[str, object]) -> list[str]:
    """Replaces ``{name}`` placeholders in each argument; other braces are left alone.

    Args:
        argv: Command template, e.g. ``["torchrun", "--node-rank={rank}", "{addr0}:29500"]``.
        values: Placeholder values; keys must be in :data:`PLACEHOLDERS`.

    Returns:
        The command with every known placeholder replaced.

    Raises:
        ValueError: If ``values`` has a key that is not a known placeholder.
    """
    unknown = set(values) - set(PLACEHOLDERS)
    if unknown:
        raise ValueError(f"unknown placeholders {sorted(unknown)}; known: {list(PLACEHOLDERS)}")
    if not values:
        return list(argv)
    pattern = re.compile(r"\{(" + "|".join(map(re.escape, values)) + r")\}")
    return [pattern.sub(lambda m: str(values[m.group(1)]), a) for a in argv]
