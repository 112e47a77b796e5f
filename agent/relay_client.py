"""The client end of the API's WebSockets: the SSH relay (``/v1/vms/{name}/ssh``), what an SSH
ProxyCommand runs,

    ssh -o ProxyCommand='hvagent vm proxy NAME' root@NAME

copying its standard input to the WebSocket and the WebSocket to its standard output; and the
serial console (``/v1/vms/{name}/console``), a terminal in raw mode until Ctrl-]. A refusal (a
wrong token, another tenant's VM, a stopped VM) is raised as the one-line error the daemon sent.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import socket
import ssl
import termios
import threading
import tty
from collections.abc import Iterator
from typing import BinaryIO, TextIO

from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.sync.client import ClientConnection, connect

from agent import __version__
from agent.errors import Conflict, EnvError, Forbidden, HvError, InputError, NotFound, Unauthorized
from agent.remote import UNREACHED

__all__ = ["ESCAPE", "connect_relay", "console", "proxy"]

CHUNK = 64 << 10
OPEN_TIMEOUT = 30.0
_BY_STATUS: dict[int, type[HvError]] = {400: InputError, 401: Unauthorized, 403: Forbidden, 404: NotFound,
                                         409: Conflict, 422: InputError}


class _Connection(ClientConnection):
    """websockets' client connection, whose close also wakes its reader thread. Over TLS 1.3 the
    server's session ticket makes the socket readable; the reader thread then blocks in the TLS
    read for application data, and closing the socket from another thread does not wake it, so a
    host that never answered the handshake held ``connect`` (which joins that thread) forever.
    A shutdown does wake it."""

    def close_socket(self) -> None:
        with contextlib.suppress(OSError):
            self.socket.shutdown(socket.SHUT_RDWR)
        super().close_socket()


def connect_relay(url: str, token: str, ssl_context: ssl.SSLContext | None, what: str = "ssh relay",
                  open_timeout: float = OPEN_TIMEOUT) -> ClientConnection:
    """The open WebSocket ``url`` (``ws://`` or ``wss://`` with ``ssl_context``): the relay to a
    guest's SSH port, or its console; to be used as a context manager (``with connect_relay(...)
    as ws:``), which closes it. ``what`` starts each error's line."""
    try:
        return connect(url, ssl=ssl_context, additional_headers={"Authorization": f"Bearer {token}"},
                       user_agent_header=f"hvagent/{__version__}", compression=None, open_timeout=open_timeout,
                       create_connection=_Connection,
                       max_size=1 << 20)
    except InvalidStatus as e:
        raise _refusal(url, e.response.status_code, bytes(e.response.body), what) from e
    except InvalidURI as e:
        raise InputError(f"{what}: {url}: not a ws:// or wss:// URL") from e
    except (OSError, TimeoutError, InvalidHandshake) as e:
        raise EnvError(f"{what}: {url}: {str(e) or type(e).__name__}",
                       hint=None if isinstance(e, ssl.SSLError) else UNREACHED) from e
    except ConnectionClosed as e:  # the host closed it before answering: a TLS alert (a client certificate
        # it wanted), or a reset; the cause is kept for the caller to name
        cause = e.__cause__ or e.__context__
        raise EnvError(f"{what}: {url}: the connection closed before the host answered"
                       + (f" ({cause})" if cause else "")) from e


def _refusal(url: str, status: int, body: bytes, what: str) -> HvError:
    try:
        message = str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        message = f"{what}: {url}: HTTP {status}"
    return _BY_STATUS.get(status, EnvError)(message)


def proxy(url: str, token: str, ssl_context: ssl.SSLContext | None, stdin: BinaryIO, stdout: BinaryIO) -> int:
    """Pump ``stdin`` to the relay and the relay to ``stdout`` until either side closes; 0 then."""
    stop = threading.Event()
    with connect_relay(url, token, ssl_context) as ws:

        def upstream() -> None:
            try:
                for chunk in _chunks(stdin, stop):
                    ws.send(chunk)
            except (ConnectionClosed, OSError):
                pass
            finally:
                ws.close()  # stdin's end is the session's end

        pump = threading.Thread(target=upstream, name="relay-stdin", daemon=True)
        pump.start()
        try:
            for message in ws:
                if isinstance(message, str):
                    raise EnvError(f"ssh relay: {url}: a text message; the relay sends binary messages only")
                _write_all(stdout, message)
        except ConnectionClosedError as e:
            raise EnvError(f"ssh relay: {url}: the connection broke mid-session ({e})", hint=BROKE) from e
        except BrokenPipeError:
            pass  # whoever read our stdout is gone: the session is over
        finally:
            stop.set()
            ws.close()
            pump.join(timeout=5)
    return 0


def _chunks(stdin: BinaryIO, stop: threading.Event) -> Iterator[bytes]:
    """What arrives on ``stdin``, as soon as it arrives, until EOF or ``stop``."""
    try:
        fd: int | None = stdin.fileno()
    except (OSError, AttributeError, io.UnsupportedOperation):
        fd = None
    read = getattr(stdin, "read1", stdin.read)
    while not stop.is_set():
        if fd is not None:
            # a timeout, so that the thread ends when the other direction closes the relay
            if not select.select([fd], [], [], 0.2)[0]:
                continue
            data = os.read(fd, CHUNK)
        else:
            data = read(CHUNK)
        if not data:
            return
        yield data


def _write_all(stdout: BinaryIO, data: bytes) -> None:
    view = memoryview(data)
    while view:  # a raw (unbuffered) stream may take part of it
        view = view[stdout.write(view):]
    stdout.flush()


BROKE = "the host or its daemon went away, or the network between: `hvagent vm show NAME` tells whether the VM runs"
ESCAPE = b"\x1d"  # Ctrl-], as virsh console
TAKEN_OVER = 4409  # the close code of a console session that another one took over (agent.api.console)


def console(url: str, token: str, ssl_context: ssl.SSLContext | None, stdin: BinaryIO, stdout: BinaryIO,
            notice: TextIO) -> int:
    """The guest's serial console on this terminal until Ctrl-] (``ESCAPE``) is typed or the daemon
    ends the session. A terminal on ``stdin`` is put in raw mode (every key goes to the guest, as
    typed) and restored at the end. 0 when left with Ctrl-] or when the VM stopped; 1 when another
    session took the console over; an ``EnvError`` when the connection broke."""
    ending: list[str] = []
    broke: ConnectionClosedError | None = None
    with connect_relay(url, token, ssl_context, "console") as ws, _raw(stdin):
        notice.write("connected to the console; Ctrl-] leaves\r\n")
        notice.flush()

        def upstream() -> None:
            try:
                for chunk in _chunks(stdin, stop):
                    typed, escape, _ = chunk.partition(ESCAPE)
                    if typed:
                        ws.send(typed)
                    if escape:
                        ending.append("left")
                        return
            except (ConnectionClosed, OSError):
                pass
            finally:
                ws.close()

        stop = threading.Event()
        pump = threading.Thread(target=upstream, name="console-stdin", daemon=True)
        pump.start()
        try:
            for message in ws:
                if isinstance(message, bytes):
                    _write_all(stdout, message)
        except ConnectionClosedError as e:
            broke = e
        except ConnectionClosed:
            pass
        finally:
            stop.set()
            ws.close()
            pump.join(timeout=5)
    if ending:
        notice.write("\r\nleft the console\r\n")
        return 0
    if broke is not None and ws.close_code != TAKEN_OVER:  # no close frame, or the daemon's error
        raise EnvError(f"console: {url}: the connection broke mid-session ({broke})", hint=BROKE)
    notice.write(f"\r\nconsole: {ws.close_reason or 'the connection closed'}\r\n")
    return 1 if ws.close_code == TAKEN_OVER else 0


@contextlib.contextmanager
def _raw(stdin: BinaryIO) -> Iterator[None]:
    """``stdin`` in raw mode while inside, if it is a terminal; restored however the block ends."""
    try:
        fd = stdin.fileno()
        saved = termios.tcgetattr(fd)
    except (OSError, AttributeError, io.UnsupportedOperation, termios.error):
        yield
        return
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
