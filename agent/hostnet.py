"""The host's own network addresses: what a guest on a bridge must not reach (GuestFilter)."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

from agent import proc
from agent.domxml import GuestFilter, IPAddress
from agent.errors import EnvError


def host_addresses() -> tuple[IPAddress, ...]:
    """Every address of every interface in this network namespace, sorted (``ip -j addr``)."""
    out = proc.run(["ip", "-j", "addr", "show"], timeout=10).stdout
    try:
        links = json.loads(out)
        found = {ipaddress.ip_address(a["local"]) for link in links for a in link.get("addr_info", [])
                 if a.get("family") in ("inet", "inet6") and "local" in a}
    except (ValueError, KeyError, TypeError) as e:
        raise EnvError(f"ip -j addr show: output not understood ({e})") from e
    return tuple(sorted(found, key=lambda a: (a.version, int(a))))


# libvirt applies the guest filter's stateful rules with iptables on bridged traffic, which the
# kernel hands to iptables only with these on (br_netfilter).
BRIDGE_SYSCTLS = ("bridge-nf-call-iptables", "bridge-nf-call-ip6tables")


def require_bridge_filtering(sysctl_dir: Path = Path("/proc/sys/net/bridge")) -> None:
    """Refuse bridged guests where the guest filter would silently not apply."""
    for name in BRIDGE_SYSCTLS:
        try:
            on = (sysctl_dir / name).read_text().strip() == "1"
        except OSError:
            on = False
        if not on:
            raise EnvError(f"net.bridge.{name} is not 1: the guest filter would not apply to bridged guests",
                           hint="modprobe br_netfilter; sysctl -w net.bridge.bridge-nf-call-iptables=1 "
                                "net.bridge.bridge-nf-call-ip6tables=1")


def guest_filter() -> GuestFilter:
    """The guest filter for the host as it is now."""
    require_bridge_filtering()
    return GuestFilter(host_addresses())
