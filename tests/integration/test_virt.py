"""agent.virt against the real libvirtd (qemu:///system, TCG).

Only domains named ``hvtest-*`` are created, and fixtures undefine them even when a test fails.
Starting a domain is slow on hosts where libvirt keeps re-probing QEMU's capabilities (minutes on
a nested host whose /dev/kvm QEMU cannot open), so the lifecycle is one test on one domain.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import pytest

from agent.domxml import Disk, Domain, DomainType, Firmware, Metadata, UserNet
from agent.errors import Conflict, EnvError, NotFound
from agent.virt import START_HINT, DomState, ShutdownPath, Virt
from tests.integration.kvm import boots, kvm_runs_real_guests

pytestmark = pytest.mark.integration

URI = "qemu:///system"
# QEMU runs as libvirt-qemu: pytest's tmp_path (0700 under /tmp) is out of its reach.
TEST_ROOT = Path("/var/lib/hvagent-test")


def _raw_cleanup(name: str) -> None:
    """Remove a test domain with plain libvirt, managed or not (Virt refuses foreign ones)."""
    conn = libvirt.open(URI)
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError:
        conn.close()
        return
    try:
        if dom.isActive():
            dom.destroy()
        if dom.isPersistent():
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
    finally:
        conn.close()


@pytest.fixture
def virt() -> Iterator[Virt]:
    v = Virt(URI)
    yield v
    v.close()


@pytest.fixture
def workdir() -> Iterator[Path]:
    TEST_ROOT.mkdir(mode=0o711, exist_ok=True)
    os.chmod(TEST_ROOT, 0o711)
    path = TEST_ROOT / f"virt-{uuid.uuid4().hex[:8]}"
    path.mkdir(mode=0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def domain_name() -> Iterator[Callable[[str], str]]:
    """Hands out hvtest- names and removes every such domain afterwards, whatever happened."""
    names: list[str] = []

    def make(suffix: str) -> str:
        name = f"hvtest-{suffix}-{uuid.uuid4().hex[:6]}"
        names.append(name)
        return name

    yield make
    for name in names:
        _raw_cleanup(name)


def _meta(name: str, port: int | None = None) -> Metadata:
    return Metadata("tester", "tiny-1.*", "tiny", "1.18", f"iid-{name}", port, "sha256:test")


def _qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True, timeout=60)


def _owner(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_uid, st.st_gid


def test_lifecycle(virt: Virt, workdir: Path, domain_name: Callable[[str], str]) -> None:
    name = domain_name("life")
    base, overlay, data = workdir / "base.qcow2", workdir / "os.qcow2", workdir / "data.qcow2"
    _qemu_img("create", "-f", "qcow2", str(base), "64M")
    os.chmod(base, 0o444)
    _qemu_img("create", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(overlay))
    _qemu_img("create", "-f", "qcow2", str(data), "16M")
    before = {p: _owner(p) for p in (base, overlay, data)}
    dom = Domain(
        name=name,
        uuid=str(uuid.uuid4()),
        memory_mib=128,
        vcpus=1,
        firmware=Firmware.BIOS,
        disks=(Disk(overlay, "vda", serial="hv-os", backing=base), Disk(data, "vdb", serial="hv-data")),
        nic=UserNet("52:54:00:00:00:42", 22342),
        console_log=workdir / "console.log",
        metadata=_meta(name, 22342),
    )

    assert virt.state(name) == "missing" and not virt.exists(name)
    virt.define(dom)
    assert virt.exists(name)
    assert virt.state(name) == DomState.SHUTOFF
    assert virt.managed()[name] == dom.metadata
    virt.define(dom)  # redefining our own domain is allowed (swaps do it)

    virt.start(name)
    assert virt.state(name) == "running"
    pid = virt.qemu_pid(name)
    assert pid is not None and Path(f"/proc/{pid}").exists()
    running = {p: _owner(p) for p in (base, overlay, data)}
    print("ownership before start:", before, "while running:", running)
    live = virt.xml(name)
    assert "<seclabel type='dynamic' model='dac'" in live
    assert "hostfwd=tcp:127.0.0.1:22342-:22" in live
    # The guest agent's port is there; nothing in this guest opens it.
    assert "name='org.qemu.guest_agent.0' state='disconnected'" in live and "<rng model='virtio'>" in live
    # A guest without an OS ignores ACPI: shutdown falls back to destroy and says so.
    assert virt.shutdown(name, timeout=2) is False
    assert virt.state(name) == "shutoff"
    assert virt.qemu_pid(name) is None
    # With DAC's remember_owner, libvirt gives every image its owner back on stop.
    assert {p: _owner(p) for p in (base, overlay, data)} == before
    assert virt.shutdown(name, timeout=2) is True  # already off
    virt.start(name)  # the batch form (swaps): how each went down
    assert virt.shutdown_all([name], timeout=1) == {name: ShutdownPath.FORCED} and virt.state(name) == "shutoff"
    assert virt.shutdown_all([name], timeout=1) == {name: ShutdownPath.OFF}

    virt.undefine(name)
    assert virt.state(name) == "missing" and name not in virt.managed()
    virt.undefine(name)  # idempotent


def test_foreign_domains_are_never_touched(virt: Virt, workdir: Path, domain_name: Callable[[str], str]) -> None:
    name = domain_name("foreign")
    foreign = f"""<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>
      <os><type arch='x86_64' machine='q35'>hvm</type></os></domain>"""
    conn = libvirt.open(URI)
    try:
        conn.defineXML(foreign)
    finally:
        conn.close()

    assert virt.exists(name) and virt.state(name) == "shutoff"
    assert name not in virt.managed()
    for act in (virt.start, virt.destroy, virt.undefine, virt.xml):
        with pytest.raises(Conflict, match="not created by hvagent"):
            act(name)
    with pytest.raises(Conflict, match="not created by hvagent"):
        virt.shutdown(name, timeout=1)
    clash = Domain(
        name=name,
        uuid=str(uuid.uuid4()),
        memory_mib=64,
        vcpus=1,
        firmware=Firmware.BIOS,
        console_log=workdir / "c.log",
        metadata=_meta(name),
    )
    with pytest.raises(Conflict, match="not created by hvagent"):
        virt.define(clash)
    assert virt.exists(name)


def test_missing_domains(virt: Virt) -> None:
    name = "hvtest-does-not-exist"
    assert virt.state(name) == DomState.MISSING
    assert not virt.exists(name)
    with pytest.raises(NotFound):
        virt.start(name)
    virt.undefine(name)  # nothing to do
    assert virt.qemu_pid(name) is None


def test_probe_accel_picks_kvm_iff_kvm_boots_a_real_guest(virt: Virt, workdir: Path,
                                                          domain_name: Callable[[str], str]) -> None:
    """Holds on any host: the probe's choice against a real guest booted under KVM without libvirt
    (here /dev/kvm opens and runs SeaBIOS, yet every bootloader stops with an emulation failure)."""
    assert boots("tcg"), "the oracle cannot see the tiny image boot even under TCG"
    name = domain_name("probe")
    expected = DomainType.KVM if kvm_runs_real_guests() else DomainType.QEMU
    assert virt.probe_accel(workdir, name=name) is expected
    assert not virt.exists(name)


def test_host_facts(virt: Virt) -> None:
    facts = virt.host_facts()
    assert str(facts["libvirt_version"]).count(".") == 2
    assert str(facts["qemu_version"]).startswith(("7.", "8.", "9.", "10."))
    assert int(facts["memory_mib"]) > 0 and int(facts["cpus"]) > 0


def test_unreachable_libvirtd_is_an_env_error() -> None:
    sleeps: list[float] = []
    v = Virt("qemu+unix:///system?socket=/nonexistent", sleep=sleeps.append)
    with pytest.raises(EnvError) as exc:
        v.exists("hvtest-x")
    assert "cannot connect" in exc.value.message and "/nonexistent" in exc.value.message
    assert exc.value.hint == START_HINT and exc.value.exit_code == 1
    assert len(sleeps) == 4  # five attempts, bounded, and no real waiting in tests
