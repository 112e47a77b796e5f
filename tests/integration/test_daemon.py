"""``hvagent serve`` for real: systemd protocol, API, tokens, the inbox hook, reconcile, tenants.

Guests are tiny images under TCG (a boot to SSH takes about 16 s); each VM test boots one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import paramiko
import pytest

from agent.faults import ENV as FAULT_ENV
from agent.seed import new_ed25519
from agent.state import State, VmState
from tests.conftest import ROOT, image
from tests.integration.daemon_fixture import EXE, Daemon, daemon_fixture, start_daemon, stop_daemon

pytestmark = [pytest.mark.integration, pytest.mark.daemon]


@pytest.fixture
def daemon(state_dir: Path) -> Iterator[Daemon]:
    yield from daemon_fixture(state_dir)


def cli(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HVAGENT_CONFIG": str(d.state_dir / "config.yaml")}
    return subprocess.run([str(EXE), *args], capture_output=True, text=True, env=env, timeout=600)


def publish(d: Daemon, ref: str) -> None:
    r = cli(d, "images", "publish", str(image(ref)))
    assert r.returncode == 0, r.stderr
    assert "through the daemon" in r.stdout


def guest(port: int, key: paramiko.PKey, command: str) -> str:
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())  # the agent's own health checks pin it
    client.connect("127.0.0.1", port=port, username="root", pkey=key, timeout=20, look_for_keys=False,
                   allow_agent=False)
    try:
        _, out, _ = client.exec_command(command, timeout=60)
        return str(out.read().decode())
    finally:
        client.close()


# -- systemd -----------------------------------------------------------------------------------
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    unit = (ROOT / "agent" / "data" / "hvagent.service").read_text()
    for setting in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "NoNewPrivileges=yes",
                    "ProtectSystem=strict", "ReadWritePaths=/var/lib/hvagent /run/hvagent", "ProtectHome=yes",
                    "PrivateTmp=yes"):
        assert setting in unit, setting
    good = tmp_path / "hvagent.service"
    good.write_text(unit.replace("/opt/hvagent/bin/hvagent", str(EXE)))
    r = subprocess.run(["systemd-analyze", "verify", str(good)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    broken = tmp_path / "broken.service"  # the check can fail: a unit without ExecStart is refused
    broken.write_text("\n".join(line for line in good.read_text().splitlines() if not line.startswith("ExecStart")))
    assert subprocess.run(["systemd-analyze", "verify", str(broken)], capture_output=True).returncode != 0


def test_ready_watchdog_logs_and_sigterm(daemon: Daemon) -> None:
    assert any("READY=1" in n for n in daemon.notifications())
    assert daemon.wait_for("WATCHDOG=1", 5), daemon.notifications()
    sock = daemon.state_dir / "api.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o660
    assert stat.S_IMODE((daemon.state_dir / "api.token").stat().st_mode) == 0o600
    assert daemon.call(None, "GET", "/healthz").json() == {"status": "ok"}
    assert daemon.terminate() == 0
    assert any("STOPPING=1" in n for n in daemon.notifications(1))
    assert not sock.exists()
    lines = daemon.log.read_text().splitlines()
    # logfmt, level first; outside the journal (as here) each line carries its time and pid
    assert lines and all(re.match(r"level=[a-z]+ ts=\S+Z pid=\d+ \S", line) for line in lines), lines[:5]
    assert any("msg=ready" in line for line in lines)


# -- API input ---------------------------------------------------------------------------------
KEY = new_ed25519("valid").public
BAD_REQUESTS: list[tuple[str | None, str, str, dict[str, Any], int, str]] = [
    (None, "GET", "/v1/vms", {}, 401, "missing bearer token"),
    ("nobody", "GET", "/v1/vms", {}, 401, "unknown token"),
    ("expired", "GET", "/v1/vms", {}, 401, "token expired"),
    ("alice", "GET", "/v1/host", {}, 403, "admin token"),
    ("alice", "GET", "/metrics", {}, 403, "admin token"),
    ("alice", "POST", "/v1/images/gc", {"json": {}}, 403, "admin token"),
    ("alice", "POST", "/v1/vms", {"content": b'{"name": "x"', "headers": {"content-type": "application/json"}},
     422, "JSON"),
    ("alice", "POST", "/v1/vms", {"json": {"name": "a", "image": "tiny-1.*", "ssh_keys": [KEY], "xml": "<d/>"}},
     422, "xml: Extra inputs are not permitted"),
    ("alice", "POST", "/v1/vms", {"json": {"name": "a", "image": "tiny-1.*", "ssh_keys": [KEY], "cpus": "two"}},
     422, "cpus"),
    ("alice", "POST", "/v1/vms", {"json": {"name": "A;reboot", "image": "tiny-1.*", "ssh_keys": [KEY]}},
     422, "name"),
    ("alice", "POST", "/v1/vms", {"json": {"name": "a", "image": "/etc/shadow", "ssh_keys": [KEY]}}, 422, "image"),
    ("alice", "POST", "/v1/vms", {"json": {"name": "a", "image": "tiny-1.*", "ssh_keys": [f'command="sh" {KEY}']}},
     422, "ssh_keys"),
    ("alice", "POST", "/v1/vms", {"json": {"name": "a", "image": "tiny-1.*", "ssh_keys": [KEY + "\nssh-rsa AAAA"]}},
     422, "ssh_keys"),
    ("alice", "POST", "/v1/vms", {"json": {"name": "a", "image": "tiny-1.*", "ssh_keys": [KEY],
                                           "network": {"mode": "network", "bridge": "br0"}}}, 403, "network"),
    ("alice", "POST", "/v1/vms", {"json": {"name": "a", "image": "tiny-1.*", "ssh_keys": [KEY], "memory": -1}},
     422, "memory"),
    ("alice", "POST", "/v1/vms", {"content": b"x" * (2 << 20), "headers": {"content-type": "application/json"}},
     413, "larger than"),
    ("alice", "GET", "/v1/vms/..%2Fetc", {}, 404, ""),
    ("alice", "GET", "/v1/vms/Bad_Name", {}, 422, "name"),
    ("alice", "GET", "/v1/vms/ghost", {}, 404, "no such VM"),
    ("ops", "POST", "/v1/images", {"files": {"manifest": ("x.yaml", b"a: ["), "image": ("x.qcow2", b"not a qcow2")}},
     400, "x.yaml"),
    ("ops", "POST", "/v1/images", {"files": {"manifest": ("../..", b"a: ["), "image": ("..", b"x")}},
     400, "manifest.yaml: manifest is not valid YAML"),
    # the upload is refused before a byte is stored; the refusal names the uploaded file
    ("ops", "POST", "/v1/images", {"files": {"manifest": ("x.yaml", (
        "name: x\nfamily: 1\nversion: '1.0'\nsha256: '" + "0" * 64 + "'\nvirtual_size: 1048576\n"
        "format: qcow2\nfirmware: bios\n").encode()), "image": ("x-1.0.qcow2", b"not a qcow2")}}, 400,
     "x-1.0.qcow2: not a qcow2 image"),
    ("alice", "POST", "/v1/vms", {"json": {"name": "a", "image": "tiny-1.*", "ssh_keys": [KEY],
                                           "devices": [{"disk": "/dev/sda"}]}}, 422, "devices"),
    ("alice", "POST", "/v1/vms", {"json": {"name": "a", "image": "tiny-1.*", "ssh_keys": [KEY],
                                           "qemu_args": ["-drive", "file=/etc/shadow"]}}, 422, "qemu_args"),
    ("alice", "POST", "/v1/vms", {"json": {"name": "a", "image": "tiny-1.*", "ssh_keys": [KEY],
                                           "libvirt_uri": "qemu+ssh://evil/system"}}, 422, "libvirt_uri"),
    ("alice", "POST", "/v1/vms", {"json": {"name": "a", "image": "tiny-1.*", "ssh_keys": [KEY],
                                           "data_disk_path": "/var/lib/libvirt/images/x.qcow2"}}, 422,
     "data_disk_path"),
    ("ops", "POST", "/v1/rollouts", {"json": {"family": "tiny-9"}}, 404, "tiny-9"),
    ("ops", "POST", "/v1/images/tiny-1.0/retire", {"json": {"grace": "soon"}}, 400, "grace"),
    ("ops", "POST", "/v1/apply", {"json": {"vms": [{"name": "a", "owner": "alice", "image": "tiny-7.*",
                                                    "ssh_keys": ["x"]}]}}, 422, "ssh_keys"),
    ("ops", "POST", "/v1/vms", {"json": {"name": "a", "image": "tiny-1.*", "ssh_keys": [KEY]}}, 400, "owner"),
    ("alice", "POST", "/v1/vms", {"json": {"name": "a", "image": "tiny-1.*", "ssh_keys": [KEY]}}, 404, "tiny-1"),
]


def test_api_refuses_bad_input_and_changes_nothing(daemon: Daemon) -> None:
    before = sorted(p.name for p in daemon.state_dir.rglob("*") if "uploads" not in p.parts)
    for who, method, path, kw, status, fragment in BAD_REQUESTS:
        headers = {"Authorization": "Bearer not-a-token"} if who == "nobody" else None
        r = daemon.call(None if who == "nobody" else who, method, path, **kw) if headers is None else \
            daemon.call(None, method, path, headers=headers, **kw)
        assert r.status_code == status, (path, kw, r.status_code, r.text)
        message = r.json()["error"]
        assert isinstance(message, str) and "\n" not in message and fragment in message, (path, message)
    assert daemon.call("ops", "GET", "/v1/images").json() == []
    assert daemon.call("ops", "GET", "/v1/vms").json() == []
    after = sorted(p.name for p in daemon.state_dir.rglob("*") if "uploads" not in p.parts)
    assert [p for p in after if p not in before and not p.startswith("state.db")] == []
    assert daemon.call(None, "GET", "/healthz").status_code == 200


def test_openapi_property_run_finds_no_server_error(daemon: Daemon) -> None:
    """schemathesis drives every operation from the OpenAPI description, as admin and as a tenant:
    no 5xx, and every payload that breaks the schema is refused with a 4xx (it once found
    ``{"keep": true}`` accepted as 1)."""
    exe = EXE.with_name("schemathesis")
    for who in ("ops", "alice"):
        r = subprocess.run([str(exe), "run", f"{daemon.url}/openapi.json",
                            "--checks", "not_a_server_error,negative_data_rejection",
                            "--header", f"Authorization: Bearer {daemon.tokens[who]}", "--max-examples", "12",
                            "--seed", "7", "--phases", "coverage,fuzzing", "--suppress-health-check", "all"],
                           capture_output=True, text=True, timeout=600, cwd=daemon.state_dir)
        assert r.returncode == 0, r.stdout[-4000:]
        assert " passed" in r.stdout
    assert "level=error" not in daemon.log.read_text()


# -- publish hook ------------------------------------------------------------------------------
def test_inbox_publishes_and_rejects(daemon: Daemon) -> None:
    inbox = daemon.state_dir / "inbox"
    staging = daemon.state_dir / "staging"
    staging.mkdir()
    src = image("tiny-1.0")
    shutil.copy(src, staging / "tiny-1.0.qcow2")
    shutil.copy(src.with_suffix(".yaml"), staging / "tiny-1.0.yaml")
    # the pipeline's last step: move the image, then its manifest
    os.rename(staging / "tiny-1.0.qcow2", inbox / "tiny-1.0.qcow2")
    os.rename(staging / "tiny-1.0.yaml", inbox / "tiny-1.0.yaml")
    (staging / "junk.qcow2").write_bytes(b"QFI\xfb" + b"\0" * 4096)
    shutil.copy(image("tiny-1.1").with_suffix(".yaml"), staging / "junk.yaml")
    os.rename(staging / "junk.qcow2", inbox / "junk.qcow2")
    os.rename(staging / "junk.yaml", inbox / "junk.yaml")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (inbox / "failed" / "junk.error").exists():
        time.sleep(0.5)
    images = daemon.call("ops", "GET", "/v1/images").json()
    assert [(i["name"], i["version"]) for i in images] == [("tiny", "1.0")]
    assert not (inbox / "tiny-1.0.qcow2").exists() and not (inbox / "tiny-1.0.yaml").exists()
    reason = (inbox / "failed" / "junk.error").read_text()
    assert "junk.qcow2" in reason and "\n" not in reason.strip()
    kinds = [e["kind"] for e in daemon.call("ops", "GET", "/v1/events").json()]
    assert "image.inbox" in kinds and "image.inbox-failed" in kinds


# -- tenants, guests, reconcile ----------------------------------------------------------------
def test_tenant_reaches_its_guest_and_nothing_else(daemon: Daemon) -> None:
    publish(daemon, "tiny-1.0")
    key = new_ed25519("alice")
    pkey = paramiko.Ed25519Key.from_private_key_file(_write_key(daemon.state_dir, key.private))
    body: dict[str, Any] = {"name": "alice-vm", "image": "tiny-1.*", "ssh_keys": [key.public], "restart": "always"}
    r = daemon.call("alice", "POST", "/v1/vms", json=body)
    assert r.status_code == 202, r.text
    assert r.json()["owner"] == "alice" and "uuid" not in r.json()
    vm = daemon.wait_vm("alice", "alice-vm", ("running", "failed"))
    assert vm["state"] == "running", vm
    port = int(vm["ssh"].split(":")[1])
    assert "VERSION_ID=1.0" in guest(port, pkey, "cat /etc/os-release")

    # another tenant: every attempt is the same 404 as for a VM that does not exist
    attempts: list[tuple[str, str, dict[str, Any]]] = [
                ("GET", "/v1/vms/alice-vm", {}), ("GET", "/v1/vms/alice-vm/console", {}),
                ("POST", "/v1/vms/alice-vm/stop", {}), ("POST", "/v1/vms/alice-vm/start", {}),
                ("POST", "/v1/vms/alice-vm/reboot", {}), ("DELETE", "/v1/vms/alice-vm", {}),
                ("DELETE", "/v1/vms/alice-vm", {"params": {"purge": "true"}}),
                ("GET", "/v1/events", {"params": {"vm": "alice-vm"}}),
                ("GET", "/v1/vms/alice-vm/console", {"params": {"tail": 10}}),
                ("POST", "/v1/vms/alice-vm/stop", {"json": {}})]
    for method, path, kw in attempts:
        r = daemon.call("bob", method, path, **kw)
        assert r.status_code == 404 and r.json() == {"error": "vm alice-vm: no such VM"}, (method, path, r.text)
    assert daemon.call("bob", "GET", "/v1/vms").json() == []
    assert all(e["vm"] != "alice-vm" for e in daemon.call("bob", "GET", "/v1/events").json())
    assert daemon.call("alice", "GET", "/v1/vms/alice-vm").json()["state"] == "running"  # untouched

    # quotas: alice has 2 VMs, 2 vCPUs, 1024 MiB; bob may not exceed his either
    r = daemon.call("alice", "POST", "/v1/vms", json={**body, "name": "alice-2", "cpus": 2})
    assert r.status_code == 403 and r.json()["error"].startswith("quota: cpus"), r.text
    r = daemon.call("alice", "POST", "/v1/vms", json={**body, "name": "alice-2", "memory": 1024})
    assert r.status_code == 403 and r.json()["error"].startswith("quota: memory"), r.text
    r = daemon.call("bob", "POST", "/v1/vms", json={**body, "name": "bob-1", "owner": "alice"})
    assert r.status_code == 403 and "for itself only" in r.json()["error"]
    r = daemon.call("bob", "POST", "/v1/vms", json={**body, "name": "bob-1",
                                                    "network": {"mode": "network", "bridge": "br0"}})
    assert r.status_code == 403 and r.json()["error"].startswith("network:")

    # QEMU runs as an unprivileged user
    pid = int(Path("/run/libvirt/qemu/alice-vm.pid").read_text())
    uids = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("Uid:"))
    assert all(int(u) != 0 for u in uids.split()[1:]), uids

    # the guest cannot open a connection to services on the host: the API port and a listener
    # standing in for the host's sshd, through the user-network gateway
    accepted: list[object] = []
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(1)
    threading.Thread(target=_accept, args=(listener, accepted), daemon=True).start()
    for target in (daemon.port, listener.getsockname()[1]):
        out = guest(port, pkey, f"echo hi | nc -w 3 10.0.2.2 {target}; echo rc=$?")
        assert "rc=0" not in out, out
    listener.close()
    assert accepted == []
    assert "rc=0" in guest(port, pkey, "echo ok >/dev/null; echo rc=$?")  # the probe itself works

    # the serial console is the tenant's to read
    console = daemon.call("alice", "GET", "/v1/vms/alice-vm/console")
    assert console.status_code == 200 and "login" in console.text

    # reconcile: a guest powered off from inside comes back (restart: always)
    seen = len(daemon.events("alice-vm"))
    guest(port, pkey, "poweroff")
    daemon.wait_event("alice-vm", "vm.restarted", seen)
    # its QEMU process dies: seen through libvirt's lifecycle events, restarted, recorded
    _wait_running("alice-vm")
    seen = len(daemon.events("alice-vm"))
    os.kill(int(Path("/run/libvirt/qemu/alice-vm.pid").read_text()), 9)
    stopped = daemon.wait_event("alice-vm", "vm.stopped", seen)
    assert "QEMU" in stopped["message"], stopped
    daemon.wait_event("alice-vm", "vm.restarted", seen)
    # the domain deleted by hand: defined again with the same identity
    _wait_running("alice-vm")
    uuid = daemon.call("ops", "GET", "/v1/vms/alice-vm").json()["uuid"]
    seen = len(daemon.events("alice-vm"))
    subprocess.run(["virsh", "undefine", "alice-vm"], check=True, capture_output=True)
    subprocess.run(["virsh", "destroy", "alice-vm"], check=True, capture_output=True)
    daemon.wait_event("alice-vm", "vm.recreated", seen)
    assert subprocess.run(["virsh", "domuuid", "alice-vm"], capture_output=True, text=True).stdout.strip() == uuid

    # a stop by the tenant holds across reconcile passes; start brings it back
    assert daemon.call("alice", "POST", "/v1/vms/alice-vm/stop").json()["state"] == "stopped"
    time.sleep(3)
    assert _domstate("alice-vm") == "shut off"
    assert daemon.call("alice", "POST", "/v1/vms/alice-vm/start").status_code == 202
    assert daemon.wait_vm("alice", "alice-vm", ("running", "failed"))["state"] == "running"
    assert "VERSION_ID=1.0" in guest(port, pkey, "cat /etc/os-release")

    metrics = daemon.call("ops", "GET", "/metrics").text
    assert 'hvagent_vms{image="tiny",state="running",track="tiny-1.*",version="1.0"} 1.0' in metrics
    assert 'hvagent_repairs_total{kind="recreated"} 1.0' in metrics

    assert daemon.call("alice", "DELETE", "/v1/vms/alice-vm", params={"purge": "true"}).status_code == 200
    assert daemon.call("alice", "GET", "/v1/vms").json() == []


def test_a_stop_that_fails_leaves_the_vm_running_and_says_so(state_dir: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """POST /stop whose shutdown fails (the test-only fault point ``stop.journaled`` raising there,
    as a failing libvirt call would; then killing the daemon there): never a running guest marked
    stopped. The VM says running, with why, and an event; reconcile passes leave it so; a stop
    that then works ends ``stopped`` with the domain shut off."""
    name = f"stop-{state_dir.name}"
    monkeypatch.setenv(FAULT_ENV, "stop.journaled:error")
    d = start_daemon(state_dir)
    try:
        publish(d, "tiny-1.0")
        r = d.call("alice", "POST", "/v1/vms", json={"name": name, "image": "tiny-1.0", "restart": "always",
                                                    "ssh_keys": [new_ed25519("alice").public]})
        assert r.status_code == 202, r.text
        assert d.wait_vm("alice", name, ("running", "failed"))["state"] == "running"

        seen = len(d.events(name))
        r = d.call("alice", "POST", f"/v1/vms/{name}/stop")
        assert r.status_code == 503 and "stop.journaled: injected failure" in r.json()["error"], r.text
        vm = d.call("alice", "GET", f"/v1/vms/{name}").json()
        assert vm["state"] == "running" and vm["reason"].startswith("stop failed: fault point stop.journaled"), vm
        time.sleep(3)  # reconcile passes
        assert _domstate(name) == "running"
        assert [e["kind"] for e in d.events(name)[seen:]] == ["vm.stopping", "vm.stop-failed"]
        assert d.call("alice", "GET", f"/v1/vms/{name}").json()["state"] == "running"

        # killed there: the VM was "stopping" with its intent journaled; the next start says running
        _restart(d, monkeypatch, "stop.journaled")
        d = start_daemon(state_dir)
        seen = len(d.events(name))
        with pytest.raises(httpx.HTTPError):  # the daemon dies with the request
            d.call("alice", "POST", f"/v1/vms/{name}/stop")
        assert d.proc.wait(30) == -signal.SIGKILL
        state = State(d.state_dir / "state.db")
        try:
            row = state.vm(name)
            assert row is not None and row.state is VmState.STOPPING, row
            assert [(it.op, it.target) for it in state.orphaned()] == [("stop", name)]
        finally:
            state.close()
        _restart(d, monkeypatch, None)
        d = start_daemon(state_dir)
        vm = d.call("alice", "GET", f"/v1/vms/{name}").json()
        assert vm["state"] == "running" and vm["reason"].startswith("stop interrupted"), vm
        assert [e["kind"] for e in d.events(name)[seen:]] == ["vm.stopping", "vm.stop-failed"]
        assert _domstate(name) == "running"

        # and a stop that works: stopped once off, and it stays off
        seen = len(d.events(name))
        r = d.call("alice", "POST", f"/v1/vms/{name}/stop")
        assert r.status_code == 200 and r.json()["state"] == "stopped", r.text
        assert _domstate(name) == "shut off"
        time.sleep(3)
        assert _domstate(name) == "shut off"
        assert [e["kind"] for e in d.events(name)[seen:]] == ["vm.stopping", "vm.stopped"]
    finally:
        stop_daemon(d)


def _restart(d: Daemon, monkeypatch: pytest.MonkeyPatch, fault: str | None) -> None:
    """Stop ``d`` (if it still runs), free its notify socket; the next daemon gets ``fault``."""
    d.terminate()
    d.notify.close()
    (d.state_dir / "notify.sock").unlink()
    if fault is None:
        monkeypatch.delenv(FAULT_ENV)
    else:
        monkeypatch.setenv(FAULT_ENV, fault)


def test_foreign_domain_is_left_alone(state_dir: Path) -> None:
    """Also: the daemon started by hand (no systemd, no NOTIFY_SOCKET) serves."""
    for daemon in daemon_fixture(state_dir, systemd=False):
        _foreign_domain_is_left_alone(daemon)


def _foreign_domain_is_left_alone(daemon: Daemon) -> None:
    name = f"foreign-{daemon.port}"
    xml = (f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><os><type arch='x86_64' "
           "machine='q35'>hvm</type></os></domain>")
    path = daemon.state_dir / "foreign.xml"
    path.write_text(xml)
    subprocess.run(["virsh", "define", str(path)], check=True, capture_output=True)
    try:
        before = subprocess.run(["virsh", "dumpxml", name], capture_output=True, text=True, check=True).stdout
        time.sleep(3)  # several reconcile passes
        after = subprocess.run(["virsh", "dumpxml", name], capture_output=True, text=True, check=True).stdout
        assert before == after and _domstate(name) == "shut off"
        assert daemon.call("ops", "GET", f"/v1/vms/{name}").status_code == 404
    finally:
        subprocess.run(["virsh", "undefine", name], capture_output=True)


def test_cli_goes_through_the_daemon_which_runs_the_rollout(daemon: Daemon) -> None:
    publish(daemon, "tiny-1.0")
    key = new_ed25519("tenant")
    spec = daemon.state_dir / "spec.yaml"
    spec.write_text(json.dumps({"vms": [{"name": "follow", "owner": "alice", "image": "tiny-1.*",
                                         "ssh_keys": [key.public], "data_disk": 1}]}))
    r = cli(daemon, "apply", str(spec))
    assert r.returncode == 0, r.stderr
    assert "created 1 VM(s): follow" in r.stdout
    assert any(e["kind"] == "vm.running" for e in daemon.events("follow"))
    r = cli(daemon, "images", "publish", str(image("tiny-1.1")))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "runs in the daemon" in r.stdout and "done" in r.stdout
    vm = daemon.call("ops", "GET", "/v1/vms/follow").json()
    assert (vm["version"], vm["state"]) == ("1.1", "running")
    r = cli(daemon, "ssh", "follow", "--", "cat /etc/os-release")
    assert "VERSION_ID=1.1" in r.stdout, r.stdout + r.stderr
    # the swap's own shutdown is the swap's, not a guest powering off: once the engine has had
    # its passes (reconcile_interval 1 s) no lifecycle event of it shows as one
    time.sleep(3)
    kinds = [e["kind"] for e in daemon.events("follow")]
    assert "swap.done" in kinds and "vm.stopped" not in kinds and "vm.restarted" not in kinds, kinds
    # the rollout in /metrics: one swap done, none rolled back, its downtime, the rollout's state
    metrics = daemon.call("ops", "GET", "/metrics").text
    for line in ('hvagent_swaps_total{outcome="done"} 1.0', 'hvagent_rollbacks_total{outcome="done"} 0.0',
                 "hvagent_swap_downtime_seconds_count 1.0",
                 'hvagent_rollouts{family="tiny-1",state="done",target="1.1"} 1.0'):
        assert line in metrics, metrics
    r = cli(daemon, "destroy", "follow")
    assert r.returncode == 0 and daemon.call("ops", "GET", "/v1/vms").json() == []


def _write_key(where: Path, private: str) -> str:
    path = where / "tenant_key"
    path.write_text(private)
    path.chmod(0o600)
    return str(path)


def _accept(listener: socket.socket, accepted: list[object]) -> None:
    while True:
        try:
            accepted.append(listener.accept())
        except TimeoutError:
            continue
        except OSError:
            return


def _domstate(name: str) -> str:
    return subprocess.run(["virsh", "domstate", name], capture_output=True, text=True).stdout.strip()


def _wait_running(name: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _domstate(name) != "running":
        time.sleep(0.5)
    time.sleep(8)  # let the guest reach its init before the next disruption


# -- libvirtd dies mid-rollout -----------------------------------------------------------------
def _libvirtd_pid() -> int | None:
    r = subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True, text=True)
    return int(r.stdout.split()[0]) if r.returncode == 0 else None


def _ensure_libvirtd() -> None:
    if _libvirtd_pid() is None:
        subprocess.run(["libvirtd", "-d"], check=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if subprocess.run(["virsh", "version"], capture_output=True).returncode == 0:
                return
            time.sleep(0.5)


def test_libvirtd_dies_mid_rollout_and_the_daemon_finishes_it(daemon: Daemon) -> None:
    """Two batches; libvirtd is killed while the first boots and stays down for 10 s."""
    publish(daemon, "tiny-1.0")
    key = new_ed25519("alice")
    for name in ("lv-a", "lv-b"):
        r = daemon.call("ops", "POST", "/v1/vms", json={"name": name, "owner": "alice", "image": "tiny-1.*",
                                                       "ssh_keys": [key.public]})
        assert r.status_code == 202, r.text
    for name in ("lv-a", "lv-b"):
        assert daemon.wait_vm("ops", name, ("running", "failed"))["state"] == "running"
    files = {"manifest": ("tiny-1.1.yaml", image("tiny-1.1").with_suffix(".yaml").read_bytes()),
             "image": ("tiny-1.1.qcow2", image("tiny-1.1").read_bytes())}
    r = daemon.call("ops", "POST", "/v1/images", files=files)
    assert r.status_code == 201, r.text
    rid = r.json()["rollout"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        kinds = [e["kind"] for e in daemon.call("ops", "GET", "/v1/events").json()]
        if "swap.booting" in kinds:
            break
        time.sleep(0.2)
    pid = _libvirtd_pid()
    assert pid is not None
    try:
        os.kill(pid, 9)
        time.sleep(10)
    finally:
        _ensure_libvirtd()
    deadline = time.monotonic() + 300
    ro: dict[str, object] = {}
    while time.monotonic() < deadline:
        ro = daemon.call("ops", "GET", f"/v1/rollouts/{rid}").json()
        if ro["state"] != "running":
            break
        time.sleep(1)
    assert ro["state"] == "done", ro
    log = daemon.log.read_text()
    assert "reconnecting" in log, "the daemon never met the dead libvirtd"
    events = daemon.call("ops", "GET", "/v1/events").json()
    for name in ("lv-a", "lv-b"):
        vm = daemon.call("ops", "GET", f"/v1/vms/{name}").json()
        assert (vm["version"], vm["state"]) == ("1.1", "running"), vm
        assert [e["kind"] for e in events if e["vm"] == name].count("swap.done") == 1  # no VM swapped twice
        shown = cli(daemon, "ssh", name, "--", "cat /etc/os-release")
        assert "VERSION_ID=1.1" in shown.stdout, shown.stdout + shown.stderr
