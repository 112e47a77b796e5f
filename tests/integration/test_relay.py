"""SSH through the API (issue 15, point 3): the WebSocket ``/v1/vms/{name}/ssh`` relays a byte
stream to the caller's own guest's port 22, so a tenant reaches its guest through the host's one
TLS port.

One daemon for the module, serving its API over TLS only (and the local Unix socket), and one
booted guest (tiny under TCG): a real SSH session through the relay with the host key pinned,
8 MiB each way; refusals before any byte is relayed; no connection to the guest left behind by a
client that vanishes mid-stream; a clear error once the VM is stopped.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import os
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import paramiko
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect, unix_connect

from agent import relay_client
from agent.errors import Conflict, EnvError, InputError, NotFound, Unauthorized
from agent.seed import new_ed25519
from tests.conftest import TEST_ROOT, image
from tests.integration.daemon_fixture import Daemon, daemon_fixture, free_port
from tests.integration.test_daemon import cli
from tests.tlsca import TestCA

pytestmark = [pytest.mark.integration, pytest.mark.daemon]

VM = "relay-1"
BLOB = 8 << 20


@dataclass
class Site:
    d: Daemon
    ca: TestCA
    tls: ssl.SSLContext

    def url(self, name: str = VM) -> str:
        return f"wss://127.0.0.1:{self.d.port}/v1/vms/{name}/ssh"

    def api(self, who: str, method: str, path: str, **kw: Any) -> httpx.Response:
        with httpx.Client(base_url=f"https://127.0.0.1:{self.d.port}", verify=self.tls, timeout=120,
                          headers={"Authorization": f"Bearer {self.d.tokens[who]}"}) as c:
            return c.request(method, path, **kw)

    def wait_vm(self, name: str, states: tuple[str, ...], timeout: float = 150) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        vm: dict[str, Any] = {}
        while time.monotonic() < deadline:
            vm = self.api("alice", "GET", f"/v1/vms/{name}").json()
            if vm.get("state") in states:
                return vm
            time.sleep(1)
        raise AssertionError(f"vm {name} never reached {states}: {vm}")

    def relays_logged(self) -> int:
        return self.d.log.read_text().count("event=ssh.relay ")

    def settled(self, port: int, timeout: float = 15.0) -> None:
        """Wait until relays of earlier tests are over: no connection to the guest left, and their
        log lines (written as each relay ends) all there."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.guest_connections(port) != 0:
            time.sleep(0.2)
        time.sleep(0.5)

    def guest_connections(self, port: int) -> int:
        """The daemon's TCP connections to ``port`` on loopback (established or closing)."""
        out = subprocess.run(["ss", "-tnpH", "dst", f"127.0.0.1:{port}"], capture_output=True, text=True,
                             check=True).stdout
        return sum(f"pid={self.d.proc.pid}," in line for line in out.splitlines())


@dataclass
class Guest:
    port: int  # the user-mode forward the relay reaches (never the caller)
    key: paramiko.PKey  # alice's
    host_key: paramiko.PKey  # the guest's, as the API tells its owner


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    TEST_ROOT.mkdir(mode=0o711, exist_ok=True)
    state_dir = TEST_ROOT / f"relay-{time.monotonic_ns() % 10**8:08d}"
    state_dir.mkdir(mode=0o711)
    ca = TestCA(state_dir / "pki", "test CA")
    server = ca.server()
    port = free_port()
    api = {"tcp": None, "listen": [f"127.0.0.1:{port}"], "tls": {"cert": str(server.cert), "key": str(server.key)}}
    try:
        for d in daemon_fixture(state_dir, api=api):
            d.port = port
            yield Site(d, ca, ssl.create_default_context(cafile=str(ca.cert)))
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def guest(site: Site) -> Guest:
    r = cli(site.d, "images", "publish", str(image("tiny-1.0")))
    assert r.returncode == 0, r.stdout + r.stderr
    pair = new_ed25519("alice")
    r2 = site.api("alice", "POST", "/v1/vms", json={"name": VM, "image": "tiny-1.0", "ssh_keys": [pair.public]})
    assert r2.status_code == 202, r2.text
    if r2.json()["state"] == "provisioning":  # a VM that is not running yet is not relayed to
        with pytest.raises(Conflict, match=f"^vm {VM}: is provisioning; ssh reaches a running VM only$"):
            relay_client.connect_relay(site.url(), site.d.tokens["alice"], site.tls)
    vm = site.wait_vm(VM, ("running", "failed"))
    assert vm["state"] == "running", vm
    hostkey = site.api("alice", "GET", f"/v1/vms/{VM}/hostkey").json()
    kind, b64 = hostkey["key"].split()
    assert kind == "ssh-ed25519"
    return Guest(int(vm["ssh"].rsplit(":", 1)[1]), paramiko.Ed25519Key.from_private_key(io.StringIO(pair.private)),
                 paramiko.Ed25519Key(data=base64.b64decode(b64)))


class Proxied:
    """``relay_client.proxy`` in a thread, as ssh's ProxyCommand would run it, bridged to one end
    of a socket pair; the other end is the socket an SSH client uses."""

    def __init__(self, url: str, token: str, tls: ssl.SSLContext) -> None:
        self.sock, self._ours = socket.socketpair()
        self._in, self._out = self._ours.makefile("rb", buffering=0), self._ours.makefile("wb")
        self.result: list[object] = []
        self.thread = threading.Thread(target=self._run, args=(url, token, tls), daemon=True)
        self.thread.start()

    def _run(self, url: str, token: str, tls: ssl.SSLContext) -> None:
        try:
            self.result.append(relay_client.proxy(url, token, tls, self._in, self._out))  # type: ignore[arg-type]
        except Exception as e:
            self.result.append(e)
        finally:
            with contextlib.suppress(OSError):
                self._ours.shutdown(socket.SHUT_RDWR)

    def close(self) -> object:
        self.sock.close()
        self.thread.join(30)
        assert not self.thread.is_alive(), "proxy() did not return after its stdin closed"
        for f in (self._in, self._out, self._ours):
            f.close()
        return self.result[0]


def ssh_client(sock: socket.socket | paramiko.ProxyCommand, g: Guest) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.get_host_keys().add(VM, g.host_key.get_name(), g.host_key)
    client.connect(VM, username="root", pkey=g.key, sock=sock, look_for_keys=False, allow_agent=False, timeout=60,
                   banner_timeout=60, auth_timeout=60)
    return client


def run(client: paramiko.SSHClient, command: str, stdin: bytes = b"") -> bytes:
    chan = client.get_transport().open_session()  # type: ignore[union-attr]
    chan.settimeout(300)
    chan.exec_command(command)
    if stdin:
        chan.sendall(stdin)
    chan.shutdown_write()
    out = bytearray()
    while data := chan.recv(1 << 16):
        out += data
    assert chan.recv_exit_status() == 0, (command, out[-200:])
    chan.close()
    return bytes(out)


def test_an_ssh_session_through_the_relay_with_the_host_key_pinned(site: Site, guest: Guest) -> None:
    before = site.relays_logged()
    p = Proxied(site.url(), site.d.tokens["alice"], site.tls)
    client = ssh_client(p.sock, guest)
    try:
        assert run(client, "echo hello from $(hostname)") == f"hello from {VM}\n".encode()
        up = os.urandom(BLOB)
        t0 = time.monotonic()
        answer = run(client, "cat > /tmp/blob && sha256sum /tmp/blob", up)
        assert answer.split()[0].decode() == hashlib.sha256(up).hexdigest()
        t1 = time.monotonic()
        down = run(client, "cat /tmp/blob")
        t2 = time.monotonic()
        assert len(down) == BLOB and hashlib.sha256(down).digest() == hashlib.sha256(up).digest()
        print(f"8 MiB up {t1 - t0:.1f} s, down {t2 - t1:.1f} s")
    finally:
        client.close()
    assert p.close() == 0
    deadline = time.monotonic() + 10
    while site.relays_logged() == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert site.relays_logged() == before + 1  # the relay ended and said so
    assert site.guest_connections(guest.port) == 0

    # the same relay over the plain Unix socket, for the local CLI (and the admin, on any VM)
    with unix_connect(str(site.d.state_dir / "api.sock"), f"ws://hvagent/v1/vms/{VM}/ssh",
                      additional_headers={"Authorization": f"Bearer {site.d.tokens['ops']}"}) as ws:
        assert ws.recv(timeout=60, decode=False).startswith(b"SSH-2.0-")


def test_refusals_come_before_any_byte_is_relayed(site: Site, guest: Guest) -> None:
    site.settled(guest.port)
    before = site.relays_logged()
    token = site.d.tokens
    cases: list[tuple[str, str, type[Exception], str]] = [
        ("bob", VM, NotFound, f"vm {VM}: no such VM"),  # another tenant's VM: as a missing one
        ("bob", "nothing-here", NotFound, "vm nothing-here: no such VM"),
        ("expired", VM, Unauthorized, "authorization: token expired"),
    ]
    for who, name, error, line in cases:
        with pytest.raises(error) as e:
            relay_client.connect_relay(site.url(name), token[who], site.tls)
        assert str(e.value) == line, (who, name)
    # no Authorization header at all
    with pytest.raises(InvalidStatus) as no_token:
        connect(site.url(), ssl=site.tls, open_timeout=30)
    assert no_token.value.response.status_code == 401
    assert b"missing bearer token" in bytes(no_token.value.response.body)
    # nothing chooses another port or host
    for query in ("?port=2222", "?host=127.0.0.1&port=22"):
        with pytest.raises(InputError, match="takes no query parameters"):
            relay_client.connect_relay(site.url() + query, token["alice"], site.tls)
    # a server certificate another CA signed: the client refuses before sending the token
    other = ssl.create_default_context(cafile=str(TestCA(site.d.state_dir / "other", "other CA").cert))
    with pytest.raises(EnvError, match="CERTIFICATE_VERIFY_FAILED"):
        relay_client.connect_relay(site.url(), token["alice"], other)
    assert site.relays_logged() == before and site.guest_connections(guest.port) == 0


# What `ssh -o ProxyCommand=...` runs, with the daemon's URL, a token file and the CA as arguments.
PROXY = ("import ssl, sys; from pathlib import Path; from agent.relay_client import proxy; "
         "sys.exit(proxy(sys.argv[1], Path(sys.argv[2]).read_text(), ssl.create_default_context(cafile=sys.argv[3]), "
         "sys.stdin.buffer, sys.stdout.buffer))")


def test_a_client_gone_mid_stream_leaves_no_connection_to_the_guest(site: Site, guest: Guest) -> None:
    assert site.guest_connections(guest.port) == 0
    before = site.relays_logged()
    token = site.d.state_dir / "alice.token"
    token.write_text(site.d.tokens["alice"])
    token.chmod(0o600)
    command = shlex.join([sys.executable, "-c", PROXY, site.url(), str(token), str(site.ca.cert)])
    proxy_command = paramiko.ProxyCommand(command)
    client = ssh_client(proxy_command, guest)
    transport = client.get_transport()
    assert transport is not None
    try:
        assert site.guest_connections(guest.port) == 1
        chan = transport.open_session()
        chan.settimeout(60)
        chan.exec_command("cat /dev/zero")  # the guest sends as fast as the relay takes it
        got = 0
        while got < (1 << 20):
            got += len(chan.recv(1 << 16))
        proxy_command.process.kill()  # the client vanishes: no close frame, data in flight both ways
    finally:
        client.close()
    transport.join(10)  # its last act signals the ProxyCommand's process: reap that only after it
    assert proxy_command.process.wait(10) == -9
    deadline = time.monotonic() + 15
    while (site.guest_connections(guest.port), site.relays_logged()) != (0, before + 1) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (site.guest_connections(guest.port), site.relays_logged()) == (0, before + 1)

    # the guest's end closing first (its sshd drops a client of another protocol) closes the relay
    with relay_client.connect_relay(site.url(), site.d.tokens["alice"], site.tls) as ws:
        assert ws.recv(timeout=60, decode=False).startswith(b"SSH-2.0-")
        ws.send(b"SSH-1.0-nobody\r\n")
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                ws.recv(timeout=30)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
    deadline = time.monotonic() + 15
    while (site.guest_connections(guest.port), site.relays_logged()) != (0, before + 2) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (site.guest_connections(guest.port), site.relays_logged()) == (0, before + 2)


def console_url(site: Site, name: str = VM, query: str = "") -> str:
    return f"wss://127.0.0.1:{site.d.port}/v1/vms/{name}/console{query}"


def read_until(ws: Any, marker: bytes, timeout: float = 60, poke: bytes | None = None) -> bytes:
    """What the console shows until ``marker``; ``poke`` is typed every second meanwhile."""
    seen = bytearray()
    deadline = time.monotonic() + timeout
    while marker not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {marker!r} on the console within {timeout} s: {bytes(seen[-300:])!r}"
        if poke is not None:
            ws.send(poke)
        with contextlib.suppress(TimeoutError):
            while marker not in seen:
                seen += ws.recv(timeout=min(1.0, left), decode=False)
    return bytes(seen)


def test_the_console_shows_the_guests_prompt_and_takes_input(site: Site, guest: Guest) -> None:
    """Issue 15, point 4: libvirt's console stream both ways, one session unless forced."""
    token = site.d.tokens
    with relay_client.connect_relay(console_url(site), token["alice"], site.tls, "console") as ws:
        read_until(ws, b"login: ", poke=b"\r")  # the tiny image's getty on ttyS0
        ws.send(b"typed-by-alice\r")  # getty echoes the name and asks for a password: input arrived
        shown = read_until(ws, b"Password: ")
        assert b"typed-by-alice" in shown, shown
        ws.send(b"wrong\r")
        read_until(ws, b"login: ", poke=b"\r")

        # a second session is refused while this one is open, named as such
        with pytest.raises(Conflict, match=f"^vm {VM}: another console session is open; force takes it over"):
            relay_client.connect_relay(console_url(site), token["alice"], site.tls, "console")
        # another tenant's VM is not there, whatever it asks for
        for query in ("", "?force=true"):
            with pytest.raises(NotFound, match=f"^vm {VM}: no such VM$"):
                relay_client.connect_relay(console_url(site, query=query), token["bob"], site.tls, "console")
        with pytest.raises(Unauthorized, match=r"^authorization: token expired$"):
            relay_client.connect_relay(console_url(site), token["expired"], site.tls, "console")
        with pytest.raises(InputError, match=r"^console: unknown query parameter 'port'"):
            relay_client.connect_relay(console_url(site, query="?port=22"), token["alice"], site.tls, "console")
        # the first session goes on meanwhile
        ws.send(b"\r")
        read_until(ws, b"login: ")

        # --force takes it over: the first is closed, saying why
        with relay_client.connect_relay(console_url(site, query="?force=true"), token["alice"], site.tls,
                                        "console") as second:
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    ws.recv(timeout=30)
            assert closed.value.rcvd is not None
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == \
                (relay_client.TAKEN_OVER, "another console session took this one over, or libvirt ended it")
            read_until(second, b"login: ", poke=b"\r")
    log = site.d.log.read_text()
    assert "event=console.session vm=relay-1 caller=alice" in log and "force=true" in log


def test_a_stopped_vm_is_not_relayed_to(site: Site, guest: Guest) -> None:
    console = relay_client.connect_relay(console_url(site), site.d.tokens["alice"], site.tls, "console")
    r = site.api("alice", "POST", f"/v1/vms/{VM}/stop")
    assert r.status_code == 200 and r.json()["state"] == "stopped", r.text
    with console, pytest.raises(ConnectionClosed) as closed:  # the console session ends with its VM
        while True:
            console.recv(timeout=60)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1000, "the VM stopped")
    with pytest.raises(Conflict, match=f"^vm {VM}: is not running; its console is there while it runs$"):
        relay_client.connect_relay(console_url(site), site.d.tokens["alice"], site.tls, "console")
    with pytest.raises(Conflict, match=f"^vm {VM}: is stopped; ssh reaches a running VM only$"):
        relay_client.connect_relay(site.url(), site.d.tokens["alice"], site.tls)
    p = Proxied(site.url(), site.d.tokens["alice"], site.tls)
    result = p.close()
    assert isinstance(result, Conflict), result
    assert site.guest_connections(guest.port) == 0
    log = site.d.log.read_text()
    for bad in ("Traceback", "Exception in ASGI", "ssh.relay.error", "level=error"):
        assert bad not in log, log
