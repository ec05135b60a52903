"""Who may reach the bridge: browser origins, the Host names that mean this machine, and Docker networks.

Plain functions over strings and addresses; `bridge.api.middleware` applies them to every request.

* **Origins.** A page served from this machine's loopback (`http(s)://localhost`, `127.0.0.1`, `[::1]`, any
  port) may call the bridge, as Ollama allows; any other page only when an `allowed_origins` pattern
  matches it. A pattern is an origin whose port may be `*`: `http://192.168.1.20:8000`, `http://st.lan:*`.
* **Host names (DNS rebinding).** A request must name this machine: a loopback name or address, one of its
  own names (`socket.gethostname()`, the FQDN, `<name>.local`), an address of one of its network interfaces,
  Docker's names for the host (`host.docker.internal`), or a name from `allowed_hosts`. A page whose DNS
  name was rebound to 127.0.0.1 still sends its own name, and is refused.
* **Docker.** On Linux a container reaches the host at the gateway of its Docker bridge network (`docker0`,
  `br-<id>`). `docker_networks()` finds those from the interfaces, so the bridge can also listen there
  while answering only peers inside those networks.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import psutil

LOOPBACK_NAMES = ("localhost",)
DOCKER_HOST_NAMES = ("host.docker.internal", "gateway.docker.internal")
# Docker names its bridge networks' host interfaces docker0 (the default network) and br-<12 hex digits>.
DOCKER_INTERFACE = re.compile(r"^(docker\d+|br-[0-9a-f]{12})$")
ADDRESS_TTL_S = 5.0  # interface addresses change (DHCP, VPNs, Docker networks): look again this often
# getfqdn() asks the resolver, which on a Mac with a slow or absent DNS server takes seconds: the bridge
# starts without the fully qualified name rather than wait for it.
FQDN_TIMEOUT_S = 1.0
DEFAULT_PORTS = {"http": 80, "https": 443}

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


# --- origins -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OriginPattern:
    """`scheme://host:port`, where port may be `*` (any port)."""

    scheme: str
    host: str
    port: int | None  # None: any port

    def matches(self, scheme: str, host: str, port: int) -> bool:
        return self.scheme == scheme and self.host == host and self.port in (None, port)


def parse_origin_pattern(text: str) -> OriginPattern:
    """`http://st.lan:*` → OriginPattern("http", "st.lan", None). Raises ValueError with the reason."""
    raw = text.strip().rstrip("/")
    match = re.fullmatch(r"(https?)://(\[[0-9a-fA-F:.]+\]|[^:/\[\]]+)(?::(\d+|\*))?", raw)
    if match is None:
        raise ValueError(
            f"{text!r} is not an origin pattern: write scheme://host[:port], e.g. http://192.168.1.20:8000 "
            "or http://st.lan:* for any port"
        )
    scheme, host, port = match.group(1), match.group(2).lower(), match.group(3)
    if port == "*":
        return OriginPattern(scheme, host, None)
    number = int(port) if port else DEFAULT_PORTS[scheme]
    if not 0 < number < 65536:
        raise ValueError(f"{text!r}: the port must be 1-65535 or *")
    return OriginPattern(scheme, host, number)


def split_origin(origin: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an `Origin` header, or None for `null` and anything unparsable."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/"):
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return parts.scheme, host.lower(), port or DEFAULT_PORTS[parts.scheme]


def is_loopback_host(host: str) -> bool:
    """localhost, *.localhost, 127.0.0.0/8 and ::1 (with or without brackets)."""
    name = host.strip("[]").lower().rstrip(".")
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    address = _address(name)
    return address is not None and address.is_loopback


def origin_allowed(origin: str, patterns: Iterable[OriginPattern]) -> bool:
    parts = split_origin(origin)
    if parts is None:
        return False
    scheme, host, port = parts
    if is_loopback_host(host):
        return True
    return any(pattern.matches(scheme, host, port) for pattern in patterns)


def origin_refusal(origin: str) -> str:
    """The 403 message for a refused origin: which page, and the setting that would allow it."""
    parts = split_origin(origin)
    if parts is None:
        return (f"this bridge does not answer pages of origin {origin!r} (only pages served from this "
                "machine, or origins listed with --allowed-origin)")
    scheme, host, port = parts
    return (
        f"the page at {origin} may not use this bridge: it allows pages served from this machine's "
        f"loopback and the origins given with --allowed-origin. To allow this one, start it with "
        f"`st-bridge serve --allowed-origin {scheme}://{host}:{port}` (or {scheme}://{host}:* for any port; "
        "setting allowed_origins, env ST_BRIDGE_ALLOWED_ORIGINS)"
    )


# --- host names --------------------------------------------------------------------------------------


def split_host(header: str) -> str:
    """The host part of a Host header, lower-case, without port, brackets, zone id or trailing dot."""
    value = header.strip().lower()
    if value.startswith("["):
        value = value[1:].split("]", 1)[0]
    elif value.count(":") == 1:
        value = value.rsplit(":", 1)[0]
    return value.split("%", 1)[0].rstrip(".")


def own_names(fqdn_timeout_s: float = FQDN_TIMEOUT_S) -> set[str]:
    """This machine's names: its host name, that name on mDNS (`.local`), and its fully qualified name
    when the resolver gives it within `fqdn_timeout_s`."""
    names = {socket.gethostname().lower()}
    if fqdn := _fqdn(fqdn_timeout_s):
        names.add(fqdn.lower())
    names |= {f"{name.split('.', 1)[0]}.local" for name in list(names) if name}
    return {name.rstrip(".") for name in names if name}


def _fqdn(timeout_s: float) -> str | None:
    """socket.getfqdn() in a thread of its own, given up after `timeout_s` (the thread ends by itself)."""
    found: list[str] = []

    def look_up() -> None:
        with contextlib.suppress(OSError):
            found.append(socket.getfqdn())

    thread = threading.Thread(target=look_up, name="fqdn", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return found[0] if found else None


def interface_addresses() -> set[str]:
    """Every IPv4 and IPv6 address of this machine's network interfaces (as text, zone ids removed)."""
    found = set()
    for addresses in psutil.net_if_addrs().values():
        for entry in addresses:
            if entry.family in (socket.AF_INET, socket.AF_INET6):
                found.add(entry.address.split("%", 1)[0].lower())
    return found


@dataclass
class HostCheck:
    """Whether a Host header names this machine. Interface addresses are looked up again at most every
    ADDRESS_TTL_S, and only when a host is not already known."""

    extra_names: frozenset[str] = frozenset()
    names: set[str] = field(default_factory=own_names)
    _addresses: set[str] = field(default_factory=set)
    _looked_at: float = float("-inf")

    def allows(self, header: str | None) -> bool:
        if header is None:  # HTTP/1.0 without Host: not a browser, so not a rebinding page
            return True
        host = split_host(header)
        if self._known(host):
            return True
        if time.monotonic() - self._looked_at > ADDRESS_TTL_S:
            self._addresses = interface_addresses()
            self._looked_at = time.monotonic()
            return host in self._addresses
        return False

    def _known(self, host: str) -> bool:
        return (
            is_loopback_host(host)
            or host in ("0.0.0.0", "::")
            or host in DOCKER_HOST_NAMES
            or host in self.names
            or host in self.extra_names
            or host in self._addresses
        )


def host_refusal(header: str) -> str:
    host = split_host(header)
    return (
        f"Host {header!r} does not name this machine, so the request is refused (a web page may have "
        f"rebound its DNS name to this machine). If {host!r} is really a name of this machine, start the "
        f"bridge with `st-bridge serve --allowed-host {host}` (setting allowed_hosts)"
    )


# --- Docker ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DockerNetwork:
    """A Docker bridge network as the host sees it: its interface, the host's (gateway) address on it."""

    interface: str
    gateway: str
    network: Network


def docker_networks() -> list[DockerNetwork]:
    """Docker's bridge networks on this machine (Linux: docker0, br-<id>), found from the interfaces."""
    found = []
    for name, addresses in sorted(psutil.net_if_addrs().items()):
        if not DOCKER_INTERFACE.match(name):
            continue
        for entry in addresses:
            if entry.family == socket.AF_INET and entry.netmask:
                network = ipaddress.ip_network(f"{entry.address}/{entry.netmask}", strict=False)
                found.append(DockerNetwork(name, entry.address, network))
    return found


def in_networks(peer: str | None, networks: Iterable[DockerNetwork]) -> bool:
    address = _address(peer or "")
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address is not None and any(address in n.network for n in networks)


def _address(text: str) -> Address | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


# --- all of it, for one server ----------------------------------------------------------------------


@dataclass
class Reach:
    """The checks one bridge applies: its origin patterns, its Host names and its Docker listeners."""

    origins: tuple[OriginPattern, ...] = ()
    hosts: HostCheck = field(default_factory=HostCheck)
    docker: tuple[DockerNetwork, ...] = ()

    @classmethod
    def build(cls, allowed_origins: Iterable[str] = (), allowed_hosts: Iterable[str] = (),
              listen_host: str = "127.0.0.1", docker: bool = False) -> Reach:
        extra = {split_host(name) for name in allowed_hosts}
        if listen_host not in ("0.0.0.0", "::", ""):
            extra.add(split_host(listen_host))
        return cls(
            origins=tuple(parse_origin_pattern(p) for p in allowed_origins),
            hosts=HostCheck(extra_names=frozenset(extra)),
            docker=tuple(docker_networks()) if docker else (),
        )

    def origin_allowed(self, origin: str) -> bool:
        return origin_allowed(origin, self.origins)

    @property
    def docker_gateways(self) -> list[str]:
        return sorted({n.gateway for n in self.docker})

    def peer_allowed(self, local: str | None, peer: str | None) -> bool:
        """A connection to a Docker gateway address must come from inside a Docker network: the host
        accepts packets for any of its addresses on any interface, so the LAN could otherwise reach it."""
        if local is None or local not in self.docker_gateways:
            return True
        return in_networks(peer, self.docker)
