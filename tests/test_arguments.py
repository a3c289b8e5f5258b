"""Argument checks: every mistake is refused up front with an error that names it (trio_recycle._arguments)."""

from __future__ import annotations

import math
import socket

import pytest

import trio_recycle
from trio_recycle import _arguments

from .conftest import StartServer, answer_then_close, cycle, has_ipv6

#: No level knows this option number; the kernel answers ENOPROTOOPT.
UNKNOWN_OPTION = 9999


@pytest.mark.parametrize("name", ["eof_timeout", "drain_limit", "keepalive_expiry"])
async def test_a_number_too_large_for_a_float_is_a_value_error_naming_it(name: str) -> None:
    """10**400 is a ValueError naming the argument, not an OverflowError from deep inside."""
    with pytest.raises(ValueError, match=f"{name} is too large"):
        async with trio_recycle.open_socket_pool(**{name: 10**400}):  # type: ignore[arg-type]
            pass  # pragma: no cover


@pytest.mark.parametrize("name", ["eof_timeout", "keepalive_expiry"])
async def test_infinity_means_no_limit(name: str) -> None:
    """math.inf is accepted where a duration is: no time limit."""
    async with trio_recycle.open_socket_pool(**{name: math.inf}) as pool:  # type: ignore[arg-type]
        assert pool.statistics().capacity == 64


async def test_capacity_per_peer_above_capacity_is_refused() -> None:
    """capacity_per_peer > capacity is a mistake about one of the two: ValueError naming both."""
    with pytest.raises(ValueError, match=r"capacity_per_peer=5 is larger than capacity=4"):
        async with trio_recycle.open_socket_pool(capacity=4, capacity_per_peer=5):
            pass  # pragma: no cover
    async with trio_recycle.open_socket_pool(capacity=4, capacity_per_peer=4) as pool:
        assert pool.statistics().capacity == 4


async def test_keepalive_expiry_zero_is_refused() -> None:
    """keepalive_expiry=0 would turn keep-alive off behind release(): refused, pointing to aclose()."""
    with pytest.raises(ValueError, match=r"keepalive_expiry must be > 0, not 0"):
        async with trio_recycle.open_socket_pool(keepalive_expiry=0):
            pass  # pragma: no cover


async def test_a_socket_option_the_kernel_does_not_know_fails_when_the_pool_opens() -> None:
    """An unknown option is tried on a throwaway socket at open: ValueError naming socket_options and the triple."""
    bad = (socket.SOL_SOCKET, UNKNOWN_OPTION, 1)
    with pytest.raises(ValueError, match=r"socket_options entry \(1, 9999, 1\) is refused") as info:
        async with trio_recycle.open_socket_pool(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1), bad]):
            pass  # pragma: no cover
    assert isinstance(info.value.__cause__, OSError)


@pytest.mark.skipif(not has_ipv6(), reason="no IPv6")
async def test_an_ipv6_option_is_probed_on_an_ipv6_socket() -> None:
    """An IPPROTO_IPV6 option is tried on an AF_INET6 socket (an IPv4 socket never gets it)."""
    with pytest.raises(ValueError, match=r"AF_INET6 TCP socket"):
        async with trio_recycle.open_socket_pool(socket_options=[(socket.IPPROTO_IPV6, UNKNOWN_OPTION, 1)]):
            pass  # pragma: no cover
    good = (socket.IPPROTO_IPV6, socket.IPV6_TCLASS, 0x10)
    async with trio_recycle.open_socket_pool(socket_options=[good]) as pool:
        assert pool.statistics().created == 0  # the probe's socket is not one of the pool's


async def test_options_that_work_still_serve_opens(start_server: StartServer) -> None:
    """Options the kernel takes pass the probe and are set on the pool's sockets."""
    server = await start_server(answer_then_close)
    async with trio_recycle.open_socket_pool(
        capacity=1, socket_options=[(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    ) as pool:
        assert pool.statistics().created == 0
        assert await cycle(pool, server) == b"ok:ping"


@pytest.mark.parametrize("host", ["[::1]", b"[::1]", "[127.0.0.1]"])
async def test_a_bracketed_host_says_brackets_are_not_part_of_an_address(host: str | bytes) -> None:
    """'[::1]' is a URL's spelling: ValueError that says so, before any socket is made, TCP and UDP alike."""
    async with trio_recycle.open_socket_pool(capacity=1) as pool:
        for open_ in (pool.open_tcp_stream, pool.open_udp_socket):
            with pytest.raises(ValueError, match=r"brackets are not part of an address"):
                await open_(host, 80)
        assert pool.statistics().created == 0


async def test_a_bracketed_local_address_says_so_too() -> None:
    """local_address='[::1]' names the argument and the brackets."""
    async with trio_recycle.open_socket_pool(capacity=1) as pool:
        with pytest.raises(ValueError, match=r"local_address.*brackets are not part of an address: pass '::1'"):
            await pool.open_tcp_stream("127.0.0.1", 80, local_address="[::1]")


async def test_forgetting_async_with_says_to_use_it() -> None:
    """A pool method on open_socket_pool()'s result, without async with: AttributeError that says how to write it."""
    opener = trio_recycle.open_socket_pool()
    with pytest.raises(AttributeError, match=r"async with trio_recycle\.open_socket_pool\(\.\.\.\) as pool"):
        opener.open_tcp_stream  # type: ignore[attr-defined]  # noqa: B018
    assert "async with" in repr(opener)
    async with opener as pool:
        assert isinstance(pool, trio_recycle.SocketPool)


def test_httpx_and_the_pool_share_one_socket_option_validator() -> None:
    """The same C-int bounds for the pool and for trio_recycle.httpx, with httpcore's extra shapes only there."""
    too_wide = (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 2**31)
    for check in (_arguments.check_socket_options, _arguments.check_httpcore_socket_options):
        with pytest.raises(ValueError, match="C int"):
            check([too_wide])
    four = (socket.SOL_SOCKET, socket.SO_BINDTODEVICE, None, 16)
    assert _arguments.check_httpcore_socket_options(iter([four])) == (four,)
    with pytest.raises(TypeError, match="socket_options entries"):
        _arguments.check_socket_options([four])


def test_local_address_cache_stays_bounded() -> None:
    """Validated local addresses are remembered, but never more than the cache's size."""
    _arguments._local_addresses.clear()
    for n in range(_arguments._LOCAL_CACHE_SIZE + 10):
        _arguments.validate_local_address(f"127.0.{n // 256}.{n % 256}")
        assert len(_arguments._local_addresses) <= _arguments._LOCAL_CACHE_SIZE
    assert "127.0.2.9" in _arguments._local_addresses
    with pytest.raises(ValueError, match="local_address"):
        _arguments.validate_local_address("not-an-address")
