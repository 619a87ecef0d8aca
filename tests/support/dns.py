"""A test's own DNS: host names to addresses, re-pointable while the service runs.

Passed as the service's `lookup` (`serve(project, lookup=dns)`), it answers the gateway's
connections and the writes' checks alike, so a test can point a name at the metadata address,
or move it between a write's check and a request's connection, with no resolver of the system
involved. A name it does not know fails as the system's resolver fails (EAI_NONAME).
"""

from __future__ import annotations

import socket


class Dns:
    """`Dns(**{"gpu.test": ["127.0.0.1"]})`; `dns.point(name, *addresses)` to re-point a name."""

    def __init__(self, records: dict[str, list[str]] | None = None) -> None:
        self.records = {name.lower(): list(addresses) for name, addresses in (records or {}).items()}
        self.asked: list[str] = []

    def point(self, name: str, *addresses: str) -> None:
        self.records[name.lower()] = list(addresses)

    def __call__(self, host: str) -> list[str]:
        name = host.lower().rstrip(".")
        self.asked.append(name)
        if name not in self.records:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return list(self.records[name])
