"""The shipped systemd unit's sandbox (agent/data/hvagent.service): what the daemon needs is let
through, and every hardening line stays. The unit applied by systemd on a real host is checked
by the lab (tests/integration/test_lab.py); this guards the file itself, in milliseconds."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.unit

UNIT = ROOT / "agent" / "data" / "hvagent.service"


def directives(path: Path, section: str) -> dict[str, list[str]]:
    """Each key of SECTION with its values in file order (DeviceAllow= and the like repeat)."""
    found: dict[str, list[str]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"{path}: continuation lines are not expected: {line}"
        if line.startswith("["):
            current = line.strip("[]")
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not KEY=VALUE: {line}"
        if current == section:
            found.setdefault(key.strip(), []).append(value.strip())
    return found


@pytest.fixture(scope="module")
def service() -> dict[str, list[str]]:
    return directives(UNIT, "Service")


def test_netlink_is_allowed_for_the_host_addresses(service: dict[str, list[str]]) -> None:
    # hostnet.host_addresses runs `ip -j addr`, a NETLINK_ROUTE socket; nothing else is added
    assert service["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6 AF_NETLINK"]


def test_kvm_device_is_visible_and_the_device_policy_closed(service: dict[str, list[str]]) -> None:
    # PrivateDevices=yes would hide /dev/kvm from the host facts; the device cgroup replaces it
    assert service.get("PrivateDevices", ["no"]) == ["no"]
    assert service["DevicePolicy"] == ["closed"]
    assert service["DeviceAllow"] == ["/dev/kvm rw"]


# Every other hardening line of the unit, as shipped before AF_NETLINK and the device policy.
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ReadWritePaths": "/var/lib/hvagent /run/hvagent",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "SystemCallArchitectures": "native",
    "SystemCallFilter": "@system-service",
    "CapabilityBoundingSet": "CAP_CHOWN CAP_DAC_OVERRIDE CAP_DAC_READ_SEARCH CAP_FOWNER",
}


@pytest.mark.parametrize(("key", "value"), HARDENING.items())
def test_every_other_hardening_line_stays(service: dict[str, list[str]], key: str, value: str) -> None:
    assert service.get(key) == [value]

