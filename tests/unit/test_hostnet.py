"""The host's addresses and the bridge-filtering precondition of the guest filter."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from agent.errors import EnvError
from agent.hostnet import BRIDGE_SYSCTLS, host_addresses, require_bridge_filtering


def _sysctls(tmp_path: Path, v4: str, v6: str | None) -> Path:
    (tmp_path / BRIDGE_SYSCTLS[0]).write_text(v4 + "\n")
    if v6 is not None:
        (tmp_path / BRIDGE_SYSCTLS[1]).write_text(v6 + "\n")
    return tmp_path


def test_bridge_filtering_on_passes(tmp_path: Path) -> None:
    require_bridge_filtering(_sysctls(tmp_path, "1", "1"))


@pytest.mark.parametrize(("v4", "v6", "named"), [("0", "1", "bridge-nf-call-iptables"),
                                                  ("1", "0", "bridge-nf-call-ip6tables"),
                                                  ("1", None, "bridge-nf-call-ip6tables")])
def test_bridge_filtering_off_or_absent_is_refused(tmp_path: Path, v4: str, v6: str | None, named: str) -> None:
    with pytest.raises(EnvError, match=rf"net\.bridge\.{named} is not 1") as e:
        require_bridge_filtering(_sysctls(tmp_path, v4, v6))
    assert "br_netfilter" in (e.value.hint or "")


def test_host_addresses_include_loopback_and_are_sorted() -> None:
    addrs = host_addresses()
    assert ipaddress.ip_address("127.0.0.1") in addrs
    assert list(addrs) == sorted(addrs, key=lambda a: (a.version, int(a)))
