"""Kill hvagent with SIGKILL at every named fault point, start it again, check that it converges.

Each case runs the real CLI with the test-only setting HVAGENT_FAULT_POINT, expects it to die by
SIGKILL, runs ``hvagent recover`` (what any restart does first) and checks the host: no journal
entry, temp file, orphan overlay, seed or domain; each VM exists once and runs a version its
track allows; the data its guest wrote is intact (a file's sha256 read back through SSH), and a
destroyed VM's data disk is unchanged (qemu-img compare with a snapshot).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from agent import config as config_mod
from agent.errors import HvError
from agent.faults import ENV, POINTS
from agent.host import Host
from agent.provision import VmPaths
from agent.seed import new_ed25519
from agent.state import Intent, State, VmState
from agent.version import Track, Version
from tests.conftest import destroy_all, hvagent, image
from tests.integration.daemon_fixture import Daemon, start_daemon

pytestmark = pytest.mark.integration

GROUPS = {
    "provision": [p for p in POINTS if p.startswith("provision.")],
    "destroy": [p for p in POINTS if p.startswith("destroy.")],
    "purge-disk": [p for p in POINTS if p.startswith("purge-disk.")],
    "publish": [p for p in POINTS if p.startswith("publish.")],
    "swap": [p for p in POINTS if p.startswith("swap.")],
    "rollback": [p for p in POINTS if p.startswith("rollback.")],
    "canary": [p for p in POINTS if p.startswith("canary.")],
    "retire": ["retire.recorded"],
    "gc": [p for p in POINTS if p.startswith("gc.")],
    # journal gaps (issue 17.6): the publish recorded, its rollout not yet planned; a pinned VM's
    # retirement move swapped, its new pin not yet written; hvagent's key pair half written
    "trigger": ["rollout.trigger"],
    "retire-move": ["retire.moved"],
    "keypair": ["keypair.first-written"],
}
# Points before the batch goes down: recovery must leave the guest running as it was.
BEFORE_SHUTDOWN = ("swap.journaled", "swap.prepared")
CASES = [(group, p) for group, points in GROUPS.items() for p in points]


# Points of operations only the daemon runs: killed there through its API, not the CLI.
ELSEWHERE = {"stop.journaled": "test_daemon.py::test_a_stop_that_fails_leaves_the_vm_running_and_says_so"}


def test_every_fault_point_is_covered() -> None:
    covered = {p for _, p in CASES}
    assert covered | set(ELSEWHERE) == set(POINTS) and not covered & set(ELSEWHERE)
    print(f"\nkill-anywhere: {len(covered)} named fault points")
    assert len(covered) >= 20


def run_killed(state_dir: Path, point: str, *args: str) -> None:
    env = {**os.environ, "HVAGENT_CONFIG": str(state_dir / "config.yaml"), ENV: point}
    exe = Path(os.environ.get("VIRTUAL_ENV", Path(__file__).resolve().parents[2] / ".venv")) / "bin" / "hvagent"
    r = subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == -signal.SIGKILL, f"{point} was not reached by {args}: rc={r.returncode} {r.stderr}"


def ok(state_dir: Path, *args: str) -> str:
    r = hvagent(state_dir, *args)
    assert r.returncode == 0, f"{args}: {r.stdout}{r.stderr}"
    return r.stdout


def write_spec(state_dir: Path, track: str) -> Path:
    spec = state_dir / "spec.yaml"
    spec.write_text(json.dumps({"vms": [{"name": f"crash-{state_dir.name}", "owner": "t", "image": track,
                                         "data_disk": 1, "ssh_keys": [new_ed25519("t").public],
                                         "health": {"timeout": 60}}]}))
    return spec


def snapshot(path: Path) -> Path:
    """A copy of a data disk's qcow2 file, to compare its guest-visible content with later."""
    copy = path.with_name(path.name + ".before")
    shutil.copyfile(path, copy)
    return copy


def same_content(path: Path, before: Path) -> bool:
    """QEMU may rewrite qcow2 metadata; what must not change is every byte the guest sees."""
    r = subprocess.run(["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "qcow2", str(before), str(path)],
                       capture_output=True, text=True)
    return r.returncode == 0


def assert_converged(state_dir: Path, data: dict[Path, Path | None]) -> None:
    """``data``: each data disk and its earlier snapshot, or None where the disk must not exist."""
    cfg = config_mod.load(state_dir / "config.yaml")
    host = Host(cfg)
    try:
        assert host.state.pending() == [], "journal entries left"
        assert list(cfg.store.rglob("*.tmp")) == [], "temp files left in the store"
        rows = {r.name: r for r in host.state.vms()}
        images = {r.path for r in host.state.images()}
        assert {str(p) for p in cfg.store.rglob("*.qcow2")} == images, "store files and catalog rows differ"
        dirs = {p.name for p in cfg.vm_dir.iterdir()} if cfg.vm_dir.exists() else set()
        assert dirs == set(rows), f"VM directories {dirs} but VMs {set(rows)}"
        # this run's domains only: other runs of these tests may have guests on the host meanwhile
        domains = {n for n in host.virt.managed() if n == f"crash-{state_dir.name}"}
        assert domains == set(rows), f"domains {domains} but VMs {set(rows)}"
        canaries = list((cfg.state_dir / "canary").glob("*"))
        assert canaries == [] and not any(n.startswith("canary_") and _uses(host, n, state_dir)
                                          for n in host.virt.managed()), "a canary left"
        for name, row in rows.items():
            xml = host.virt.xml(name, inactive=True)
            assert row.uuid in xml, "the domain is not the VM's (UUID)"
            track = Track.parse(row.track)
            assert row.image == track.name and Version.parse(row.version).family == track.family
            if track.pinned:
                assert row.version == f"{track.family}.{track.minor}"
            overlays = sorted(p.name for p in VmPaths.of(cfg, name).root.glob("os-*.qcow2"))
            assert overlays == [f"os-{row.version}.qcow2"], overlays
            assert row.state in (VmState.RUNNING, VmState.PROVISIONING, VmState.STOPPED), row.state
        for path, before in data.items():
            if before is None:
                assert not path.exists(), f"data disk {path} left behind"
            else:
                assert path.exists() and same_content(path, before), f"data disk {path} changed"
    finally:
        host.close()


@pytest.mark.parametrize(("group", "point"), CASES, ids=[p for _, p in CASES])
def test_kill_at_fault_point_converges(state_dir: Path, group: str, point: str) -> None:
    (state_dir / "config.yaml").write_text(
        f"state_dir: {state_dir}\naccelerator: qemu\nport_min: 22400\nport_max: 22499\nhealth_timeout: 90\n"
        f"shutdown_timeout: 3\ncanary: {'true' if group == 'canary' else 'false'}\n")  # its own case only
    vm = f"crash-{state_dir.name}"
    data = config_mod.load(state_dir / "config.yaml").data_dir / "t" / f"{vm}.qcow2"  # owner t's disk
    try:
        if group in ("publish",):
            run_killed(state_dir, point, "images", "publish", str(image("tiny-1.0")))
            ok(state_dir, "recover")
            assert_converged(state_dir, {})
            listed = json.loads(ok(state_dir, "images", "list", "--json"))
            if not listed:  # undone: a retry publishes it
                ok(state_dir, "images", "publish", str(image("tiny-1.0")))
            assert [i["version"] for i in json.loads(ok(state_dir, "images", "list", "--json"))] == ["1.0"]
            return
        ok(state_dir, "images", "publish", str(image("tiny-1.0")))
        if group in ("retire", "gc"):
            ok(state_dir, "images", "publish", str(image("tiny-1.1")))
            if group == "retire":
                run_killed(state_dir, point, "images", "retire", "tiny-1.0", "--grace", "0", "--policy", "never")
            else:
                run_killed(state_dir, point, "images", "gc", "--keep", "1")
            ok(state_dir, "recover")
            assert_converged(state_dir, {})
            return
        if group in ("provision", "keypair"):
            spec = write_spec(state_dir, "tiny-1.*")
            run_killed(state_dir, point, "apply", str(spec), "--no-wait")
            ok(state_dir, "recover")
            assert_converged(state_dir, {data: None})  # undone; no data disk left behind
            ok(state_dir, "apply", str(spec), "--no-wait")  # applying again makes exactly one VM
            assert_converged(state_dir, {})
            return
        spec = write_spec(state_dir, "tiny-1.0" if group == "retire-move" else "tiny-1.*")
        if group == "destroy":
            ok(state_dir, "apply", str(spec), "--no-wait")
            subprocess.run(["virsh", "destroy", vm], capture_output=True)  # off, so its disk holds still
            before = snapshot(data)
            run_killed(state_dir, point, "destroy", vm)
            ok(state_dir, "recover")
            assert_converged(state_dir, {data: before})  # gone, its data disk kept as it was
            assert hvagent(state_dir, "ps", "--json").stdout.strip() == "[]"
            assert [d["state"] for d in json.loads(ok(state_dir, "disks", "--json"))] == ["kept"]
            return
        if group == "purge-disk":
            ok(state_dir, "apply", str(spec), "--no-wait")
            ok(state_dir, "destroy", vm)  # its data disk kept for owner t
            run_killed(state_dir, point, "disks", "purge", vm, "--owner", "t")
            ok(state_dir, "recover")
            assert_converged(state_dir, {data: None})  # the purge finished: no file, no row
            assert json.loads(ok(state_dir, "disks", "--json")) == []
            return
        ok(state_dir, "apply", str(spec))  # healthy, its data disk formatted and mounted at /data
        marker = ok(state_dir, "ssh", vm, "--", "head -c 65536 /dev/urandom > /data/marker && sync && "
                    "sha256sum /data/marker").split()[0]
        target = "tiny-1.3-panic" if group == "rollback" else "tiny-1.1"  # panics at once: no health wait
        if group == "retire-move":  # pinned to 1.0: nothing moves until 1.0 is retired
            ok(state_dir, "images", "publish", str(image(target)))
            run_killed(state_dir, point, "images", "retire", "tiny-1.0", "--grace", "0", "--policy", "move")
        elif point in BEFORE_SHUTDOWN:  # the guest never went down: recovery must not touch it
            pid = qemu_pid(state_dir, vm)
            run_killed(state_dir, point, "images", "publish", str(image(target)))
            ok(state_dir, "rollout", "pause")  # so that `recover` settles the swap but does not redo it
            ok(state_dir, "recover")
            assert qemu_pid(state_dir, vm) == pid, "recovery restarted a guest that never went down"
            row = json.loads(hvagent(state_dir, "ps", "--json").stdout)[0]
            assert (row["state"], row["version"]) == ("running", "1.0"), row
            ok(state_dir, "rollout", "resume")
        else:
            run_killed(state_dir, point, "images", "publish", str(image(target)))
        ok(state_dir, "recover")  # settles the swap, then finishes the rollout
        assert_converged(state_dir, {})
        row = json.loads(hvagent(state_dir, "ps", "--json").stdout)[0]
        assert row["state"] == "running", row
        assert row["version"] == ("1.0" if group == "rollback" else "1.1"), row
        if group == "retire-move":
            assert row["track"] == "tiny-1.1", row  # moved and pinned to it, in one step
        seen = ok(state_dir, "ssh", vm, "--", "grep VERSION_ID /etc/os-release; sha256sum /data/marker")
        assert f"VERSION_ID={row['version']}" in seen
        assert marker in seen, "the data disk lost what the tenant wrote"
    finally:
        cleanup(state_dir)


def test_restart_is_ready_while_a_rollback_awaits_its_guest(state_dir: Path) -> None:
    """The daemon started after a crash mid-swap sends READY=1, serves and feeds the watchdog within
    seconds, while recovery rolls the VM back and awaits its guest's health in the background: that
    wait may outlast systemd's TimeoutStartSec (300 s), and a start-up that waited on it would be
    killed and started again in a loop. The swap's journal entry stays until recovery settles it
    (parked by the daemon meanwhile); then the rollout finishes."""
    vm = f"crash-{state_dir.name}"
    hold = "/var/lib/tiny/hold"  # on the OS disk's persistent partition: on 1.0's overlay only
    (state_dir / "config.yaml").write_text(
        f"state_dir: {state_dir}\naccelerator: qemu\nport_min: 22400\nport_max: 22499\nhealth_timeout: 900\n"
        "shutdown_timeout: 3\ncanary: false\n")
    spec = state_dir / "spec.yaml"
    spec.write_text(json.dumps({"vms": [{"name": vm, "owner": "t", "image": "tiny-1.*",
                                         "ssh_keys": [new_ed25519("t").public],
                                         "health": {"command": f"test ! -e {hold}", "timeout": 600}}]}))
    d: Daemon | None = None
    try:
        ok(state_dir, "images", "publish", str(image("tiny-1.0")))
        ok(state_dir, "apply", str(spec))  # healthy
        ok(state_dir, "ssh", vm, "--", f"touch {hold} && sync")  # from now on 1.0 fails health, for 600 s
        run_killed(state_dir, "swap.parked", "images", "publish", str(image("tiny-1.1")))

        t0 = time.monotonic()
        d = start_daemon(state_dir, extra={"health_timeout": 900, "shutdown_timeout": 3})
        took = time.monotonic() - t0
        assert took < 10, f"READY=1 after {took:.0f} s"  # 1.2 s here
        assert d.wait_for("WATCHDOG=1", 5)
        assert d.call("ops", "GET", f"/v1/vms/{vm}").json()["state"] == "swapping"
        deadline = time.monotonic() + 60
        while not (entries := _journal(state_dir)) or not entries[0].in_flight:  # the rollback awaits health
            assert time.monotonic() < deadline, entries
            time.sleep(0.5)
        assert [(it.op, it.target) for it in entries] == [("swap", vm)]
        deadline = time.monotonic() + 180
        while hvagent(state_dir, "ssh", vm, "--", f"test -e {hold} && rm {hold} && sync").returncode != 0:
            assert time.monotonic() < deadline, "1.0 never answered SSH again"
            time.sleep(2)
        assert d.call("ops", "GET", f"/v1/vms/{vm}").json()["state"] == "swapping"  # it waited until now
        assert "READY=1" in " ".join(d.notes) and d.proc.poll() is None

        recovered = d.wait_event(vm, "swap.recovered", 0, timeout=120)
        assert recovered["message"] == "interrupted swap to 1.1 settled", recovered
        deadline = time.monotonic() + 300
        while (row := d.call("ops", "GET", f"/v1/vms/{vm}").json())["version"] != "1.1" or row["state"] != "running":
            assert time.monotonic() < deadline, row
            time.sleep(1)
        kinds = [e["kind"] for e in d.events(vm)]
        assert kinds.count("swap.recovered") == 1 and kinds[-1] == "swap.done", kinds
        assert [ro["state"] for ro in d.call("ops", "GET", "/v1/rollouts", params={"all": True}).json()] == ["done"]
        assert _journal(state_dir) == []
        overlays = sorted(p.name for p in (state_dir / "vms" / vm).glob("os-*.qcow2"))
        assert overlays == ["os-1.1.qcow2"], overlays
    finally:
        if d is not None:  # SIGKILL: a SIGTERM would wait for a rollback's health
            d.proc.kill()
            d.proc.wait()
            d.notify.close()
        # whatever a failure left (a VM still swapping): settled at once, then removed
        config = state_dir / "config.yaml"
        config.write_text(re.sub(r"health_timeout: \d+", "health_timeout: 5", config.read_text()))
        hvagent(state_dir, "recover")
        cleanup(state_dir)


def _uses(host: Host, domain: str, state_dir: Path) -> bool:
    """Whether the domain's files are under this run's state directory."""
    try:
        return str(state_dir) in host.virt.xml(domain, inactive=True)
    except HvError:  # gone meanwhile
        return False


def qemu_pid(state_dir: Path, vm: str) -> int | None:
    host = Host(config_mod.load(state_dir / "config.yaml"))
    try:
        return host.virt.qemu_pid(vm)
    finally:
        host.close()


def _journal(state_dir: Path) -> list[Intent]:
    state = State(state_dir / "state.db")
    try:
        return state.pending()
    finally:
        state.close()


def cleanup(state_dir: Path) -> None:
    host = Host(config_mod.load(state_dir / "config.yaml"))
    if f"crash-{state_dir.name}" in host.virt.managed() and host.state.vm(f"crash-{state_dir.name}") is None:
        host.virt.undefine(f"crash-{state_dir.name}")  # a domain a failed case left without its row
    destroy_all(host)
