"""Hostile images through the real publish command: each refused in one line, nothing changed.

Every file is generated here with qemu-img or by hand. The manifest beside each one carries the
file's real sha256 (and, where it has one, its claimed virtual size), so what refuses it is the
content check, not a checksum. After each attempt the store holds exactly what it held before.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from agent import config as config_mod
from agent.host import Host
from agent.seed import KeyPair
from tests.conftest import destroy_all, hvagent, image, luks_qcow2, store_snapshot

pytestmark = pytest.mark.integration

MiB = 1 << 20


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def manifest_for(path: Path, version: str = "1.9", **override: object) -> Path:
    m = yaml.safe_load(image("tiny-1.0").with_suffix(".yaml").read_text())
    data = path.read_bytes() if path.is_file() else b""
    m.update(version=version, sha256=hashlib.sha256(data).hexdigest())
    if data[:4] == b"QFI\xfb" and len(data) >= 32:
        m["virtual_size"] = struct.unpack(">Q", data[24:32])[0]
    m.update(override)
    out = path.parent / (path.name + ".yaml")
    out.write_text(yaml.safe_dump(m))
    return out


def good_copy(d: Path) -> Path:
    p = d / "copy.qcow2"
    shutil.copyfile(image("tiny-1.0"), p)
    return p


def backing_shadow(d: Path) -> Path:
    p = d / "shadow.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "/etc/shadow", "-F", "raw", str(p), "1M")
    return p


def backing_json(d: Path) -> Path:
    p = d / "json.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", 'json:{"driver":"file","filename":"/etc/shadow"}',
             "-F", "raw", str(p), "1M")
    return p


def data_file(d: Path) -> Path:
    p = d / "datafile.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={d / 'data.raw'}", str(p), "1M")
    return p


def raw_named_qcow2(d: Path) -> Path:
    p = d / "raw.qcow2"
    p.write_bytes(b"\0" * MiB)
    return p


def raw_mimic(d: Path) -> Path:
    p = d / "mimic.qcow2"
    p.write_bytes(b"QFI\xfb" + b"\xff" * 96 + b"\0" * (MiB - 100))
    return p


def truncated(d: Path) -> Path:
    p = good_copy(d)
    with open(p, "r+b") as f:
        f.truncate(64 * 1024)
    return p


def corrupt_header(d: Path) -> Path:
    p = good_copy(d)
    with open(p, "r+b") as f:
        f.seek(20)
        f.write(struct.pack(">I", 40))  # cluster_bits 40
    return p


def tables_past_eof(d: Path) -> Path:
    p = good_copy(d)
    with open(p, "r+b") as f:
        f.seek(40)
        f.write(struct.pack(">Q", 1 << 40))  # l1_table_offset far beyond the end of the file
    return p


def huge(d: Path) -> Path:
    p = d / "huge.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(p), "100T")
    return p


def encrypted(d: Path) -> Path:
    return luks_qcow2(d / "enc.qcow2", "1M")


def symlink_to_host_file(d: Path) -> Path:
    p = d / "link.qcow2"
    p.symlink_to("/etc/shadow")
    return p


def vmdk(d: Path) -> Path:
    p = d / "vmdk.qcow2"
    qemu_img("create", "-q", "-f", "vmdk", str(p), "1M")
    return p


def vhd(d: Path) -> Path:
    p = d / "vhd.qcow2"
    qemu_img("create", "-q", "-f", "vpc", str(p), "1M")
    return p


Maker = Callable[[Path], Path]
CASES: dict[str, tuple[Maker, dict[str, object], str]] = {
    # kind: (file maker, manifest overrides, what the one-line message must contain)
    "backing file /etc/shadow": (backing_shadow, {}, "backing"),
    "backing json: pseudo-protocol": (backing_json, {}, "backing"),
    "external data file": (data_file, {}, "data file"),
    "raw file named .qcow2": (raw_named_qcow2, {}, "qcow2"),
    "raw file mimicking a qcow2 header": (raw_mimic, {}, "mimic.qcow2"),
    "truncated qcow2": (truncated, {}, "copy.qcow2"),
    "corrupt header": (corrupt_header, {}, "cluster"),
    "tables past the end of the file": (tables_past_eof, {}, "L1"),
    "huge virtual size": (huge, {}, "virtual size"),
    "encrypted": (encrypted, {}, "encrypt"),
    "sha256 mismatch": (good_copy, {"sha256": "0" * 64}, "sha256"),
    "symlink to a host file": (symlink_to_host_file, {}, "symbolic link"),
    "path traversal in the manifest name": (good_copy, {"name": "../../etc"}, "name"),
    "VMDK in disguise": (vmdk, {}, "VMDK"),
    "VHD in disguise": (vhd, {}, "VHD"),
    "version not the manifest's family": (good_copy, {"version": "2.0"}, "family"),
}


@pytest.fixture
def seeded(state_dir: Path) -> Iterator[Path]:
    r = hvagent(state_dir, "images", "publish", str(image("tiny-1.0")))
    assert r.returncode == 0, r.stderr
    yield state_dir


@pytest.mark.parametrize("kind", sorted(CASES))
def test_hostile_image_refused_and_nothing_changes(seeded: Path, kind: str) -> None:
    maker, override, needle = CASES[kind]
    work = seeded / "hostile"
    work.mkdir()
    path = maker(work)
    manifest = manifest_for(path, **override)
    before = store_snapshot(seeded)
    r = hvagent(seeded, "images", "publish", str(path), "--manifest", str(manifest))
    assert r.returncode == 2, (kind, r.stdout, r.stderr)
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and line.startswith("hvagent: error:"), r.stderr
    assert needle.lower() in line.lower(), line
    assert store_snapshot(seeded) == before
    events = json.loads(hvagent(seeded, "events", "--json").stdout)
    assert [e["kind"] for e in events] == ["image.published"]


def test_publish_into_a_full_store_leaves_no_partial_file(state_dir: Path) -> None:
    store = state_dir / "small-store"
    store.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "hvagent-test", str(store)], check=True)
    try:
        (state_dir / "config.yaml").write_text(f"state_dir: {state_dir}\nstore_dir: {store}\n")
        r = hvagent(state_dir, "images", "publish", str(image("tiny-1.0")))
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert "No space left" in r.stderr or "space" in r.stderr.lower(), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert [p for p in store.rglob("*") if p.is_file()] == []
        assert json.loads(hvagent(state_dir, "images", "list", "--json").stdout) == []
    finally:
        subprocess.run(["umount", str(store)], check=False)


def test_two_publishes_of_one_version_one_wins(state_dir: Path) -> None:
    hvagent(state_dir, "images", "list")  # writes the config file
    exe = Path(".venv/bin/hvagent").resolve()
    env = {**os.environ, "HVAGENT_CONFIG": str(state_dir / "config.yaml")}
    procs = [subprocess.Popen([str(exe), "images", "publish", str(image("tiny-1.1"))], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read() if p.stderr else "") for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "already" in loser and len(loser.strip().splitlines()) == 1
    listed = json.loads(hvagent(state_dir, "images", "list", "--json").stdout)
    assert [(i["name"], i["version"]) for i in listed] == [("tiny", "1.1")]
    assert sorted(p.name for p in (state_dir / "images" / "tiny").iterdir()) == ["tiny-1.1.qcow2"]


KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIsvUPIF8CmmT0Ezq+vHSyBU9TPy5KmoS0JhMHbd41fa t@test"
GOOD = {"name": "t-ok", "owner": "alice", "image": "tiny-1.*", "ssh_keys": [KEY]}
HOSTILE_SPECS: list[tuple[str, dict[str, object], str]] = [
    # (case, override of one VM, field the error must name)
    ("XML in name", {"name": "<domain/>"}, "vms[0].name"),
    ("ampersand in name", {"name": "a&b"}, "vms[0].name"),
    ("quote in name", {"name": "a'b"}, "vms[0].name"),
    ("shell in name", {"name": "a;reboot"}, "vms[0].name"),
    ("command substitution in name", {"name": "$(reboot)"}, "vms[0].name"),
    ("backtick in name", {"name": "`id`"}, "vms[0].name"),
    ("newline in name", {"name": "a\nb"}, "vms[0].name"),
    ("Cyrillic look-alike in name", {"name": "t-\u043eK"}, "vms[0].name"),
    ("Cyrillic look-alike in owner", {"owner": "\u0430lice"}, "vms[0].owner"),
    ("fullwidth digits in name", {"name": "t-\uff11"}, "vms[0].name"),
    ("name of 64 characters", {"name": "a" * 64}, "vms[0].name"),
    ("empty name", {"name": ""}, "vms[0].name"),
    ("path in name", {"name": "../../etc"}, "vms[0].name"),
    ("zero cpus", {"cpus": 0}, "vms[0].cpus"),
    ("negative cpus", {"cpus": -1}, "vms[0].cpus"),
    ("huge cpus", {"cpus": 10**9}, "vms[0].cpus"),
    ("boolean cpus", {"cpus": True}, "vms[0].cpus"),
    ("negative memory", {"memory": -256}, "vms[0].memory"),
    ("huge memory", {"memory": 10**15}, "vms[0].memory"),
    ("shell in memory", {"memory": "256; reboot"}, "vms[0].memory"),
    ("negative data disk", {"data_disk": -1}, "vms[0].data_disk"),
    ("data disk over the host limit", {"data_disk": 4096}, "data_disk"),
    ("key carrying a second key", {"ssh_keys": [KEY + "\nssh-ed25519 AAAA evil"]}, "vms[0].ssh_keys"),
    ("key with command= option", {"ssh_keys": ['command="rm -rf /" ' + KEY]}, "vms[0].ssh_keys"),
    ("key with from= option", {"ssh_keys": ['from="*" ' + KEY]}, "vms[0].ssh_keys"),
    ("not a key", {"ssh_keys": ["hello"]}, "vms[0].ssh_keys"),
    ("key with bad base64", {"ssh_keys": ["ssh-ed25519 !!!!"]}, "vms[0].ssh_keys"),
    ("private key instead of public", {"ssh_keys": ["-----BEGIN OPENSSH PRIVATE KEY-----"]}, "vms[0].ssh_keys"),
    ("shell in image", {"image": "tiny-1.0; reboot"}, "vms[0].image"),
    ("host path as image", {"image": "/etc/shadow"}, "vms[0].image"),
    ("traversal as image", {"image": "../../tiny-1.0"}, "vms[0].image"),
    ("shell in bridge", {"network": {"mode": "network", "bridge": "br0;reboot"}}, "vms[0].network.bridge"),
    ("XML in network name", {"network": {"mode": "network", "name": "<x/>"}}, "vms[0].network.name"),
    ("unknown network mode", {"network": {"mode": "passthrough"}}, "vms[0].network.mode"),
    ("raw QEMU arguments", {"qemu_args": ["-device", "vfio-pci"]}, "vms[0].qemu_args"),
    ("raw domain XML", {"xml": "<domain/>"}, "vms[0].xml"),
    ("host disk path", {"disk": "/dev/sda"}, "vms[0].disk"),
    ("negative health timeout", {"health": {"timeout": -5}}, "vms[0].health.timeout"),
]


def test_hostile_specs_refused_and_nothing_changes(seeded: Path) -> None:
    assert len(HOSTILE_SPECS) >= 30
    before = (hvagent(seeded, "ps", "--json").stdout, sorted(p.name for p in seeded.rglob("*")),
              hvagent(seeded, "events", "--json").stdout)
    spec = seeded / "spec.yaml"
    failures = []
    for case, override, field in HOSTILE_SPECS:
        spec.write_text(yaml.safe_dump({"vms": [{**GOOD, **override}]}, allow_unicode=True))
        r = hvagent(seeded, "apply", str(spec))
        line = r.stderr.strip()
        if r.returncode != 2 or len(line.splitlines()) != 1 or field not in line:
            failures.append(f"{case}: exit {r.returncode}: {r.stderr!r}")
    spec.write_text(yaml.safe_dump({"vms": [GOOD, {**GOOD, "owner": "bob"}]}))
    r = hvagent(seeded, "apply", str(spec))
    if r.returncode != 2 or "duplicate" not in r.stderr:
        failures.append(f"duplicate names: {r.stderr!r}")
    spec.unlink()
    assert failures == []
    after = (hvagent(seeded, "ps", "--json").stdout, sorted(p.name for p in seeded.rglob("*")),
             hvagent(seeded, "events", "--json").stdout)
    assert after == before


@pytest.mark.parametrize("setting,vms,needle", [
    ("capacity_memory_mib: 512", [{"memory": 256}, {"memory": 256}, {"memory": 128}], "memory"),
    ("capacity_vcpus: 2", [{"cpus": 1}, {"cpus": 2}], "cpus"),
    ("capacity_disk_gib: 3", [{"data_disk": 2}, {"data_disk": 2}], "data_disk"),
])
def test_provisioning_beyond_capacity_is_refused(seeded: Path, setting: str, vms: list[dict[str, object]],
                                                 needle: str) -> None:
    cfgf = seeded / "config.yaml"
    cfgf.write_text(cfgf.read_text() + setting + "\n")
    spec = seeded / "spec.yaml"
    spec.write_text(yaml.safe_dump({"vms": [{**GOOD, "name": f"t-cap-{i}", **v} for i, v in enumerate(vms)]}))
    before = (hvagent(seeded, "ps", "--json").stdout, sorted(p.name for p in seeded.rglob("*")))
    r = hvagent(seeded, "apply", str(spec))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert needle in r.stderr and "capacity" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert (hvagent(seeded, "ps", "--json").stdout, sorted(p.name for p in seeded.rglob("*"))) == before


def test_kept_disks_count_against_capacity(seeded: Path) -> None:
    cfgf = seeded / "config.yaml"
    cfgf.write_text(cfgf.read_text() + "capacity_disk_gib: 3\n")
    try:
        spec = seeded / "spec.yaml"
        spec.write_text(yaml.safe_dump({"vms": [{**GOOD, "name": "t-kept", "data_disk": 2}]}))
        assert hvagent(seeded, "apply", str(spec), "--no-wait").returncode == 0
        assert hvagent(seeded, "destroy", "t-kept").returncode == 0  # its 2 GiB stay, kept for its owner
        spec.write_text(yaml.safe_dump({"vms": [{**GOOD, "name": "t-other", "data_disk": 2}]}))
        before = (hvagent(seeded, "ps", "--json").stdout, sorted(p.name for p in seeded.rglob("*")))
        r = hvagent(seeded, "apply", str(spec), "--no-wait")
        assert r.returncode == 2 and "data_disk: would take this host to 4 GiB" in r.stderr, r.stderr
        assert (hvagent(seeded, "ps", "--json").stdout, sorted(p.name for p in seeded.rglob("*"))) == before
        assert hvagent(seeded, "disks", "purge", "t-kept").returncode == 0
        r = hvagent(seeded, "apply", str(spec), "--no-wait")
        assert r.returncode == 0, r.stderr
        assert hvagent(seeded, "destroy", "t-other", "--purge").returncode == 0
    finally:
        destroy_all(Host(config_mod.load(cfgf)))


def test_two_applies_at_once_make_one_vm(seeded: Path, tenant_key: KeyPair) -> None:
    spec = seeded / "spec.yaml"
    spec.write_text(yaml.safe_dump({"vms": [{**GOOD, "name": "t-race", "ssh_keys": [tenant_key.public]}]}))
    exe = Path(".venv/bin/hvagent").resolve()
    env = {**os.environ, "HVAGENT_CONFIG": str(seeded / "config.yaml")}
    try:
        procs = [subprocess.Popen([str(exe), "apply", str(spec)], env=env, text=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE) for _ in range(2)]
        outs = [p.communicate(timeout=300) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        said = sorted(o[0].strip().splitlines()[-1] for o in outs)
        assert said == ["created 1 VM(s): t-race", "nothing to do: the host already matches the spec"], said
        ps = json.loads(hvagent(seeded, "ps", "--json").stdout)
        assert [(v["name"], v["state"], v["domain"]) for v in ps] == [("t-race", "running", "running")]
        listed = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"], capture_output=True,
                                text=True, check=True).stdout.split()
        assert listed.count("t-race") == 1
    finally:
        hvagent(seeded, "destroy", "t-race", "--purge")
