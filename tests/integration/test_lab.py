"""The Vagrant lab (README: Lab): the Vagrantfile, and `make lab` end to end.

``test_vagrantfile_validates`` runs wherever vagrant is installed: no box, no libvirtd needed.
The end-to-end test (marker ``lab``) takes about 12 minutes here, box build included (hypervisor
hosts under TCG, then a guest under TCG inside one of them), plus about a minute of checks that
hold only under the shipped systemd unit's sandbox (``check_unit_sandbox``: the lab's hosts run
systemd, and the Ansible role installs that unit there). It runs in ``make test`` and CI;
``make test-lab`` runs it alone, ``-m "not lab"`` leaves it out. Whatever happens, its fixture
runs ``make lab-destroy`` and checks that nothing of the lab is left.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.seed import new_ed25519

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
    check_unit_sandbox("hv1", status)
    vms = json.loads(lab_ssh("hv1", "sudo /opt/hvagent/bin/hvagent ps --json"))
    assert [vm["name"] for vm in vms] == ["lab-1"], "the network-mode check left a VM behind"


# -- the systemd unit's sandbox --------------------------------------------------------------------
UNIT = ROOT / "agent" / "data" / "hvagent.service"
UNIT_PROPERTIES = ("FragmentPath", "DropInPaths", "NeedDaemonReload", "ActiveState", "RestrictAddressFamilies",
                   "PrivateDevices", "DevicePolicy", "DeviceAllow")


def key_values(text: str) -> dict[str, list[str]]:
    """KEY=VALUE lines (systemctl show's, and the checks' own) as each key's values in order."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def check_unit_sandbox(host: str, status: dict[str, Any]) -> None:
    """The daemon on HOST runs under the shipped unit, and that unit's sandbox lets it do its work.

    Under the unit as it was before issue 17.7 (``PrivateDevices=yes``, no ``AF_NETLINK``) the
    ``systemctl show``, /dev and network-mode checks fail: the daemon's /dev was a private tmpfs,
    so its host facts said "no /dev/kvm" on a KVM host (the facts check itself bites only where
    the host has /dev/kvm: ``HVAGENT_LAB_DRIVER=kvm``), and ``ip -j addr`` (agent/hostnet.py)
    could not open its netlink socket, so no network-mode VM could be defined. ``status`` is
    ``hvagent status --json`` on HOST: the daemon's own host facts.
    """
    view = key_values(lab_ssh(host, (
        "set -e; echo UnitSha256=$(sha256sum < /etc/systemd/system/hvagent.service | cut -d' ' -f1); "
        "systemctl show hvagent " + " ".join(f"-p {p}" for p in UNIT_PROPERTIES) + "; "
        "pid=$(systemctl show hvagent -p MainPID --value); "
        "sudo awk '/^(NoNewPrivs|Seccomp):/ {print $1 \"=\" $2}' /proc/$pid/status | tr -d :; "
        "echo DaemonDev=$(sudo findmnt -N $pid -no FSTYPE,SOURCE /dev); "
        "echo HostDev=$(findmnt -no FSTYPE,SOURCE /dev); "
        "if [ -e /dev/kvm ]; then echo HostKvm=true; else echo HostKvm=false; fi")))
    # what systemd applies is the shipped file, unchanged: no drop-in, no stale copy
    assert view["UnitSha256"] == [hashlib.sha256(UNIT.read_bytes()).hexdigest()], view
    assert view["FragmentPath"] == ["/etc/systemd/system/hvagent.service"], view
    assert view.get("DropInPaths", [""]) == [""] and view["NeedDaemonReload"] == ["no"], view
    assert view["ActiveState"] == ["active"], view
    assert set(view["RestrictAddressFamilies"][0].split()) == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}, view
    assert (view["PrivateDevices"], view["DevicePolicy"]) == (["no"], ["closed"]), view
    assert "/dev/kvm rw" in view["DeviceAllow"], view  # ProtectClock=yes adds "char-rtc r"
    # the running daemon is the sandboxed one (NoNewPrivileges, SystemCallFilter: seccomp mode 2)
    assert (view["NoNewPrivs"], view["Seccomp"]) == (["1"], ["2"]), view
    # it sees the host's /dev (PrivateDevices=yes gave it a tmpfs), so its facts see /dev/kvm
    # when the host has it (TCG lab hosts have none; HVAGENT_LAB_DRIVER=kvm hosts do)
    assert view["DaemonDev"] == view["HostDev"] and view["HostDev"][0].startswith("devtmpfs"), view
    assert status["facts"]["kvm_device"] is (view["HostKvm"] == ["true"]), (status, view)
    check_hostnet_under_unit(host)


NETCHECK_VM = "lab-netcheck"


def check_hostnet_under_unit(host: str) -> None:
    """A network-mode VM through the daemon's API (`hvagent apply`, POST /v1/apply): the define
    reads the host's addresses with `ip -j addr` inside the daemon, and puts them into libvirt's
    nwfilter hvagent-guest. No guest boots: the VM names a libvirt network that does not exist,
    so its start fails after the define, and the daemon undoes the VM. The filter it defined
    holds every address the host has: netlink worked under the unit."""
    spec = {"vms": [{"name": NETCHECK_VM, "owner": "lab", "image": "tiny-1.*", "cpus": 1, "memory": 64,
                     "ssh_keys": [new_ed25519("lab").public], "restart": "never",
                     "network": {"mode": "network", "name": "nosuchnet"}}]}
    virsh = "sudo virsh -q -c qemu:///system"
    out = lab_ssh(host, (
        "set -e; sudo modprobe br_netfilter; "  # network mode's precondition (README: Security model)
        "sudo sysctl -q -w net.bridge.bridge-nf-call-iptables=1 net.bridge.bridge-nf-call-ip6tables=1; "
        f"{virsh} nwfilter-undefine hvagent-guest >/dev/null 2>&1 || true; "
        f"if {virsh} nwfilter-list | grep -qw hvagent-guest; then echo 'hvagent-guest: still defined'; exit 1; fi; "
        f"echo '{json.dumps(spec)}' > /tmp/{NETCHECK_VM}.yaml; "
        f"rc=0; sudo /opt/hvagent/bin/hvagent apply --no-wait /tmp/{NETCHECK_VM}.yaml 2>&1 || rc=$?; "
        "echo apply-exit=$rc"))
    assert "apply-exit=0" not in out, f"the VM on network nosuchnet was created: {out}"
    assert "ip -j addr" not in out and "Address family not supported" not in out, out
    assert "nosuchnet" in out, f"expected libvirt to refuse the missing network at start: {out}"
    filter_xml = lab_ssh(host, f"{virsh} nwfilter-dumpxml hvagent-guest")
    in_filter = {ipaddress.ip_address(el.attrib["dstipaddr"])
                 for el in ET.fromstring(filter_xml).iter() if "dstipaddr" in el.attrib}
    links = json.loads(lab_ssh(host, "ip -j addr show"))
    host_addresses = {ipaddress.ip_address(a["local"]) for link in links for a in link.get("addr_info", [])
                      if a.get("family") in ("inet", "inet6") and "local" in a}
    loopback = {ipaddress.ip_address("127.0.0.0"), ipaddress.ip_address("::1")}  # the filter's range rules
    assert in_filter - loopback == {a for a in host_addresses if not a.is_loopback}, (filter_xml, links)
    domains = lab_ssh(host, f"{virsh} list --all --name").split()
    assert NETCHECK_VM not in domains, domains
