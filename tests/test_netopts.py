"""muxtunnel.netopts: the session socket's retransmission cap and user timeout."""

from __future__ import annotations

import socket

import pytest

from muxtunnel import netopts


def _supported() -> bool:
    with socket.socket() as sock:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, netopts._TCP_RTO_MAX_MS, netopts.RTO_MAX_MS)
        except OSError:
            return False
        return True


def test_caps_the_retransmission_timeout_and_keeps_the_kernel_limit_long() -> None:
    with socket.socket() as sock:
        ok = netopts.cap_retransmit_timeout(sock)
        assert ok == _supported()
        if ok:
            assert sock.getsockopt(socket.IPPROTO_TCP, netopts._TCP_RTO_MAX_MS) == 2000
            got = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
            assert got == netopts.USER_TIMEOUT_MS


@pytest.mark.parametrize("error", [OSError, ValueError])
def test_an_older_kernel_changes_nothing(error: type[Exception]) -> None:
    class Refusing:
        def __init__(self) -> None:
            self.calls: list[tuple[int, int, int]] = []

        def setsockopt(self, level: int, optname: int, value: int, /) -> None:
            self.calls.append((level, optname, value))
            raise error("no")

    sock = Refusing()
    assert netopts.cap_retransmit_timeout(sock) is False
    assert len(sock.calls) == 1  # the user timeout is left alone too
