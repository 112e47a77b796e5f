"""The HTTP API (FastAPI): admins drive images, rollouts and every VM; tenants only their own VMs.

Every error is ``{"error": "one line"}`` with a 4xx (5xx only when the host itself is at fault).
A tenant asking for another tenant's VM gets the same 404 as for a VM that does not exist, so
names do not leak. No request carries a host path, XML, a device, a QEMU argument or a libvirt
URI: a VM request is the VM spec without its owner (the token says who) and, for tenants,
without a network choice (tenants get user networking with one forwarded port).
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import socket
import tempfile
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import anyio
import uvicorn
from fastapi import Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError, field_validator
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from agent import __version__, qcow2
from agent.daemon import Daemon, Principal
from agent.errors import Conflict, Forbidden, HvError, InputError, NotFound, Unauthorized
from agent.manifest import MAX_MANIFEST_BYTES, load_manifest
from agent.metrics import StateCollector
from agent.provision import VmPaths
from agent.rollout import Policy, RetirePolicy, parse_duration, parse_family, parse_max_unavailable
from agent.spec import NAME_RE, NetMode, Spec, VmSpec, check_name
from agent.state import DiskRow, RolloutRow, VmRow, VmState
from agent.upload import FormStream, Part

if TYPE_CHECKING:
    from agent.host import Host

log = logging.getLogger("hvagent.api")

NAME = NAME_RE.pattern  # the spec's VM-name pattern, for OpenAPI
REF = r"^[a-z][a-z0-9-]{0,62}-[0-9]{1,6}\.[0-9]{1,6}$"
FAMILY = r"^[a-z][a-z0-9-]{0,62}-[0-9]{1,6}(?:\.\*)?$"
CONSOLE_MAX = 1 << 20
# Seconds an idle connection stays open; longer than any client here keeps one (agent.client,
# httpx's default of 5 s), so a client never sends a request into the server's close.
KEEP_ALIVE = 30


# -- request bodies ----------------------------------------------------------------------------
class VmRequest(VmSpec):
    """A VM to create: the spec without its owner (the token says who; admins may name one)."""

    owner: StrictStr | None = Field(None, description="admins only: the tenant that owns the VM")  # type: ignore[assignment]

    @field_validator("owner")
    @classmethod
    def _owner(cls, v: str | None) -> str | None:  # type: ignore[override]
        return None if v is None else check_name(v, "owner")


class RetireRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grace: StrictStr = Field("14d", max_length=16, description="0, 30m, 12h, 14d")
    policy: RetirePolicy = RetirePolicy.MOVE


class GcRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keep: StrictInt | None = Field(None, ge=1, le=1000)


class RolloutRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    family: StrictStr = Field(pattern=FAMILY, description="tiny-1 or tiny-1.*")
    max_unavailable: StrictStr | None = Field(None, max_length=8, description="a count (3) or a percentage (25%)")


_UPLOAD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def _upload_name(filename: str | None, default: str) -> str:
    """The base name an upload came with, for messages and the manifest's temporary file; anything
    that is not a plain file name (``..``, slashes, control characters) becomes ``default``."""
    name = Path(filename or "").name
    return name if _UPLOAD_NAME.match(name) else default


def _upload_part(part: Part | None, name: str) -> Part:
    if part is None or part.name != name:
        got = "nothing more" if part is None else f"part {part.name[:64]!r}"
        raise InputError(f"multipart: {got} where the part {name!r} belongs; send the part 'manifest' "
                         f"(YAML, at most 1 MiB) first, then 'image' (the policy is a query parameter)")
    return part


def _body_chunks(request: Request) -> Callable[[], bytes]:
    """The request body's next chunk (``b""`` at its end), for code in FastAPI's threadpool."""
    stream = request.stream()

    async def next_chunk() -> bytes:
        try:
            return await anext(stream, b"")
        except ClientDisconnect:
            raise InputError("request body: the client went away before sending all of it") from None

    return lambda: anyio.from_thread.run(next_chunk)


UPLOAD_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["manifest", "image"],
    "properties": {"manifest": {"type": "string", "format": "binary", "description": "first: YAML, at most 1 MiB"},
                   "image": {"type": "string", "format": "binary", "description": "then: the qcow2 file"}}}}}}}


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
            "max_unavailable": ro.max_unavailable, "reason": ro.reason, "created_at": ro.created_at,
            "vms": [{"vm": s.vm, "batch": s.batch + 1, "from": s.from_version, "state": s.state.value,
                     "downtime": s.downtime, "reason": s.reason} for s in host.state.steps(ro.id)]}


# -- principals --------------------------------------------------------------------------------
bearer = HTTPBearer(auto_error=False, description="a token from the configuration's api.tokens")


def principal(request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Principal:
    if creds is None:
        raise Unauthorized("authorization: missing bearer token (Authorization: Bearer TOKEN)")
    daemon: Daemon = request.app.state.daemon
    return daemon.authenticate(creds.credentials)


def admin(p: Annotated[Principal, Depends(principal)]) -> Principal:
    if not p.admin:
        raise Forbidden("authorization: this call needs an admin token")
    return p


Who = Annotated[Principal, Depends(principal)]
Admin = Annotated[Principal, Depends(admin)]
Name = Annotated[str, PathParam(pattern=NAME, max_length=63, description="VM name")]


# -- the app -----------------------------------------------------------------------------------
def create_app(d: Daemon) -> FastAPI:
    app = FastAPI(title="hvagent", version=__version__,
                  description="Hypervisor host agent: VMs from versioned qcow2 guest OS images on libvirt.")
    app.state.daemon = d
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StateCollector(d.host))

    @app.exception_handler(HvError)
    async def _hv_error(_: Request, e: HvError) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=e.http_status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": validation_line(e.errors())}, status_code=422)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, e: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse({"error": "internal error; see the daemon's log"}, status_code=500)

    def own(host: Host, p: Principal, name: str) -> VmRow:
        row = host.state.vm(name)
        if row is None or not (p.admin or row.owner == p.name):
            raise NotFound(f"vm {name}: no such VM")
        return row

    # -- service -------------------------------------------------------------------------------
    @app.get("/healthz", tags=["service"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", tags=["service"], response_class=PlainTextResponse)
    def metrics(_: Admin) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/host", tags=["host"])
    def host_facts(_: Admin) -> dict[str, Any]:
        host = d.host()
        return {"facts": host.virt.host_facts(), "capacity": host.provisioner.capacity(),
                "accelerator": host.accelerator().value, "version": __version__}

    # -- images --------------------------------------------------------------------------------
    @app.get("/v1/images", tags=["images"])
    def images_list(p: Who) -> list[dict[str, Any]]:
        return [{"name": e.row.name, "family": e.row.family, "version": e.row.version, "state": e.row.state.value,
                 "sha256": e.row.sha256, "virtual_size": e.row.virtual_size,
                 "firmware": e.row.manifest.get("firmware"), **({"vms": e.vms} if p.admin else {})}
                for e in d.host().catalog.entries()]

    @app.post("/v1/images", tags=["images"], status_code=201, openapi_extra=UPLOAD_BODY)
    def images_publish(_: Admin, request: Request, policy: Annotated[Policy | None, Query(
            description="rollout policy for this publish; default from the configuration")] = None) -> dict[str, Any]:
        """Publish an image (checked as hostile until proven otherwise); may start a rollout.

        multipart/form-data: the part ``manifest`` (YAML, at most 1 MiB) first, then ``image``, the
        qcow2 file, which streams into the store's hashing copy as it arrives."""
        form = FormStream(request.headers.get("content-type"), _body_chunks(request))
        manifest_name = _upload_name(_upload_part(form.next_part(), "manifest").filename, "manifest.yaml")
        text = form.read_all(MAX_MANIFEST_BYTES, "manifest")
        try:
            text.decode()
        except UnicodeDecodeError:  # named as uploaded (load_manifest would name our temporary file)
            raise InputError(f"{manifest_name}: manifest is not UTF-8 text") from None
        uploads = d.cfg.state_dir / "uploads"
        uploads.mkdir(mode=0o700, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=uploads) as tmp:  # load_manifest reads a file
            man = Path(tmp) / manifest_name
            man.write_bytes(text)
            m = load_manifest(man)
        shown = _upload_name(_upload_part(form.next_part(last=True), "image").filename, "upload.qcow2")
        with d.locked() as host:
            row = host.catalog.publish_stream(form, m, shown)
            ro = host.rollouts.on_publish(row, policy)
        form.finish()
        d.poke()
        return {"image": {"name": row.name, "version": row.version, "family": row.family, "sha256": row.sha256},
                "rollout": ro.id if ro else None}

    @app.post("/v1/images/{ref}/retire", tags=["images"])
    def images_retire(_: Admin, ref: Annotated[str, PathParam(pattern=REF)], body: RetireRequest) -> dict[str, Any]:
        grace = parse_duration(body.grace)
        with d.locked() as host:
            r = host.rollouts.retire(ref, grace, body.policy)
        return {"image": ref, "grace_until": r.grace_until, "policy": r.policy}

    @app.post("/v1/images/gc", tags=["images"])
    def images_gc(_: Admin, body: GcRequest) -> dict[str, Any]:
        with d.locked() as host:
            return {"removed": host.rollouts.gc(body.keep)}

    # -- rollouts ------------------------------------------------------------------------------
    @app.get("/v1/rollouts", tags=["rollouts"])
    def rollouts_list(_: Admin, all_: Annotated[bool, Query(alias="all")] = False) -> list[dict[str, Any]]:
        host = d.host()
        return [rollout_view(host, ro) for ro in host.state.rollouts(active_only=not all_)]

    @app.get("/v1/rollouts/{rid}", tags=["rollouts"])
    def rollout_get(_: Admin, rid: Annotated[int, PathParam(ge=1, le=1 << 31)]) -> dict[str, Any]:
        host = d.host()
        ro = host.state.rollout(rid)
        if ro is None:
            raise NotFound(f"rollout {rid}: no such rollout")
        return rollout_view(host, ro)

    @app.post("/v1/rollouts", tags=["rollouts"], status_code=202)
    def rollout_start(_: Admin, body: RolloutRequest) -> dict[str, Any]:
        name, major = parse_family(body.family)
        if body.max_unavailable is not None:
            parse_max_unavailable(body.max_unavailable, "max_unavailable")
        with d.locked() as host:
            ro = host.rollouts.start(name, major, body.max_unavailable)
        d.poke()
        return {"rollout": rollout_view(host, ro) if ro else None}

    @app.post("/v1/rollouts/{family}/{action}", tags=["rollouts"])
    def rollout_action(_: Admin, family: Annotated[str, PathParam(pattern=FAMILY)],
                       action: Annotated[str, PathParam(pattern=r"^(pause|resume|abort)$")]) -> dict[str, Any]:
        host = d.host()
        ro = getattr(host.rollouts, action)(family)
        d.poke()
        return {"rollout": rollout_view(host, host.state.rollout(ro.id) or ro)}

    # -- VMs -----------------------------------------------------------------------------------
    @app.get("/v1/vms", tags=["vms"])
    def vms_list(p: Who) -> list[dict[str, Any]]:
        rows = d.host().state.vms(owner=None if p.admin else p.name)
        return [vm_view(r, p.admin) for r in rows]

    @app.post("/v1/vms", tags=["vms"], status_code=202)
    def vm_create(p: Who, body: VmRequest) -> dict[str, Any]:
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

    @app.post("/v1/apply", tags=["vms"], status_code=202)
    def apply(_: Admin, body: Spec,
              source: Annotated[str, Query(max_length=256, pattern=r"^[\x20-\x7e]*$")] = "spec") -> dict[str, Any]:
        """Converge to a spec (the CLI's ``apply``): create the VMs the host lacks; all checked first."""
        notes: list[str] = []
        with d.locked() as host:
            created = host.apply(body, source, notes=notes.append)
        for name in created:
            d.watch_health(name)
        return {"created": created, "notes": notes}

    @app.get("/v1/vms/{name}", tags=["vms"])
    def vm_get(p: Who, name: Name) -> dict[str, Any]:
        return vm_view(own(d.host(), p, name), p.admin)

    @app.delete("/v1/vms/{name}", tags=["vms"])
    def vm_delete(p: Who, name: Name, purge: bool = False) -> dict[str, Any]:
        """Destroy the VM; its data disk is kept unless purge=true."""
        with d.locked() as host:
            own(host, p, name)
            host.provisioner.destroy(name, purge=purge)
        return {"name": name, "deleted": True, "purged": purge}

    @app.post("/v1/vms/{name}/stop", tags=["vms"])
    def vm_stop(p: Who, name: Name) -> dict[str, Any]:
        """ACPI shutdown (forced off after shutdown_timeout); it stays off until started."""
        with d.locked() as host:
            row = own(host, p, name)
            if row.state not in (VmState.RUNNING, VmState.STOPPED, VmState.FAILED):
                raise Conflict(f"vm {name}: is {row.state}; try again when it is running")
            host.state.update_vm(name, state=VmState.STOPPED, reason=f"stopped by {p.name}")
            host.state.event("vm.stopping", f"requested by {p.name}", vm=name)
        clean = host.virt.shutdown(name, d.cfg.shutdown_timeout)
        host.state.event("vm.stopped", "shut down" if clean else "forced off after the shutdown timeout", vm=name)
        return vm_view(host.provisioner.row(name), p.admin)

    @app.post("/v1/vms/{name}/start", tags=["vms"], status_code=202)
    def vm_start(p: Who, name: Name) -> dict[str, Any]:
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

    @app.post("/v1/vms/{name}/reboot", tags=["vms"])
    def vm_reboot(p: Who, name: Name) -> dict[str, Any]:
        with d.locked() as host:
            row = own(host, p, name)
            if row.state is not VmState.RUNNING:
                raise Conflict(f"vm {name}: is {row.state}, not running")
            host.virt.reboot(name)
            host.state.event("vm.reboot", f"requested by {p.name}", vm=name)
        return vm_view(row, p.admin)

    @app.get("/v1/vms/{name}/console", tags=["vms"], response_class=PlainTextResponse)
    def vm_console(p: Who, name: Name,
                   tail: Annotated[int, Query(ge=1, le=CONSOLE_MAX, description="last bytes")] = 65536) -> str:
        """The guest's serial console output (the last ``tail`` bytes)."""
        host = d.host()
        row = own(host, p, name)
        path = VmPaths.of(d.cfg, name).console(row.uuid)  # this VM's own log, by its UUID
        try:
            with path.open("rb") as f:
                size = f.seek(0, 2)
                f.seek(max(0, size - tail))
                return f.read(tail).decode(errors="replace")
        except FileNotFoundError:
            return ""

    @app.get("/v1/events", tags=["events"])
    def events(p: Who, vm: Annotated[str | None, Query(pattern=NAME, max_length=63)] = None,
               limit: Annotated[int, Query(ge=1, le=10000)] = 1000) -> list[dict[str, Any]]:
        """Events, oldest first. A tenant sees those of its own VMs (by owner, so never those of an
        earlier VM of the same name that someone else owned) and of its disks."""
        host = d.host()
        evs = host.state.events(vm, limit, owner=None if p.admin else p.name)
        if vm is not None and not evs:
            own(host, p, vm)  # 404 for a name the caller has no VM and no history of
        return [{"ts": e.ts, "vm": e.vm, "kind": e.kind, "message": e.message, "duration": e.duration,
                 **({"owner": e.owner, "uuid": e.vm_uuid} if p.admin else {})} for e in evs]

    # -- data disks ----------------------------------------------------------------------------
    @app.get("/v1/disks", tags=["disks"])
    def disks_list(p: Who) -> list[dict[str, Any]]:
        """Data disks: attached to a VM, or kept for their owner after it was destroyed."""
        host = d.host()
        return [disk_view(host, disk) for disk in host.state.disks(owner=None if p.admin else p.name)]

    @app.delete("/v1/disks/{name}", tags=["disks"])
    def disk_purge(p: Who, name: Name,
                   owner: Annotated[str | None, Query(pattern=NAME, max_length=63,
                                                      description="admins: whose disk")] = None) -> dict[str, Any]:
        """Delete a kept data disk; one attached to a VM is refused (409)."""
        if not p.admin and owner not in (None, p.name):
            raise NotFound(f"disk {name}: no such disk")
        with d.locked() as host:
            whose = owner or (p.name if not p.admin else _only_owner(host, name))
            disk = host.provisioner.purge_disk(whose, name)
        return {"name": disk.name, "owner": disk.owner, "purged": True}

    return app


def disk_view(host: Host, disk: DiskRow) -> dict[str, Any]:
    vm = next((r.name for r in host.state.vms(owner=disk.owner) if r.uuid == disk.vm_uuid), None)
    return {"name": disk.name, "owner": disk.owner, "size_gib": disk.size_gib, "vm": vm,
            "state": "attached" if disk.vm_uuid else "kept", "created_at": disk.created_at}


def _only_owner(host: Host, name: str) -> str:
    """The owner of the only disk of this name; admins name the owner when several have one."""
    owners = [disk.owner for disk in host.state.disks() if disk.name == name]
    if not owners:
        raise NotFound(f"disk {name}: no such disk")
    if len(owners) > 1:
        raise InputError(f"owner: disks named {name} belong to {', '.join(owners)}; name the owner")
    return owners[0]


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


def validation_line(errors: Any) -> str:
    """The first validation error as ``where: what`` (the body's field path, without 'body')."""
    if not errors:
        return "request: invalid"
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ())[1 if err.get("loc", ("",))[0] == "body" else 0:]]
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    return f"{'.'.join(loc) or 'body'}: {msg}"


# -- authentication and body size, before the body is read -------------------------------------
ASGIApp = Callable[[MutableMapping[str, Any], Any, Any], Awaitable[None]]
ADMIN_ONLY_UPLOADS = frozenset({("POST", "/v1/images")})


class AuthGate:
    """401 and 403 before a byte of the body is read: FastAPI reads (and spools) a request's body
    before it runs the endpoint's dependencies. Those still decide; the gate only answers first for
    a missing, unknown or expired token, and for a tenant's token on an admin-only upload."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.public = frozenset({"/healthz"} | {u for u in (app.openapi_url, app.docs_url, app.redoc_url,
                                                              app.swagger_ui_oauth2_redirect_url) if u})

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in self.public:
            request = Request({**scope, "app": self.app})  # as Starlette passes it to the dependencies
            try:
                who = principal(request, await bearer(request))
                if (scope["method"], scope["path"]) in ADMIN_ONLY_UPLOADS:
                    admin(who)
            except HvError as e:
                await JSONResponse({"error": str(e)}, status_code=e.http_status)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """413 for a body over the limit: Content-Length checked first, streamed bodies counted. A
    response sent before the whole body was read closes the connection: the rest is not read."""

    def __init__(self, app: ASGIApp, limit: Callable[[str, str], tuple[int, str]]) -> None:
        self.app = app
        self.limit = limit  # (method, path) -> (bytes, the 413's message)

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, too_large = self.limit(scope["method"], scope["path"])
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        pending = length not in (None, b"0") or b"transfer-encoding" in headers
        seen = 0

        async def counted() -> Any:
            nonlocal seen, pending
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise HTTPException(413, too_large)
            pending = pending and bool(message.get("more_body")) and message["type"] == "http.request"
            return message

        async def closing(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start" and pending:
                message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
            await send(message)

        if length is not None and (not length.isdigit() or int(length) > limit):
            await JSONResponse({"error": too_large}, status_code=413)(scope, receive, closing)
            return
        await self.app(scope, counted, closing)


# -- serving -----------------------------------------------------------------------------------
class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_ready: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_ready = on_ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.should_exit:
            self._on_ready()


def serve_api(d: Daemon, sockets: list[socket.socket], on_ready: Callable[[], None]) -> None:
    app = create_app(d)
    mvs = d.cfg.max_virtual_size
    # the largest image file, its manifest, and the form's boundaries and part headers
    image_limit = qcow2.max_file_size(mvs) + MAX_MANIFEST_BYTES + (64 << 10)
    image_too_large = (f"image upload: larger than {image_limit} bytes, the most an image of max_virtual_size "
                       f"{mvs} bytes ({qcow2.human(mvs)}) takes with its metadata and manifest")
    body_too_large = f"request body: larger than {d.cfg.api.max_body} bytes"

    def limit(method: str, path: str) -> tuple[int, str]:
        if (method, path) == ("POST", "/v1/images"):
            return image_limit, image_too_large
        return d.cfg.api.max_body, body_too_large

    config = uvicorn.Config(BodyLimit(AuthGate(app), limit), log_config=None, access_log=False, lifespan="off",
                            timeout_keep_alive=KEEP_ALIVE, timeout_graceful_shutdown=30)
    server = _Server(config, on_ready)
    # uvicorn re-raises the signal it caught once it has shut down; let that land on a no-op so the
    # daemon can finish its engine step and exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    asyncio.run(server.serve(sockets=sockets))
