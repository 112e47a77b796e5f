"""A real ``hvagent serve`` in a subprocess: its own state dir, tokens, loopback TCP port and a
NOTIFY_SOCKET that plays systemd's part (READY=1, WATCHDOG=1 arrive as datagrams)."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from agent import config as config_mod
from agent.daemon import token_hash
from agent.host import Host
from tests.conftest import ROOT, destroy_all

EXE = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin" / "hvagent"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Daemon:
    state_dir: Path
    port: int
    tokens: dict[str, str]
    proc: subprocess.Popen[bytes]
    notify: socket.socket
    log: Path
    notes: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def http(self, who: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"} if who else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)

    def call(self, who: str | None, method: str, path: str, **kw: Any) -> httpx.Response:
        with self.http(who) as c:
            return c.request(method, path, **kw)

    def notifications(self, timeout: float = 0.0) -> list[str]:
        """Datagrams received so far on the NOTIFY_SOCKET (waiting up to ``timeout`` for the first)."""
        self.notify.settimeout(timeout if timeout > 0 else 0.001)
        while True:
            try:
                self.notes.append(self.notify.recv(4096).decode())
                self.notify.settimeout(0.001)
            except (TimeoutError, BlockingIOError):
                return self.notes

    def wait_for(self, needle: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(needle in n for n in self.notifications(0.5)):
                return True
            if self.proc.poll() is not None:
                return False
        return False

    def wait_vm(self, who: str, name: str, states: tuple[str, ...], timeout: float = 150) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        vm: dict[str, Any] = {}
        while time.monotonic() < deadline:
            r = self.call(who, "GET", f"/v1/vms/{name}")
            vm = r.json()
            if r.status_code == 200 and vm["state"] in states:
                return vm
            time.sleep(1)
        raise AssertionError(f"vm {name} never reached {states}: {vm}")

    def events(self, vm: str) -> list[dict[str, Any]]:
        r = self.call("ops", "GET", "/v1/events", params={"vm": vm})
        assert r.status_code == 200, r.text
        return list(r.json())

    def wait_event(self, vm: str, kind: str, after: int, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            evs = [e for e in self.events(vm)[after:] if e["kind"] == kind]
            if evs:
                return evs[0]
            time.sleep(0.5)
        raise AssertionError(f"no {kind} event for {vm}; events: {self.events(vm)[after:]}")

    def terminate(self, timeout: float = 120) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


def start_daemon(state_dir: Path, extra: dict[str, Any] | None = None,
                 quotas: dict[str, dict[str, int]] | None = None, systemd: bool = True,
                 api: dict[str, Any] | None = None, wrap: tuple[str, ...] = ()) -> Daemon:
    """With ``systemd`` False the daemon runs as by hand: no NOTIFY_SOCKET, readiness from /healthz.
    ``api`` replaces settings of the api section (``tcp: None`` drops the loopback port). ``wrap``
    runs it under a command (``ip netns exec NS``)."""
    tokens = {who: secrets.token_urlsafe(24) for who in ("ops", "alice", "bob", "expired")}
    quotas = quotas or {}
    entries: list[dict[str, Any]] = [{"name": "ops", "role": "admin", "sha256": token_hash(tokens["ops"])}]
    for who in ("alice", "bob"):
        entries.append({"name": who, "role": "tenant", "sha256": token_hash(tokens[who]),
                        "quota": quotas.get(who, {"vms": 2, "cpus": 2, "memory": 1024})})
    entries.append({"name": "carol", "role": "tenant", "sha256": token_hash(tokens["expired"]),
                    "expires": "2020-01-01T00:00:00Z"})
    port = free_port()
    api_cfg = {"socket": str(state_dir / "api.sock"), "tcp": f"127.0.0.1:{port}", "tokens": entries, **(api or {})}
    cfg = {"state_dir": str(state_dir), "accelerator": "qemu", "port_min": 22600, "port_max": 22699,
           "health_timeout": 90, "shutdown_timeout": 10, "reconcile_interval": 1, "canary": False,
           "api": {k: v for k, v in api_cfg.items() if v is not None}, **(extra or {})}
    (state_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    notify_path = state_dir / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    log = state_dir / "serve.log"
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    env["HVAGENT_CONFIG"] = str(state_dir / "config.yaml")
    if systemd:
        env |= {"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "1000000"}
    with log.open("wb") as f:
        proc = subprocess.Popen([*wrap, str(EXE), "serve"], stdout=f, stderr=subprocess.STDOUT, env=env)
    d = Daemon(state_dir, port, tokens, proc, notify, log)
    if not (d.wait_for("READY=1", 60) if systemd else _answers(d, 60)):
        d.terminate(10)
        raise AssertionError(f"daemon did not become ready:\n{log.read_text()}")
    return d


def _answers(d: Daemon, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and d.proc.poll() is None:
        try:
            if d.call(None, "GET", "/healthz").status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    return False


def stop_daemon(d: Daemon) -> None:
    """Stop the daemon (by its pid) and remove every VM it made, even when a test failed."""
    try:
        d.terminate(120)
    except subprocess.TimeoutExpired:
        d.proc.kill()
        d.proc.wait()
    d.notify.close()
    destroy_all(Host(config_mod.load(d.state_dir / "config.yaml")))


def daemon_fixture(state_dir: Path, **kw: Any) -> Iterator[Daemon]:
    d = start_daemon(state_dir, **kw)
    try:
        yield d
    finally:
        stop_daemon(d)
