"""The SSH relay's parts without a daemon: where it connects (port 22 of the caller's own running
guest, nothing else), the copy loop ends cleanly whichever side closes and leaves no task behind,
and the auth gate refuses a WebSocket handshake as an HTTP answer."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Coroutine
from types import SimpleNamespace
from typing import Any, cast

import pytest
from fastapi import FastAPI, WebSocket

from agent.api import relay
from agent.api.middleware import AuthGate
from agent.config import Quota, Role
from agent.daemon import Daemon, Principal
from agent.errors import Conflict, EnvError, NotFound, Unauthorized
from agent.state import VmRow, VmState
from agent.throttle import AuthThrottle

pytestmark = pytest.mark.unit


class FakeSocket:
    """The caller's side of a WebSocket: what it sends is queued; what the relay sends is kept."""

    def __init__(self) -> None:
        self.incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.sent = bytearray()

    async def receive(self) -> dict[str, Any]:
        return await self.incoming.get()

    async def send_bytes(self, data: bytes) -> None:
        self.sent += data


async def _with_guest(guest: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
                      caller: Callable[[FakeSocket], Coroutine[Any, Any, None]]) -> tuple[int, FakeSocket, list[int]]:
    server = await asyncio.start_server(guest, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    ws = FakeSocket()
    counts = [0, 0]
    driver = asyncio.create_task(caller(ws))
    code = await asyncio.wait_for(relay._pump(cast(WebSocket, ws), reader, writer, counts), 10)
    left = [t for t in asyncio.all_tasks() if t.get_coro().__qualname__.startswith("_pump.")]  # type: ignore[union-attr]
    assert left == []  # neither copy task outlives the relay
    await driver
    writer.close()
    await writer.wait_closed()
    server.close()
    await server.wait_closed()
    return code, ws, counts


def test_the_callers_close_ends_the_relay() -> None:
    got = bytearray()

    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"SSH-2.0-guest\r\n")
        await w.drain()
        while data := await r.read(1024):
            got.extend(data)
        w.close()

    async def caller(ws: FakeSocket) -> None:
        await ws.incoming.put({"type": "websocket.receive", "bytes": b"hello "})
        await ws.incoming.put({"type": "websocket.receive", "bytes": b"guest"})
        await asyncio.sleep(0.2)
        await ws.incoming.put({"type": "websocket.disconnect", "code": 1000})

    code, ws, counts = asyncio.run(_with_guest(guest, caller))
    assert code == relay.NORMAL and bytes(ws.sent) == b"SSH-2.0-guest\r\n" and counts == [11, 15]


def test_the_guests_close_ends_the_relay() -> None:
    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"x" * 300_000)
        await w.drain()
        w.close()

    async def caller(ws: FakeSocket) -> None:
        pass  # never sends, never closes: the guest's end alone ends the relay

    code, ws, counts = asyncio.run(_with_guest(guest, caller))
    assert code == relay.NORMAL and len(ws.sent) == 300_000 and counts == [0, 300_000]


def test_a_text_message_ends_the_relay() -> None:
    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.read()
        w.close()

    async def caller(ws: FakeSocket) -> None:
        await ws.incoming.put({"type": "websocket.receive", "text": "ls\n"})

    code, _, _ = asyncio.run(_with_guest(guest, caller))
    assert code == relay.BINARY_ONLY


class _Daemon:
    def authenticate(self, token: str) -> Any:
        raise Unauthorized("authorization: unknown token")


def _handshake(extensions: dict[str, Any]) -> list[dict[str, Any]]:
    app = FastAPI()
    app.state.daemon = _Daemon()
    app.include_router(relay.router)  # were it reached, it would answer 404 (no such VM), not 401
    gate = AuthGate(app, AuthThrottle(5))
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "websocket", "path": "/v1/vms/web-1/ssh", "headers": [(b"authorization", b"Bearer wrong")],
             "client": ("127.0.0.1", 5000), "query_string": b"", "extensions": extensions}
    asyncio.run(gate(scope, receive, send))
    return sent


def test_the_gate_refuses_a_websocket_handshake_before_it_is_accepted() -> None:
    start, body = _handshake({"websocket.http.response": {}})
    assert (start["type"], start["status"]) == ("websocket.http.response.start", 401)
    assert body["type"] == "websocket.http.response.body"
    assert json.loads(body["body"]) == {"error": "authorization: unknown token"}
    # a server without the denial-response extension: a close before accept, which servers send as 403
    assert _handshake({}) == [{"type": "websocket.close", "code": 1008}]


def _row(owner: str, state: VmState, host_port: int | None) -> VmRow:
    return VmRow(name="web-1", owner=owner, track="tiny-1.*", image="tiny", version="1.0", state=state, reason=None,
                 uuid="u", mac="52:54:00:00:00:01", host_port=host_port, instance_id="i", spec={}, spec_hash="h",
                 created_at=0.0, updated_at=0.0)


class _Host:
    def __init__(self, row: VmRow, address: str | None) -> None:
        self.state = SimpleNamespace(vm=lambda name: row if name == row.name else None)
        self.virt = SimpleNamespace(guest_address=lambda name: address)


def _target(row: VmRow, who: str = "alice", address: str | None = None) -> tuple[str, int]:
    d = SimpleNamespace(host=lambda: _Host(row, address))
    p = Principal(who, Role.TENANT, Quota())
    return relay.target(cast(Daemon, d), p, "web-1")


def test_the_relay_reaches_port_22_of_the_callers_running_guest_only() -> None:
    assert _target(_row("alice", VmState.RUNNING, 22601)) == ("127.0.0.1", 22601)  # user mode: QEMU's forward
    assert _target(_row("alice", VmState.RUNNING, None), address="192.168.122.7") == ("192.168.122.7", 22)
    with pytest.raises(EnvError, match="no address known yet"):  # network mode without a lease: 503
        _target(_row("alice", VmState.RUNNING, None))
    with pytest.raises(NotFound, match=r"^vm web-1: no such VM$"):  # another tenant's: as a missing one
        _target(_row("bob", VmState.RUNNING, 22601))
    for state in (VmState.STOPPED, VmState.SWAPPING, VmState.PROVISIONING, VmState.FAILED):
        with pytest.raises(Conflict, match=f"^vm web-1: is {state}; ssh reaches a running VM only$"):
            _target(_row("alice", state, 22601))
