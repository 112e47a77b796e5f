"""The catalog: immutable base images in a store directory, with manifests and states.

A file to publish is hostile until checked. What can be refused from the manifest, the file's
size and its first bytes (the qcow2 header) is refused before anything is written. Then it is
copied into the store under a temporary name (hashing while copying), and every check runs on
that private copy, so the bytes checked are the bytes kept. Only then is it fsynced, renamed and
recorded.

Every image in the catalog is one this host can run (invariant 12): its manifest's needs are
checked against the host's capabilities (agent.compat) at publish, when a track picks a version
(one this host can no longer run is skipped, say after QEMU was downgraded) and when a base is used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agent import files, imageinfo, qcow2
from agent.compat import HostCaps, Needs, check
from agent.config import Accel, Config
from agent.domxml import DomainType
from agent.errors import Conflict, EnvError, ImageRefused, InputError, NotFound
from agent.faults import point as fault
from agent.manifest import Manifest, load_manifest
from agent.state import ImageRow, ImageState, State
from agent.version import Track, Version
from agent.virt import Virt

log = logging.getLogger(__name__)

CHUNK = 4 << 20
Progress = Callable[[int, int], None]
# The journal entry of a publish's rollout trigger: written with the publish, before the image is
# recorded, and cleared by ``Rollouts.on_publish`` (or its recovery, which calls it).
TRIGGER = "rollout-trigger"


class Source(Protocol):
    """What an image is read from: an open file, or an upload as it arrives."""

    def read(self, size: int = -1, /) -> bytes: ...


@dataclass(frozen=True)
class CatalogEntry:
    row: ImageRow
    vms: int


def default_manifest_path(image: Path) -> Path:
    return image.with_suffix(".yaml")


class LibvirtCaps:
    """This host's capabilities from libvirt (``Virt.host_caps``) on a connection of their own,
    read again once ``ttl`` seconds have passed: a rollout's or a reconcile pass's many look-ups
    cost one read, and a QEMU upgraded or downgraded meanwhile is seen within seconds."""

    def __init__(self, cfg: Config, ttl: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.ttl = ttl
        self._clock = clock
        self._cached: tuple[float, HostCaps] | None = None

    def __call__(self) -> HostCaps:
        now = self._clock()
        if self._cached is None or now - self._cached[0] >= self.ttl:
            virt = Virt(self.cfg.libvirt_uri)
            try:
                self._cached = now, virt.host_caps(self._virttype())
            finally:
                virt.close()
        return self._cached[1]

    def _virttype(self) -> DomainType:
        """The domain type guests get: the configured one, else what Host.accelerator's probe chose
        (its cache, so that no probe guest boots here); before any probe, TCG's (QEMU's machines,
        loaders and device models are KVM's too)."""
        if self.cfg.accelerator is not Accel.AUTO:
            return DomainType(self.cfg.accelerator.value)
        try:
            return DomainType(json.loads(self.cfg.accel_cache.read_text())["accel"])
        except (OSError, ValueError, KeyError, TypeError):
            return DomainType.QEMU


def unmet(row: ImageRow, caps: HostCaps) -> list[str]:
    """What ``row`` needs that this host lacks (agent.compat.check); empty when it runs here."""
    try:
        needs = Needs.stored(row.manifest)
    except ValueError as e:
        return [f"manifest: {e}"]
    return check(needs, caps)


class Catalog:
    def __init__(self, cfg: Config, state: State, caps: Callable[[], HostCaps]) -> None:
        """``caps``: this host's capabilities (``LibvirtCaps`` reads them from libvirt)."""
        self.cfg = cfg
        self.state = state
        self.store = cfg.store
        self.caps = caps

    def _ensure_store(self) -> None:
        try:
            self.store.mkdir(parents=True, exist_ok=True)
            os.chmod(self.store, 0o755)  # QEMU runs as an unprivileged user and must read bases
        except OSError as e:
            raise EnvError(f"{self.store}: cannot create the image store ({e.strerror})") from e

    def path_for(self, m: Manifest) -> Path:
        return self.store / m.name / f"{m.name}-{m.version}.qcow2"

    # publish -------------------------------------------------------------------------------
    def publish(self, image: Path, manifest_path: Path | None = None,
                progress: Progress | None = None, rollout: str | None = None) -> ImageRow:
        manifest_path = manifest_path or default_manifest_path(image)
        m = load_manifest(manifest_path)
        if image.is_symlink():
            raise ImageRefused(f"{image}: is a symbolic link; publish the file itself")
        if not image.is_file():
            raise InputError(f"{image}: no such image file")
        try:
            fd = os.open(image, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as e:
            raise ImageRefused(f"{image}: cannot open ({e.strerror})") from e
        with open(fd, "rb") as src:
            return self.publish_stream(src, m, str(image), os.fstat(fd).st_size, progress, rollout)

    def publish_stream(self, src: Source, m: Manifest, shown: str, size: int | None = None,
                       progress: Progress | None = None, rollout: str | None = None) -> ImageRow:
        """Publish the image read from ``src`` (a file, an upload) under manifest ``m``; refusals
        name ``shown``. Its bytes are hashed while copied into the store, once.

        ``rollout``: the publish's rollout policy (auto, manual). Given, its trigger is journaled
        (``TRIGGER``) before the image is recorded and left open for ``Rollouts.on_publish``,
        which the caller calls next: a crash between the two still gets the rollout started."""
        if self.state.image(m.name, m.version) is not None:
            raise Conflict(f"image {m.ref}: already in the catalog (published images never change)")
        head, header = self._check_before_copy(src, m, shown, size)
        final = self.path_for(m)
        made = [d for d in (final.parent, self.store) if not d.exists()]  # removed again if refused
        self._ensure_store()
        final.parent.mkdir(mode=0o755, exist_ok=True)
        tmp = final.parent / f".{final.name}.{os.getpid()}.{threading.get_native_id()}.tmp"
        intent = self.state.begin("publish", m.ref, {"tmp": str(tmp), "final": str(final)})
        trigger = None if rollout is None else self.state.begin(TRIGGER, m.ref, {"policy": str(rollout)})
        linked = recorded = False
        try:
            digest = _copy_hashing(head, src, tmp, size, qcow2.max_file_size(self.cfg.max_virtual_size), shown,
                                   progress)
            fault("publish.copied")
            if digest != m.sha256:
                raise ImageRefused(f"{shown}: sha256 {digest} differs from the manifest's {m.sha256}")
            # the checks run on our private copy; refusals name the file the user gave
            imageinfo.inspect(tmp, self.cfg.max_virtual_size, shown=shown)
            os.chmod(tmp, 0o444)
            fault("publish.checked")
            try:
                os.link(tmp, final)  # fails if a concurrent publish already placed this version
            except FileExistsError as e:
                raise Conflict(f"image {m.ref}: already being published") from e
            linked = True
            files.fsync_dir(final.parent)
            fault("publish.linked")
            row = ImageRow(m.name, m.version, m.family, m.parsed_version.minor, digest, str(final),
                           header.size, ImageState.ACTIVE, m.model_dump(mode="json"), self.state.clock())
            self.state.add_image(row)
            recorded = True
            fault("publish.recorded")
            self.state.event("image.published", f"{m.ref} sha256={digest[:12]} firmware={m.firmware}")
            return row
        except BaseException:
            if trigger is not None and not recorded:
                self.state.done(trigger)
            if linked and self.state.image(m.name, m.version) is None:
                final.unlink(missing_ok=True)
            tmp.unlink(missing_ok=True)  # now, not in `finally`: the directories below must be empty
            for d in made:
                with contextlib.suppress(OSError):  # not empty: a concurrent publish uses it
                    d.rmdir()
            raise
        finally:
            tmp.unlink(missing_ok=True)
            self.state.done(intent)

    def _check_before_copy(self, src: Source, m: Manifest, shown: str,
                           size: int | None) -> tuple[bytes, qcow2.Qcow2Header]:
        """Refuse what the manifest, the size and the header tell before a byte is written; the
        first bytes read from ``src`` (the copy starts with them) and their header."""
        limit = self.cfg.max_virtual_size
        accepted = f"max_virtual_size is {limit} bytes ({qcow2.human(limit)})"
        if m.virtual_size > limit:
            raise ImageRefused(f"{shown}: the manifest's virtual size {m.virtual_size} bytes "
                               f"({qcow2.human(m.virtual_size)}) is too large; {accepted}")
        bound = qcow2.max_file_size(limit)
        if size is not None and size > bound:
            raise ImageRefused(f"{shown}: {size} bytes ({qcow2.human(size)}) is larger than any accepted qcow2 "
                               f"image: {accepted}, so the file is at most {bound} bytes")
        head = _read_up_to(src, qcow2.HEAD_BYTES)
        header = qcow2.parse_head(head, size if len(head) == qcow2.HEAD_BYTES else len(head), shown)
        qcow2.check_virtual_size(header, limit, shown)
        if header.size != m.virtual_size:
            raise ImageRefused(f"{shown}: virtual size {header.size} differs from the manifest's {m.virtual_size}")
        if needs := check(m, self.caps()):
            raise ImageRefused(f"{shown}: this host cannot run {m.ref}: {'; '.join(needs)}")
        return head, header

    def recover(self) -> None:
        """Finish or undo publishes interrupted by a crash: no temp file, no file without a row."""
        for it in self.state.orphaned():
            if it.op == "gc":  # the row goes first, so a crash leaves at most the file to remove
                name, _, version = it.target.rpartition("-")
                if self.state.image(name, version) is None:
                    Path(it.intent["path"]).unlink(missing_ok=True)
                self.state.done(it.id)
                continue
            if it.op != "publish":
                continue
            name, _, version = it.target.rpartition("-")
            Path(it.intent["tmp"]).unlink(missing_ok=True)
            if self.state.image(name, version) is None:
                Path(it.intent["final"]).unlink(missing_ok=True)
            self.state.done(it.id)

    # queries -------------------------------------------------------------------------------
    def entries(self) -> list[CatalogEntry]:
        users = Counter((v.image, v.version) for v in self.state.vms())
        return [CatalogEntry(r, users[(r.name, r.version)]) for r in self.state.images()]

    def resolve(self, track: Track) -> ImageRow:
        """The version ``track`` runs: pinned, or the newest active version of its family that this
        host can run (newer ones it cannot are skipped, logged with why)."""
        rows = self.state.images()
        available = [(r.name, Version.parse(r.version)) for r in rows]
        active = [r for r in rows if r.state is ImageState.ACTIVE]
        if not track.pinned:
            skipped = self.unrunnable(track.name, track.family, newest_only=True)
            for r, why in skipped:
                log.warning("image %s: skipped for %s, this host cannot run it: %s", r.ref, track, "; ".join(why))
            active = [r for r in active if r.ref not in {s.ref for s, _ in skipped}]
            if skipped and not any((r.name, r.family) == (track.name, track.family) for r in active):
                ref, why = skipped[0][0].ref, skipped[0][1]
                raise NotFound(f"image: {track} has no active version this host can run ({ref}: {'; '.join(why)})")
        usable = [(r.name, Version.parse(r.version)) for r in active]
        version = track.resolve(available, usable)
        row = self.state.image(track.name, str(version))
        assert row is not None
        return row

    def unrunnable(self, name: str, family: int, newest_only: bool = False) -> list[tuple[ImageRow, list[str]]]:
        """The family's active versions this host cannot run, newest first, each with why.
        ``newest_only``: those newer than the newest it can run (what a track skips)."""
        family_rows = sorted((r for r in self.state.images() if r.name == name and r.family == family
                              and r.state is ImageState.ACTIVE), key=lambda r: Version.parse(r.version), reverse=True)
        if not family_rows:
            return []
        caps = self.caps()
        found: list[tuple[ImageRow, list[str]]] = []
        for r in family_rows:
            if why := unmet(r, caps):
                found.append((r, why))
            elif newest_only:
                break
        return found

    def compat(self) -> dict[str, Any]:
        """The host's guest OS compatibility list: the host's values and, for each image in the
        catalog, whether it runs here and, if not, why."""
        caps = self.caps()
        images = []
        for r in self.state.images():
            why = unmet(r, caps)
            images.append({"image": r.ref, "name": r.name, "version": r.version, "state": str(r.state),
                           "kind": str(r.manifest.get("kind", "disk")), "firmware": r.manifest.get("firmware"),
                           "runs": not why, "why_not": why})
        return {"host": caps.describe(), "images": images}

    def resolve_for_new_vm(self, track: Track, vm: str) -> ImageRow:
        """``resolve``, refusing a retired version: no new VM may pin it."""
        row = self.resolve(track)
        if row.state is ImageState.RETIRED:
            raise InputError(f"vms: {vm}: image: {row.ref} is retired; no new VM may pin it "
                             f"(use {row.name}-{row.family}.* or a newer version)")
        return row

    def get(self, ref: str) -> ImageRow:
        name, _, version = ref.rpartition("-")
        row = self.state.image(name, version) if name else None
        if row is None:
            raise NotFound(f"image: {ref!r} is not in the catalog")
        return row

    def base_for_use(self, row: ImageRow) -> Path:
        """The base file, re-checked (header, size, read-only, and that this host can run it)
        every time it is used."""
        if why := unmet(row, self.caps()):
            raise Conflict(f"image {row.ref}: this host cannot run it: {'; '.join(why)}")
        path = Path(row.path)
        try:
            st = path.stat()
        except OSError as e:
            raise EnvError(f"{path}: base image of {row.ref} is missing from the store") from e
        if st.st_mode & 0o222:
            raise ImageRefused(f"{path}: base image of {row.ref} is writable; the store was tampered with")
        header = qcow2.read_header(path)
        if header.size != row.virtual_size:
            raise ImageRefused(f"{path}: base image of {row.ref} changed size since publish")
        return path

    def verify(self, row: ImageRow) -> bool:
        """Full sha256 check of a stored base (invariant 1)."""
        return _sha256(Path(row.path)) == row.sha256


def _read_up_to(src: Source, n: int) -> bytes:
    """The first ``n`` bytes of ``src``, fewer only at its end (a read may return less)."""
    buf = bytearray()
    while len(buf) < n and (chunk := src.read(n - len(buf))):
        buf += chunk
    return bytes(buf)


def _copy_hashing(head: bytes, src: Source, dst: Path, total: int | None, bound: int, shown: str,
                  progress: Progress | None) -> str:
    """Write ``head`` and the rest of ``src`` into the new file ``dst``, fsynced, refusing a file
    over ``bound`` bytes; the sha256 of what was written."""
    h = hashlib.sha256()
    done = 0
    try:
        with open(dst, "xb") as fout:
            chunk = head
            while chunk:
                done += len(chunk)
                if done > bound:
                    raise ImageRefused(f"{shown}: larger than {bound} bytes, the most an accepted qcow2 image "
                                       f"takes (max_virtual_size plus metadata)")
                h.update(chunk)
                fout.write(chunk)
                if progress:
                    progress(done, total or done)
                chunk = src.read(CHUNK)
            fout.flush()
            os.fsync(fout.fileno())
    except OSError as e:
        dst.unlink(missing_ok=True)
        raise EnvError(f"{dst}: cannot write into the image store ({e.strerror})") from e
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()
