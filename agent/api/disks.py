"""Data disks, for tenants and admins: a tenant lists and purges its own, an admin anyone's (naming
the owner when two tenants have a disk of that name). A disk attached to a VM is never purged."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Query

from agent.api.common import NAME, DaemonDep, Name, Who, disk_view
from agent.errors import InputError, NotFound

if TYPE_CHECKING:
    from agent.host import Host

router = APIRouter(tags=["disks"])


@router.get("/v1/disks")
def disks_list(p: Who, d: DaemonDep) -> list[dict[str, Any]]:
    """Data disks: attached to a VM, or kept for their owner after it was destroyed."""
    host = d.host()
    names = {r.uuid: r.name for r in host.state.vms(owner=None if p.admin else p.name)}
    return [disk_view(disk, names) for disk in host.state.disks(owner=None if p.admin else p.name)]


@router.delete("/v1/disks/{name}")
def disk_purge(p: Who, d: DaemonDep, name: Name,
               owner: Annotated[str | None, Query(pattern=NAME, max_length=63,
                                                  description="admins: whose disk")] = None) -> dict[str, Any]:
    """Delete a kept data disk; one attached to a VM is refused (409)."""
    if not p.admin and owner not in (None, p.name):
        raise NotFound(f"disk {name}: no such disk")
    with d.locked() as host:
        whose = owner or (p.name if not p.admin else _only_owner(host, name))
        disk = host.provisioner.purge_disk(whose, name)
    return {"name": disk.name, "owner": disk.owner, "purged": True}


def _only_owner(host: Host, name: str) -> str:
    """The owner of the only disk of this name; admins name the owner when several have one."""
    owners = [disk.owner for disk in host.state.disks() if disk.name == name]
    if not owners:
        raise NotFound(f"disk {name}: no such disk")
    if len(owners) > 1:
        raise InputError(f"owner: disks named {name} belong to {', '.join(owners)}; name the owner")
    return owners[0]
