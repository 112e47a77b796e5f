"""VMs, for tenants and admins: a tenant creates and drives its own VMs only (user networking,
within its quota), an admin any VM for any owner; ``/v1/apply`` (admins only) converges to a spec.
Console output and events follow the same ownership.

A VM request is the VM spec without its owner (the token says who) and, for tenants, without a
network choice (tenants get user networking with one forwarded port).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import PlainTextResponse
from pydantic import Field, StrictStr, ValidationError, field_validator

from agent.api.common import NAME, Admin, DaemonDep, Name, Who, own, validation_line, vm_view
from agent.errors import Conflict, Forbidden, InputError
from agent.provision import VmPaths
from agent.seed import fingerprint
from agent.spec import NetMode, Spec, VmSpec, check_name
from agent.state import VmState

if TYPE_CHECKING:
    from agent.daemon import Principal
    from agent.host import Host

CONSOLE_MAX = 1 << 20

router = APIRouter()


class VmRequest(VmSpec):
    """A VM to create: the spec without its owner (the token says who; admins may name one)."""

    owner: StrictStr | None = Field(None, description="admins only: the tenant that owns the VM")  # type: ignore[assignment]

    @field_validator("owner")
    @classmethod
    def _owner(cls, v: str | None) -> str | None:  # type: ignore[override]
        return None if v is None else check_name(v, "owner")


@router.get("/v1/vms", tags=["vms"])
def vms_list(p: Who, d: DaemonDep) -> list[dict[str, Any]]:
    rows = d.host().state.vms(owner=None if p.admin else p.name)
    return [vm_view(r, p.admin) for r in rows]


@router.post("/v1/vms", tags=["vms"], status_code=202)
def vm_create(p: Who, d: DaemonDep, body: VmRequest) -> dict[str, Any]:
    """Create a VM from a track; 202: it boots, and its state becomes running (or failed)."""
    if p.admin:
        if body.owner is None:
            raise InputError("owner: admins name the tenant that owns the VM")
        owner = body.owner
    else:
        if body.owner not in (None, p.name):
            raise Forbidden("owner: a tenant creates VMs for itself only")
        if body.network.mode is not NetMode.USER:
            raise Forbidden("network: tenants get user networking; ask an operator for another network")
        owner = p.name
    try:
        spec = VmSpec.model_validate({**body.model_dump(mode="json"), "owner": owner})
    except ValidationError as e:
        raise InputError(validation_line(e.errors())) from e
    with d.locked() as host:
        existing = host.state.vm(spec.name)
        if existing is not None:
            raise Conflict(f"vm {spec.name}: the name is taken; choose another")
        if not p.admin:
            check_quota(host, p, spec)
        row = host.provisioner.create(spec)
    d.watch_health(row.name)
    return vm_view(row, p.admin)


@router.post("/v1/apply", tags=["vms"], status_code=202)
def apply(_: Admin, d: DaemonDep, body: Spec,
          source: Annotated[str, Query(max_length=256, pattern=r"^[\x20-\x7e]*$")] = "spec") -> dict[str, Any]:
    """Converge to a spec (the CLI's ``apply``): create the VMs the host lacks; all checked first."""
    notes: list[str] = []
    with d.locked() as host:
        created = host.apply(body, source, notes=notes.append)
    for name in created:
        d.watch_health(name)
    return {"created": created, "notes": notes}


@router.get("/v1/vms/{name}", tags=["vms"])
def vm_get(p: Who, d: DaemonDep, name: Name) -> dict[str, Any]:
    return vm_view(own(d.host(), p, name), p.admin)


@router.get("/v1/vms/{name}/hostkey", tags=["vms"])
def vm_hostkey(p: Who, d: DaemonDep, name: Name) -> dict[str, str]:
    """The guest's SSH host public key (hvagent made it and put it in the seed), its fingerprint
    (what the owner's known_hosts line holds, for strict host key checking) and the image's login."""
    host = d.host()
    row = own(host, p, name)
    private = VmPaths.of(d.cfg, row.name).host_key
    key = " ".join(private.with_name(private.name + ".pub").read_text().split()[:2])
    user = host.provisioner.endpoint_user(row)
    return {"name": row.name, "key": key, "fingerprint": fingerprint(key), "user": user}


@router.delete("/v1/vms/{name}", tags=["vms"])
def vm_delete(p: Who, d: DaemonDep, name: Name, purge: bool = False) -> dict[str, Any]:
    """Destroy the VM; its data disk is kept unless purge=true."""
    with d.locked() as host:
        own(host, p, name)
        host.provisioner.destroy(name, purge=purge)
    return {"name": name, "deleted": True, "purged": purge}


@router.post("/v1/vms/{name}/stop", tags=["vms"])
def vm_stop(p: Who, d: DaemonDep, name: Name) -> dict[str, Any]:
    """ACPI shutdown (forced off after shutdown_timeout); it stays off until started. The VM is
    ``stopping`` meanwhile and ``stopped`` once off; a shutdown that fails leaves it as it was."""
    with d.locked() as host:
        own(host, p, name)
        row = host.provisioner.stop(name, by=p.name, lock=host.lock)  # lets go of the lock meanwhile
    return vm_view(row, p.admin)


@router.post("/v1/vms/{name}/start", tags=["vms"], status_code=202)
def vm_start(p: Who, d: DaemonDep, name: Name) -> dict[str, Any]:
    with d.locked() as host:
        row = own(host, p, name)
        if row.state not in (VmState.STOPPED, VmState.FAILED, VmState.RUNNING):
            raise Conflict(f"vm {name}: is {row.state}; try again when it settles")
        host.virt.start(name)
        if row.state is not VmState.RUNNING:
            host.state.update_vm(name, state=VmState.PROVISIONING, reason=None)
            host.state.event("vm.starting", f"requested by {p.name}", vm=name)
    if row.state is not VmState.RUNNING:
        d.watch_health(name)
    return vm_view(host.provisioner.row(name), p.admin)


@router.post("/v1/vms/{name}/reboot", tags=["vms"])
def vm_reboot(p: Who, d: DaemonDep, name: Name) -> dict[str, Any]:
    with d.locked() as host:
        row = own(host, p, name)
        if row.state is not VmState.RUNNING:
            raise Conflict(f"vm {name}: is {row.state}, not running")
        host.virt.reboot(name)
        host.state.event("vm.reboot", f"requested by {p.name}", vm=name)
    return vm_view(row, p.admin)


@router.get("/v1/vms/{name}/console", tags=["vms"], response_class=PlainTextResponse)
def vm_console(p: Who, d: DaemonDep, name: Name,
               tail: Annotated[int, Query(ge=1, le=CONSOLE_MAX, description="last bytes")] = 65536) -> str:
    """The guest's serial console output (the last ``tail`` bytes)."""
    row = own(d.host(), p, name)
    path = VmPaths.of(d.cfg, name).console(row.uuid)  # this VM's own log, by its UUID
    try:
        with path.open("rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - tail))
            return f.read(tail).decode(errors="replace")
    except FileNotFoundError:
        return ""


@router.get("/v1/events", tags=["events"])
def events(p: Who, d: DaemonDep, vm: Annotated[str | None, Query(pattern=NAME, max_length=63)] = None,
           limit: Annotated[int, Query(ge=1, le=10000)] = 1000) -> list[dict[str, Any]]:
    """Events, oldest first. A tenant sees those of its own VMs (by owner, so never those of an
    earlier VM of the same name that someone else owned) and of its disks."""
    host = d.host()
    evs = host.state.events(vm, limit, owner=None if p.admin else p.name)
    if vm is not None and not evs:
        own(host, p, vm)  # 404 for a name the caller has no VM and no history of
    return [{"ts": e.ts, "vm": e.vm, "kind": e.kind, "message": e.message, "duration": e.duration,
             **({"owner": e.owner, "uuid": e.vm_uuid} if p.admin else {})} for e in evs]


def check_quota(host: Host, p: Principal, spec: VmSpec) -> None:
    mine = [VmSpec.model_validate(r.spec) for r in host.state.vms(owner=p.name)]
    q = p.quota
    if len(mine) + 1 > q.vms:
        raise Forbidden(f"quota: vms: {p.name} may have {q.vms} VM(s) and has {len(mine)}")
    cpus = sum(s.cpus for s in mine) + spec.cpus
    if cpus > q.cpus:
        raise Forbidden(f"quota: cpus: {cpus} vCPUs would exceed {p.name}'s quota of {q.cpus}")
    memory = sum(s.memory for s in mine) + spec.memory
    if memory > q.memory:
        raise Forbidden(f"quota: memory: {memory} MiB would exceed {p.name}'s quota of {q.memory} MiB")
    disk = host.provisioner.disk_use(p.name) + host.provisioner.new_disk_gib(spec)
    if disk > q.disk_gib:
        raise Forbidden(f"quota: disk_gib: {disk} GiB of data disks (kept disks included) would exceed "
                        f"{p.name}'s quota of {q.disk_gib} GiB")
