"""The client side of the relay and the console when the host goes away mid-session: a real
WebSocket server on 127.0.0.1 (websockets' own) that sends a little, then drops the TCP connection
without a close frame. Both end in one line (an EnvError with a hint), never a silent exit 0;
a close by the host with 1000 (the VM stopped) is still a normal end."""

from __future__ import annotations

import io
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from websockets.sync.server import ServerConnection, serve

from agent import relay_client
from agent.errors import EnvError
from agent.remote import UNREACHED
from tests.tlsca import TestCA

pytestmark = pytest.mark.unit


@contextmanager
def host(ending: str) -> Iterator[str]:
    """A ws:// URL whose server sends ``hello``, then ends as ``ending`` says: ``drop`` (the TCP
    connection dropped, no close frame) or ``stopped`` (close 1000, as when the VM stops)."""

    def handler(ws: ServerConnection) -> None:
        ws.send(b"hello")
        if ending == "drop":
            ws.socket.shutdown(socket.SHUT_RDWR)
        else:
            ws.close(1000, "the VM stopped")

    with serve(handler, "127.0.0.1", 0) as server:
        port = server.socket.getsockname()[1]
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"ws://127.0.0.1:{port}/v1/vms/x/console"
        finally:
            server.shutdown()
            thread.join(5)


@pytest.fixture
def idle() -> Iterator[io.BufferedReader]:
    """A stdin on which nothing is ever typed (a pipe nobody writes to)."""
    r, w = os.pipe()
    with os.fdopen(r, "rb") as stdin:
        yield stdin
    os.close(w)


def test_the_console_reports_a_connection_that_broke(idle: io.BufferedReader) -> None:
    out, notice = io.BytesIO(), io.StringIO()
    with host("drop") as url, pytest.raises(EnvError) as e:
        relay_client.console(url, "t", None, idle, out, notice)
    assert out.getvalue() == b"hello"
    assert "console: " in str(e.value) and "broke mid-session" in str(e.value) and e.value.hint


def test_the_console_ends_normally_when_the_vm_stopped(idle: io.BufferedReader) -> None:
    out, notice = io.BytesIO(), io.StringIO()
    with host("stopped") as url:
        assert relay_client.console(url, "t", None, idle, out, notice) == 0
    assert out.getvalue() == b"hello" and "the VM stopped" in notice.getvalue()


def test_the_relay_reports_a_connection_that_broke(idle: io.BufferedReader) -> None:
    out = io.BytesIO()
    with host("drop") as url, pytest.raises(EnvError) as e:
        relay_client.proxy(url, "t", None, idle, out)
    assert out.getvalue() == b"hello"
    assert "ssh relay: " in str(e.value) and "broke mid-session" in str(e.value) and e.value.hint


def test_an_unreachable_host_has_a_hint() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(EnvError) as e:
            relay_client.connect_relay(f"ws://127.0.0.1:{port}/v1/vms/x/ssh", "t", None)
    assert "ssh relay: " in str(e.value) and e.value.hint == UNREACHED


def test_a_host_that_never_answers_the_handshake_is_given_up_at_the_open_timeout(tmp_path: Path) -> None:
    """Over TLS 1.3 the server's session ticket makes the socket readable, and websockets' reader
    thread then blocks in the TLS read for application data that never comes; closing the socket
    does not wake it. Seen in CI: a relay whose daemon did not answer held its client 900 s."""
    ca = TestCA(tmp_path, "test CA")
    issued = ca.server()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(issued.cert, issued.key)
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def silent() -> None:  # completes TLS, reads the request, never answers
        conn, _ = listener.accept()
        tls = server_tls.wrap_socket(conn, server_side=True)
        tls.recv(4096)
        held.append(tls)

    threading.Thread(target=silent, daemon=True).start()
    url = f"wss://127.0.0.1:{listener.getsockname()[1]}/v1/vms/x/ssh"
    outcome: list[BaseException] = []

    def client() -> None:
        try:
            relay_client.connect_relay(url, "t", ssl.create_default_context(cafile=str(ca.cert)), open_timeout=1.0)
        except BaseException as e:  # handed to the test's thread
            outcome.append(e)

    thread = threading.Thread(target=client, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(15)
    try:
        assert not thread.is_alive(), "connect_relay still waits for a host that never answers"
        assert len(outcome) == 1 and isinstance(outcome[0], EnvError), outcome
        assert "timed out" in str(outcome[0]) and time.monotonic() - started < 10
    finally:
        for s in held:
            s.close()
        listener.close()
