"""Whether `localhost` has two usable addresses here (`::1` and `127.0.0.1`), as on Debian's
default `/etc/hosts` and on macOS: the pages' `needs="ipv6-localhost"` blocks and the tests that
connect to a name with several addresses need it. Where it has one, or `::1` is listed but IPv6
is off (a container with `disable_ipv6`), they are skipped with one line
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
NO_IPV6 = "needs IPv6 on the loopback: ::1 does not refuse a connection here, it fails otherwise"


def localhost_addresses() -> set[str]:
    """The addresses `localhost` resolves to, as asyncio and libpq see them."""
    infos = socket.getaddrinfo("localhost", 5432, type=socket.SOCK_STREAM)
    return {str(info[4][0]) for info in infos}


def ipv6_loopback_refuses() -> bool:
    """A connection to a closed port on ::1 is refused (not: no such address, no IPv6)."""
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as listener:
        try:
            listener.bind(("::1", 0))
        except OSError:
            return False
        port = listener.getsockname()[1]  # bound, never listening: a closed port
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as client:
            client.settimeout(5)
            try:
                client.connect(("::1", port))
            except ConnectionRefusedError:
                return True
            except OSError:
                return False
    return False


def require_ipv6_localhost() -> None:
    """Skip (or with REQUIRE_IPV6_LOCALHOST_TEST fail) in one line unless `localhost` resolves to
    both loopback addresses and ::1 refuses a closed port as 127.0.0.1 does."""
    if not {"::1", "127.0.0.1"} <= localhost_addresses():
        reason = NOT_SET_UP
    elif not ipv6_loopback_refuses():
        reason = NO_IPV6
    else:
        return
    if os.environ.get("REQUIRE_IPV6_LOCALHOST_TEST"):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)
