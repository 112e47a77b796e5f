"""Two publishes of one version that the host lock does not serialize: the store's ``os.link``
decides. The CLI and the daemon publish under the host lock, so there the second one is refused
by the catalog check before it copies (tests/integration/test_hostile.py); here two catalogs on
one store and one database (as two processes would have) both pass that check, both copy, and
the second to link its copy meets the first one's file at the destination."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from agent.catalog import CHUNK, Catalog
from agent.config import Config
from agent.errors import Conflict
from agent.manifest import Manifest
from agent.state import ImageRow, State
from tests.unit.hostcaps import CAPS

pytestmark = [pytest.mark.unit,
              pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")]


class Gated(io.BytesIO):
    """An upload that, once its header has been checked, holds the rest until ``go`` is set."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.copying = threading.Event()
        self.go = threading.Event()

    def read(self, size: int | None = -1, /) -> bytes:
        if size == CHUNK:  # the header was read and checked; the copy into the store has begun
            self.copying.set()
            assert self.go.wait(30), "never released"
        return super().read(size)


def test_the_second_link_of_one_version_is_a_conflict_and_the_first_stays(tmp_path: Path) -> None:
    image = tmp_path / "in.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    data = image.read_bytes()
    m = Manifest(name="x", family=1, version="1.0", sha256=hashlib.sha256(data).hexdigest(), format="qcow2",
                 virtual_size=1 << 20, firmware="bios")
    cfg = Config(state_dir=tmp_path / "state", max_virtual_size=1 << 30)
    states = [State(cfg.db_path), State(cfg.db_path)]
    catalogs = [Catalog(cfg, s, lambda: CAPS) for s in states]
    sources = [Gated(data), Gated(data)]
    results: list[ImageRow | Exception | None] = [None, None]

    def publish(i: int) -> None:
        try:
            results[i] = catalogs[i].publish_stream(sources[i], m, f"publisher-{i}.qcow2", len(data))
        except Exception as e:
            results[i] = e

    threads = [threading.Thread(target=publish, args=(i,)) for i in (0, 1)]
    try:
        for t, src in zip(threads, sources, strict=True):
            t.start()
            assert src.copying.wait(30)  # past the "already in the catalog" check, copying its temp file
        assert len(list(cfg.store.rglob(".*.tmp"))) == 2 and len(states[0].pending()) == 2
        sources[0].go.set()
        threads[0].join(30)
        sources[1].go.set()  # its copy, checks and chmod run; then os.link meets publisher 0's file
        threads[1].join(30)
    finally:
        for src in sources:
            src.go.set()
        for t in threads:
            t.join(30)

    first, second = results
    assert isinstance(first, ImageRow), first
    assert isinstance(second, Conflict) and second.message == "image x-1.0: already being published", second
    final = cfg.store / "x" / "x-1.0.qcow2"
    assert sorted(p.name for p in cfg.store.rglob("*")) == ["x", "x-1.0.qcow2"]  # no temp file left
    assert first.path == str(final) and final.read_bytes() == data and os.stat(final).st_mode & 0o777 == 0o444
    assert os.stat(final).st_nlink == 1  # the loser's copy is gone, not a second name of the winner's
    assert [(r.name, r.version) for r in states[1].images()] == [("x", "1.0")]
    assert states[0].pending() == [] and [e.kind for e in states[0].events()] == ["image.published"]
    for s in states:
        s.close()
