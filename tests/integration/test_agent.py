"""The agent core on a real libvirtd with real guests: publish, apply, ps, ssh, destroy."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import libvirt
import paramiko
import pytest
import yaml

from agent import health
from agent.domxml import DomainType
from agent.errors import HealthError
from agent.host import Host
from agent.seed import KeyPair
from agent.spec import parse_spec
from agent.state import VmState
from tests.conftest import hvagent, image
from tests.integration.kvm import kvm_runs_real_guests

pytestmark = pytest.mark.integration
OTHER_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl other"


def write_spec(path: Path, vms: list[dict[str, object]]) -> Path:
    path.write_text(yaml.safe_dump({"vms": vms}))
    return path


def domains(prefix: str = "t-", uri: str = "qemu:///system") -> dict[str, str]:
    """This test's domains (names starting with ``prefix``) with their UUIDs; other runs' are not ours."""
    conn = libvirt.open(uri)
    try:
        return {d.name(): d.UUIDString() for d in conn.listAllDomains() if d.name().startswith(prefix)}
    finally:
        conn.close()


@pytest.fixture
def cli_state(state_dir: Path) -> Path:
    for ref in ("tiny-1.0", "tiny-2.0"):
        r = hvagent(state_dir, "images", "publish", str(image(ref)))
        assert r.returncode == 0, r.stderr
    return state_dir


def test_two_families_apply_ps_ssh_and_idempotent(cli_state: Path, tenant_key: KeyPair) -> None:
    spec = write_spec(cli_state / "spec.yaml", [
        {"name": "t-one", "owner": "alice", "image": "tiny-1.*", "ssh_keys": [tenant_key.public]},
        {"name": "t-two", "owner": "bob", "image": "tiny-2.*", "ssh_keys": [tenant_key.public], "data_disk": 1},
    ])
    try:
        r = hvagent(cli_state, "apply", str(spec))
        assert r.returncode == 0, r.stdout + r.stderr
        listing = json.loads(hvagent(cli_state, "ps", "--json", check=True).stdout)
        by_name = {v["name"]: v for v in listing}
        assert by_name["t-one"]["version"] == "1.0" and by_name["t-two"]["version"] == "2.0"
        assert {v["state"] for v in listing} == {"running"}
        assert {v["domain"] for v in listing} == {"running"}

        # The tenant's own key reaches the guest, and the guest presents the pinned host key.
        for name, want in (("t-one", "1.0"), ("t-two", "2.0")):
            port = int(by_name[name]["ssh"].split(":")[1])
            host_pub = (cli_state / "vms" / name / "ssh_host_ed25519_key.pub").read_text().strip()
            ep = health.Endpoint("127.0.0.1", port, "root", host_pub)
            res = health.run(ep, tenant_key.private, "cat /etc/os-release")
            assert health.os_release(res.stdout)["VERSION_ID"] == want
            # A different host key is refused: the pin is strict.
            with pytest.raises(paramiko.BadHostKeyException):
                health.run(health.Endpoint("127.0.0.1", port, "root", OTHER_KEY), tenant_key.private, "true")

        r = hvagent(cli_state, "ssh", "t-two", "--", "cat", "/etc/hvagent-image")
        assert r.returncode == 0 and "family=2" in r.stdout, r.stderr

        before_db = json.loads(hvagent(cli_state, "ps", "--json", check=True).stdout)
        before_doms = domains("t-one") | domains("t-two")
        r = hvagent(cli_state, "apply", str(spec))
        assert r.returncode == 0 and "nothing to do" in r.stdout, r.stdout + r.stderr
        assert json.loads(hvagent(cli_state, "ps", "--json", check=True).stdout) == before_db
        assert domains("t-one") | domains("t-two") == before_doms

        images_list = {i["version"]: i for i in json.loads(hvagent(cli_state, "images", "list", "--json").stdout)}
        assert images_list["1.0"]["vms"] == 1 and images_list["2.0"]["vms"] == 1
        kinds = [e["kind"] for e in json.loads(hvagent(cli_state, "events", "--vm", "t-one", "--json").stdout)]
        assert kinds[:3] == ["vm.provisioning", "vm.started", "vm.running"]
    finally:
        for name in ("t-one", "t-two"):
            hvagent(cli_state, "destroy", name, "--purge")
    assert not {"t-one", "t-two"} & set(domains())


def test_overlay_is_backed_by_catalog_image_and_destroy_cleans_up(host: Host, tenant_key: KeyPair) -> None:
    row = host.catalog.publish(image("tiny-1.0"))
    spec = parse_spec({"vms": [{"name": "t-ovl", "owner": "alice", "image": "tiny-1.0", "data_disk": 1,
                                "ssh_keys": [tenant_key.public]}]})
    vm = host.provisioner.create(spec.vms[0])
    host.provisioner.wait("t-ovl")
    overlay = host.cfg.vm_dir / "t-ovl" / "os-1.0.qcow2"
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-f", "qcow2", "-U", str(overlay)],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["backing-filename"] == row.path and info["backing-filename-format"] == "qcow2"
    assert info["actual-size"] < 16 << 20  # copy-on-write, never a copy of the base
    base = Path(row.path)
    assert base.stat().st_mode & 0o777 == 0o444 and base.stat().st_uid == 0

    # Write into the data disk, destroy without purge: the data disk stays, everything else goes.
    ep = host.provisioner.endpoint(vm)
    key = host.provisioner.agent_key.private
    assert health.run(ep, key, "echo kept > /data/proof && sync").status == 0
    host.provisioner.destroy("t-ovl")
    assert "t-ovl" not in domains()
    assert not (host.cfg.vm_dir / "t-ovl").exists()  # overlay, seed, keys, console log
    data = host.cfg.data_dir / "alice" / "t-ovl.qcow2"  # its owner's directory
    assert data.exists()

    # Applying the same name again re-attaches the kept data disk.
    vm = host.provisioner.create(spec.vms[0])
    host.provisioner.wait("t-ovl")
    res = health.run(host.provisioner.endpoint(vm), key, "cat /data/proof")
    assert res.stdout.strip() == "kept"
    # A command that does not finish is given up at its timeout (a health check never hangs),
    # and a large output does not stall it either.
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        health.run(host.provisioner.endpoint(vm), key, "sleep 60", timeout=3)
    assert time.monotonic() - t0 < 30
    big = health.run(host.provisioner.endpoint(vm), key, "head -c 3000000 /dev/zero | tr '\\0' x", timeout=60)
    assert (big.status, len(big.stdout), big.dropped) == (0, health.OUTPUT_LIMIT, 3000000 - health.OUTPUT_LIMIT)
    host.provisioner.destroy("t-ovl", purge=True)
    assert not data.exists()
    assert host.state.vms() == [] and host.state.pending() == []


def test_a_guest_paused_by_qemu_or_whose_qemu_died_fails_health_at_once(host: Host, tenant_key: KeyPair) -> None:
    # QEMU pauses a guest it cannot go on with (here KVM's "emulation failure"; a full disk too):
    # the health wait ends on the next probe with that reason instead of after its 90 s.
    host.catalog.publish(image("tiny-1.0"))
    spec = parse_spec({"vms": [{"name": "t-halt", "owner": "alice", "image": "tiny-1.0",
                                "ssh_keys": [tenant_key.public]}]})
    host.provisioner.create(spec.vms[0])
    conn = libvirt.open("qemu:///system")
    try:
        conn.lookupByName("t-halt").suspend()
    finally:
        conn.close()
    t0 = time.monotonic()
    with pytest.raises(HealthError, match=r"domain t-halt is paused: QEMU stopped the guest"):
        host.provisioner.wait("t-halt")
    assert time.monotonic() - t0 < 30
    row = host.state.vm("t-halt")
    assert row is not None and row.state is VmState.FAILED and "is paused" in (row.reason or "")

    # The same guest going on, its QEMU killed during the wait: under on_crash=destroy the domain
    # is shut off, not crashed, and the wait ends at once too (it used to last the whole timeout).
    conn = libvirt.open("qemu:///system")
    try:
        conn.lookupByName("t-halt").resume()
    finally:
        conn.close()
    pid = host.virt.qemu_pid("t-halt")
    assert pid is not None and "guest=t-halt," in Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    killer = threading.Timer(3, os.kill, (pid, signal.SIGKILL))  # this guest's QEMU only
    killer.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(HealthError, match=r": the guest's QEMU stopped: shut off \(crashed\)$"):
            host.provisioner.wait("t-halt")
    finally:
        killer.cancel()
    assert time.monotonic() - t0 < 3 + 10, "the wait went on after QEMU died"
    row = host.state.vm("t-halt")
    assert row is not None and row.state is VmState.FAILED and "shut off (crashed)" in (row.reason or "")


def test_generated_domains_pass_virt_xml_validate(host: Host, tenant_key: KeyPair, tmp_path: Path) -> None:
    host.catalog.publish(image("tiny-2.0"))
    spec = parse_spec({"vms": [{"name": "t-xml", "owner": "alice", "image": "tiny-2.*", "data_disk": 1,
                                "ssh_keys": [tenant_key.public]}]})
    host.provisioner.create(spec.vms[0])
    xml = tmp_path / "t-xml.xml"
    xml.write_text(host.virt.xml("t-xml"))
    r = subprocess.run(["virt-xml-validate", str(xml), "domain"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_accelerator_auto_is_decided_by_a_probe(host: Host) -> None:
    # Holds on any host: KVM exactly when a real guest boots under KVM (tests/integration/kvm.py).
    # Where /dev/kvm exists and runs SeaBIOS, but every real guest stops in its bootloader (KVM
    # emulation failure; these test machines), the probe must see that and pick QEMU.
    expected = DomainType.KVM if kvm_runs_real_guests() else DomainType.QEMU
    assert host.accelerator() is expected
    assert json.loads((host.cfg.state_dir / "accel.json").read_text())["accel"] == expected.value
    assert any(e.kind == "host.accel" and e.message == f"probe chose {expected.value}" for e in host.state.events())


def test_bad_input_exits_2_and_changes_nothing(cli_state: Path, tenant_key: KeyPair) -> None:
    good = {"name": "t-bad", "owner": "alice", "image": "tiny-1.*", "ssh_keys": [tenant_key.public]}
    cases = [
        ({**good, "memory": "lots"}, "vms[0].memory"),
        ({**good, "image": "tiny-9.*"}, "no family tiny-9"),
        ({**good, "image": "tiny-1.7"}, "tiny-1.7 is not in the catalog"),
        ({**good, "image": "nope-1.*"}, "no family nope-1"),
        ({**good, "name": "t_bad"}, "vms[0].name"),
    ]
    before = (hvagent(cli_state, "ps", "--json").stdout, domains("t-bad"), sorted(p.name for p in cli_state.rglob("*")))
    for i, (vm, needle) in enumerate(cases):
        spec = write_spec(cli_state / f"bad{i}.yaml", [vm])
        r = hvagent(cli_state, "apply", str(spec))
        assert r.returncode == 2, (vm, r.stdout, r.stderr)
        assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        (cli_state / f"bad{i}.yaml").unlink()
    dup = write_spec(cli_state / "dup.yaml", [good, {**good, "owner": "bob"}])
    r = hvagent(cli_state, "apply", str(dup))
    assert r.returncode == 2 and "duplicate VM name" in r.stderr
    dup.unlink()
    # a host file offered as an image (manifest of a version not yet published): refused on its header
    manifest = str(image("tiny-2.1").with_suffix(".yaml"))
    r = hvagent(cli_state, "images", "publish", "/etc/hostname", "--manifest", manifest)
    assert r.returncode == 2 and "/etc/hostname" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = hvagent(cli_state, "destroy", "no-such-vm")
    assert r.returncode == 2 and "no such VM" in r.stderr
    after = (hvagent(cli_state, "ps", "--json").stdout, domains("t-bad"), sorted(p.name for p in cli_state.rglob("*")))
    assert after == before


def test_unwritable_state_dir_and_libvirtd_down(state_dir: Path) -> None:
    cfgf = state_dir / "config.yaml"
    cfgf.write_text("state_dir: /proc/hvagent-nope\n")
    r = subprocess.run([str(Path(".venv/bin/hvagent").resolve()), "--config", str(cfgf), "ps"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "/proc/hvagent-nope" in r.stderr and "not writable" in r.stderr
    cfgf.write_text(f"state_dir: {state_dir}\nlibvirt_uri: qemu+unix:///system?socket=/run/hvagent-test-none.sock\n")
    (state_dir / "spec.yaml").write_text("vms: []\n")
    r = subprocess.run([str(Path(".venv/bin/hvagent").resolve()), "--config", str(cfgf), "ps"],
                       capture_output=True, text=True)
    # no VMs: ps does not need libvirt; a command that does must fail with the hint
    assert r.returncode == 0
    # publishing checks the image against the host's capabilities, which libvirt tells: refused
    # in one line with the hint, nothing published
    r = subprocess.run([str(Path(".venv/bin/hvagent").resolve()), "--config", str(cfgf), "images", "publish",
                        str(image("tiny-1.0"))], capture_output=True, text=True)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "cannot connect" in r.stderr and "libvirtd -d" in r.stderr
    assert [line for line in r.stderr.splitlines() if line.startswith("hvagent: error:")] == \
        [r.stderr.splitlines()[-1]]
    listed = subprocess.run([str(Path(".venv/bin/hvagent").resolve()), "--config", str(cfgf), "images", "list",
                             "--json"], capture_output=True, text=True)
    assert listed.returncode == 0 and json.loads(listed.stdout) == [], listed.stdout + listed.stderr
    assert json.loads(subprocess.run([str(Path(".venv/bin/hvagent").resolve()), "--config", str(cfgf), "ps",
                                      "--json"], capture_output=True, text=True).stdout) == []


def test_config_check_names_the_bad_field_and_status_says_no_daemon(tmp_path: Path) -> None:
    good = hvagent(tmp_path, "config", "check")  # writes a valid config.yaml first
    assert good.returncode == 0 and good.stdout.strip() == f"{tmp_path / 'config.yaml'}: ok", good.stderr
    shown = json.loads(hvagent(tmp_path, "config", "check", "--json", check=True).stdout)
    assert shown["state_dir"] == str(tmp_path) and shown["port_min"] == 22400
    bad = [("port_min: 80\n", "port_min"), ("bogus: 1\n", "bogus"), ("api: {tcp: '0.0.0.0:80'}\n", "api.tcp"),
           ("- a list\n", "must be a mapping")]
    for text, needle in bad:
        (tmp_path / "config.yaml").write_text(text)
        r = hvagent(tmp_path, "config", "check")
        assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, (text, r.stderr)
    (tmp_path / "config.yaml").write_text(f"state_dir: {tmp_path}\napi: {{socket: {tmp_path / 'api.sock'}}}\n")
    r = hvagent(tmp_path, "status")
    assert r.returncode == 1 and "not answering" in r.stderr
