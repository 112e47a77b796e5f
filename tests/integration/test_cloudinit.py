"""hvagent's NoCloud seed configures a stock image running the real cloud-init package.

The image is Debian bookworm with the cloud kernel (no AHCI driver, so a SATA CD-ROM would be
invisible to it) built by images/build-cloud from Debian packages.
"""

from __future__ import annotations

import pytest

from agent import health
from agent.host import Host
from agent.seed import KeyPair
from agent.spec import parse_spec
from tests.conftest import image

pytestmark = pytest.mark.integration


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
