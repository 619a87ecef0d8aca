"""Where upstream requests may go: `SWITCHBOARD_ALLOWED_UPSTREAMS` (docs/reference.md §7).

The setting lists networks (`10.0.0.0/8`, `192.168.1.5`, `fd00::/8`) and host names
(`api.openai.com`, or `*.openai.azure.com` for any name below that one), comma-separated.
Connecting to an upstream is allowed when the address connected to is in a listed network,
or when the name the provider's URL gives is listed. Unset, every address is allowed.

Link-local addresses (`169.254.0.0/16`, `fe80::/10`, where clouds serve instance metadata
and credentials) and AWS's IPv6 metadata address are refused unless they are listed
explicitly: by a network inside those ranges (`169.254.169.254`, `169.254.0.0/16`), not by a
wider one (`0.0.0.0/0` means "anywhere", not "the metadata service too"), and never by a
name, so a name that is re-pointed at the metadata service reaches nothing, listed or not.

The rule is applied to the address actually connected to, after DNS resolution and at
connect time (`gateway.transports.guard`), so a name that resolves elsewhere later gains
nothing; and beforehand to a write's `base_url` (`runtime.checks`), so that a provider file
pointing outside is refused (422) before it is committed.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

SETTING = "SWITCHBOARD_ALLOWED_UPSTREAMS"

Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
Address: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

METADATA: tuple[Network, ...] = (
    ipaddress.ip_network("169.254.0.0/16"),
    ipaddress.ip_network("fe80::/10"),
    ipaddress.ip_network("fd00:ec2::254/128"),  # AWS's instance metadata over IPv6 (not link-local)
)
"""Refused unless a listed network inside them covers them, whatever else is listed, and when unset."""
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
"""The well-known NAT64 prefix: its last 32 bits are the IPv4 address a NAT64 gateway reaches."""

Lookup = Callable[[str], list[str]]
"""A host name -> the addresses it resolves to now (blocking: called off the event loop)."""

LINK_LOCAL = (
    "a link-local address, where clouds serve instance metadata (allowed only when listed explicitly)"
)
UNLISTED = "not listed"

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_NAME = re.compile(rf"^(?:\*\.)?{_LABEL}(?:\.{_LABEL})*$")


def system_lookup(host: str) -> list[str]:
    """The addresses `host` resolves to through the system's resolver (as aiohttp's default does)."""
    found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_ADDRCONFIG)
    return list(dict.fromkeys(str(info[4][0]) for info in found))


def address(host: str) -> Address | None:
    """`host` as an IP address when it is one written canonically (`[...]`, a zone and one
    trailing dot allowed); None for a name."""
    text = host.strip("[]")
    if text.endswith(".") and not text.endswith(".."):
        text = text[:-1]
    try:
        found = ipaddress.ip_address(text)
    except ValueError:
        return None
    return unmapped(found)


def unmapped(found: Address) -> Address:
    """An IPv6 address that carries an IPv4 one (`::ffff:169.254.169.254`, NAT64's
    `64:ff9b::a9fe:a9fe`) as the IPv4 address it reaches."""
    if isinstance(found, ipaddress.IPv6Address):
        if found.ipv4_mapped is not None:
            return found.ipv4_mapped
        if found in _NAT64:
            return ipaddress.IPv4Address(int(found) & 0xFFFFFFFF)
    return found


def numeric_spelling(host: str) -> bool:
    """Whether `host` is an IPv4 address in a legacy spelling (`2130706433`, `0177.0.0.1`,
    `0x7f.1`, `127.1`): resolvers read those as addresses, so they are no names, and the
    rule is not asked to tell what they reach: they are refused as they stand."""
    if address(host) is not None:
        return False
    try:
        socket.inet_aton(host.rstrip("."))
    except (OSError, ValueError):
        return False
    return True


def normal_name(host: str) -> str:
    """A host name as the rule compares it: lower case, without the trailing dot of a FQDN."""
    return host.lower().rstrip(".")


@dataclass(frozen=True, slots=True)
class AllowedUpstreams:
    """`SWITCHBOARD_ALLOWED_UPSTREAMS`, parsed: what an upstream connection may reach."""

    networks: tuple[Network, ...] = ()
    names: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()
    """`.example.com` for each `*.example.com` listed."""
    listed: bool = False
    """Whether the setting is set (unset: every address but the metadata ones)."""

    @classmethod
    def parse(cls, text: str | None) -> AllowedUpstreams:
        """The rule the setting's text says; unset or blank is no list. ValueError names what is wrong."""
        entries = [e.strip() for e in (text or "").split(",") if e.strip()]
        if not entries:
            return cls()
        networks: list[Network] = []
        names: set[str] = set()
        suffixes: list[str] = []
        for entry in entries:
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            name = normal_name(entry)
            if (
                "/" in entry
                or numeric_spelling(name)
                or not _NAME.match(name)
                or name.split(".")[-1].isdigit()
            ):
                raise ValueError(
                    f"{SETTING}: {entry!r} is neither a network (10.0.0.0/8, 192.168.1.5, fd00::/8) "
                    "nor a host name (api.example.com, *.example.com)"
                )
            if name.startswith("*."):
                suffixes.append(name[1:])
            else:
                names.add(name)
        return cls(tuple(networks), frozenset(names), tuple(suffixes), listed=True)

    def name_listed(self, name: str) -> bool:
        """Whether the host name `name` is listed, by itself or under a `*.` entry."""
        name = normal_name(name)
        return name in self.names or any(name.endswith(suffix) for suffix in self.suffixes)

    def refusal(self, found: Address | str, name: str | None = None) -> str | None:
        """Why connecting to address `found` is refused, `LINK_LOCAL` or `UNLISTED` (None: it is
        allowed); `name` is the host name the URL gave, when it gave one rather than an address.

        The reason names no address: it reaches clients in a 502's attempts, and what a
        provider's host resolves to is not theirs to learn."""
        if isinstance(found, str):
            parsed = address(found)
            if parsed is None:
                return UNLISTED
            found = parsed
        found = unmapped(found)
        metadata = [m for m in METADATA if found in m]
        if metadata and not any(
            found in n and n.version == m.version and n.subnet_of(m)  # type: ignore[arg-type]
            for n in self.networks
            for m in metadata
        ):
            return LINK_LOCAL
        if not self.listed or any(found in network for network in self.networks):
            return None
        if name is not None and self.name_listed(name):
            return None
        return UNLISTED


def host_refusal(host: str, allowed: AllowedUpstreams, lookup: Lookup) -> str | None:
    """Why requests to `host` (a URL's host: a name or an address) would be refused; None when
    some address it reaches now is allowed, or when it cannot be told here (a name that does
    not resolve here, which a listed network might still cover once it does).

    The connection is checked again when it is made (a name can be re-pointed): this answer
    is early feedback for a write, not the guard.
    """
    refused = f"{normal_name(host)} is refused by {SETTING}"
    if numeric_spelling(host):
        return f"{refused}: it spells an address in a legacy form (write it in dotted decimal)"
    found = address(host)
    if found is not None:
        why = allowed.refusal(found)
        return f"{refused}: it is {why}" if why else None
    try:
        addresses = lookup(host)
    except (OSError, UnicodeError):
        addresses = []
    if not addresses:
        if allowed.listed and not allowed.networks and not allowed.name_listed(host):
            return f"{refused}: it is {UNLISTED}"
        return None
    reasons = [allowed.refusal(a, host) for a in addresses]
    if not all(reasons):
        return None
    return f"{refused}: its address is {LINK_LOCAL if LINK_LOCAL in reasons else UNLISTED}"
