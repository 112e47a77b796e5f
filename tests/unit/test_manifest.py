from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.errors import InputError
from agent.manifest import load_manifest

pytestmark = pytest.mark.unit

GOOD: dict[str, Any] = {"name": "tiny", "family": 1, "version": "1.18", "sha256": "a" * 64, "format": "qcow2",
                        "virtual_size": 268435456, "firmware": "bios", "machine": "q35", "min_qemu": "7.2"}


def write(tmp_path: Path, data: Any) -> Path:
    p = tmp_path / "m.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_good_manifest(tmp_path: Path) -> None:
    m = load_manifest(write(tmp_path, GOOD))
    assert m.ref == "tiny-1.18" and m.expected_version_id == "1.18" and m.ssh_user == "root"
    m2 = load_manifest(write(tmp_path, {**GOOD, "name": "debian", "family": 12, "version": "12.0",
                                        "guest_version_id": "12"}))
    assert m2.expected_version_id == "12"


@pytest.mark.parametrize("override,needle", [
    ({"family": 2}, "version 1.18 is not in family 2"),
    ({"version": 1.18}, "version: write it as a string"),
    ({"version": "1.x"}, "version"),
    ({"name": "../../etc"}, "name"),
    ({"sha256": "xyz"}, "sha256"),
    ({"format": "raw"}, "format"),
    ({"firmware": "coreboot"}, "firmware"),
    ({"virtual_size": -1}, "virtual_size"),
    ({"guest_version_id": "12\nX=1"}, "guest_version_id"),
    # a misspelt key is named, not dropped (issue 17: the check it asked for would never run)
    ({"guest_verison_id": "12"}, "m.yaml: guest_verison_id: unknown key; accepted: name, family, version"),
])
def test_bad_manifests(tmp_path: Path, override: dict[str, Any], needle: str) -> None:
    with pytest.raises(InputError, match=needle):
        load_manifest(write(tmp_path, {**GOOD, **override}))


def test_manifest_symlink_refused(tmp_path: Path) -> None:
    (tmp_path / "link.yaml").symlink_to(write(tmp_path, GOOD))
    with pytest.raises(InputError, match="regular file"):
        load_manifest(tmp_path / "link.yaml")
