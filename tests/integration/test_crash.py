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
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from agent import config as config_mod
from agent.faults import ENV, POINTS
from agent.host import Host
from agent.provision import VmPaths
from agent.seed import new_ed25519
from agent.state import VmState
from agent.version import Track, Version
from tests.conftest import destroy_all, hvagent, image

pytestmark = pytest.mark.integration

GROUPS = {
    "provision": [p for p in POINTS if p.startswith("provision.")],
    "destroy": [p for p in POINTS if p.startswith("destroy.")],
    "purge-disk": [p for p in POINTS if p.startswith("purge-disk.")],
    "publish": [p for p in POINTS if p.startswith("publish.")],
    "swap": [p for p in POINTS if p.startswith("swap.")],
    "rollback": [p for p in POINTS if p.startswith("rollback.")],
    "retire": ["retire.recorded"],
    "gc": [p for p in POINTS if p.startswith("gc.")],
}
CASES = [(group, p) for group, points in GROUPS.items() for p in points]


def test_every_fault_point_is_covered() -> None:
    covered = {p for _, p in CASES}
    assert covered == set(POINTS)
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
        domains = {n for n in host.virt.managed() if n.startswith("crash-")}
        assert domains == set(rows), f"domains {domains} but VMs {set(rows)}"
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
        "shutdown_timeout: 3\n")
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
        if group == "provision":
            spec = write_spec(state_dir, "tiny-1.*")
            run_killed(state_dir, point, "apply", str(spec), "--no-wait")
            ok(state_dir, "recover")
            assert_converged(state_dir, {data: None})  # undone; no data disk left behind
            ok(state_dir, "apply", str(spec), "--no-wait")  # applying again makes exactly one VM
            assert_converged(state_dir, {})
            return
        spec = write_spec(state_dir, "tiny-1.*")
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
        target = "tiny-1.1" if group == "swap" else "tiny-1.2-broken-ssh"
        run_killed(state_dir, point, "images", "publish", str(image(target)))
        ok(state_dir, "recover")  # settles the swap, then finishes the rollout
        assert_converged(state_dir, {})
        row = json.loads(hvagent(state_dir, "ps", "--json").stdout)[0]
        assert row["state"] == "running", row
        assert row["version"] == ("1.1" if group == "swap" else "1.0"), row
        seen = ok(state_dir, "ssh", vm, "--", "grep VERSION_ID /etc/os-release; sha256sum /data/marker")
        assert f"VERSION_ID={row['version']}" in seen
        assert marker in seen, "the data disk lost what the tenant wrote"
    finally:
        cleanup(state_dir)


def cleanup(state_dir: Path) -> None:
    host = Host(config_mod.load(state_dir / "config.yaml"))
    if f"crash-{state_dir.name}" in host.virt.managed() and host.state.vm(f"crash-{state_dir.name}") is None:
        host.virt.undefine(f"crash-{state_dir.name}")  # a domain a failed case left without its row
    destroy_all(host)
