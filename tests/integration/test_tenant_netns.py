"""A tenant on its own machine reaches its guest through the host's one TLS port, and nothing else
of the host (issue 15, point 5).

Two network namespaces that this module creates, joined by a veth pair: the *host* (a libvirtd of
its own, lab/ns-libvirtd, and ``hvagent serve`` with its API on the host's address, TLS with a
certificate from a test CA) and the *tenant's machine*, where the tenant runs the real ``hvagent``
CLI with its remote, the system's ``ssh`` and ``scp``, and a terminal for the console. The guest
(tiny under TCG) runs in the host namespace with QEMU's user-mode forward on that namespace's
loopback. All traffic stays inside the two namespaces.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import select
import shutil
import subprocess
import sys
import termios
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.seed import KeyPair, new_ed25519
from tests.conftest import image
from tests.integration.daemon_fixture import EXE, Daemon, daemon_fixture
from tests.integration.netns import ns_host
from tests.integration.netns import run as _run
from tests.tlsca import TestCA

pytestmark = [pytest.mark.integration, pytest.mark.daemon, pytest.mark.timeout(900)]

HOST_ADDR = "192.0.2.1"  # TEST-NET-1, inside the namespaces only
TENANT_ADDR = "192.0.2.2"
OTHER_ADDR = "192.0.2.3"  # a second address of the tenant's machine: the throttle's victim
API_PORT = 8470
URL = f"https://{HOST_ADDR}:{API_PORT}"
VM = "tn-1"
AUTH_FAILURES = 3  # the host's api.auth_failures


@dataclass
class Tenant:
    """``who`` on the tenant's machine: a home of its own with the remote ``hv`` (its token, the CA)."""

    ns: str
    home: Path

    def env(self) -> dict[str, str]:
        drop = ("HVAGENT_CONFIG", "HVAGENT_STATE_DIR", "HVAGENT_REMOTE")
        env = {k: v for k, v in os.environ.items() if k not in drop and "proxy" not in k.lower()}
        return env | {"HOME": str(self.home), "XDG_CONFIG_HOME": str(self.home / ".config")}

    def argv(self, *args: str | Path) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *(str(a) for a in args)]

    def run(self, *args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args), capture_output=True, text=True, env=self.env(), timeout=timeout)

    def hvagent(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(EXE, *args)

    def ok(self, *args: str) -> str:
        r = self.hvagent(*args)
        assert r.returncode == 0, (args, r.stdout, r.stderr)
        return r.stdout

    def refused(self, *args: str) -> str:
        """The one line of a command refused by the host (exit 2)."""
        r = self.hvagent(*args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("hvagent: error: "), \
            (args, r.returncode, r.stdout, r.stderr)
        return lines[0]

    def python(self, code: str, *args: str) -> Any:
        """``code`` run by this venv's Python on the tenant's machine; what it prints, as JSON."""
        r = self.run(sys.executable, "-c", textwrap.dedent(code), *args)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)


@dataclass
class Site:
    host_ns: str
    d: Daemon
    ca: TestCA
    root: Path
    tenant_ns: str

    def tenant(self, who: str, token: str | None = None) -> Tenant:
        home = self.root / who
        t = Tenant(self.tenant_ns, home)
        if not home.exists():
            home.mkdir(parents=True)
            (home / "token").write_text((token or self.d.tokens[who]) + "\n")
            out = t.ok("remote", "add", "hv", URL, "--token-file", str(home / "token"), "--ca", str(self.ca.cert))
            assert f"added remote hv: {URL}" in out, out
        return t

    def in_host(self, code: str, *args: str) -> Any:
        r = _run("ip", "netns", "exec", self.host_ns, sys.executable, "-c", textwrap.dedent(code), *args)
        return json.loads(r.stdout)


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    for tool in ("ssh", "scp"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing (make host installs it)")
    with ns_host("hvtn", others=["t"]) as host:
        host_ns, tenant_ns = host.ns, host.ns + "t"
        _run("ip", "link", "add", "hvtn0", "netns", host_ns, "type", "veth", "peer", "name", "eth0",
             "netns", tenant_ns)
        _run("ip", "-n", host_ns, "addr", "add", f"{HOST_ADDR}/24", "dev", "hvtn0")
        for address in (TENANT_ADDR, OTHER_ADDR):
            _run("ip", "-n", tenant_ns, "addr", "add", f"{address}/24", "dev", "eth0")
        _run("ip", "-n", host_ns, "link", "set", "hvtn0", "up")
        _run("ip", "-n", tenant_ns, "link", "set", "eth0", "up")
        ca = TestCA(host.base / "pki", "tenant test CA")
        server = ca.server(addresses=(HOST_ADDR,))
        state_dir = host.base / "state"
        state_dir.mkdir(mode=0o711)
        api = {"tcp": None, "listen": [f"{HOST_ADDR}:{API_PORT}"], "auth_failures": AUTH_FAILURES,
               "tls": {"cert": str(server.cert), "key": str(server.key)}}
        for d in daemon_fixture(state_dir, api=api, extra={"libvirt_uri": host.uri, "health_timeout": 180},
                                wrap=("ip", "netns", "exec", host_ns)):
            d.port = API_PORT
            # the operator publishes on the host, through the daemon's Unix socket
            env = {**os.environ, "HVAGENT_CONFIG": str(state_dir / "config.yaml")}
            r = _run("ip", "netns", "exec", host_ns, EXE, "images", "publish", str(image("tiny-1.0")), env=env,
                     timeout=600)
            assert "through the daemon" in r.stdout, r.stdout + r.stderr
            yield Site(host_ns, d, ca, host.base / "tenants", tenant_ns)


@dataclass
class Guest:
    key: KeyPair  # alice's
    identity: Path  # its private half, on the tenant's machine
    forward: int  # the user-mode forward on the host's loopback (never reachable from outside)


@pytest.fixture(scope="module")
def guest(site: Site) -> Guest:
    alice = site.tenant("alice")
    key = new_ed25519("alice@laptop")
    (alice.home / ".ssh").mkdir(mode=0o700)
    (alice.home / ".ssh" / "id_ed25519.pub").write_text(key.public + "\n")
    identity = alice.home / ".ssh" / "id_ed25519"
    identity.write_text(key.private)
    identity.chmod(0o600)
    out = alice.ok("vm", "create", VM, "--image", "tiny-1.*")
    assert f"{VM}: running (tiny-1.0, track tiny-1.*)" in out, out
    with _unix(site.d) as c:  # the admin's view, on the host: which port QEMU forwards
        vm = c.get(f"/v1/vms/{VM}").json()
    return Guest(key, identity, int(vm["ssh"].rsplit(":", 1)[1]))


@contextlib.contextmanager
def _unix(d: Daemon) -> Iterator[Any]:
    import httpx

    transport = httpx.HTTPTransport(uds=str(d.state_dir / "api.sock"))
    with httpx.Client(transport=transport, base_url="http://hvagent", timeout=60,
                      headers={"Authorization": f"Bearer {d.tokens['ops']}"}) as c:
        yield c


# Connects to every TCP port of an address, many at once; prints the open ones.
SCAN = """
import asyncio, json, sys

async def main(host):
    gate = asyncio.Semaphore(512)
    async def one(port):
        async with gate:
            try:
                _, w = await asyncio.wait_for(asyncio.open_connection(host, port), 3)
            except (OSError, asyncio.TimeoutError):
                return None
            w.close()
            return port
    found = await asyncio.gather(*(one(p) for p in range(1, 65536)))
    print(json.dumps([p for p in found if p]))

asyncio.run(main(sys.argv[1]))
"""

CONNECTS = """
import json, socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()
    print(json.dumps(True))
except OSError:
    print(json.dumps(False))
"""


def test_a_port_scan_from_the_tenants_machine_finds_the_api_only(site: Site, guest: Guest) -> None:
    # the guest's forward is there on the host (its loopback), so its absence below is no accident
    assert site.in_host(CONNECTS, "127.0.0.1", str(guest.forward)) is True
    alice = site.tenant("alice")
    assert alice.python(SCAN, HOST_ADDR) == [API_PORT]
    assert alice.python(CONNECTS, HOST_ADDR, str(guest.forward)) is False


# One request from a given source address: its status, or the error that stood for one.
REQUEST = """
import json, ssl, sys
import httpx
url, source, token, ca = sys.argv[1:5]
verify = ssl.create_default_context(cafile=ca) if ca else False
transport = httpx.HTTPTransport(local_address=source, verify=verify)
try:
    with httpx.Client(transport=transport, timeout=20) as c:
        r = c.get(url, headers={"Authorization": f"Bearer {token}"} if token else {})
        print(json.dumps({"status": r.status_code, "body": r.text[:300]}))
except httpx.HTTPError as e:
    print(json.dumps({"error": type(e).__name__}))
"""


def test_expired_tokens_plain_http_and_the_throttle(site: Site) -> None:
    carol = site.tenant("carol", site.d.tokens["expired"])
    line = carol.refused("vm", "list")
    assert "remote hv: authorization: token expired" in line, line
    alice = site.tenant("alice")

    def get(source: str, token: str | None, url: str = f"{URL}/v1/vms") -> dict[str, Any]:
        answer: dict[str, Any] = alice.python(REQUEST, url, source, token or "", str(site.ca.cert))
        return answer

    # plain HTTP to the TLS port: no HTTP answer at all, let alone data
    plain = alice.python(REQUEST, f"http://{HOST_ADDR}:{API_PORT}/v1/vms", TENANT_ADDR, site.d.tokens["alice"], "")
    assert "status" not in plain, plain
    assert get(TENANT_ADDR, site.d.tokens["alice"])["status"] == 200
    # wrong tokens from one address: 401 until the limit, then 429 for that address, good token or not
    wrong = [get(OTHER_ADDR, "not-a-token")["status"] for _ in range(AUTH_FAILURES)]
    assert wrong == [401] * AUTH_FAILURES
    throttled = get(OTHER_ADDR, site.d.tokens["alice"])
    assert throttled["status"] == 429 and "too many failed attempts from 192.0.2.3" in throttled["body"], throttled
    # the tenant's other address is served meanwhile, and each failure was logged
    assert get(TENANT_ADDR, site.d.tokens["alice"])["status"] == 200
    assert site.d.log.read_text().count("event=auth.failed peer=192.0.2.3") == AUTH_FAILURES


def test_another_tenants_vm_is_not_there_on_any_path(site: Site, guest: Guest) -> None:
    bob = site.tenant("bob")
    for args in (["vm", "show", VM], ["vm", "stop", VM], ["vm", "start", VM], ["vm", "reboot", VM],
                 ["vm", "events", VM], ["vm", "hostkey", VM], ["vm", "delete", VM, "--purge"],
                 ["vm", "console", VM], ["vm", "console", VM, "--force"], ["vm", "proxy", VM],
                 ["vm", "ssh", VM, "--", "true"]):
        line = bob.refused(*args)
        assert line.endswith(f"vm {VM}: no such VM"), (args, line)
    assert bob.python(REQUEST, f"{URL}/v1/vms/{VM}/console", TENANT_ADDR, site.d.tokens["bob"],
                      str(site.ca.cert))["status"] == 404
    assert site.tenant("alice").python(REQUEST, f"{URL}/v1/vms/{VM}", TENANT_ADDR, site.d.tokens["alice"],
                                       str(site.ca.cert))["status"] == 200


class Terminal:
    """A command on a pseudo-terminal of its own, as a person at the tenant's machine runs it."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.master, slave = pty.openpty()
        self.saved = termios.tcgetattr(slave)
        self.slave = slave
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
        self.seen = bytearray()

    def expect(self, marker: bytes, timeout: float = 60, poke: bytes | None = None) -> bytes:
        deadline = time.monotonic() + timeout
        start = len(self.seen)
        while marker not in self.seen[start:]:
            left = deadline - time.monotonic()
            assert left > 0, f"no {marker!r} within {timeout} s: {bytes(self.seen[-400:])!r}"
            if poke is not None:
                os.write(self.master, poke)
            ready, _, _ = select.select([self.master], [], [], min(1.0, left))
            if ready:
                with contextlib.suppress(OSError):
                    self.seen += os.read(self.master, 65536)
        return bytes(self.seen[start:])

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def close(self) -> int:
        code = self.proc.wait(30)
        with contextlib.suppress(OSError):
            while select.select([self.master], [], [], 0.2)[0]:
                self.seen += os.read(self.master, 65536)
        return code

    def release(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)


def test_the_whole_workflow_from_the_tenants_machine(site: Site, guest: Guest) -> None:
    alice = site.tenant("alice")
    # ssh with the guest's host key pinned (the CLI fetched it from the API) through the relay
    # (ssh finds ~ from the password database, root's here: the key is named)
    shown = alice.ok("vm", "ssh", VM, "-i", str(guest.identity), "--", "cat /etc/os-release; hostname")
    assert "VERSION_ID=1.0" in shown and shown.strip().endswith(VM), shown
    # scp a file in and back out, with the same ssh options as a config file
    config = alice.home / "ssh_config"
    config.write_text(alice.ok("vm", "ssh-config", VM))
    blob, back = alice.home / "blob", alice.home / "blob.back"
    blob.write_bytes(os.urandom(2 << 20))
    scp = ["scp", "-q", "-F", str(config), "-i", str(guest.identity), "-o", "IdentitiesOnly=yes"]
    r = alice.run(*scp, blob, f"{VM}:/tmp/blob")
    assert r.returncode == 0, r.stderr
    r = alice.run(*scp, f"{VM}:/tmp/blob", back)
    assert r.returncode == 0, r.stderr
    assert back.read_bytes() == blob.read_bytes()
    # a wrong pinned key: ssh refuses to talk to the guest (strict checking is on)
    wrong = alice.home / "wrong_config"
    wrong.write_text("".join(f"  UserKnownHostsFile {alice.home / 'wrong_known_hosts'}\n"
                             if line.strip().startswith("UserKnownHostsFile") else f"{line}\n"
                             for line in config.read_text().splitlines()))
    (alice.home / "wrong_known_hosts").write_text(f"hvagent.hv.{VM} {new_ed25519('x').public.rsplit(' ', 1)[0]}\n")
    r = alice.run("ssh", "-F", wrong, "-i", guest.identity, "-o", "IdentitiesOnly=yes", VM, "true")
    assert r.returncode == 255 and "Host key verification failed" in r.stderr, r.stderr

    # the console on a terminal: the guest's prompt, typed input reaching it, Ctrl-] to leave
    term = Terminal(alice.argv(EXE, "vm", "console", VM), alice.env())
    try:
        term.expect(b"Ctrl-] leaves")
        term.expect(b"login: ", poke=b"\r")
        term.type(b"typed-on-the-laptop\r")
        assert b"typed-on-the-laptop" in term.expect(b"Password: ")
        term.type(b"\x1d")
        assert term.close() == 0
        assert termios.tcgetattr(term.slave) == term.saved  # the terminal is out of raw mode again
    finally:
        term.release()
    assert b"left the console" in term.seen, bytes(term.seen[-300:])

    # stop, start, delete
    assert alice.ok("vm", "stop", VM).strip() == f"{VM}: stopped"
    line = alice.refused("vm", "ssh", VM, "-i", str(guest.identity), "--", "true")
    assert f"vm {VM}: is stopped; ssh reaches a running VM only" in line, line
    assert f"{VM}: running" in alice.ok("vm", "start", VM)
    assert "VERSION_ID=1.0" in alice.ok("vm", "ssh", VM, "-i", str(guest.identity), "--", "cat /etc/os-release")
    assert alice.ok("vm", "delete", VM, "--purge").strip() == f"deleted {VM} (data disk purged)"
    assert json.loads(alice.ok("vm", "list", "--json")) == []
    with _unix(site.d) as c:
        assert c.get("/v1/vms").json() == []
