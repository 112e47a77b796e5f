"""The image pipeline's output on real QEMU guests (TCG) through a real libvirtd.

Every guest is booted from its own disk with a seed carrying a freshly generated host key and
client key; SSH must present that host key and accept that client key.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import paramiko
import pytest
import yaml

from agent import health
from agent.errors import HealthError
from agent.host import Host
from agent.provision import VmPaths
from agent.seed import KeyPair, new_ed25519
from agent.spec import parse_spec
from agent.virt import ShutdownPath
from tests.conftest import ROOT, image

pytestmark = pytest.mark.integration
BUILD = ROOT / "images" / "build"


def wait_for_console(path: Path, needle: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if needle in text:
            return text
        time.sleep(0.5)
    raise AssertionError(f"{needle!r} not on the serial console within {timeout}s; last lines:\n{text[-2000:]}")


def boot(host: Host, ref: str, key: KeyPair, name: str, data_disk: int = 0, timeout: float = 90) -> None:
    if host.state.image(*ref.rsplit("-", 1)) is None:
        host.catalog.publish(image(ref))
    spec = parse_spec({"vms": [{"name": name, "owner": "t", "image": ref, "ssh_keys": [key.public],
                                "data_disk": data_disk, "health": {"timeout": timeout}}]})
    host.provisioner.create(spec.vms[0])


@pytest.mark.parametrize("ref,firmware", [("tiny-1.0", "bios"), ("tiny-1.1", "bios"), ("tiny-2.0", "uefi"),
                                          ("tiny-2.1", "uefi")])
def test_image_boots_serves_ssh_and_powers_off(host: Host, tenant_key: KeyPair, ref: str, firmware: str) -> None:
    manifest = yaml.safe_load(image(ref).with_suffix(".yaml").read_text())
    assert manifest["firmware"] == firmware and manifest["version"] == ref.split("-")[1]
    name = "t-img-" + ref.replace(".", "-")
    boot(host, ref, tenant_key, name)
    vm = host.provisioner.wait(name)
    ep = host.provisioner.endpoint(vm)
    res = health.run(ep, tenant_key.private, "cat /etc/os-release /etc/hvagent-image; hostname")
    osr = health.os_release(res.stdout)
    assert (osr["ID"], osr["VERSION_ID"]) == ("tiny", manifest["version"])
    assert f"family={manifest['family']}" in res.stdout and res.stdout.strip().endswith(name)
    # No guest agent in a tiny image: the ACPI power button at once, no force needed.
    assert host.virt.shutdown_all([name], timeout=30) == {name: ShutdownPath.ACPI}
    assert host.virt.state(name) == "shutoff"


def test_data_disk_blank_gets_filesystem_used_keeps_files(host: Host, tenant_key: KeyPair) -> None:
    boot(host, "tiny-1.0", tenant_key, "t-data", data_disk=1)
    vm = host.provisioner.wait("t-data")
    ep = host.provisioner.endpoint(vm)
    res = health.run(ep, tenant_key.private, "grep ' /data ' /proc/mounts && echo hello > /data/f && sync")
    assert res.status == 0 and "/data" in res.stdout, res.stderr
    assert host.virt.shutdown("t-data", timeout=30)
    host.virt.start("t-data")
    host.provisioner.wait("t-data")
    res = health.run(ep, tenant_key.private, "cat /data/f")
    assert res.stdout.strip() == "hello"


def test_new_instance_id_reapplies_the_seed_and_same_one_keeps_config(host: Host, tenant_key: KeyPair) -> None:
    boot(host, "tiny-2.0", tenant_key, "t-iid")
    vm = host.provisioner.wait("t-iid")
    ep = host.provisioner.endpoint(vm)
    assert host.virt.shutdown("t-iid", timeout=30)
    # Same disk, a seed with a new instance-id and another owner key: the guest applies it again.
    other = new_ed25519("other@test")
    spec = dict(vm.spec, ssh_keys=[other.public])
    host.state.update_vm("t-iid", instance_id="t-iid-second", spec=spec)
    row = host.provisioner.row("t-iid")
    host.provisioner.write_vm_seed(row, VmPaths.of(host.cfg, "t-iid"))
    host.virt.start("t-iid")
    host.provisioner.wait("t-iid")
    assert health.run(ep, other.private, "hostname").stdout.strip() == "t-iid"
    with pytest.raises(paramiko.AuthenticationException):
        health.run(ep, tenant_key.private, "true")
    console = VmPaths.of(host.cfg, "t-iid").console(row.uuid).read_text(errors="replace")
    assert "instance-id=t-iid-second" in console


def test_broken_variant_boots_without_ssh(host: Host, tenant_key: KeyPair) -> None:
    host.catalog.publish(image("tiny-1.2-broken-ssh"))
    spec = parse_spec({"vms": [{"name": "t-broken", "owner": "t", "image": "tiny-1.2", "ssh_keys": [tenant_key.public],
                                "health": {"timeout": 20}}]})
    row = host.provisioner.create(spec.vms[0])
    wait_for_console(VmPaths.of(host.cfg, "t-broken").console(row.uuid), "ssh disabled")
    with pytest.raises(HealthError):
        host.provisioner.wait("t-broken")
    assert host.state.vm("t-broken").state == "failed"  # type: ignore[union-attr]


def test_panic_variant_panics(host: Host, tenant_key: KeyPair) -> None:
    host.catalog.publish(image("tiny-1.3-panic"))
    vm = {"name": "t-panic", "owner": "t", "image": "tiny-1.3", "ssh_keys": [tenant_key.public]}
    spec = parse_spec({"vms": [vm]})
    row = host.provisioner.create(spec.vms[0])
    wait_for_console(VmPaths.of(host.cfg, "t-panic").console(row.uuid), "Kernel panic")
    # the pvpanic device told QEMU, and on_crash=destroy stopped the domain: seen at once, not
    # after a health timeout
    deadline = time.monotonic() + 20
    while (why := host.virt.halted("t-panic")) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert why == "the guest's QEMU stopped: shut off (crashed)", why


def test_image_size_and_manifest() -> None:
    for ref in ("tiny-1.0", "tiny-1.1", "tiny-2.0", "tiny-2.1"):
        path = image(ref)
        m = yaml.safe_load(path.with_suffix(".yaml").read_text())
        assert path.stat().st_size <= 64 << 20
        assert hashlib.sha256(path.read_bytes()).hexdigest() == m["sha256"]
        for key in ("name", "family", "version", "sha256", "format", "virtual_size", "firmware", "machine",
                    "min_qemu", "built_at", "packages"):
            assert key in m, key
        assert m["packages"] and all(isinstance(v, str) for v in m["packages"].values())


def test_build_is_reproducible(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(BUILD), "--family", "1", "--version", "1.0", "--out", str(tmp_path),
                        "--cache", str(ROOT / "images" / "cache")], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "tiny-1.0.qcow2").read_bytes() == image("tiny-1.0").read_bytes()


@pytest.mark.parametrize("args,needle", [
    (["--family", "3", "--version", "3.0"], "family"),
    (["--family", "1", "--version", "1"], "version"),
    (["--family", "1", "--version", "1.x"], "version"),
    (["--family", "1", "--version", "01.2"], "version"),
    (["--family", "1", "--version", "-1.0"], "version"),
    (["--family", "1", "--version", "1.2.3"], "version"),
    (["--family", "1", "--version", "2.0"], "family"),
])
def test_build_bad_input(tmp_path: Path, args: list[str], needle: str) -> None:
    r = subprocess.run([sys.executable, str(BUILD), *args, "--out", str(tmp_path)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert list(tmp_path.iterdir()) == []


def test_build_missing_debian_package(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(BUILD), "--family", "1", "--version", "1.0", "--out", str(tmp_path),
                        "--extra-package", "hvagent-no-such-package"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "hvagent-no-such-package" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert list(tmp_path.iterdir()) == []


def test_build_unwritable_out(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(BUILD), "--family", "1", "--version", "1.0", "--out", "/proc/nope"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "/proc/nope" in r.stderr and len(r.stderr.strip().splitlines()) == 1

