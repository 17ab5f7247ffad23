"""Keep HTTP tools away from internal networks (server-side request forgery).

An address is refused unless it is globally routable, or allow-listed: private, loopback,
link-local (cloud metadata at 169.254.169.254), CGNAT (100.64/10), unique-local, multicast,
reserved and unspecified addresses, the IETF protocol assignments 192.0.0.0/24 (all of it,
including the DS-Lite/NAT64-discovery/PCP/TURN addresses), and IPv6 forms that embed an IPv4
address: IPv4-mapped ::ffff:a.b.c.d, NAT64 64:ff9b::/96 and 6to4 2002::/16 are judged by the
address they embed; the deprecated IPv4-compatible ::a.b.c.d (::/96), local-use NAT64
64:ff9b:1::/48, deprecated site-local fec0::/10 and documentation 3fff::/20 are refused
outright (Python's `is_global` calls several of these global). The
check runs on the RESOLVED addresses inside the connector, so a name that resolves (or
re-resolves) to an internal address cannot slip through, and again for every redirect.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from typing import Any

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from rulebound.engine.executor import ExecutorError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_6TO4 = ipaddress.ip_network("2002::/16")
# Not reachable on purpose although `ipaddress` may call them global (Python 3.11).
_DENY = tuple(ipaddress.ip_network(n) for n in (
    "192.0.0.0/24",     # IETF protocol assignments (RFC 6890), e.g. 192.0.0.8 dummy address
    "::/96",            # IPv4-compatible IPv6 (deprecated, RFC 4291): ::127.0.0.1 = ::7f00:1
    "64:ff9b:1::/48",   # local-use NAT64 (RFC 8215): the embedded IPv4 may sit anywhere
    "fec0::/10",        # site-local (deprecated, RFC 3879)
    "3fff::/20",        # documentation (RFC 9637)
))


class Refused(OSError):
    """Raised inside the connector; the executor turns it into a 'refused' failure."""


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in _6TO4:
        return ipaddress.IPv4Address((int(address) >> 80) & 0xFFFFFFFF)
    return None


class Guard:
    """The allow-list: CIDR networks (and exact host names) that may be reached anyway."""

    def __init__(self, allow: Iterable[str] = ()) -> None:
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self.hosts: set[str] = set()
        for item in allow:
            try:
                self.networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                self.hosts.add(item.lower().rstrip("."))
        self.key = (tuple(sorted(map(str, self.networks))), tuple(sorted(self.hosts)))

    def allowed_address(self, address: IPAddress) -> bool:
        if any(address in net for net in self.networks if net.version == address.version):
            return True
        inner = embedded_ipv4(address)
        if inner is not None:
            return self.allowed_address(inner)
        if any(address in net for net in _DENY if net.version == address.version):
            return False
        return address.is_global and not (address.is_multicast or address.is_reserved)

    def check_host(self, host: str) -> None:
        """Refuse a literal internal address in a URL (literals never reach the resolver)."""
        name = host.strip("[]").lower().rstrip(".")
        if name in self.hosts:
            return
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            return  # a name: checked on its resolved addresses at connect time
        if not self.allowed_address(address):
            raise ExecutorError(f"refused to connect to {name}: not a public address "
                                "(allow-list it if this is intended)", kind="refused",
                                retryable=False)


class GuardedResolver(AbstractResolver):
    """Resolves with the default resolver, then drops every address the guard refuses."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self._inner = DefaultResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if host.lower().rstrip(".") in self.guard.hosts:
            return results
        kept = [r for r in results if self.guard.allowed_address(ipaddress.ip_address(r["host"]))]
        if not kept:
            raise Refused(f"refused to connect to {host}: it resolves only to non-public "
                          "addresses")
        return kept

    async def close(self) -> None:
        await self._inner.close()


def session_factory(guard: Guard) -> Any:
    """A factory for an aiohttp session whose connector resolves through the guard."""

    def make() -> Any:
        import aiohttp

        connector = aiohttp.TCPConnector(resolver=GuardedResolver(guard), limit=100)
        return aiohttp.ClientSession(connector=connector, trust_env=False,
                                     timeout=aiohttp.ClientTimeout(total=None))

    return make
