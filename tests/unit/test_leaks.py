"""Failed connections leave nothing behind: no SSH transport thread, no libvirt connection."""

from __future__ import annotations

import threading
import time
from typing import Any

import libvirt
import pytest

from agent import virt
from agent.health import Endpoint, check_once
from agent.seed import new_ed25519
from tests.unit.sshserver import ssh_server

pytestmark = pytest.mark.unit


def _settled(limit: int, within: float = 10.0) -> int:
    """The thread count once it is at most ``limit`` (closed transports end a moment later), or after ``within`` s."""
    end = time.monotonic() + within
    while threading.active_count() > limit and time.monotonic() < end:
        time.sleep(0.05)
    return threading.active_count()


def test_a_guest_with_another_host_key_leaves_no_thread_behind() -> None:
    with ssh_server(lambda _chan: None, presents=new_ed25519("impostor")) as g:
        before = threading.active_count()
        for _ in range(5):
            c = check_once(Endpoint("127.0.0.1", g.port, "root", g.host_key), g.agent_key, "1.0", None)
            assert (c.ok, c.final, c.reason) == (False, True, "guest presented a host key other than the pinned one")
        assert _settled(before) <= before


class _Conn:
    def __init__(self, fail: str) -> None:
        self.fail = fail
        self.closed = 0

    def _maybe_fail(self, what: str) -> None:
        if what == self.fail:
            raise libvirt.libvirtError(f"{what}: refused")

    def registerCloseCallback(self, *_a: Any) -> None:
        self._maybe_fail("registerCloseCallback")

    def setKeepAlive(self, *_a: Any) -> None:
        self._maybe_fail("setKeepAlive")

    def domainEventRegisterAny(self, *_a: Any) -> int:
        self._maybe_fail("domainEventRegisterAny")
        return 1

    def close(self) -> int:
        self.closed += 1
        return 0


@pytest.mark.parametrize("fail", ["registerCloseCallback", "setKeepAlive", "domainEventRegisterAny"])
def test_a_failed_event_registration_closes_its_connection(monkeypatch: pytest.MonkeyPatch, fail: str) -> None:
    conns: list[_Conn] = []

    def open_read_only(_uri: str) -> _Conn:
        conns.append(_Conn(fail))
        return conns[-1]

    monkeypatch.setattr(libvirt, "openReadOnly", open_read_only)
    watch = virt.LifecycleWatch("qemu:///system", lambda _e: None)
    assert not watch.ensure()
    assert not watch.ensure()
    assert [c.closed for c in conns] == [1, 1]
    assert not watch.connected


def test_a_registered_watch_keeps_its_connection_open(monkeypatch: pytest.MonkeyPatch) -> None:
    conn = _Conn("nothing")
    monkeypatch.setattr(libvirt, "openReadOnly", lambda _uri: conn)
    watch = virt.LifecycleWatch("qemu:///system", lambda _e: None)
    assert watch.ensure() and watch.connected and conn.closed == 0
    watch.close()
    assert conn.closed == 1
