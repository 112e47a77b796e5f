"""The image manifest: what the pipeline says about a qcow2 file, checked field by field."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.compat import Device, parse_qemu_version
from agent.domxml import Firmware
from agent.errors import InputError
from agent.version import Version, check_image_name

_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MAX_MANIFEST_BYTES = 1 << 20


class Manifest(BaseModel):
    # Unknown keys are refused, named: a misspelt ``guest_verison_id`` would otherwise be dropped
    # without a word, and the check it asked for never made.
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    family: int = Field(ge=0, le=999999)
    version: str
    variant: str = "ok"
    sha256: str
    format: str
    virtual_size: int = Field(gt=0)
    firmware: Firmware
    machine: str = "q35"
    min_qemu: str = "7.2"
    ssh_user: str = "root"
    guest_version_id: str | None = None
    os_release_id: str | None = None
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

    @field_validator("format")
    @classmethod
    def _format(cls, v: str) -> str:
        if v != "qcow2":
            raise ValueError("only qcow2 is accepted")
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

    @field_validator("ssh_user", "variant")
    @classmethod
    def _ident(cls, v: str) -> str:
        if not re.match(r"^[a-z_][a-z0-9_-]{0,31}$", v):
            raise ValueError("must be a lowercase identifier")
        return v

    @field_validator("guest_version_id", "os_release_id", "build_id")
    @classmethod
    def _opt_ident(cls, v: str | None) -> str | None:
        if v is not None and not _ID_RE.match(v):
            raise ValueError("accepted: letters, digits, '.', '_' and '-' (up to 64)")
        return v

    @property
    def parsed_version(self) -> Version:
        return Version.parse(self.version)

    @property
    def expected_version_id(self) -> str:
        """What the guest's /etc/os-release VERSION_ID must say (third-party images differ)."""
        return self.guest_version_id or self.version

    @property
    def ref(self) -> str:
        return f"{self.name}-{self.version}"


def load_manifest(path: Path) -> Manifest:
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
    try:
        m = Manifest.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            raise InputError(f"{path}: {field}: unknown key; accepted: {', '.join(Manifest.model_fields)}") from e
        raise InputError(f"{path}: {field}: {err['msg']}") from e
    if m.parsed_version.family != m.family:
        raise InputError(f"{path}: version {m.version} is not in family {m.family}")
    return m
