"""A guest command's output: bounded in memory, streamed on request, never past the health deadline."""

from __future__ import annotations

import time
import tracemalloc

import paramiko
import pytest

from agent import health
from agent.health import OUTPUT_LIMIT, Endpoint, Head, Result, Tail, check_once, run, wait_healthy
from tests.unit.sshserver import Command, Guest, ssh_server

pytestmark = pytest.mark.unit

MiB = 1 << 20


def _ep(g: Guest) -> Endpoint:
    return Endpoint("127.0.0.1", g.port, "root", g.host_key)


def flood(stdout: int, stderr: int, status: int) -> Command:
    """Prints ``stdout`` MiB after a first line, ``stderr`` MiB before its last line, exits ``status``."""
    def command(chan: paramiko.Channel) -> None:
        chan.sendall(b"first line\n")
        chunk = b"o" * MiB
        for _ in range(stdout):
            chan.sendall(chunk)
        chan.sendall_stderr(b"e" * (stderr * MiB) + b"\nthe reason\n")
        chan.send_exit_status(status)
    return command


def endless(chan: paramiko.Channel) -> None:
    chunk = b"o" * MiB
    while True:
        chan.sendall(chunk)


def test_a_guest_printing_50_mib_costs_64_kib_and_its_status_is_kept() -> None:
    with ssh_server(flood(50, 1, 3)) as g:
        tracemalloc.start()
        try:
            r = run(_ep(g), g.agent_key, "yes", timeout=120)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert r.status == 3
    assert len(r.stdout) == OUTPUT_LIMIT and r.stdout.startswith("first line\n")
    assert len(r.stderr) == OUTPUT_LIMIT and r.stderr.endswith("\nthe reason\n")
    assert r.dropped == 50 * MiB + len("first line\n") + MiB + len("\nthe reason\n") - 2 * OUTPUT_LIMIT
    assert peak < 8 * MiB, f"peak {peak / MiB:.1f} MiB for 51 MiB of output"


def test_a_guest_printing_forever_is_given_up_at_the_deadline() -> None:
    with ssh_server(endless) as g:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="'yes' did not finish within 2 s"):
            run(_ep(g), g.agent_key, "yes", timeout=2)
        assert time.monotonic() - t0 < 6


def test_sinks_receive_every_byte_as_it_comes() -> None:
    got = {"out": 0, "err": 0}

    def count(key: str) -> health.Sink:
        def sink(data: bytes) -> None:
            got[key] += len(data)
        return sink

    with ssh_server(flood(5, 1, 0)) as g:
        r = run(_ep(g), g.agent_key, "yes", timeout=60, stdout=count("out"), stderr=count("err"))
    assert r == Result(0, "", "", 0)
    assert got == {"out": 5 * MiB + len("first line\n"), "err": MiB + len("\nthe reason\n")}


def test_head_and_tail_keep_their_end_across_chunks() -> None:
    head, tail = Head(10), Tail(10)
    for chunk in (b"0123", b"456789ab", b"", b"cdefghijklmnop"):
        head(chunk)
        tail(chunk)
    assert (bytes(head.data), head.dropped) == (b"0123456789", 16)
    assert (bytes(tail.data), tail.dropped) == (b"ghijklmnop", 16)


def _os_release_ok(calls: list[float]) -> object:
    def fake_run(_ep: Endpoint, _key: str, command: str, timeout: float = 30.0) -> Result:
        calls.append(timeout)
        return Result(0, "VERSION_ID=1.0\n" if "os-release" in command else "", "")
    return fake_run


def test_no_probe_step_runs_past_the_health_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    timeouts: list[float] = []
    monkeypatch.setattr(health, "run", _os_release_ok(timeouts))
    ok = check_once(Endpoint("127.0.0.1", 22, "root", "ssh-ed25519 AAAA"), "key", "1.0", "true",
                    deadline=time.monotonic() + 5)
    assert ok.ok
    assert len(timeouts) == 2 and all(0 < t <= 5 for t in timeouts)


def test_a_probe_after_the_deadline_does_not_connect() -> None:
    c = check_once(Endpoint("127.0.0.1", 1, "root", "ssh-ed25519 AAAA"), "key", "1.0", None,
                   deadline=time.monotonic() - 1)
    assert not c.ok and "no time left" in c.reason


def test_the_health_wait_hands_its_deadline_to_each_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    deadlines: list[float | None] = []

    def fake_check(*_a: object, deadline: float | None = None) -> health.Check:
        deadlines.append(deadline)
        return health.Check(True, "healthy", "1.0")

    monkeypatch.setattr(health, "check_once", fake_check)
    t0 = time.monotonic()
    wait_healthy(Endpoint("127.0.0.1", 22, "root", "ssh-ed25519 AAAA"), "key", "1.0", "true", timeout=7,
                 sleep=lambda _s: None, interval=0)
    t1 = time.monotonic()
    assert len(deadlines) == 1 and deadlines[0] is not None
    assert t0 + 7 <= deadlines[0] <= t1 + 7
