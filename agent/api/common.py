"""What every router shares: who is calling (``Who``, ``Admin``), the daemon, VM names, and views.

A tenant asking for another tenant's VM gets the same 404 as for a VM that does not exist
(``own``), so names do not leak.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

from fastapi import Depends, Request
from fastapi import Path as PathParam
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import HTTPConnection

from agent.daemon import Daemon, Principal
from agent.errors import Forbidden, NotFound, Unauthorized
from agent.spec import NAME_RE
from agent.state import DiskRow, RolloutRow, VmRow

if TYPE_CHECKING:
    from agent.host import Host

T = TypeVar("T")

NAME = NAME_RE.pattern  # the spec's VM-name pattern, for OpenAPI


# -- principals and the daemon -----------------------------------------------------------------
bearer = HTTPBearer(auto_error=False, description="a token from the configuration's api.tokens")


def principal(request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Principal:
    return _authenticated(request, creds)


async def caller(conn: HTTPConnection) -> Principal:
    """Who sends a request or a WebSocket handshake, as ``Who`` decides for a request (FastAPI gives
    a WebSocket route no ``Request``: the relay and the pre-body gate ask here)."""
    return _authenticated(conn, await bearer(conn))


def _authenticated(conn: HTTPConnection, creds: HTTPAuthorizationCredentials | None) -> Principal:
    if creds is None:
        raise Unauthorized("authorization: missing bearer token (Authorization: Bearer TOKEN)")
    daemon: Daemon = conn.app.state.daemon
    return daemon.authenticate(creds.credentials)


def admin(p: Annotated[Principal, Depends(principal)]) -> Principal:
    if not p.admin:
        raise Forbidden("authorization: this call needs an admin token")
    return p


async def daemon(request: Request) -> Daemon:
    """The daemon the app serves (``create_app`` puts it in the app's state)."""
    d: Daemon = request.app.state.daemon
    return d


Who = Annotated[Principal, Depends(principal)]
Admin = Annotated[Principal, Depends(admin)]
DaemonDep = Annotated[Daemon, Depends(daemon)]
Name = Annotated[str, PathParam(pattern=NAME, max_length=63, description="VM name")]


def own(host: Host, p: Principal, name: str) -> VmRow:
    row = host.state.vm(name)
    if row is None or not (p.admin or row.owner == p.name):
        raise NotFound(f"vm {name}: no such VM")
    return row


# -- views -------------------------------------------------------------------------------------
def vm_view(row: VmRow, admin: bool) -> dict[str, Any]:
    # The stored spec was validated and dumped (JSON mode) when the VM was created: read it as it
    # is, not validated again per listing (its keys would be parsed by cryptography each time).
    spec = row.spec
    view: dict[str, Any] = {
        "name": row.name, "owner": row.owner, "track": row.track, "image": row.image, "version": row.version,
        "state": row.state.value, "reason": row.reason, "cpus": spec["cpus"], "memory": spec["memory"],
        "data_disk": spec["data_disk"], "restart": spec["restart"],
        "ssh": f"127.0.0.1:{row.host_port}" if row.host_port else None,
        "created_at": row.created_at, "updated_at": row.updated_at,
    }
    if admin:
        view["uuid"] = row.uuid
    return view


def rollout_view(host: Host, ro: RolloutRow) -> dict[str, Any]:
    return {"id": ro.id, "family": ro.family_ref, "target": ro.target, "state": ro.state.value,
            "canary": ro.canary, "max_unavailable": ro.max_unavailable, "reason": ro.reason,
            "created_at": ro.created_at,
            "vms": [{"vm": s.vm, "batch": s.batch + 1, "from": s.from_version, "state": s.state.value,
                     "downtime": s.downtime, "reason": s.reason} for s in host.state.steps(ro.id)]}


def disk_view(disk: DiskRow, vm_names: dict[str, str]) -> dict[str, Any]:
    """``vm_names``: VM names by UUID (one listing for all the disks shown)."""
    return {"name": disk.name, "owner": disk.owner, "size_gib": disk.size_gib,
            "vm": vm_names.get(disk.vm_uuid or ""), "state": disk.state, "created_at": disk.created_at}


def validation_line(errors: Any) -> str:
    """The first validation error as ``where: what`` (the body's field path, without 'body')."""
    if not errors:
        return "request: invalid"
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ())[1 if err.get("loc", ("",))[0] == "body" else 0:]]
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    return f"{'.'.join(loc) or 'body'}: {msg}"


# -- streams -----------------------------------------------------------------------------------
async def first_done(*coros: Coroutine[Any, Any, T]) -> T | BaseException:
    """Run both directions of a stream until one ends; cancel the others and wait for them.
    The first one's result, or what it raised (a caller that went away, a broken pipe)."""
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    return results[tasks.index(done.pop())]
