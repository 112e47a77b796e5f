"""SSH through the API: ``/v1/vms/{name}/ssh`` is a WebSocket that relays a byte stream to the
caller's own guest's port 22, so the host exposes one TLS port and no per-VM port need be
reachable from outside.

The token, the VM's ownership (404 as for every call), its state (409 unless running) and the
guest's address (503 without one) are checked before the handshake is accepted: a refusal is an
HTTP answer ``{"error": "one line"}`` and nothing is relayed. The target is always the guest's
SSH port (user mode: QEMU's 127.0.0.1 forward; network mode: the guest's address, port 22); no
parameter names another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from fastapi import APIRouter, WebSocket
from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocketDisconnect, WebSocketState

from agent.api.common import caller, first_done, own
from agent.errors import Conflict, EnvError, InputError, NotFound
from agent.spec import NAME_RE
from agent.state import VmState, logfmt

if TYPE_CHECKING:
    from agent.daemon import Daemon, Principal

log = logging.getLogger("hvagent.api")

router = APIRouter()

GUEST_PORT = 22
CONNECT_TIMEOUT = 10.0
CHUNK = 64 << 10
# WebSocket close codes (RFC 6455): the guest's end closed; its connection failed; a text frame.
NORMAL, GUEST_ERROR, BINARY_ONLY = 1000, 1011, 1003


def target(d: Daemon, p: Principal, name: str) -> tuple[str, int]:
    """Where the caller's VM ``name`` answers SSH; blocking (SQLite, libvirt): run in a thread."""
    host = d.host()
    row = own(host, p, name)
    if row.state is not VmState.RUNNING:
        raise Conflict(f"vm {name}: is {row.state}; ssh reaches a running VM only")
    if row.host_port is not None:
        return "127.0.0.1", row.host_port
    address = host.virt.guest_address(name)
    if address is None:
        raise EnvError(f"vm {name}: no address known yet for its network interface (no DHCP lease); try again")
    return address, GUEST_PORT


@router.websocket("/v1/vms/{name}/ssh")
async def vm_ssh(websocket: WebSocket, name: str) -> None:
    """Relay binary messages to and from the guest's SSH port until either side closes."""
    who = await caller(websocket)  # the gate refused bad tokens already; this is the decision
    if websocket.query_params:
        raise InputError("ssh relay: takes no query parameters; it reaches the guest's port 22 only")
    if not NAME_RE.fullmatch(name):
        raise NotFound("vm: no such VM (names are 1-63 of [a-z0-9-])")
    d: Daemon = websocket.app.state.daemon
    address, port = await run_in_threadpool(target, d, who, name)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(address, port), CONNECT_TIMEOUT)
    except (OSError, TimeoutError) as e:
        raise EnvError(f"vm {name}: its SSH port does not answer ({str(e) or 'timed out'}); try again") from e
    started = time.monotonic()
    counts = [0, 0]  # bytes to the guest, from the guest
    try:
        try:
            await websocket.accept()
        except WebSocketDisconnect:
            return  # the caller left during the checks
        code = await _pump(websocket, reader, writer, counts)
        connected = WebSocketState.CONNECTED
        if websocket.client_state is connected and websocket.application_state is connected:
            with contextlib.suppress(WebSocketDisconnect, OSError, RuntimeError):
                await websocket.close(code)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        peer = websocket.client.host if websocket.client and websocket.client.host else "local"
        log.info(logfmt({"event": "ssh.relay", "vm": name, "caller": who.name, "peer": peer, "to_guest": str(counts[0]),
                         "from_guest": str(counts[1]), "seconds": f"{time.monotonic() - started:.1f}"}))


async def _pump(websocket: WebSocket, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 counts: list[int]) -> int:
    """Copy both ways until one side ends; the close code to send the caller, if it is still there."""

    async def up() -> int:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return NORMAL
            data = message.get("bytes")
            if data is None:
                return BINARY_ONLY
            writer.write(data)
            await writer.drain()
            counts[0] += len(data)

    async def down() -> int:
        while data := await reader.read(CHUNK):
            await websocket.send_bytes(data)
            counts[1] += len(data)
        return NORMAL

    result = await first_done(up(), down())
    if isinstance(result, int):
        return result
    if isinstance(result, WebSocketDisconnect):
        return NORMAL
    if not isinstance(result, asyncio.CancelledError | OSError):
        log.warning(logfmt({"event": "ssh.relay.error", "msg": f"{type(result).__name__}: {result}"}))
    return GUEST_ERROR
