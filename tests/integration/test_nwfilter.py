"""Guest-only access on a libvirt network: the guest reaches other machines, never the host.

Everything runs inside network namespaces this test creates: a libvirtd of its own (private
mount namespace, as the Vagrant lab runs one) with a libvirt network ``hvnf`` (bridge, DHCP)
whose gateway address stands for the host; a second namespace plugged into that bridge plays
another machine on the network. Services listen on the "host" (its SSH and API ports) and on
the other machine; the guest, provisioned by the real CLI in ``network`` mode, tries them all.
Without hvagent's nwfilter every connection would succeed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.seed import KeyPair
from tests.conftest import ROOT, image
from tests.integration.netns import ns_host
from tests.integration.netns import run as _run

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

EXE = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin" / "hvagent"
GATEWAY = "10.77.0.1"  # the host's address on the network (libvirt's bridge)
NEW_ADDRESS = "10.77.0.2"  # an address the host gains while the guest runs
PEER = "10.77.0.50"  # another machine on the same network
HOST_PORTS = (22, 8470)  # the host's SSH and the API's TCP port
PEER_PORT = 8470
NETWORK_XML = f"""<network><name>hvnf</name><bridge name='hvnfbr0' stp='off'/>
<ip address='{GATEWAY}' netmask='255.255.255.0'><dhcp><range start='10.77.0.100' end='10.77.0.150'/></dhcp></ip>
</network>"""
# A banner service: every connection gets one line naming the listener.
LISTENER = textwrap.dedent("""
    import socket, sys
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[2]))); s.listen(8)
    while True:
        c, _ = s.accept(); c.sendall(f"hello from {sys.argv[1]}\\n".encode()); c.close()
""")


@dataclass
class Lan:
    ns: str
    peer_ns: str
    uri: str
    state_dir: Path

    def hvagent(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """The real CLI inside the namespace (it reaches the guest's address there)."""
        env = {**os.environ, "HVAGENT_CONFIG": str(self.state_dir / "config.yaml")}
        return _run("ip", "netns", "exec", self.ns, EXE, *args, check=check, timeout=timeout, env=env)

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run("virsh", "-q", "-c", self.uri, *args, check=check)


@pytest.fixture
def lan() -> Iterator[Lan]:
    listeners: list[subprocess.Popen[bytes]] = []
    with ns_host("hvnf", others=["p"], tools=["dnsmasq", "ebtables"]) as host:
        ns, peer_ns = host.ns, host.ns + "p"
        lan = Lan(ns, peer_ns, host.uri, host.base / "state")
        try:
            (host.base / "net.xml").write_text(NETWORK_XML)
            lan.virsh("net-create", str(host.base / "net.xml"))
            # another machine on the network: a namespace of its own, plugged into the bridge
            _run("ip", "link", "add", "hvnfv0", "netns", ns, "type", "veth", "peer", "name", "eth0", "netns", peer_ns)
            _run("ip", "-n", ns, "link", "set", "hvnfv0", "master", "hvnfbr0", "up")
            _run("ip", "-n", peer_ns, "addr", "add", f"{PEER}/24", "dev", "eth0")
            _run("ip", "-n", peer_ns, "link", "set", "eth0", "up")
            for where, label, port in [(ns, "host", p) for p in HOST_PORTS] + [(peer_ns, "peer", PEER_PORT)]:
                listeners.append(subprocess.Popen(["ip", "netns", "exec", where, sys.executable, "-c", LISTENER,
                                                   label, str(port)]))
            lan.state_dir.mkdir(mode=0o711)
            (lan.state_dir / "config.yaml").write_text(
                f"state_dir: {lan.state_dir}\nlibvirt_uri: '{host.uri}'\naccelerator: qemu\nhealth_timeout: 180\n"
                f"api: {{socket: {lan.state_dir}/api.sock}}\n")
            yield lan
        finally:
            for p in listeners:
                p.kill()
                p.wait()
            lan.virsh("net-destroy", "hvnf", check=False)


def probe(targets: list[tuple[str, int]]) -> str:
    """A guest command: one line "ADDR:PORT [what came back]" per target (busybox nc gives up
    after 3 s), then "ping-ADDR ok" for each address that answers a ping."""
    lines = [f"echo {a}:{p} [$(sleep 2 | nc -w 3 {a} {p} 2>/dev/null)]" for a, p in targets]
    lines += [f"ping -c 1 -W 2 {a} >/dev/null 2>&1 && echo ping-{a} ok" for a in sorted({a for a, _ in targets})]
    return "; ".join([*lines, "true"])


def _seen(out: str) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


def test_guest_on_a_network_reaches_the_network_but_not_the_host(lan: Lan, tenant_key: KeyPair) -> None:
    key = tenant_key.public
    assert lan.hvagent("images", "publish", str(image("tiny-1.0"))).returncode == 0
    spec = lan.state_dir / "spec.yaml"
    spec.write_text(textwrap.dedent(f"""\
        vms:
          - name: lan-1
            owner: alice
            image: tiny-1.*
            cpus: 1
            memory: 128
            ssh_keys: ["{key}"]
            network: {{mode: network, name: hvnf}}
        """))
    r = lan.hvagent("apply", str(spec))
    assert r.returncode == 0, r.stdout + r.stderr
    # the guest got its address from the network's DHCP, and hvagent's health check reached it there
    ps = lan.hvagent("ps", "--json").stdout
    assert '"running"' in ps, ps
    xml = lan.virsh("dumpxml", "lan-1").stdout
    assert "<filterref filter='hvagent-guest'>" in xml or "<filterref filter='hvagent-guest'/>" in xml, xml
    assert GATEWAY in lan.virsh("nwfilter-dumpxml", "hvagent-guest").stdout

    targets = [(GATEWAY, p) for p in HOST_PORTS] + [(PEER, PEER_PORT)]
    out = lan.hvagent("ssh", "lan-1", "--", probe(targets)).stdout
    seen = _seen(out)
    # the other machine answers: the network works, so the refusals below are the filter's doing
    assert seen.get(f"{PEER}:{PEER_PORT}") == "[hello from peer]", out
    assert f"ping-{PEER} ok" in out.splitlines(), out
    for port in HOST_PORTS:
        assert seen.get(f"{GATEWAY}:{port}") == "[]", out
    assert f"ping-{GATEWAY} ok" not in out.splitlines(), out
    # and from the host's side the same services do answer (they are up; only the guest is kept out)
    banner = _run("ip", "netns", "exec", lan.ns, sys.executable, "-c",
                  f"import socket; print(socket.create_connection(('{GATEWAY}', 22), 3).recv(64).decode())").stdout
    assert "hello from host" in banner

    # The host gains an address while the guest runs: the daemon's next reconcile pass puts it
    # under the filter too (the listeners bind 0.0.0.0, so the service is there on it at once).
    _run("ip", "-n", lan.ns, "addr", "add", f"{NEW_ADDRESS}/24", "dev", "hvnfbr0")
    log = (lan.state_dir / "daemon.log").open("w")
    env = {**os.environ, "HVAGENT_CONFIG": str(lan.state_dir / "config.yaml")}
    daemon = subprocess.Popen(["ip", "netns", "exec", lan.ns, str(EXE), "serve"], env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while NEW_ADDRESS not in lan.virsh("nwfilter-dumpxml", "hvagent-guest").stdout:
            assert daemon.poll() is None, (lan.state_dir / "daemon.log").read_text()
            assert time.monotonic() < deadline, (lan.state_dir / "daemon.log").read_text()
            time.sleep(1)
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        log.close()
    assert daemon.returncode == 0, (lan.state_dir / "daemon.log").read_text()
    out = lan.hvagent("ssh", "lan-1", "--", probe([(NEW_ADDRESS, 22), (PEER, PEER_PORT)])).stdout
    assert _seen(out).get(f"{NEW_ADDRESS}:22") == "[]", out
    assert _seen(out).get(f"{PEER}:{PEER_PORT}") == "[hello from peer]", out

    assert lan.hvagent("destroy", "lan-1", "--purge").returncode == 0
