"""One line means one line: a hostile file name reaches the user's terminal escaped, through the real CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import hvagent, image

pytestmark = pytest.mark.integration

EVIL = "esc\n\x1b[31mred"


def test_a_refused_publish_of_a_hostile_name_prints_one_clean_line(state_dir: Path) -> None:
    drop = state_dir / "drop"
    drop.mkdir()
    file = drop / f"{EVIL}.qcow2"
    shutil.copyfile(image("tiny-1.0"), file)
    manifest = yaml.safe_load(image("tiny-1.0").with_suffix(".yaml").read_text())
    (drop / f"{EVIL}.yaml").write_text(yaml.safe_dump({**manifest, "sha256": "0" * 64}))

    r = hvagent(state_dir, "images", "publish", str(file))

    assert r.returncode == 2, r.stderr
    assert r.stderr.endswith("\n") and r.stderr.count("\n") == 1, r.stderr
    assert "\x1b" not in r.stderr
    assert r.stderr.startswith(f"hvagent: error: {drop}/esc\\n\\x1b[31mred.qcow2: sha256 ")
    assert "differs from the manifest's " + "0" * 64 in r.stderr
    assert json.loads(hvagent(state_dir, "images", "list", "--json", check=True).stdout) == []
