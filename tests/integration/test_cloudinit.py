"""hvagent's NoCloud seed configures a stock image running the real cloud-init package, and a
swap of such a guest goes through its QEMU guest agent.

The image is Debian bookworm with the cloud kernel (no AHCI driver, so a SATA CD-ROM would be
invisible to it) and qemu-guest-agent, built by images/build-cloud from Debian packages.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from agent import config as config_mod
from agent import health
from agent.domxml import guest_agent_connected
from agent.host import Host
from agent.seed import KeyPair
from agent.spec import parse_spec
from agent.state import RolloutState
from agent.virt import AGENT_WAIT, ShutdownPath
from tests.conftest import image

pytestmark = pytest.mark.integration


@pytest.fixture
def cfg(state_dir: Path) -> config_mod.Config:
    """A Debian boot under TCG takes about a minute, longer on a busy host: the health wait the
    specs ask for (600 s) is not cut to the other tests' 90 s. Ports of their own."""
    return config_mod.load(None, state_dir=state_dir, port_min=22790, port_max=22799, health_timeout=600.0,
                           canary=False)


def test_seed_configures_real_cloud_init_guest(host: Host, tenant_key: KeyPair) -> None:
    row = host.catalog.publish(image("debian-12.0"))
    assert row.manifest["guest_version_id"] == "12" and row.manifest["ssh_user"] == "debian"
    spec = parse_spec({"vms": [{"name": "t-cloud", "owner": "alice", "image": "debian-12.*", "memory": 1024,
                                "cpus": 2, "ssh_keys": [tenant_key.public], "health": {"timeout": 600}}]})
    host.provisioner.create(spec.vms[0])
    vm = host.provisioner.wait("t-cloud")  # pinned host key from the seed, VERSION_ID "12"
    ep = host.provisioner.endpoint(vm)
    res = health.run(ep, tenant_key.private, "hostname; cloud-init query instance_id; cat /etc/os-release")
    lines = res.stdout.splitlines()
    assert lines[0] == "t-cloud"
    assert lines[1] == vm.instance_id
    assert health.os_release(res.stdout)["ID"] == "debian"


def _as_version(tmp_path: Path, version: str) -> Path:
    """debian-12.0's manifest naming another version of family 12: the same disk published as a
    newer release, so a swap can be made (and timed) with the one cloud image there is."""
    manifest = yaml.safe_load(image("debian-12.0").with_suffix(".yaml").read_text())
    path = tmp_path / f"debian-{version}.yaml"
    path.write_text(yaml.safe_dump({**manifest, "version": version}, sort_keys=False))
    return path


def test_swap_keeps_host_key_and_data_and_shuts_down_through_the_guest_agent(host: Host, tenant_key: KeyPair,
                                                                             tmp_path: Path) -> None:
    """Prints the swap's shutoff and downtime (README, Measured)."""
    name, mark = "t-cloud-swap", "hvagent-data-kept"
    find_data = "d=/dev/disk/by-id/virtio-hvagent-data && test -b $d"  # udev's link for the disk's serial
    host.catalog.publish(image("debian-12.0"))
    spec = parse_spec({"vms": [{"name": name, "owner": "alice", "image": "debian-12.*", "memory": 1024, "cpus": 2,
                                "data_disk": 1, "ssh_keys": [tenant_key.public], "health": {"timeout": 600}}]})
    host.provisioner.create(spec.vms[0])
    before = host.provisioner.wait(name)
    ep = host.provisioner.endpoint(before)  # its host key pinned
    key = tenant_key.private
    res = health.run(ep, key, f"{find_data} && echo {mark} | sudo dd of=$d conv=fsync status=none && echo ok")
    assert res.stdout.strip() == "ok", res.stderr

    row = host.catalog.publish(image("debian-12.0"), _as_version(tmp_path, "12.1"))
    rollout = host.rollouts.on_publish(row)
    assert rollout is not None and host.rollouts.run(rollout.id).state is RolloutState.DONE
    events = {e.kind: e.message for e in host.state.events(vm=name)}
    print(f"\n{name}: swap.shutoff: {events['swap.shutoff']}; swap.done: {events['swap.done']}")

    after = host.provisioner.row(name)
    assert (after.version, after.uuid, after.mac, after.host_port) == ("12.1", before.uuid, before.mac,
                                                                       before.host_port)
    assert after.instance_id != before.instance_id
    # The old endpoint: the same port, and the guest must present the same host key.
    res = health.run(ep, key, f"cloud-init query instance_id; {find_data} && sudo head -c {len(mark)} $d; echo; "
                     "systemctl is-active qemu-guest-agent")
    assert res.stdout.split() == [after.instance_id, mark, "active"], res.stdout + res.stderr
    # Through the guest agent, not ACPI: fails if the domain's agent channel or the image's
    # qemu-guest-agent is lost.
    assert events["swap.shutoff"].endswith("(guest agent)"), events["swap.shutoff"]
    assert "swap.forced-off" not in events

    # A guest whose agent holds its port open and never answers costs AGENT_WAIT, then ACPI.
    res = health.run(ep, key, "sudo systemctl stop qemu-guest-agent && sudo sh -c 'sleep 600 "
                     "</dev/virtio-ports/org.qemu.guest_agent.0 >/dev/null 2>&1 &' && echo held")
    assert res.stdout.strip() == "held", res.stderr
    deadline = time.monotonic() + 10
    while not guest_agent_connected(host.virt.xml(name)):  # libvirt saw the port opened again
        assert time.monotonic() < deadline, "the guest's port never showed as connected"
        time.sleep(0.2)
    t0 = time.monotonic()
    assert host.virt.request_shutdown(name) is ShutdownPath.ACPI
    assert AGENT_WAIT <= time.monotonic() - t0 < AGENT_WAIT + 2
