"""Images: anyone with a token lists them (admins also see the VMs on each); admins only publish
(a multipart upload streamed into the store), retire and garbage-collect them."""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.requests import ClientDisconnect

from agent.api.common import Admin, DaemonDep, Who
from agent.api.upload import FormStream, Part
from agent.errors import InputError
from agent.manifest import MAX_MANIFEST_BYTES, kind_of, load_any_manifest
from agent.rollout import Policy, RetirePolicy, parse_duration

REF = r"^[a-z][a-z0-9-]{0,62}-[0-9]{1,6}\.[0-9]{1,6}$"

router = APIRouter(tags=["images"])


class RetireRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grace: StrictStr = Field("14d", max_length=16, description="0, 30m, 12h, 14d")
    policy: RetirePolicy = RetirePolicy.MOVE


class GcRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keep: StrictInt | None = Field(None, ge=1, le=1000)


# -- the upload --------------------------------------------------------------------------------
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
                   "image": {"type": "string", "format": "binary", "description": "then: the qcow2 file (or ISO)"}}}}}}}


# -- endpoints ---------------------------------------------------------------------------------
@router.get("/v1/images")
def images_list(p: Who, d: DaemonDep) -> list[dict[str, Any]]:
    return [{"name": e.row.name, "kind": kind_of(e.row.manifest).value, "family": e.row.family,
             "version": e.row.version, "state": e.row.state.value,
             "sha256": e.row.sha256, "virtual_size": e.row.virtual_size,
             "firmware": e.row.manifest.get("firmware"), **({"vms": e.vms} if p.admin else {})}
            for e in d.host().catalog.entries()]


@router.post("/v1/images", status_code=201, openapi_extra=UPLOAD_BODY)
def images_publish(_: Admin, d: DaemonDep, request: Request, policy: Annotated[Policy | None, Query(
        description="rollout policy for this publish; default from the configuration")] = None) -> dict[str, Any]:
    """Publish an image or an installer ISO (checked as hostile until proven otherwise); may start a rollout.

    multipart/form-data: the part ``manifest`` (YAML, at most 1 MiB) first, then ``image``, the
    qcow2 file (or the ISO of a ``kind: installer`` manifest), which streams into the store's
    hashing copy as it arrives. A netboot bundle (a directory) is published on the host."""
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
        m = load_any_manifest(man)
    shown = _upload_name(_upload_part(form.next_part(last=True), "image").filename, "upload.qcow2")
    with d.locked() as host:
        policy = host.rollouts.policy(policy)
        row = host.catalog.publish_stream(form, m, shown, rollout=policy)
        ro = host.rollouts.on_publish(row, policy)
    form.finish()
    d.poke()
    return {"image": {"name": row.name, "version": row.version, "family": row.family, "sha256": row.sha256},
            "rollout": ro.id if ro else None}


@router.post("/v1/images/{ref}/retire")
def images_retire(_: Admin, d: DaemonDep, ref: Annotated[str, PathParam(pattern=REF)],
                  body: RetireRequest) -> dict[str, Any]:
    grace = parse_duration(body.grace)
    with d.locked() as host:
        r = host.rollouts.retire(ref, grace, body.policy)
    return {"image": ref, "grace_until": r.grace_until, "policy": r.policy}


@router.post("/v1/images/gc")
def images_gc(_: Admin, d: DaemonDep, body: GcRequest) -> dict[str, Any]:
    with d.locked() as host:
        return {"removed": host.rollouts.gc(body.keep)}
