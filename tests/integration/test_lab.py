"""The Vagrant lab (README: Lab): the Vagrantfile, and `make lab` end to end.

``test_vagrantfile_validates`` runs wherever vagrant is installed: no box, no libvirtd needed.
The end-to-end test (marker ``lab``) takes about 12 minutes here, box build included (hypervisor
hosts under TCG, then a guest under TCG inside one of them). It runs in ``make test`` and CI;
``make test-lab`` runs it alone, ``-m "not lab"`` leaves it out. Whatever happens, its fixture
runs ``make lab-destroy`` and checks that nothing of the lab is left.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAB_NS = "hvlab"
LAB_DIR = Path("/var/lib/hvlab")
LAB_RUN = Path("/run/hvlab")

needs_vagrant = pytest.mark.skipif(shutil.which("vagrant") is None, reason="vagrant is not installed")


def vagrant_validate(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`vagrant validate` with a Vagrant home and machine state of its own: no box, no libvirtd."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("HVAGENT_LAB_", "VAGRANT_"))}
    full_env.pop("LIBVIRT_DEFAULT_URI", None)
    full_env |= {
        "VAGRANT_CWD": str(ROOT),
        "VAGRANT_HOME": str(tmp_path / "vagrant.d"),
        "VAGRANT_DOTFILE_PATH": str(tmp_path / "dotvagrant"),
        # a socket nobody listens on: validating must not need a libvirtd
        "HVAGENT_LAB_LIBVIRT_URI": f"qemu:///system?socket={tmp_path}/no-such-libvirt-sock",
        **env,
    }
    return subprocess.run(["vagrant", "validate"], env=full_env, capture_output=True, text=True, timeout=120)


@needs_vagrant
@pytest.mark.parametrize("env", [{}, {"HVAGENT_LAB_DRIVER": "qemu", "HVAGENT_LAB_HOSTS": "3"}])
def test_vagrantfile_validates(tmp_path: Path, env: dict[str, str]) -> None:
    r = vagrant_validate(tmp_path, **env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "validated successfully" in r.stdout
    assert not (ROOT / ".vagrant").exists()


@needs_vagrant
@pytest.mark.parametrize(
    ("var", "value"), [("HVAGENT_LAB_HOSTS", "0"), ("HVAGENT_LAB_HOSTS", "two"), ("HVAGENT_LAB_DRIVER", "xen")]
)
def test_vagrantfile_refuses_bad_settings(tmp_path: Path, var: str, value: str) -> None:
    r = vagrant_validate(tmp_path, **{var: value})
    assert r.returncode != 0
    assert var in r.stdout + r.stderr


def lab_leftovers() -> list[str]:
    """What of the lab still exists on this machine (empty once `make lab-destroy` is done)."""
    found = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    if any(line.split()[0] == LAB_NS for line in netns.splitlines() if line.strip()):
        found.append(f"network namespace {LAB_NS}")
    found += [str(p) for p in (LAB_DIR, LAB_RUN) if p.exists()]
    mounts = Path("/proc/self/mounts").read_text()
    found += [f"mount {m}" for m in mounts.split() if m.startswith((str(LAB_DIR), str(LAB_RUN)))]
    return found


def lab_ssh(host: str, command: str) -> str:
    r = subprocess.run(
        [str(ROOT / "lab" / "vagrant"), "ssh", host, "-c", command, "--", "-o", "LogLevel=ERROR"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, f"{host}: {command}: {r.stdout}{r.stderr}"
    return r.stdout.replace("\r", "")


# `make lab` takes about 12 minutes here (box build included); past 25 minutes it is stopped, so
# that a stuck lab fails the run instead of eating CI's whole time.
LAB_LIMIT = 1500


def make_lab(limit: float) -> None:
    """`make lab` in a process group of its own: on a timeout the whole of it (lab/up, vagrant,
    ansible-playbook) is stopped before the fixture's `make lab-destroy`, not only `make`."""
    proc = subprocess.Popen(["make", "-C", str(ROOT), "lab"], start_new_session=True)
    try:
        rc = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        pytest.fail(f"make lab: not done after {limit:.0f} s")
    assert rc == 0, f"make lab: exit {rc}"


@pytest.fixture
def lab() -> Iterator[float]:
    """`make lab`, yielding how long it took; `make lab-destroy` afterwards, whatever happened."""
    if os.geteuid() != 0:
        pytest.skip("the lab needs root (network namespace, its own libvirtd)")
    has_ansible = shutil.which("ansible-playbook") or (ROOT / ".venv/bin/ansible-playbook").exists()
    if shutil.which("vagrant") is None or not has_ansible:
        pytest.skip("vagrant and vagrant-libvirt (make host) and ansible (make venv) are needed")
    t0 = time.monotonic()
    try:
        make_lab(LAB_LIMIT)
        yield time.monotonic() - t0
    finally:
        t1 = time.monotonic()
        subprocess.run(["make", "-C", str(ROOT), "lab-destroy"], check=True, timeout=900)
        print(f"make lab-destroy: {time.monotonic() - t1:.0f} s")
        assert lab_leftovers() == []


@pytest.mark.lab
@pytest.mark.timeout(LAB_LIMIT + 900)
def test_lab_end_to_end(lab: float) -> None:
    print(f"make lab: {lab:.0f} s")
    for host in ("hv1", "hv2"):
        assert lab_ssh(host, "systemctl is-active hvagent").strip() == "active"
    status = json.loads(lab_ssh("hv1", "sudo /opt/hvagent/bin/hvagent status --json"))
    if os.environ.get("HVAGENT_LAB_DRIVER", "qemu") == "qemu":
        # TCG hosts have no SVM or VMX (Vagrantfile): hvagent runs its guests under TCG
        # (libvirt's domain type `qemu`), not on nested KVM over TCG's emulated SVM
        assert status["accelerator"] == "qemu", status
    vms = json.loads(lab_ssh("hv1", "sudo /opt/hvagent/bin/hvagent ps --json"))
    assert [(vm["name"], vm["state"], vm["domain"]) for vm in vms] == [("lab-1", "running", "running")]
