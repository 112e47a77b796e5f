"""The VM spec: a YAML file of VMs, validated with messages that name the field."""

from __future__ import annotations

import hashlib
import json
import re
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives.serialization import load_ssh_public_key
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from agent.errors import InputError
from agent.version import Track
from agent.window import Maintenance

NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_KEY_RE = re.compile(
    r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(?:256|384|521)) [A-Za-z0-9+/]+={0,3}(?: [\x21-\x7e][\x20-\x7e]{0,99})?$"
)
MAX_SPEC_BYTES = 1 << 20


class NetMode(StrEnum):
    USER = "user"
    NETWORK = "network"


class Restart(StrEnum):
    ALWAYS = "always"
    ON_FAILURE = "on-failure"
    NEVER = "never"


def check_name(value: str, what: str = "name") -> str:
    if not NAME_RE.match(value):
        raise ValueError(f"{value!r} is not a valid {what}; accepted: 1-63 of [a-z0-9-], "
                         "starting and ending with a letter or digit")
    return value


def check_public_key(value: str) -> str:
    if not isinstance(value, str) or not _KEY_RE.match(value):
        raise ValueError("not an SSH public key; accepted: one line 'TYPE BASE64 [comment]' of type "
                         "ssh-ed25519, ssh-rsa or ecdsa-sha2-nistp256/384/521, without options")
    try:
        load_ssh_public_key(" ".join(value.split()[:2]).encode())
    except (ValueError, TypeError) as e:
        raise ValueError("not an SSH public key: the base64 part does not decode to a key") from e
    return value


class Network(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: NetMode = NetMode.USER
    name: str | None = Field(None, description="libvirt network (mode network)")
    bridge: str | None = Field(None, description="host bridge (mode network)")

    @field_validator("name", "bridge")
    @classmethod
    def _ident(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$", v):
            raise ValueError("accepted: up to 15 of [A-Za-z0-9_.-]")
        return v

    @model_validator(mode="after")
    def _one(self) -> Network:
        if self.mode is NetMode.USER and (self.name or self.bridge):
            raise ValueError("mode user takes neither name nor bridge")
        if self.mode is NetMode.NETWORK and (self.name is None) == (self.bridge is None):
            raise ValueError("mode network needs exactly one of name or bridge")
        return self


class Health(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    command: str | None = Field(None, max_length=1024, description="run in the guest; must exit 0")
    timeout: StrictInt | StrictFloat = Field(120.0, gt=0, le=3600, description="seconds to become healthy")


class VmSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: StrictStr
    owner: StrictStr
    image: StrictStr = Field(description="track: tiny-1.18 (pinned) or tiny-1.* (latest in family 1)")
    cpus: StrictInt = Field(1, ge=1, le=64)
    memory: StrictInt = Field(256, ge=64, le=1 << 20, description="MiB")
    data_disk: StrictInt = Field(0, ge=0, le=65536, description="GiB; 0 for none")
    ssh_keys: tuple[StrictStr, ...] = Field(min_length=1, max_length=32)
    network: Network = Network()
    health: Health = Health()
    restart: Restart = Restart.ALWAYS
    maintenance: Maintenance | None = Field(None, description="when a latest-track swap may take it down; "
                                            "default: the host's window, else any time")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v)

    @field_validator("owner")
    @classmethod
    def _owner(cls, v: str) -> str:
        return check_name(v, "owner")

    @field_validator("image")
    @classmethod
    def _image(cls, v: str) -> str:
        try:
            Track.parse(v)
        except InputError as e:
            raise ValueError(e.message.split(": ", 1)[1]) from e
        return v

    @field_validator("ssh_keys")
    @classmethod
    def _keys(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for key in v:
            check_public_key(key)
        return v

    @property
    def track(self) -> Track:
        return Track.parse(self.image)

    def digest(self) -> str:
        # without maintenance when it has none: specs from before windows keep their digest
        dump = self.model_dump(mode="json", exclude={"maintenance"} if self.maintenance is None else None)
        return hashlib.sha256(json.dumps(dump, sort_keys=True).encode()).hexdigest()


class Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    vms: tuple[VmSpec, ...]

    @model_validator(mode="after")
    def _unique(self) -> Spec:
        seen: set[str] = set()
        for i, vm in enumerate(self.vms):
            if vm.name in seen:
                raise ValueError(f"vms[{i}].name: duplicate VM name {vm.name!r}")
            seen.add(vm.name)
        return self


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse_spec(data: Any, source: str = "spec") -> Spec:
    if not isinstance(data, dict):
        raise InputError(f"{source}: a spec is a mapping with a list 'vms'")
    try:
        return Spec.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        where = _loc(tuple(err["loc"]))
        raise InputError(f"{source}: {where}: {msg}" if where else f"{source}: {msg}") from e


def load_spec(path: Path) -> Spec:
    try:
        if path.stat().st_size > MAX_SPEC_BYTES:
            raise InputError(f"{path}: spec is larger than 1 MiB")
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise InputError(f"{path}: cannot read spec ({e.strerror})") from e
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML ({e.__class__.__name__})") from e
    return parse_spec(data, str(path))
