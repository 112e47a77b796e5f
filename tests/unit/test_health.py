"""Health waits: a guest whose address comes from a DHCP lease, and failures that end the wait at once."""

from __future__ import annotations

import time

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

    def fake_check(ep: Endpoint, *_a: object, **_k: object) -> health.Check:
        probed.append(ep.host)
        return health.Check(True, "healthy", "1.0")

    monkeypatch.setattr(health, "check_once", fake_check)
    answers = iter([None, None, "10.77.0.101"])
    wait_healthy(_ep(lambda: next(answers)), "key", "1.0", None, timeout=5, sleep=lambda _s: None, interval=0)
    assert probed == ["10.77.0.101"]


def test_a_guest_that_qemu_stopped_fails_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent import health

    probes: list[str] = []

    def fake_check(ep: Endpoint, *_a: object, **_k: object) -> health.Check:
        probes.append(ep.host)
        return health.Check(False, "ssh: no answer yet")

    monkeypatch.setattr(health, "check_once", fake_check)
    states = iter([None, None, "domain t is paused: QEMU stopped the guest"])
    slept: list[float] = []
    with pytest.raises(HealthError, match=r"^127.0.0.1:22: not healthy within 600s: domain t is paused: QEMU"):
        wait_healthy(Endpoint("127.0.0.1", 22, "root", "ssh-ed25519 AAAA"), "key", "1.0", None, timeout=600,
                     halted=lambda: next(states), sleep=slept.append, interval=1)
    assert probes == ["127.0.0.1", "127.0.0.1"]  # no SSH once it halted, and no wait for the 600 s
    assert slept == [1, 1]


def test_libvirt_trouble_while_asking_whether_it_halted_leaves_ssh_to_decide(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent import health

    monkeypatch.setattr(health, "check_once", lambda *_a, **_k: health.Check(True, "healthy", "1.0"))

    def halted() -> str | None:
        raise EnvError("libvirt at qemu:///system: connection lost")

    ok = wait_healthy(Endpoint("127.0.0.1", 22, "root", "ssh-ed25519 AAAA"), "key", "1.0", None, timeout=5,
                      halted=halted, sleep=lambda _s: None, interval=0)
    assert ok.ok


def test_another_host_key_fails_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent import health

    calls: list[int] = []

    def fake_check(*_a: object, **_k: object) -> health.Check:
        calls.append(1)
        return health.Check(False, "guest presented a host key other than the pinned one", final=True)

    monkeypatch.setattr(health, "check_once", fake_check)
    with pytest.raises(HealthError, match="other than the pinned one"):
        wait_healthy(Endpoint("127.0.0.1", 22, "root", "ssh-ed25519 AAAA"), "key", "1.0", None, timeout=600,
                     sleep=lambda _s: None, interval=0)
    assert calls == [1]


def test_a_probe_cut_short_by_the_deadline_does_not_hide_the_failure_before_it(monkeypatch: pytest.MonkeyPatch
                                                                            ) -> None:
    """The wait's last probe starts just before the deadline and is cut short ("no time left"):
    the reason given is the failure decided before it, the one that says what is wrong."""
    from agent import health

    answers = iter([health.Check(False, "health command exited 3: last words"),
                    health.Check(False, "ssh: TimeoutError: 'cat /etc/os-release': no time left to run it")])

    def fake_check(*_a: object, **_k: object) -> health.Check:
        answer = next(answers)
        if "no time left" in answer.reason:
            time.sleep(0.3)  # the deadline passes while this probe runs
        return answer

    monkeypatch.setattr(health, "check_once", fake_check)
    with pytest.raises(HealthError, match=r"not healthy within 0s: health command exited 3: last words$"):
        wait_healthy(Endpoint("127.0.0.1", 22, "root", "ssh-ed25519 AAAA"), "key", "1.0", "false", timeout=0.2,
                     sleep=lambda _s: None, interval=0)
