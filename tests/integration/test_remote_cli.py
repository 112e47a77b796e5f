"""The tenant's remote CLI (issue 15, point 2): the real ``hvagent`` command, with a tenant's own
XDG_CONFIG_HOME and HOME and no host configuration, against a real ``hvagent serve`` over TLS on
127.0.0.1 (a throwaway CA). One guest boots: alice's, through the whole lifecycle; bob's remote
cannot see it, and the bad inputs (a wrong CA, a host name the certificate does not name, an
unknown remote, an expired token, a closed port, a CA file gone) are one line each, with the exit status promised.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator

import paramiko
import pytest

from agent.seed import fingerprint, new_ed25519
from tests.conftest import TEST_ROOT, image
from tests.integration.daemon_fixture import EXE, daemon_fixture, free_port
from tests.integration.tenant_cli import Site, Tenant
from tests.tlsca import TestCA

pytestmark = [pytest.mark.integration, pytest.mark.daemon]

VM = "rcli-1"  # domain names are per host: one no other test uses


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    TEST_ROOT.mkdir(mode=0o711, exist_ok=True)
    state_dir = TEST_ROOT / f"rcli-{uuid.uuid4().hex[:8]}"
    state_dir.mkdir(mode=0o711)
    try:
        ca = TestCA(state_dir / "pki", "test CA")
        server = ca.server()
        port = free_port()
        # 127.0.0.2 is served too, with the same certificate, which names 127.0.0.1 only
        api = {"tcp": None, "listen": [f"127.0.0.1:{port}", f"127.0.0.2:{port}"],
               "tls": {"cert": str(server.cert), "key": str(server.key)}}
        for d in daemon_fixture(state_dir, api=api, extra={"port_min": 22740, "port_max": 22759}):
            d.port = port
            # the operator publishes through the daemon (its socket and local admin token)
            env = {**os.environ, "HVAGENT_CONFIG": str(state_dir / "config.yaml")}
            r = subprocess.run([str(EXE), "images", "publish", str(image("tiny-1.0"))], capture_output=True,
                               text=True, env=env, timeout=600)
            assert r.returncode == 0 and "through the daemon" in r.stdout, r.stdout + r.stderr
            yield Site(d, ca, f"https://127.0.0.1:{port}", state_dir / "tenants")
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


def tenant(site: Site, who: str) -> Tenant:
    """``who``'s machine: a home of its own with its remote ``hv1`` added, its token from a file."""
    home = site.root / who
    if not home.exists():
        home.mkdir(parents=True)
        token = home / "token"
        token.write_text(site.daemon.tokens[who] + "\n")
        t = Tenant(home)
        out = t.ok("remote", "add", "hv1", site.url, "--token-file", str(token), "--ca", str(site.ca.cert))
        assert f"added remote hv1: {site.url}, CA {site.ca.cert} (the default remote)" in out, out
    return Tenant(home)


def test_remote_add_keeps_the_tenants_file_private(site: Site) -> None:
    alice = tenant(site, "alice")
    path = alice.home / ".config" / "hvagent" / "remotes.yaml"
    assert (path.stat().st_mode & 0o777, path.parent.stat().st_mode & 0o777) == (0o600, 0o700)
    assert alice.json("remote", "list") == [{"name": "hv1", "url": site.url, "ca": str(site.ca.cert),
                                             "cert": None, "default": True}]
    assert site.daemon.tokens["alice"] not in alice.ok("remote", "list")
    # a token from standard input works as well (here: carol's expired one)
    alice.ok("remote", "add", "old", site.url, "--ca", str(site.ca.cert), stdin=site.daemon.tokens["expired"])
    line = alice.refused(2, "--remote", "old", "vm", "list")
    assert "remote old: authorization: token expired (hint: the token was refused" in line, line
    alice.ok("remote", "remove", "old")


def test_the_lifecycle_of_a_tenants_vm(site: Site) -> None:
    alice, bob = tenant(site, "alice"), tenant(site, "bob")
    key = new_ed25519("alice@laptop")
    (alice.home / ".ssh").mkdir(mode=0o700)
    (alice.home / ".ssh" / "id_ed25519.pub").write_text(key.public + "\n")  # the default --ssh-key

    out = alice.ok("vm", "create", VM, "--image", "tiny-1.0", "--memory", "256", "--cpus", "2", "--data-disk", "1")
    assert f"{VM}: running (tiny-1.0, track tiny-1.0)" in out, out
    [vm] = alice.json("vm", "list")
    assert {k: vm[k] for k in ("name", "owner", "image", "version", "track", "state", "memory", "cpus", "data_disk")} \
        == {"name": VM, "owner": "alice", "image": "tiny", "version": "1.0", "track": "tiny-1.0", "state": "running",
            "memory": 256, "cpus": 2, "data_disk": 1}
    assert "uuid" not in vm  # a tenant's view
    assert alice.json("vm", "show", VM) == vm
    listing = alice.ok("vm", "list")
    assert VM in listing and "tiny-1.0" in listing and "running" in listing

    # the host key, as the guest presents it
    r = alice.run("vm", "hostkey", VM)
    assert r.returncode == 0, r.stderr
    port = int(vm["ssh"].rsplit(":", 1)[1])
    transport = paramiko.Transport(("127.0.0.1", port))
    try:
        transport.start_client(timeout=20)
        presented = transport.get_remote_server_key()
    finally:
        transport.close()
    assert r.stdout.strip() == f"{presented.get_name()} {presented.get_base64()}"
    assert r.stderr.strip() == f"{VM}: {fingerprint(r.stdout.strip())}"

    # bob's remote is the same host: alice's VM is not there for him, and nothing of it changes
    events_before = alice.json("vm", "events", VM)
    assert bob.json("vm", "list") == []
    for args in (["vm", "show", VM], ["vm", "stop", VM], ["vm", "reboot", VM], ["vm", "start", VM],
                 ["vm", "delete", VM, "--purge"], ["vm", "events", VM], ["vm", "hostkey", VM]):
        assert bob.refused(2, *args) == f"hvagent: error: remote hv1: vm {VM}: no such VM", args
    assert alice.json("vm", "show", VM)["state"] == "running"
    assert alice.json("vm", "events", VM) == events_before
    line = alice.refused(2, "vm", "create", VM, "--image", "tiny-1.0")
    assert f"remote hv1: vm {VM}: the name is taken" in line, line

    assert alice.ok("vm", "stop", VM).strip() == f"{VM}: stopped"
    assert alice.json("vm", "show", VM)["state"] == "stopped"
    assert f"{VM}: running (tiny-1.0, track tiny-1.0)" in alice.ok("vm", "start", VM)
    kinds = [e["kind"] for e in alice.json("vm", "events", VM)]
    for kind in ("vm.provisioning", "vm.running", "vm.stopping", "vm.stopped", "vm.starting"):
        assert kind in kinds, kinds
    assert kinds.index("vm.stopped") < kinds.index("vm.starting")
    assert "vm.running" in kinds[kinds.index("vm.starting"):]
    table = alice.ok("vm", "events", VM)
    assert "vm.stopping" in table and "requested by alice" in table

    # SSH through the host's API: the system's ssh with the relay as ProxyCommand and the guest's key
    # pinned; with the same ssh_config block (`ssh -F`, as scp and rsync take it) a file goes in and
    # back out (test_tenant_netns does the same with scp)
    private = alice.home / "id_ed25519"
    private.write_text(key.private)
    private.chmod(0o600)
    shown = alice.ok("vm", "ssh", VM, "-i", str(private), "--", "cat /etc/os-release")
    assert "VERSION_ID=1.0" in shown, shown
    config = alice.home / "ssh_config"
    config.write_text(alice.ok("vm", "ssh-config", VM))
    assert "StrictHostKeyChecking yes" in config.read_text()
    blob = alice.home / "blob"
    blob.write_bytes(os.urandom(4 << 20))
    back = alice.home / "blob.back"
    ssh = ["ssh", "-F", str(config), "-i", str(private), "-o", "IdentitiesOnly=yes", VM]
    with blob.open("rb") as src:
        sent = subprocess.run([*ssh, "cat > /tmp/blob"], stdin=src, capture_output=True, timeout=300, env=alice.env())
    assert sent.returncode == 0, sent.stderr
    with back.open("wb") as dst:
        got = subprocess.run([*ssh, "cat /tmp/blob"], stdout=dst, stderr=subprocess.PIPE, timeout=300,
                             env=alice.env())
    assert got.returncode == 0, got.stderr
    assert back.read_bytes() == blob.read_bytes()
    # what the guest was created with, seen from inside; a forward with -L through the same relay
    def guest(command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*ssh, command], capture_output=True, text=True, timeout=120, env=alice.env())

    assert guest("nproc").stdout.strip() == "2"
    local = free_port()
    forward = subprocess.Popen([*ssh[:-1], "-N", "-o", "ExitOnForwardFailure=yes", "-L",
                                f"127.0.0.1:{local}:127.0.0.1:22", VM], env=alice.env(), stderr=subprocess.PIPE)
    try:
        banner = b""
        deadline = time.monotonic() + 60
        while not banner.startswith(b"SSH-2.0-") and time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", local), timeout=10) as conn:
                    banner = conn.recv(64)  # the guest's own sshd, through the forward and the relay
            except OSError:
                time.sleep(0.5)
        assert banner.startswith(b"SSH-2.0-"), banner
    finally:
        forward.terminate()
        forward.wait(10)
    # the owner reboots it: it comes back (a shorter uptime) with the same host key (ssh checks it)
    up = float(guest("cat /proc/uptime").stdout.split()[0])
    assert alice.ok("vm", "reboot", VM).strip() == f"{VM}: rebooting"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        r = guest("cat /proc/uptime")
        if r.returncode == 0 and float(r.stdout.split()[0]) < up:
            break
        time.sleep(2)
    assert r.returncode == 0 and float(r.stdout.split()[0]) < up, (r.stdout, r.stderr)
    assert "vm.reboot" in [e["kind"] for e in alice.json("vm", "events", VM)]
    # another tenant: the relay answers 404 as every call does, and ssh gets nothing through
    r = bob.run("vm", "ssh", VM, "--", "true")
    assert r.returncode == 2 and f"vm {VM}: no such VM" in r.stderr, r.stderr
    proxied = subprocess.run([str(EXE), "vm", "proxy", VM], capture_output=True, text=True, timeout=60,
                             env=bob.env())
    assert proxied.returncode == 2 and f"vm {VM}: no such VM" in proxied.stderr, proxied.stderr

    assert alice.ok("vm", "delete", VM, "--purge").strip() == f"deleted {VM} (data disk purged)"
    assert alice.json("vm", "list") == []
    assert alice.refused(2, "vm", "show", VM) == f"hvagent: error: remote hv1: vm {VM}: no such VM"


def test_bad_remotes_are_one_line_each(site: Site) -> None:
    alice = tenant(site, "alice")
    other = TestCA(site.root / "other-pki", "other CA")
    token = str(alice.home / "token")
    alice.ok("remote", "add", "wrong-ca", site.url, "--token-file", token, "--ca", str(other.cert))
    alice.ok("remote", "add", "other-ip", site.url.replace("127.0.0.1", "127.0.0.2"), "--token-file", token,
             "--ca", str(site.ca.cert))
    closed = free_port()
    alice.ok("remote", "add", "down", f"https://127.0.0.1:{closed}", "--token-file", token, "--ca", str(site.ca.cert))

    line = alice.refused(2, "--remote", "wrong-ca", "vm", "list")
    assert f"remote wrong-ca: {site.url}: the server's certificate does not verify against {other.cert}" in line
    assert "(hint: check --ca" in line
    line = alice.refused(2, "--remote", "other-ip", "vm", "list")  # the certificate names 127.0.0.1 only
    assert "does not verify" in line and "127.0.0.2" in line and "(hint: check --ca" in line, line
    line = alice.refused(1, "--remote", "down", "vm", "list")
    assert f"remote down: https://127.0.0.1:{closed}: GET /v1/vms: cannot reach the host" in line
    assert "(hint: is the host up" in line
    # the relay and the console (WebSockets, not the API client) give the same lines
    for command in (["vm", "proxy", VM], ["vm", "console", VM]):
        line = alice.refused(2, "--remote", "wrong-ca", *command)
        assert f"remote wrong-ca: {site.url}: the server's certificate does not verify against {other.cert}" \
            in line and "(hint: check --ca" in line, line
        line = alice.refused(2, "--remote", "other-ip", *command)
        assert "does not verify" in line and "(hint: check --ca" in line, line
        line = alice.refused(1, "--remote", "down", *command)
        assert f"127.0.0.1:{closed}/v1/vms/{VM}/" in line and "(hint: is the host up" in line, line
    # $HVAGENT_REMOTE picks one; --remote wins over it
    env = alice.env() | {"HVAGENT_REMOTE": "down"}
    r = subprocess.run([str(EXE), "vm", "list"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1 and f"remote down: https://127.0.0.1:{closed}" in r.stderr, r.stderr
    r = subprocess.run([str(EXE), "--remote", "hv1", "vm", "list"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    line = alice.refused(2, "--remote", "nope", "vm", "list")
    assert line == "hvagent: error: --remote nope: no such remote; the remotes are hv1, wrong-ca, other-ip, down"
    r = alice.run("vm", "list")  # the default remote still works
    assert r.returncode == 0, r.stderr
    # a CA file that is not one: refused when added, and when it went bad after
    line = alice.refused(2, "remote", "add", "bad", site.url, "--token-file", token, "--ca", token)
    assert f"--ca: {token}: not PEM certificates" in line
    gone = site.root / "gone-ca.pem"
    shutil.copy(site.ca.cert, gone)
    alice.ok("remote", "add", "gone", site.url, "--token-file", token, "--ca", str(gone))
    gone.unlink()
    line = alice.refused(2, "--remote", "gone", "vm", "list")
    assert f"remote gone: ca: {gone}: cannot read (No such file or directory)" in line
    for name in ("wrong-ca", "other-ip", "down", "gone"):
        alice.ok("remote", "remove", name)
