"""Addresses the HTTP gateway may listen on: shared by the gateway and the CLI that starts it."""

from __future__ import annotations

import ipaddress

DEFAULT_HTTP_PORT = 11435


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address, IPv6 with or without brackets) is this machine only."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_address(value: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """`[HOST:]PORT` (`11435`, `0.0.0.0:11435`, `[::1]:11435`) as (host, port); ValueError if it is not."""
    host, colon, port = value.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536 or (colon and not host):
        raise ValueError(f"{value!r}: give [HOST:]PORT, e.g. 11435, 0.0.0.0:11435 or [::1]:11435")
    return (host.strip("[]") or default_host), int(port)
