"""Whether `localhost` has two addresses here (`::1` and `127.0.0.1`), as on Debian's default
`/etc/hosts` and on macOS: the pages' `needs="ipv6-localhost"` blocks and the tests that connect
to a name with several addresses need it. Where it has one, they are skipped with one line
(REQUIRE_IPV6_LOCALHOST_TEST, which `.ci/run` sets after adding Debian's line, makes that a
failure)."""

from __future__ import annotations

import os
import socket

import pytest

NOT_SET_UP = (
    "needs `localhost` to resolve to ::1 and 127.0.0.1, as Debian's default /etc/hosts has it: "
    "add the line `::1 localhost ip6-localhost ip6-loopback` (.ci/run does)"
)


def localhost_addresses() -> set[str]:
    """The addresses `localhost` resolves to, as asyncio and libpq see them."""
    infos = socket.getaddrinfo("localhost", 5432, type=socket.SOCK_STREAM)
    return {str(info[4][0]) for info in infos}


def require_ipv6_localhost() -> None:
    """Skip (or with REQUIRE_IPV6_LOCALHOST_TEST fail) in one line unless `localhost` resolves to
    both loopback addresses."""
    if {"::1", "127.0.0.1"} <= localhost_addresses():
        return
    if os.environ.get("REQUIRE_IPV6_LOCALHOST_TEST"):
        pytest.fail(NOT_SET_UP, pytrace=False)
    pytest.skip(NOT_SET_UP)
