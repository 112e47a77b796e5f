"""Host configuration: one frozen, typed model; defaults and help live here only."""

from __future__ import annotations

import ipaddress
import os
import re
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.errors import InputError
from agent.spec import check_name
from agent.window import Maintenance

DEFAULT_CONFIG = Path("/etc/hvagent/config.yaml")
GiB = 1 << 30


class Accel(StrEnum):
    AUTO = "auto"
    KVM = "kvm"
    QEMU = "qemu"


class Role(StrEnum):
    ADMIN = "admin"    # operators and image pipelines: images, rollouts, host facts, every VM
    TENANT = "tenant"  # its own VMs, within its quota


class Quota(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    vms: int = Field(4, ge=0, description="VMs the tenant may have")
    cpus: int = Field(8, ge=0, description="vCPUs over all its VMs")
    memory: int = Field(4096, ge=0, description="MiB of memory over all its VMs")
    disk_gib: int = Field(64, ge=0, description="GiB of data disks over all its VMs and its kept disks")


class Token(BaseModel):
    """An API bearer token, stored only as its sha256 (``hvagent token new`` prints both)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="the principal; a tenant's name is the owner of its VMs")
    role: Role
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex sha256 of the token")
    expires: datetime | None = Field(None, description="UTC time after which the token is refused")
    quota: Quota = Quota()

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "token name")


class Tls(BaseModel):
    """The API's TLS: uvicorn serves every ``api.listen`` address with it, and only with it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cert: Path = Field(description="server certificate, with its chain (PEM)")
    key: Path = Field(description="its private key (PEM)")
    client_ca: Path | None = Field(None, description="CA certificates (PEM): clients must present a certificate "
                                   "one of them signed, besides their token")


def listen_address(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (an IPv4 address, ``[IPv6]`` or ``localhost``) -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{value!r}: accepted: HOST:PORT with a port from 1 to 65535 (0.0.0.0:8470, [::]:8470)")
    if host == "localhost":
        return host, int(port)
    literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        addr = ipaddress.ip_address(literal)
    except ValueError:
        raise ValueError(f"{value!r}: the host is an IP address ([...] for IPv6) or localhost") from None
    if addr.version == 6 and literal == host:
        raise ValueError(f"{value!r}: write an IPv6 address in brackets: [{literal}]:{port}")
    return literal, int(port)


def is_loopback(host: str) -> bool:
    return host == "localhost" or ipaddress.ip_address(host).is_loopback


class Api(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    socket: Path = Field(Path("/run/hvagent/api.sock"), description="Unix socket of the API, mode 0660")
    socket_group: str | None = Field(None, description="group owning the socket (e.g. hvagent)")
    tcp: str | None = Field(None, pattern=r"^(?:127(?:\.[0-9]{1,3}){3}|\[::1\]|localhost):[0-9]{1,5}$",
                            description="plain HTTP on a loopback address for local tools, e.g. 127.0.0.1:8470")
    listen: tuple[str, ...] = Field((), max_length=16, description="addresses the API serves, HOST:PORT; with "
                                    "tls, over TLS only; without it, loopback addresses only")
    tls: Tls | None = Field(None, description="certificate and key for api.listen (and a client CA)")
    auth_failures: int = Field(5, ge=1, le=1000, description="failed authentications per peer address and "
                               "minute; beyond them the peer gets 429 until the minute has passed")
    tokens: tuple[Token, ...] = ()
    max_body: int = Field(1 << 20, gt=0, description="largest JSON request body, bytes")

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for address in v:
            listen_address(address)
        return v

    @model_validator(mode="after")
    def _tls_beyond_loopback(self) -> Api:
        if self.tls is None:
            for address in self.listen:
                if not is_loopback(listen_address(address)[0]):
                    raise ValueError(f"listen: {address} is not a loopback address; serving it needs api.tls "
                                     "(cert and key): tokens never cross a network in clear text")
        elif self.tcp is not None:
            raise ValueError("tcp: plain HTTP beside api.tls; list the address in api.listen, where it is "
                             "served over TLS")
        return self


class Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    state_dir: Path = Field(Path("/var/lib/hvagent"), description="SQLite state, VM disks and seeds")
    store_dir: Path | None = Field(None, description="image store; default STATE_DIR/images")
    libvirt_uri: str = Field("qemu:///system", description="libvirt connection URI")
    accelerator: Accel = Field(Accel.AUTO, description="auto: KVM only if a probe guest runs under KVM")
    max_virtual_size: int = Field(64 * GiB, gt=0, description="largest image virtual size accepted")
    max_data_disk_gib: int = Field(512, gt=0, description="largest data disk a spec may ask for")
    capacity_vcpus: int | None = Field(None, gt=0, description="vCPUs all VMs may have; default 4 per host CPU")
    capacity_memory_mib: int | None = Field(
        None, gt=0, description="MiB all VMs may have; default the host's memory less 1 GiB")
    capacity_disk_gib: int | None = Field(
        None, gt=0, description="GiB of data disks all VMs may have; default the state filesystem's size")
    port_min: int = Field(22200, ge=1024, le=65535, description="first 127.0.0.1 port for SSH forwards")
    port_max: int = Field(22999, ge=1024, le=65535, description="last 127.0.0.1 port for SSH forwards")
    health_timeout: float = Field(120.0, gt=0, description="seconds a VM has to become healthy; caps a spec's "
                                  "health.timeout")
    shutdown_timeout: float = Field(30.0, gt=0, description="seconds of ACPI shutdown before forcing off")
    rollout_policy: Literal["auto", "manual"] = Field(
        "auto", description="auto: publishing a family's newest version swaps its latest-track VMs")
    max_unavailable: str = Field("1", pattern=r"^(?:[1-9][0-9]{0,5}|(?:100|[1-9][0-9]?)%)$",
                                 description="VMs swapped at once in a rollout: a count or a percentage")
    maintenance: Maintenance | None = Field(None, description="when latest-track swaps may take VMs down "
                                            "(a VM's own window wins): {window: \"Sat 02:00-04:00\", tz: UTC}")
    canary: bool = Field(True, description="boot a rollout's version once on a throwaway VM before the first "
                         "batch; a failure there marks it bad and no tenant VM goes down")
    keep_images: int = Field(2, ge=1, description="newest versions of each family kept by garbage collection")
    ssh_key: Path | None = Field(None, description="hvagent's own SSH key; default STATE_DIR/id_ed25519")
    api: Api = Api()
    inbox_dir: Path | None = Field(None, description="publish hook: the daemon publishes FILE.qcow2 + FILE.yaml "
                                   "moved here; default STATE_DIR/inbox")
    reconcile_interval: float = Field(10.0, gt=0, le=3600, description="seconds between reconcile passes")
    events_keep_days: float = Field(30.0, gt=0, description="events older than this are dropped")
    events_keep_max: int = Field(100_000, ge=100, description="events beyond the newest this many are dropped")

    @property
    def store(self) -> Path:
        return self.store_dir or self.state_dir / "images"

    @property
    def vm_dir(self) -> Path:
        return self.state_dir / "vms"

    @property
    def data_dir(self) -> Path:
        """Data disks, one directory per owner: STATE_DIR/data/OWNER/NAME.qcow2."""
        return self.state_dir / "data"

    @property
    def db_path(self) -> Path:
        return self.state_dir / "state.db"

    @property
    def accel_cache(self) -> Path:
        """The accelerator probe's answer, with the boot it was made in (agent.host)."""
        return self.state_dir / "accel.json"

    @property
    def inbox(self) -> Path:
        return self.inbox_dir or self.state_dir / "inbox"

    @property
    def local_token(self) -> Path:
        """Written by the daemon at start (0600): the local CLI's admin token."""
        return self.state_dir / "api.token"

    @property
    def agent_key(self) -> Path:
        return self.ssh_key or self.state_dir / "id_ed25519"


def config_file(path: Path | None = None) -> Path | None:
    """The configuration file in effect: PATH, else $HVAGENT_CONFIG, else /etc/hvagent/config.yaml if it exists."""
    env = os.environ.get("HVAGENT_CONFIG")
    return path or (Path(env) if env else None) or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)


def load(path: Path | None = None, **overrides: object) -> Config:
    """Read the configuration file (if any), then apply non-None overrides."""
    source = config_file(path)
    data: dict[str, object] = {}
    if source is not None:
        try:
            loaded = yaml.safe_load(source.read_text())
        except OSError as e:
            raise InputError(f"{source}: cannot read configuration ({e.strerror})") from e
        except yaml.YAMLError as e:
            raise InputError(f"{source}: not valid YAML ({e.__class__.__name__})") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise InputError(f"{source}: configuration must be a mapping of settings")
        data.update(loaded or {})
    if "HVAGENT_STATE_DIR" in os.environ and "state_dir" not in overrides:
        data["state_dir"] = os.environ["HVAGENT_STATE_DIR"]
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        head, sep, rest = msg.partition(": ")
        if field and sep and re.fullmatch(r"[a-z_]+", head):  # a model's check naming one of its fields
            field, msg = f"{field}.{head}", rest
        raise InputError(f"{source or 'configuration'}: {field}: {msg}" if field else
                         f"{source or 'configuration'}: {msg}") from e
    if cfg.port_min > cfg.port_max:
        raise InputError(f"{source or 'configuration'}: port_min must not exceed port_max")
    return cfg
