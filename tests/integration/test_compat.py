"""The host's guest OS compatibility list through the real CLI and the real libvirtd, in a
throwaway state directory; nothing here boots a guest. An image needing a QEMU newer than the one
libvirt runs is refused at publish in one line naming both versions, with nothing changed; the
published tiny-1.0 is listed as runnable, against the host's values read from libvirt."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
import yaml

from tests.conftest import hvagent, image, store_snapshot
from tests.integration.daemon_fixture import daemon_fixture

pytestmark = pytest.mark.integration


def libvirt_qemu() -> str:
    conn = libvirt.openReadOnly("qemu:///system")
    try:
        v = int(conn.getVersion())
    finally:
        conn.close()
    return f"{v // 1_000_000}.{v // 1000 % 1000}.{v % 1000}"


@pytest.fixture
def seeded(state_dir: Path) -> Iterator[Path]:
    """tiny-1.0 published; the API socket in the state directory, so no daemon of this host answers."""
    (state_dir / "config.yaml").write_text(yaml.safe_dump({"state_dir": str(state_dir), "accelerator": "qemu",
                                                           "api": {"socket": str(state_dir / "api.sock")}}))
    r = hvagent(state_dir, "images", "publish", str(image("tiny-1.0")))
    assert r.returncode == 0, r.stderr
    yield state_dir


def needs_qemu_99(state_dir: Path) -> Path:
    """A copy of tiny-1.0 (the same bytes: the manifest's sha256 holds) as tiny-1.7, needing QEMU 99.0."""
    work = state_dir / "in"
    work.mkdir()
    path = work / "tiny-1.7.qcow2"
    shutil.copyfile(image("tiny-1.0"), path)
    m = yaml.safe_load(image("tiny-1.0").with_suffix(".yaml").read_text())
    m.update(version="1.7", guest_version_id="1.7", min_qemu="99.0")
    path.with_suffix(".yaml").write_text(yaml.safe_dump(m))
    return path


def test_an_image_needing_a_newer_qemu_is_refused_with_both_versions(seeded: Path) -> None:
    path = needs_qemu_99(seeded)
    before = store_snapshot(seeded)
    r = hvagent(seeded, "images", "publish", str(path))
    assert r.returncode == 2, (r.stdout, r.stderr)
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and line.startswith("hvagent: error:"), r.stderr
    assert f"min_qemu: needs QEMU 99.0, this host runs {libvirt_qemu()}" in line, line
    assert store_snapshot(seeded) == before
    events = json.loads(hvagent(seeded, "events", "--json").stdout)
    assert [e["kind"] for e in events] == ["image.published"]


def test_host_compat_lists_the_catalog_against_libvirts_values(seeded: Path) -> None:
    r = hvagent(seeded, "host", "compat", "--json")
    assert r.returncode == 0, r.stderr
    report: dict[str, Any] = json.loads(r.stdout)
    assert [(i["image"], i["runs"], i["why_not"]) for i in report["images"]] == [("tiny-1.0", True, [])]
    host = report["host"]
    assert host["qemu"] == libvirt_qemu() and host["virttype"] == "qemu"
    assert host["machine"]["asked"] == "q35" and host["machine"]["canonical"].startswith("pc-q35-")
    assert {"virtio-blk", "virtio-net", "virtio-rng", "qemu-guest-agent", "serial"} <= set(host["devices"])
    if host["firmware"]["uefi"]:  # the loader libvirt lists, and the template its descriptor gives
        assert host["firmware"]["loader"] in host["firmware"]["loaders"]
        assert Path(host["firmware"]["nvram_template"]).is_file()
    table = hvagent(seeded, "host", "compat")
    assert table.returncode == 0 and f"QEMU {libvirt_qemu()}" in table.stdout and "tiny-1.0" in table.stdout


@pytest.mark.daemon
def test_through_the_daemon_the_list_is_get_v1_hosts(state_dir: Path) -> None:
    """The CLI goes through a running daemon (its socket in the state directory; TCG configured, so
    no probe guest): the same refusal, and ``host compat`` is what ``GET /v1/host`` carries."""
    for daemon in daemon_fixture(state_dir):
        r = hvagent(state_dir, "images", "publish", str(image("tiny-1.0")))
        assert r.returncode == 0 and "through the daemon" in r.stdout, (r.stdout, r.stderr)
        r = hvagent(state_dir, "images", "publish", str(needs_qemu_99(state_dir)))
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert f"min_qemu: needs QEMU 99.0, this host runs {libvirt_qemu()}" in r.stderr
        listed = json.loads(hvagent(state_dir, "host", "compat", "--json").stdout)
        host = daemon.call("ops", "GET", "/v1/host")
        assert host.status_code == 200, host.text
        assert listed == host.json()["compat"]
        assert [(i["image"], i["runs"]) for i in listed["images"]] == [("tiny-1.0", True)]
