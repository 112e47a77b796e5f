"""The client end of the API's SSH relay (``/v1/vms/{name}/ssh``): what an SSH ProxyCommand runs,

    ssh -o ProxyCommand='hvagent vm proxy NAME' root@NAME

copying its standard input to the WebSocket and the WebSocket to its standard output. A refusal
(a wrong token, another tenant's VM, a stopped VM) is raised as the one-line error the daemon sent.
"""

from __future__ import annotations

import io
import json
import os
import select
import ssl
import threading
from collections.abc import Iterator
from typing import BinaryIO

from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.sync.client import ClientConnection, connect

from agent import __version__
from agent.errors import Conflict, EnvError, Forbidden, HvError, InputError, NotFound, Unauthorized

__all__ = ["connect_relay", "proxy"]

CHUNK = 64 << 10
OPEN_TIMEOUT = 30.0
_BY_STATUS: dict[int, type[HvError]] = {400: InputError, 401: Unauthorized, 403: Forbidden, 404: NotFound,
                                         409: Conflict, 422: InputError}


def connect_relay(url: str, token: str, ssl_context: ssl.SSLContext | None) -> ClientConnection:
    """The open relay to a guest's SSH port (``ws://`` or ``wss://`` with ``ssl_context``), to be
    used as a context manager (``with connect_relay(...) as ws:``), which closes it."""
    try:
        return connect(url, ssl=ssl_context, additional_headers={"Authorization": f"Bearer {token}"},
                       user_agent_header=f"hvagent/{__version__}", compression=None, open_timeout=OPEN_TIMEOUT,
                       max_size=1 << 20)
    except InvalidStatus as e:
        raise _refusal(url, e.response.status_code, bytes(e.response.body)) from e
    except InvalidURI as e:
        raise InputError(f"ssh relay: {url}: not a ws:// or wss:// URL") from e
    except (OSError, TimeoutError, InvalidHandshake) as e:
        raise EnvError(f"ssh relay: {url}: {str(e) or type(e).__name__}") from e


def _refusal(url: str, status: int, body: bytes) -> HvError:
    try:
        message = str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        message = f"ssh relay: {url}: HTTP {status}"
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
            raise EnvError(f"ssh relay: {url}: {e}") from e
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
