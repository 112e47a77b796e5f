"""Failed authentications per peer: a few a minute, then 429 until the oldest leaves the minute."""

from __future__ import annotations

import pytest

from agent.throttle import MAX_PEERS, AuthThrottle

pytestmark = pytest.mark.unit


def test_a_peer_is_throttled_after_its_limit_and_freed_a_minute_later() -> None:
    now = [100.0]
    t = AuthThrottle(3, clock=lambda: now[0])
    for i in range(3):
        assert t.retry_after("10.0.0.1") is None
        assert t.failed("10.0.0.1") == i + 1
        now[0] += 10
    assert t.retry_after("10.0.0.1") == pytest.approx(30.0)  # the first failure (t=100) leaves at 160
    assert t.retry_after("10.0.0.2") is None  # another peer is served
    now[0] = 160.0
    assert t.retry_after("10.0.0.1") is None
    assert t.failed("10.0.0.1") == 3  # two still in the minute, and this one


def test_memory_is_bounded_by_peers_and_by_the_limit() -> None:
    t = AuthThrottle(2, clock=lambda: 0.0)
    for i in range(MAX_PEERS + 10):
        t.failed(f"peer-{i}")
    assert len(t._failures) == MAX_PEERS and "peer-0" not in t._failures
    for _ in range(100):
        t.failed("busy")
    assert len(t._failures["busy"]) == 2
