"""The guest's serial console over a WebSocket: ``/v1/vms/{name}/console`` carries libvirt's
console stream (``virDomainOpenConsole``) both ways, as binary messages: what the guest writes on
its first serial port, and what the caller types.

As for the SSH relay, the token, the VM's ownership (404 as for every call) and whether it runs
(409) are decided before the handshake is accepted, each refusal one line. One session per VM:
a second is refused (409) unless ``?force=true``, which ends the first; its caller's WebSocket
closes with code 4409 and the reason. ``GET`` on the same path (agent.api.vms) returns the
console's log instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from typing import TYPE_CHECKING

from fastapi import APIRouter, WebSocket
from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocketDisconnect, WebSocketState

from agent.api.common import caller, first_done, own
from agent.errors import InputError, NotFound
from agent.spec import NAME_RE
from agent.state import logfmt
from agent.virt import ConsoleStream

if TYPE_CHECKING:
    from agent.daemon import Daemon, Principal

log = logging.getLogger("hvagent.api")

router = APIRouter()

# WebSocket close codes: the session ended (the guest stopped); a text frame came; another
# session took the console over (4000-4999 are the application's own, RFC 6455).
NORMAL, BINARY_ONLY, TAKEN_OVER = 1000, 1003, 4409
_FLAGS = {"true": True, "1": True, "false": False, "0": False}


def _force(websocket: WebSocket) -> bool:
    params = websocket.query_params
    unknown = sorted(set(params) - {"force"})
    if unknown:
        raise InputError(f"console: unknown query parameter {unknown[0]!r}; it takes force=true|false only")
    value = params.get("force", "false").lower()
    if value not in _FLAGS:
        raise InputError(f"console: force: {value!r} is not true or false")
    return _FLAGS[value]


def open_console(d: Daemon, p: Principal, name: str, force: bool) -> ConsoleStream:
    """The caller's VM ``name``'s console; blocking (SQLite, libvirt): run in a thread."""
    host = d.host()
    row = own(host, p, name)
    return ConsoleStream(host.virt.uri, row.uuid, name, force=force)


@router.websocket("/v1/vms/{name}/console")
async def vm_console(websocket: WebSocket, name: str) -> None:
    """Carry the console both ways until the caller leaves, the guest stops or a session forced
    its way in."""
    who = await caller(websocket)  # the gate refused bad tokens already; this is the decision
    force = _force(websocket)
    if not NAME_RE.fullmatch(name):
        raise NotFound("vm: no such VM (names are 1-63 of [a-z0-9-])")
    d: Daemon = websocket.app.state.daemon
    console = await run_in_threadpool(open_console, d, who, name, force)
    started = time.monotonic()
    counts = [0, 0]  # bytes typed, bytes from the guest
    code, reason = NORMAL, ""
    try:
        try:
            await websocket.accept()
        except WebSocketDisconnect:
            return
        code, reason = await _pump(websocket, console, counts)
        connected = WebSocketState.CONNECTED
        if websocket.client_state is connected and websocket.application_state is connected:
            with contextlib.suppress(WebSocketDisconnect, OSError, RuntimeError):
                await websocket.close(code, reason)
    finally:
        await run_in_threadpool(console.close)
        peer = websocket.client.host if websocket.client and websocket.client.host else "local"
        log.info(logfmt({"event": "console.session", "vm": name, "caller": who.name, "peer": peer,
                         "force": str(force).lower(), "typed": str(counts[0]), "shown": str(counts[1]),
                         "end": reason or "closed", "seconds": f"{time.monotonic() - started:.1f}"}))


async def _pump(websocket: WebSocket, console: ConsoleStream, counts: list[int]) -> tuple[int, str]:
    """Copy both ways until one side ends: the close code and reason for the caller."""
    loop = asyncio.get_running_loop()
    from_guest: asyncio.Queue[bytes] = asyncio.Queue()

    def read() -> None:  # libvirt's recv blocks: a thread of its own, ended by console.close
        with contextlib.suppress(RuntimeError):  # the event loop is gone: nobody to tell
            while data := console.recv():
                loop.call_soon_threadsafe(from_guest.put_nowait, data)
            loop.call_soon_threadsafe(from_guest.put_nowait, b"")

    async def up() -> tuple[int, str]:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return NORMAL, ""
            data = message.get("bytes")
            if data is None:
                return BINARY_ONLY, "the console takes binary messages only"
            await run_in_threadpool(console.send, data)
            counts[0] += len(data)

    async def down() -> tuple[int, str]:
        while data := await from_guest.get():
            await websocket.send_bytes(data)
            counts[1] += len(data)
        if console.broken:
            return TAKEN_OVER, "another console session took this one over, or libvirt ended it"
        return NORMAL, "the VM stopped"

    reader = threading.Thread(target=read, name="console-recv", daemon=True)
    reader.start()
    result = await first_done(up(), down())
    if isinstance(result, tuple):
        return result
    if isinstance(result, WebSocketDisconnect):
        return NORMAL, ""
    return NORMAL, f"the console session ended ({str(result) or type(result).__name__})"
