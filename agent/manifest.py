"""The image manifest: what the pipeline says about a qcow2 file, checked field by field.

Installer media have manifests too (``MediaManifest``): an El Torito ISO (``kind: installer``,
``format: iso``) or a PXE bundle (``kind: netboot``, ``format: pxe``: a directory whose files
the manifest lists, each with its sha256). They are catalogued beside the disk images, under
names of their own, and never become a VM's disk."""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Any, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.compat import Device, Needs, parse_qemu_version
from agent.domxml import Firmware
from agent.errors import InputError
from agent.version import Version, check_image_name

_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MAX_MANIFEST_BYTES = 1 << 20
# A file of a netboot bundle: a relative path of plain names (no "..", no hidden files), as TFTP serves it.
_BUNDLE_PART_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}$")
MAX_BUNDLE_DEPTH = 8
MAX_BUNDLE_FILES = 1024


class Kind(StrEnum):
    """What a catalog entry is: a VM's disk, or media that install one (point 2's ``install:``)."""

    DISK = "disk"
    INSTALLER = "installer"
    NETBOOT = "netboot"


MEDIA_FORMATS = {Kind.INSTALLER: "iso", Kind.NETBOOT: "pxe"}


def check_bundle_name(name: str) -> str:
    """A bundle file's name as the manifest lists it; ValueError naming it otherwise."""
    parts = name.split("/")
    if len(parts) > MAX_BUNDLE_DEPTH or not all(_BUNDLE_PART_RE.match(p) for p in parts):
        raise ValueError(f"{name!r} is not a file inside the bundle; accepted: a relative path of names of "
                         f"letters, digits, '.', '_', '+' and '-' (not starting with '.' or '-'), "
                         f"at most {MAX_BUNDLE_DEPTH} deep")
    return name


class _Common(BaseModel):
    """What disk and media manifests share, checked the same way."""

    # Unknown keys are refused, named: a misspelt ``guest_verison_id`` would otherwise be dropped
    # without a word, and the check it asked for never made.
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    family: int = Field(ge=0, le=999999)
    version: str
    sha256: str
    format: str
    machine: str = "q35"
    min_qemu: str = "7.2"
    kernel_flavour: str | None = None
    built_at: str | None = None
    build_id: str | None = None
    packages: dict[str, str] = Field(default_factory=dict)
    # Devices the guest needs beyond those every hvagent domain has (agent.compat.BASE_DEVICES).
    devices: tuple[Device, ...] = ()

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_image_name(v, "name")

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        Version.parse(v)
        return v

    @field_validator("sha256")
    @classmethod
    def _sha(cls, v: str) -> str:
        if not _SHA_RE.match(v):
            raise ValueError("must be 64 lowercase hex digits")
        return v

    @field_validator("machine")
    @classmethod
    def _machine(cls, v: str) -> str:
        if v != "q35":
            raise ValueError("only q35 is supported")
        return v

    @field_validator("min_qemu")
    @classmethod
    def _min_qemu(cls, v: str) -> str:
        parse_qemu_version(v)
        return v

    @field_validator("devices", mode="before")
    @classmethod
    def _devices(cls, v: object) -> object:
        names = [d.value for d in Device]
        accepted = ", ".join(names)
        if not isinstance(v, list | tuple):
            raise ValueError(f"must be a list of device names; accepted: {accepted}")
        for item in v:
            if item not in names:
                raise ValueError(f"{item!r} is not a device hvagent checks; accepted: {accepted}")
        return v

    @field_validator("build_id")
    @classmethod
    def _build_id(cls, v: str | None) -> str | None:
        if v is not None and not _ID_RE.match(v):
            raise ValueError("accepted: letters, digits, '.', '_' and '-' (up to 64)")
        return v

    @property
    def parsed_version(self) -> Version:
        return Version.parse(self.version)

    @property
    def ref(self) -> str:
        return f"{self.name}-{self.version}"


class Manifest(_Common):
    """A disk image's manifest: a qcow2 file a VM's overlay is based on."""

    kind: Kind = Kind.DISK
    variant: str = "ok"
    virtual_size: int = Field(gt=0)
    firmware: Firmware
    ssh_user: str = "root"
    guest_version_id: str | None = None
    os_release_id: str | None = None

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: Kind) -> Kind:
        if v is not Kind.DISK:
            raise ValueError(f"a disk image's manifest says kind: disk, not {v}")
        return v

    @field_validator("format")
    @classmethod
    def _format(cls, v: str) -> str:
        if v != "qcow2":
            raise ValueError("only qcow2 is accepted")
        return v

    @field_validator("ssh_user", "variant")
    @classmethod
    def _ident(cls, v: str) -> str:
        if not re.match(r"^[a-z_][a-z0-9_-]{0,31}$", v):
            raise ValueError("must be a lowercase identifier")
        return v

    @field_validator("guest_version_id", "os_release_id")
    @classmethod
    def _opt_ident(cls, v: str | None) -> str | None:
        if v is not None and not _ID_RE.match(v):
            raise ValueError("accepted: letters, digits, '.', '_' and '-' (up to 64)")
        return v

    @property
    def expected_version_id(self) -> str:
        """What the guest's /etc/os-release VERSION_ID must say (third-party images differ)."""
        return self.guest_version_id or self.version


class MediaManifest(_Common):
    """Installer media: an ISO (kind installer) or a PXE bundle (kind netboot), what
    images/build-installer writes. ``sha256`` is the ISO's; a bundle's is that of its SHA256SUMS
    listing (``agent.media.listing``), each file's own sha256 being in ``files``."""

    kind: Kind
    firmware: tuple[Firmware, ...] = Field(min_length=1)
    size: int | None = Field(None, gt=0)           # the ISO's bytes
    boot: dict[Firmware, str] = Field(default_factory=dict)  # the ISO's bootloader per firmware
    cmdline: str | None = Field(None, max_length=4096)
    bootfile: str | None = None                    # a bundle's: what DHCP names, served by TFTP
    kernel: str | None = None
    initrd: str | None = None
    files: dict[str, str] = Field(default_factory=dict, max_length=MAX_BUNDLE_FILES)
    # What the media install (read by a later ``install:``); kept as the pipeline wrote it.
    installs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("cmdline")
    @classmethod
    def _cmdline(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^[\x20-\x7e]*$", v):
            raise ValueError("must be one line of printable ASCII")
        return v

    @field_validator("bootfile", "kernel", "initrd")
    @classmethod
    def _member(cls, v: str | None) -> str | None:
        return None if v is None else check_bundle_name(v)

    @field_validator("files")
    @classmethod
    def _files(cls, v: dict[str, str]) -> dict[str, str]:
        for name, sha in v.items():
            check_bundle_name(name)
            if not _SHA_RE.match(sha):
                raise ValueError(f"{name}: sha256 must be 64 lowercase hex digits")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.kind is Kind.DISK:
            raise ValueError("kind: disk is a disk image's manifest (virtual_size, a single firmware)")
        if self.format != MEDIA_FORMATS[self.kind]:
            raise ValueError(f"format: kind {self.kind} takes format {MEDIA_FORMATS[self.kind]}, not {self.format}")
        if self.kind is Kind.NETBOOT:
            if not self.files:
                raise ValueError("files: a netboot bundle lists its files (name: sha256)")
            for key in ("bootfile", "kernel", "initrd"):
                value = getattr(self, key)
                if value is None:
                    raise ValueError(f"{key}: a netboot bundle names it")
                if value not in self.files:
                    raise ValueError(f"{key}: {value} is not among the bundle's files")
            if self.size is not None or self.boot:
                raise ValueError("size, boot: an installer ISO's keys, not a netboot bundle's")
        elif self.files or self.bootfile or self.kernel or self.initrd:
            raise ValueError("files, bootfile, kernel, initrd: a netboot bundle's keys, not an installer ISO's")
        elif self.size is None:  # without it a bogus tail would be copied whole before the sha256 refused it
            raise ValueError("size: an installer ISO's manifest gives its size in bytes")
        return self

    @property
    def needs(self) -> Needs:
        """What booting the media needs from the host: BIOS when the media boot on it, else UEFI."""
        firmware = Firmware.BIOS if Firmware.BIOS in self.firmware else Firmware.UEFI
        return Needs(self.min_qemu, self.machine, firmware, self.devices)


AnyManifest = Manifest | MediaManifest


def kind_of(manifest: dict[str, Any]) -> Kind:
    """The kind of a stored manifest (a catalog row's; rows from before media are disks)."""
    return Kind(manifest.get("kind", Kind.DISK))


def load_manifest(path: Path) -> Manifest:
    """A disk image's manifest; media manifests are refused (``load_any_manifest`` takes them)."""
    m = load_any_manifest(path)
    if not isinstance(m, Manifest):
        raise InputError(f"{path}: kind: {m.kind} media are not a disk image; a disk image's manifest says "
                         "kind: disk (or no kind)")
    return m


def load_any_manifest(path: Path) -> AnyManifest:
    """A disk image's manifest, or installer media's (by its ``kind``)."""
    try:
        if path.is_symlink() or not path.is_file():
            raise InputError(f"{path}: manifest must be a regular file")
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise InputError(f"{path}: manifest is larger than 1 MiB")
        data: Any = yaml.safe_load(path.read_text())
    except OSError as e:
        raise InputError(f"{path}: cannot read manifest ({e.strerror})") from e
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: manifest is not UTF-8 text (YAML)") from e
    except yaml.YAMLError as e:
        raise InputError(f"{path}: manifest is not valid YAML") from e
    if not isinstance(data, dict):
        raise InputError(f"{path}: manifest must be a YAML mapping")
    if isinstance(data.get("version"), (int, float)):
        raise InputError(f"{path}: version: write it as a string, e.g. version: \"1.18\"")
    kinds = ", ".join(Kind)
    try:
        kind = Kind(data.get("kind", Kind.DISK))
    except ValueError:
        raise InputError(f"{path}: kind: {str(data.get('kind'))[:64]!r} is not a kind; accepted: {kinds}") from None
    model: type[Manifest] | type[MediaManifest] = Manifest if kind is Kind.DISK else MediaManifest
    try:
        m = model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            of = "" if kind is Kind.DISK else f" for kind {kind}"
            raise InputError(f"{path}: {field}: unknown key; accepted{of}: {', '.join(model.model_fields)}") from e
        if not field:  # a check across fields names its field in its message
            raise InputError(f"{path}: {err['msg'].removeprefix('Value error, ')}") from e
        raise InputError(f"{path}: {field}: {err['msg']}") from e
    if m.parsed_version.family != m.family:
        raise InputError(f"{path}: version {m.version} is not in family {m.family}")
    return m
