"""The catalog: immutable base images in a store directory, with manifests and states.

A file to publish is hostile until checked. What can be refused from the manifest, the file's
size and its first bytes (the qcow2 header) is refused before anything is written. Then it is
copied into the store under a temporary name (hashing while copying), and every check runs on
that private copy, so the bytes checked are the bytes kept. Only then is it fsynced, renamed and
recorded.

Every image in the catalog is one this host can run (invariant 12): its manifest's needs are
checked against the host's capabilities (agent.compat) at publish, when a track picks a version
(one this host can no longer run is skipped, say after QEMU was downgraded) and when a base is used.

Installer media (``kind: installer``, an ISO; ``kind: netboot``, a PXE bundle's directory) are
published the same way, checked by agent.media, and stored read-only beside the disk images under
names of their own. They are never a VM's disk: no track, rollout or VM's ``image:`` takes them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agent import files, imageinfo, media, qcow2
from agent.compat import HostCaps, Needs, check
from agent.config import Accel, Config
from agent.domxml import DomainType
from agent.errors import Conflict, EnvError, ImageRefused, InputError, NotFound
from agent.faults import point as fault
from agent.manifest import AnyManifest, Kind, Manifest, MediaManifest, kind_of, load_any_manifest
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
    """FILE.yaml beside FILE; a bundle's directory DIR has DIR.yaml, and a manifest is its own."""
    if image.suffix == ".yaml":
        return image
    if image.is_dir() and not image.is_symlink():
        return image.with_name(image.name + ".yaml")
    return image.with_suffix(".yaml")


def remove_stored(path: Path) -> None:
    """Remove a stored file, or a bundle's read-only directory tree, if it is there."""
    if path.is_dir() and not path.is_symlink():
        for d in [path, *(p for p in path.rglob("*") if p.is_dir() and not p.is_symlink())]:
            os.chmod(d, 0o700)
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _make_read_only(path: Path) -> None:
    """Files 0444, directories 0555, deepest first (a read-only directory takes no chmod below it)."""
    if path.is_dir() and not path.is_symlink():
        for p in sorted(path.rglob("*"), key=lambda q: len(q.parts), reverse=True):
            os.chmod(p, 0o555 if p.is_dir() else 0o444, follow_symlinks=False)
        os.chmod(path, 0o555)
    else:
        os.chmod(path, 0o444)


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
        needs = Needs.stored(row.manifest) if kind_of(row.manifest) is Kind.DISK else \
            MediaManifest.model_validate(row.manifest).needs
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

    def path_for(self, m: AnyManifest) -> Path:
        """A disk's qcow2 file, an installer's ISO, a netboot bundle's directory."""
        suffix = {Kind.DISK: ".qcow2", Kind.INSTALLER: ".iso", Kind.NETBOOT: ""}[m.kind]
        return self.store / m.name / f"{m.name}-{m.version}{suffix}"

    # publish -------------------------------------------------------------------------------
    def publish(self, image: Path, manifest_path: Path | None = None,
                progress: Progress | None = None, rollout: str | None = None) -> ImageRow:
        """Publish a disk image or an installer ISO (FILE, its manifest beside it), or a netboot
        bundle (its directory DIR, or its manifest DIR.yaml)."""
        manifest_path = manifest_path or default_manifest_path(image)
        m = load_any_manifest(manifest_path)
        if isinstance(m, MediaManifest) and m.kind is Kind.NETBOOT:
            bundle = image.with_suffix("") if image == manifest_path else image
            return self.publish_bundle(bundle, m)
        if image == manifest_path:
            raise InputError(f"{image}: is the manifest; publish the image file, its manifest beside it "
                             f"(kind {m.kind})")
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

    def publish_stream(self, src: Source, m: AnyManifest, shown: str, size: int | None = None,
                       progress: Progress | None = None, rollout: str | None = None) -> ImageRow:
        """Publish the image read from ``src`` (a file, an upload) under manifest ``m``; refusals
        name ``shown``. Its bytes are hashed while copied into the store, once.

        ``rollout``: the publish's rollout policy (auto, manual). Given, its trigger is journaled
        (``TRIGGER``) before the image is recorded and left open for ``Rollouts.on_publish``,
        which the caller calls next: a crash between the two still gets the rollout started.
        Installer media start no rollout: theirs is never journaled."""
        if isinstance(m, MediaManifest):
            if m.kind is Kind.NETBOOT:
                raise InputError(f"{shown}: kind netboot: a PXE bundle is a directory of files, not one upload; "
                                 "publish it on the host: hvagent images publish DIR")
            return self._publish_iso(src, m, shown, size, progress)
        self._check_new(m)
        head, header = self._check_before_copy(src, m, shown, size)

        def fill(tmp: Path) -> tuple[str, int]:
            digest = _copy_hashing(head, src, tmp, size, qcow2.max_file_size(self.cfg.max_virtual_size), shown,
                                   progress, "the most an accepted qcow2 image takes (max_virtual_size plus metadata)")
            fault("publish.copied")
            if digest != m.sha256:
                raise ImageRefused(f"{shown}: sha256 {digest} differs from the manifest's {m.sha256}")
            # the checks run on our private copy; refusals name the file the user gave
            imageinfo.inspect(tmp, self.cfg.max_virtual_size, shown=shown)
            return digest, header.size

        return self._commit(m, fill, rollout, f"firmware={m.firmware}")

    def _publish_iso(self, src: Source, m: MediaManifest, shown: str, size: int | None,
                     progress: Progress | None) -> ImageRow:
        """An installer ISO: refused from its manifest, size and first 34 KiB before a byte is
        written; copied hashing; the whole private copy checked again (agent.media)."""
        self._check_new(m)
        limit = self.cfg.max_virtual_size
        for what, n in (("the manifest's size", m.size), ("the file", size)):
            if n is not None:
                media.check_size(n, limit, f"{shown}: {what}" if what != "the file" else shown)
        if m.size is not None and size is not None and m.size != size:
            raise ImageRefused(f"{shown}: {size} bytes differs from the manifest's size {m.size}")
        head = _read_up_to(src, media.HEAD_BYTES)
        media.parse_head(head, size if len(head) == media.HEAD_BYTES else len(head), shown)
        self._check_runs(m, shown)

        def fill(tmp: Path) -> tuple[str, int]:
            digest = _copy_hashing(head, src, tmp, size, limit, shown, progress,
                                   "the most an installer ISO may take (max_virtual_size)")
            if digest != m.sha256:
                raise ImageRefused(f"{shown}: sha256 {digest} differs from the manifest's {m.sha256}")
            stored = tmp.stat().st_size
            if m.size is not None and stored != m.size:
                raise ImageRefused(f"{shown}: {stored} bytes differs from the manifest's size {m.size}")
            media.inspect_iso(tmp, limit, shown)
            return digest, stored

        return self._commit(m, fill, None, f"kind={m.kind} firmware={','.join(m.firmware)}")

    def publish_bundle(self, bundle: Path, m: MediaManifest) -> ImageRow:
        """A netboot bundle's directory: exactly the files its manifest lists (no link, nothing
        else), its listing's sha256 the manifest's, each file copied hashing into the store and
        checked against its own sha256; kernel, initrd and boot file are no disk image."""
        shown = str(bundle)
        self._check_new(m)
        if (listed := media.listing_sha256(m.files)) != m.sha256:
            raise ImageRefused(f"{shown}: the listing of the manifest's files has sha256 {listed}, "
                               f"the manifest says {m.sha256}")
        if not bundle.is_dir() and not bundle.is_symlink():
            raise InputError(f"{shown}: no such bundle directory (kind netboot: the directory its manifest names)")
        sizes = media.scan_bundle(bundle, m.files, shown)
        limit = self.cfg.max_virtual_size
        media.check_size(sum(sizes.values()), limit, shown, "a netboot bundle's files together")
        self._check_runs(m, shown)
        heads = {m.bootfile, m.kernel, m.initrd}

        def fill(tmp: Path) -> tuple[str, int]:
            os.mkdir(tmp, 0o755)
            total = 0
            for name in sorted(m.files):
                fd = media.open_member(bundle, name, shown)
                with open(fd, "rb") as src:
                    head = _read_up_to(src, media.TAIL_BYTES)
                    if name in heads:
                        media.check_member_head(head, name, shown)
                    dst = tmp / name
                    dst.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                    digest = _copy_hashing(head, src, dst, None, limit - total, f"{shown}: {name}", None,
                                           "what is left of max_virtual_size for the bundle")
                if digest != m.files[name]:
                    raise ImageRefused(f"{shown}: {name}: sha256 {digest} differs from the manifest's {m.files[name]}")
                total += dst.stat().st_size
            return m.sha256, total

        return self._commit(m, fill, None, f"kind={m.kind} files={len(m.files)}")

    def _check_new(self, m: AnyManifest) -> None:
        """Refuse a version the catalog has, and a kind its name does not have: a name is one
        lineage, its versions all disks or all media of one kind."""
        if self.state.image(m.name, m.version) is not None:
            raise Conflict(f"image {m.ref}: already in the catalog (published images never change)")
        other = {kind_of(r.manifest) for r in self.state.images() if r.name == m.name} - {m.kind}
        if other:
            raise InputError(f"image {m.ref}: kind {m.kind}, and {m.name} names kind {other.pop()} images in this "
                             f"catalog; each kind needs names of its own")

    def _check_runs(self, m: AnyManifest, shown: str) -> None:
        needs = m.needs if isinstance(m, MediaManifest) else m
        if why := check(needs, self.caps()):
            raise ImageRefused(f"{shown}: this host cannot run {m.ref}: {'; '.join(why)}")

    def _commit(self, m: AnyManifest, fill: Callable[[Path], tuple[str, int]], rollout: str | None,
                what: str) -> ImageRow:
        """Store ``m``'s file or directory atomically: ``fill`` writes and checks it at a temporary
        path, giving its sha256 and size; it is then made read-only, placed and recorded, or
        removed with the intent journaled around it."""
        final = self.path_for(m)
        made = [d for d in (final.parent, self.store) if not d.exists()]  # removed again if refused
        self._ensure_store()
        final.parent.mkdir(mode=0o755, exist_ok=True)
        tmp = final.parent / f".{final.name}.{os.getpid()}.{threading.get_native_id()}.tmp"
        intent = self.state.begin("publish", m.ref, {"tmp": str(tmp), "final": str(final)})
        trigger = None if rollout is None else self.state.begin(TRIGGER, m.ref, {"policy": str(rollout)})
        linked = recorded = False
        try:
            digest, size = fill(tmp)
            _make_read_only(tmp)
            fault("publish.checked")
            try:
                if tmp.is_dir():
                    os.mkdir(final)  # fails if a concurrent publish already placed this version
                    linked = True
                    os.rename(tmp, final)  # onto our own empty directory
                else:
                    os.link(tmp, final)  # fails if a concurrent publish already placed this version
            except FileExistsError as e:
                raise Conflict(f"image {m.ref}: already being published") from e
            linked = True
            files.fsync_dir(final.parent)
            fault("publish.linked")
            row = ImageRow(m.name, m.version, m.family, m.parsed_version.minor, digest, str(final),
                           size, ImageState.ACTIVE, m.model_dump(mode="json"), self.state.clock())
            self.state.add_image(row)
            recorded = True
            fault("publish.recorded")
            self.state.event("image.published", f"{m.ref} sha256={digest[:12]} {what}")
            return row
        except BaseException:
            if trigger is not None and not recorded:
                self.state.done(trigger)
            if linked and self.state.image(m.name, m.version) is None:
                remove_stored(final)
            remove_stored(tmp)  # now, not in `finally`: the directories below must be empty
            for d in made:
                with contextlib.suppress(OSError):  # not empty: a concurrent publish uses it
                    d.rmdir()
            raise
        finally:
            remove_stored(tmp)
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
        self._check_runs(m, shown)
        return head, header

    def recover(self) -> None:
        """Finish or undo publishes interrupted by a crash: no temp file, no file without a row."""
        for it in self.state.orphaned():
            if it.op == "gc":  # the row goes first, so a crash leaves at most the file to remove
                name, _, version = it.target.rpartition("-")
                if self.state.image(name, version) is None:
                    remove_stored(Path(it.intent["path"]))
                self.state.done(it.id)
                continue
            if it.op != "publish":
                continue
            name, _, version = it.target.rpartition("-")
            remove_stored(Path(it.intent["tmp"]))
            if self.state.image(name, version) is None:
                remove_stored(Path(it.intent["final"]))
            self.state.done(it.id)

    # queries -------------------------------------------------------------------------------
    def entries(self) -> list[CatalogEntry]:
        users = Counter((v.image, v.version) for v in self.state.vms())
        return [CatalogEntry(r, users[(r.name, r.version)]) for r in self.state.images()]

    def resolve(self, track: Track) -> ImageRow:
        """The version ``track`` runs: pinned, or the newest active version of its family that this
        host can run (newer ones it cannot are skipped, logged with why)."""
        rows = self.state.images()
        if media_rows := [r for r in rows if r.name == track.name and kind_of(r.manifest) is not Kind.DISK]:
            kind = kind_of(media_rows[0].manifest)
            raise InputError(f"image: {track} names {kind} media (kind {kind}); a VM's image, a latest track and a "
                             f"rollout take disk images only (kind disk)")
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
                           "kind": str(kind_of(r.manifest)), "firmware": r.manifest.get("firmware"),
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
        if (kind := kind_of(row.manifest)) is not Kind.DISK:
            raise InputError(f"image {row.ref}: kind {kind} media are not a VM's disk (kind disk)")
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
        """Full sha256 check of a stored base or ISO, or of each file of a bundle (invariant 1)."""
        path = Path(row.path)
        if kind_of(row.manifest) is Kind.NETBOOT:
            listed: dict[str, str] = row.manifest.get("files", {})
            stored = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if not p.is_dir())
            return stored == sorted(listed) and all(_sha256(path / n) == s for n, s in listed.items()) \
                and media.listing_sha256(listed) == row.sha256
        return _sha256(path) == row.sha256


def _read_up_to(src: Source, n: int) -> bytes:
    """The first ``n`` bytes of ``src``, fewer only at its end (a read may return less)."""
    buf = bytearray()
    while len(buf) < n and (chunk := src.read(n - len(buf))):
        buf += chunk
    return bytes(buf)


def _copy_hashing(head: bytes, src: Source, dst: Path, total: int | None, bound: int, shown: str,
                  progress: Progress | None, bound_is: str) -> str:
    """Write ``head`` and the rest of ``src`` into the new file ``dst``, fsynced, refusing a file
    over ``bound`` bytes (``bound_is`` says what that bound is); the sha256 of what was written."""
    h = hashlib.sha256()
    done = 0
    try:
        with open(dst, "xb") as fout:
            chunk = head
            while chunk:
                done += len(chunk)
                if done > bound:
                    raise ImageRefused(f"{shown}: larger than {bound} bytes, {bound_is}")
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
