"""Health waits for a guest whose address is known only once it has a DHCP lease."""

from __future__ import annotations

import pytest

from agent.errors import EnvError, HealthError
from agent.health import Endpoint, wait_healthy


def _ep(locate: object) -> Endpoint:
    return Endpoint("", 22, "root", "ssh-ed25519 AAAA", locate=locate)  # type: ignore[arg-type]


def test_no_address_until_the_timeout_is_a_health_failure() -> None:
    calls: list[int] = []

    def locate() -> None:
        calls.append(1)

    with pytest.raises(HealthError, match=r"^guest: not healthy within 0s: no address yet"):
        wait_healthy(_ep(locate), "key", "1.0", None, timeout=0.05, sleep=lambda _s: None, interval=0)
    assert len(calls) > 1  # looked up again on every probe


def test_libvirt_trouble_while_locating_keeps_probing() -> None:
    def locate() -> str:
        raise EnvError("libvirt at qemu:///system: connection lost")

    with pytest.raises(HealthError, match="guest address: libvirt at qemu:///system: connection lost"):
        wait_healthy(_ep(locate), "key", "1.0", None, timeout=0.05, sleep=lambda _s: None, interval=0)


def test_once_located_the_address_is_probed(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent import health

    probed: list[str] = []

    def fake_check(ep: Endpoint, *_a: object) -> health.Check:
        probed.append(ep.host)
        return health.Check(True, "healthy", "1.0")

    monkeypatch.setattr(health, "check_once", fake_check)
    answers = iter([None, None, "10.77.0.101"])
    wait_healthy(_ep(lambda: next(answers)), "key", "1.0", None, timeout=5, sleep=lambda _s: None, interval=0)
    assert probed == ["10.77.0.101"]
