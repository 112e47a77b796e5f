"""A small SSH server in this process on 127.0.0.1 (paramiko), standing in for a guest."""

from __future__ import annotations

import contextlib
import io
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import paramiko
from paramiko.common import AUTH_SUCCESSFUL, OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED, OPEN_SUCCEEDED

from agent.seed import KeyPair, new_ed25519

# Runs in a thread of its own for each exec request: writes the output, sends the exit status.
Command = Callable[[paramiko.Channel], None]


@dataclass(frozen=True)
class Guest:
    port: int
    host_key: str  # the public host key to pin
    agent_key: str  # a private key the guest accepts (it accepts any)


class _Interface(paramiko.ServerInterface):
    def __init__(self, command: Command) -> None:
        self.command = command

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        return AUTH_SUCCESSFUL

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return OPEN_SUCCEEDED if kind == "session" else OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        threading.Thread(target=self._run, args=(channel,), daemon=True).start()
        return True

    def _run(self, channel: paramiko.Channel) -> None:
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):  # the client went away
            self.command(channel)
            channel.close()


@contextlib.contextmanager
def ssh_server(command: Command, *, presents: KeyPair | None = None) -> Iterator[Guest]:
    """A guest on 127.0.0.1 that runs ``command`` for every exec request; its pinned host key is
    the one it presents unless ``presents`` names another."""
    pinned, agent = new_ed25519("guest"), new_ed25519("agent")
    pkey = paramiko.Ed25519Key.from_private_key(io.StringIO((presents or pinned).private))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    transports: list[paramiko.Transport] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # closed: the test is over
                return
            t = paramiko.Transport(conn)
            t.add_server_key(pkey)
            transports.append(t)
            with contextlib.suppress(paramiko.SSHException, EOFError, OSError):
                t.start_server(server=_Interface(command))

    acceptor = threading.Thread(target=serve, daemon=True)
    acceptor.start()
    try:
        yield Guest(listener.getsockname()[1], pinned.public, agent.private)
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        acceptor.join(5)
        for t in transports:
            t.close()
