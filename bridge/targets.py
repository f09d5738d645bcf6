"""One parser for every place a NuClick server is named (``--server`` of
``segment``, ``qupath`` and ``omero``, :class:`bridge.client.NuClickClient`).

Accepted, and turned into the gRPC target that gRPC's own name resolvers
understand (so that its ``round_robin`` policy sees every address):

- ``HOST:PORT`` (``[::1]:PORT`` for an IPv6 literal): passed as it is; gRPC's
  DNS resolver gives every address the name has.
- ``HOST:PORT,HOST:PORT,...``: a fixed set of replicas.  Names are resolved
  once here and the list becomes an ``ipv4:`` (or ``ipv6:``) target, gRPC's
  static multi-address form.
- a gRPC target URI, e.g. ``dns:///nuclick.lab.svc:50051`` (a Kubernetes
  headless Service: one name, one address per ready pod), ``ipv4:...``,
  ``ipv6:...``, ``unix:...``: passed through.

Anything else is refused with one line that says what is wrong.  No grpc import
here: the CLI checks its flags before anything heavy loads.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

from bridge.errors import BridgeInputError

SCHEMES = ("dns", "ipv4", "ipv6", "unix", "unix-abstract")
_HOST = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.\-_]*[A-Za-z0-9])?$")
FORMS = "a comma-separated list HOST:PORT,HOST:PORT,... or a gRPC target such as dns:///HOST:PORT"


@dataclass(frozen=True)
class Target:
    """``grpc``: what the channel is opened on; ``text``: what the user wrote
    (for messages); ``addresses``: how many fixed addresses (0: a resolver decides)."""

    grpc: str
    text: str
    addresses: int


def _host_port(item: str, whole: str) -> tuple[str, int]:
    """(host, port) of one ``HOST:PORT`` / ``[V6]:PORT``, or a one-line error."""
    where = "" if item == whole else f" in {whole!r}"
    if item.startswith("["):
        host, sep, port = item[1:].partition("]:")
        if not sep:
            raise BridgeInputError(f"--server: {item!r}{where} is not [IPV6]:PORT")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise BridgeInputError(f"--server: {host!r}{where} is not an IPv6 address") from None
    else:
        host, sep, port = item.rpartition(":")
        if not sep or not host:
            raise BridgeInputError(f"--server must be HOST:PORT (or {FORMS}), not {item!r}{where}")
        if ":" in host:
            raise BridgeInputError(f"--server: write the IPv6 address of {item!r} as [ADDRESS]:PORT")
        if not _HOST.match(host):
            raise BridgeInputError(f"--server: {host!r}{where} is not a host name or address")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise BridgeInputError(f"--server: port {port!r} of {item!r} must be a number from 1 to 65535")
    return host, int(port)


def _resolve(host: str, port: int, whole: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise BridgeInputError(f"--server: cannot resolve {host!r} in {whole!r} ({exc})") from None
    return ipaddress.ip_address(infos[0][4][0])


def parse_target(text: str | None) -> Target:
    """The gRPC target for what a user wrote as the server (see the module doc)."""
    whole = (text or "").strip()
    if not whole or not whole.strip(", "):
        raise BridgeInputError(f"--server is empty: give HOST:PORT, {FORMS}")
    scheme, colon, rest = whole.partition(":")
    if colon and scheme.lower() in SCHEMES:
        if not rest.strip("/"):
            raise BridgeInputError(f"--server: {whole!r} names no address after {scheme}:")
        return Target(whole, whole, 0)
    if "://" in whole:
        raise BridgeInputError(f"--server: unknown scheme in {whole!r}; use {', '.join(SCHEMES)}, HOST:PORT or {FORMS}")
    items = [s.strip() for s in whole.split(",")]
    if any(not s for s in items):
        raise BridgeInputError(f"--server: an empty entry in the list {whole!r}")
    pairs = [_host_port(s, whole) for s in items]
    if len(pairs) == 1:
        return Target(items[0], whole, 1)
    if len(set(pairs)) < len(pairs):
        raise BridgeInputError(f"--server: the list {whole!r} names the same server twice")
    addrs = [(_resolve(h, p, whole), p) for h, p in pairs]
    versions = {a.version for a, _ in addrs}
    if len(versions) > 1:
        raise BridgeInputError(f"--server: {whole!r} mixes IPv4 and IPv6 addresses; use dns:///NAME:PORT instead")
    if versions == {4}:
        return Target("ipv4:" + ",".join(f"{a}:{p}" for a, p in addrs), whole, len(addrs))
    return Target("ipv6:" + ",".join(f"[{a}]:{p}" for a, p in addrs), whole, len(addrs))
