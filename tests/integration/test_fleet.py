"""The fleet: Ansible installs hvagent on three host containers and walks images across them.

Real components throughout: a Docker engine running three bare Debian 12 containers
(images/build-host-container, `network_mode: none`, so every host is air-gapped), the
hvagent role installing libvirt, QEMU and the agent from the controller's bundle
(ansible/build-bundle --debs), libvirtd and `hvagent serve` inside each container, and tiny
guests booting under TCG there. The tests run in file order and share the fleet.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.seed import KeyPair

pytestmark = [pytest.mark.fleet, pytest.mark.timeout(2400)]

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE = ROOT / "ansible"
IMAGES = ROOT / "images/cache/out"
VENV_BIN = Path(os.environ.get("PYTHON", ROOT / ".venv/bin/python")).parent
HOSTS = ("hv1", "hv2", "hv3")
LOG_TAIL = 80  # lines of each host's /var/log/hvagent.log in a failure's message
RECAP = re.compile(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def _need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.fail(f"fleet test needs {', '.join(missing)} (make host installs them)")


def _run(*cmd: str | Path, timeout: float = 1200, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="session")
def fleet_image() -> str:
    """Build (or reuse) the bundle and the host image; compose reads the tag from the environment."""
    _need("docker", "mmdebstrap", "apt-ftparchive")
    r = _run(ANSIBLE / "build-bundle", "--debs")
    assert r.returncode == 0, r.stderr
    r = _run(ROOT / "images/build-host-container")
    assert r.returncode == 0, r.stderr
    tag = r.stdout.strip().splitlines()[-1]
    os.environ["HVAGENT_HOST_IMAGE"] = tag
    return tag


@pytest.fixture(scope="session")
def docker_compose_file(fleet_image: str) -> str:
    return str(ROOT / "tests/fleet/docker-compose.yml")


@pytest.fixture(scope="session")
def docker_compose_command() -> str:
    has_v2 = _run("docker", "compose", "version").returncode == 0
    return "docker compose" if has_v2 else "docker-compose"


@pytest.fixture(scope="session")
def docker_compose_project_name() -> str:
    return f"hvfleet{os.getpid()}"


@pytest.fixture(scope="session")
def docker_setup() -> list[str]:
    return ["up -d"]


@pytest.fixture(scope="session")
def docker_cleanup() -> list[str]:
    return ["down -v --timeout 5"]


@dataclass
class Fleet:
    containers: dict[str, str]  # inventory name -> container id
    inventory: Path
    workdir: Path

    def playbook(self, play: str, *args: str, inventory: Path | None = None) -> Play:
        env = {**os.environ, "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1",
               "ANSIBLE_FORCE_COLOR": "0", "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
        r = _run(VENV_BIN / "ansible-playbook", "-i", inventory or self.inventory, ANSIBLE / play, *args,
                 cwd=ANSIBLE, env=env, timeout=1800)
        out = r.stdout + r.stderr
        (self.workdir / f"{play}.{time.time():.0f}.log").write_text(out)
        recap = {m[1]: {"ok": int(m[2]), "changed": int(m[3]), "unreachable": int(m[4]), "failed": int(m[5])}
                 for m in RECAP.finditer(out)}
        return Play(r.returncode, out, recap)

    def sh(self, host: str, script: str, stdin: str | None = None, check: bool = True) -> str:
        r = _run("docker", "exec", "-i", self.containers[host], "sh", "-c", script, input=stdin, timeout=900)
        if check:
            assert r.returncode == 0, f"{host}: {script}: {r.stdout}{r.stderr}{self.daemon_logs()}"
        return r.stdout

    def daemon_logs(self, lines: int = LOG_TAIL) -> str:
        """Each host's daemon (running or not) and the tail of its log, for a failure's message."""
        script = ('p=$(cat /run/hvagent/hvagent.pid 2>/dev/null); if [ -n "$p" ] && kill -0 "$p" 2>/dev/null; '
                  'then echo "hvagent serve running, pid $p"; else echo "hvagent serve NOT running (pid $p)"; fi; '
                  f'tail -n {lines} /var/log/hvagent.log 2>&1')
        parts = []
        for h, cid in self.containers.items():
            try:
                r = _run("docker", "exec", cid, "sh", "-c", script, timeout=60)
                text = r.stdout + r.stderr
            except subprocess.TimeoutExpired:
                text = "(docker exec timed out)\n"
            parts.append(f"--- {h}: /var/log/hvagent.log, last {lines} lines ---\n{text}")
        return "\n" + "".join(parts)

    def hv(self, host: str, *args: str) -> Any:
        """`hvagent ARGS --json` on a host, parsed."""
        return json.loads(self.sh(host, "hvagent " + " ".join(args) + " --json"))

    def guest_version(self, host: str, vm: str) -> str:
        out = self.sh(host, f"hvagent ssh {vm} -- cat /etc/os-release")
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)["VERSION_ID"].strip('"')


@dataclass
class Play:
    rc: int
    output: str
    recap: dict[str, dict[str, int]]


@pytest.fixture(scope="module")
def fleet(docker_services: Any, docker_compose_project_name: str, docker_compose_command: str,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    _need("docker")
    compose = [*docker_compose_command.split(), "-f", str(ROOT / "tests/fleet/docker-compose.yml"),
               "-p", docker_compose_project_name]
    containers = {h: _run(*compose, "ps", "-q", h).stdout.strip() for h in HOSTS}
    assert all(containers.values()), containers
    work = tmp_path_factory.mktemp("fleet")
    inventory = work / "hosts.yml"
    inventory.write_text(inventory_yaml(containers))
    yield Fleet(containers, inventory, work)


@pytest.fixture(autouse=True)
def _daemon_logs_on_failure(request: pytest.FixtureRequest, fleet: Fleet) -> Iterator[None]:
    """A failed test prints every host's daemon log tail (whatever the assertion said)."""
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed > failed:
        logs = fleet.daemon_logs()
        (fleet.workdir / f"hvagent-logs.{request.node.name}.txt").write_text(logs)
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"\n{request.node.nodeid}: the hosts' daemon logs{logs}")


def inventory_yaml(containers: dict[str, str], extra: dict[str, dict[str, str]] | None = None) -> str:
    hosts = {h: {"ansible_host": cid} for h, cid in containers.items()}
    for h, v in (extra or {}).items():
        hosts.setdefault(h, {}).update(v)
    lines = ["hypervisors:", "  hosts:"]
    for h, v in hosts.items():
        lines.append(f"    {h}:")
        lines += [f"      {k}: {json.dumps(val)}" for k, val in v.items()]
    lines += ["  vars:",
              "    ansible_connection: community.docker.docker",
              "    hvagent_offline: true",  # the containers have no network at all
              "    hvagent_config:",
              "      health_timeout: 90",
              "      shutdown_timeout: 15"]
    return "\n".join(lines) + "\n"


SPEC = """\
vms:
  - name: pinned
    owner: fleet
    image: tiny-1.0
    cpus: 1
    memory: 128
    ssh_keys: ["{key}"]
  - name: latest
    owner: fleet
    image: tiny-1.*
    cpus: 1
    memory: 128
    ssh_keys: ["{key}"]
    health: {{timeout: 120}}
"""


def _events(fleet: Fleet, host: str, kind: str) -> list[dict[str, Any]]:
    return [e for e in fleet.hv(host, "events") if e["kind"] == kind]


# -- tests, in order -------------------------------------------------------------------------------
def test_site_installs_every_air_gapped_host_and_a_second_run_changes_nothing(fleet: Fleet) -> None:
    first = fleet.playbook("site.yml")
    assert first.rc == 0, first.output[-3000:] + fleet.daemon_logs()
    assert set(first.recap) == set(HOSTS)
    for h in HOSTS:
        assert first.recap[h]["changed"] > 0
        status = fleet.hv(h, "status")
        assert status["daemon"] == "running"
        assert status["version"]
        # the role's fallback without systemd: the daemons run from their pid files
        fleet.sh(h, "kill -0 $(cat /run/hvagent/hvagent.pid) && kill -0 $(cat /run/libvirtd.pid)")
        # air-gapped: apt read the bundle only; the host's own apt sources are untouched
        assert "deb.debian.org" not in fleet.sh(h, "cat /var/cache/hvagent/bundle.list")

    second = fleet.playbook("site.yml")
    assert second.rc == 0, second.output[-3000:] + fleet.daemon_logs()
    assert {h: second.recap[h]["changed"] for h in HOSTS} == dict.fromkeys(HOSTS, 0), second.output[-3000:]


def test_rollout_walks_hosts_in_order_and_leaves_pinned_vms(fleet: Fleet, tenant_key: KeyPair) -> None:
    first = fleet.playbook("rollout.yml", "-e", f"image={IMAGES / 'tiny-1.0.qcow2'}")
    assert first.rc == 0, first.output[-3000:] + fleet.daemon_logs()
    key = tenant_key.public

    def apply(h: str) -> str:
        return fleet.sh(h, "cat > /tmp/spec.yaml && hvagent apply /tmp/spec.yaml", stdin=SPEC.format(key=key))

    with ThreadPoolExecutor(len(HOSTS)) as pool:
        list(pool.map(apply, HOSTS))
    for h in HOSTS:
        assert {v["name"]: (v["version"], v["state"]) for v in fleet.hv(h, "ps")} == {
            "pinned": ("1.0", "running"), "latest": ("1.0", "running")}

    play = fleet.playbook("rollout.yml", "-e", f"image={IMAGES / 'tiny-1.1.qcow2'}")
    assert play.rc == 0, play.output[-3000:] + fleet.daemon_logs()
    for h in HOSTS:
        vms = {v["name"]: v for v in fleet.hv(h, "ps")}
        assert (vms["pinned"]["version"], vms["latest"]["version"]) == ("1.0", "1.1"), h
        assert fleet.guest_version(h, "latest") == "1.1"
        assert fleet.guest_version(h, "pinned") == "1.0"
    # host by host: a host's rollout was done before the next host was given the image
    done = [_events(fleet, h, "rollout.done")[-1]["ts"] for h in HOSTS]
    published = [next(e["ts"] for e in _events(fleet, h, "rollout.start") if "1.1" in e["message"]) for h in HOSTS]
    assert done[0] <= published[1] and done[1] <= published[2], (done, published)


def test_broken_image_halts_the_fleet_at_the_first_host_whose_canary_fails(fleet: Fleet) -> None:
    before = {h: fleet.hv(h, "events") for h in HOSTS[1:]}
    # 1.3's kernel panics at boot: the canary fails as soon as QEMU reports it, not after a timeout
    play = fleet.playbook("rollout.yml", "-e", f"image={IMAGES / 'tiny-1.3-panic.qcow2'}")
    assert play.rc != 0
    assert re.search(r"hv1: .*halted", play.output), play.output[-3000:]
    assert play.recap["hv1"]["failed"] == 1 and "hv2" not in play.recap and "hv3" not in play.recap
    vms = {v["name"]: v for v in fleet.hv("hv1", "ps")}
    assert (vms["latest"]["version"], vms["latest"]["state"]) == ("1.1", "running")
    assert fleet.guest_version("hv1", "latest") == "1.1"
    # the canary (a throwaway VM) failed on hv1: no tenant VM went down there, none rolled back
    assert _events(fleet, "hv1", "rollout.canary-failed")
    assert not [e for e in _events(fleet, "hv1", "swap.start") if "1.3" in e["message"]]
    for h in HOSTS[1:]:  # untouched: no image, no event
        assert "1.3" not in {i["version"] for i in fleet.hv(h, "images", "list")}
        assert fleet.hv(h, "events") == before[h]


def test_missing_image_stops_before_any_host(fleet: Fleet) -> None:
    before = {h: fleet.hv(h, "events") for h in HOSTS}
    play = fleet.playbook("rollout.yml", "-e", f"image={IMAGES / 'tiny-1.9.qcow2'}")
    assert play.rc != 0
    assert "tiny-1.9.qcow2: no such image on the controller" in play.output
    assert not set(play.recap) & set(HOSTS)
    assert {h: fleet.hv(h, "events") for h in HOSTS} == before


def test_unreachable_host_stops_site_before_any_change(fleet: Fleet) -> None:
    inv = fleet.workdir / "unreachable.yml"
    inv.write_text(inventory_yaml(fleet.containers, {"hv9": {"ansible_host": "hvfleet-no-such-container"}}))
    config = {h: fleet.sh(h, "cat /etc/hvagent/config.yaml") for h in HOSTS}
    play = fleet.playbook("site.yml", "-e", '{"hvagent_config": {"health_timeout": 91}}', inventory=inv)
    assert play.rc != 0
    assert play.recap["hv9"]["unreachable"] == 1
    assert all(play.recap[h]["changed"] == 0 for h in HOSTS), play.output[-3000:]
    assert {h: fleet.sh(h, "cat /etc/hvagent/config.yaml") for h in HOSTS} == config


def test_host_without_hardware_virtualization_stops_site_with_one_message(fleet: Fleet) -> None:
    inv = fleet.workdir / "nokvm.yml"
    inv.write_text(inventory_yaml(fleet.containers, {"hv2": {"hvagent_kvm_device": "/dev/no-kvm"}}))
    play = fleet.playbook("site.yml", "-e", '{"hvagent_config": {"health_timeout": 91}}', inventory=inv)
    assert play.rc != 0
    assert "hv2: no hardware virtualization (/dev/no-kvm missing" in play.output
    assert all(play.recap[h]["changed"] == 0 for h in HOSTS), play.output[-3000:]
    assert "health_timeout: 90" in fleet.sh("hv1", "cat /etc/hvagent/config.yaml")


def test_qemu_conf_running_qemu_as_root_stops_site_with_one_message(fleet: Fleet) -> None:
    conf = "/etc/libvirt/qemu.conf"
    fleet.sh("hv3", f"cp -p {conf} {conf}.hvtest && echo 'user = \"root\"' >> {conf}")
    try:
        play = fleet.playbook("site.yml", "-e", '{"hvagent_config": {"health_timeout": 91}}')
    finally:
        fleet.sh("hv3", f"mv {conf}.hvtest {conf}")
    assert play.rc != 0
    assert 'hv3: /etc/libvirt/qemu.conf: user is "root"; expected: "libvirt-qemu"' in play.output, play.output[-3000:]
    assert play.recap["hv3"]["failed"] == 1
    assert all(play.recap[h]["changed"] == 0 for h in HOSTS), play.output[-3000:]
    assert "health_timeout: 90" in fleet.sh("hv1", "cat /etc/hvagent/config.yaml")
