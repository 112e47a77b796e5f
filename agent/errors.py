"""The one user-facing failure path: an error is one line naming what is wrong."""

from __future__ import annotations

import re

# C0 controls, DEL, C1 controls and the Unicode line and paragraph separators: what can end a
# line or drive a terminal when a name, a field or a guest's words are echoed back.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(m: re.Match[str]) -> str:
    c = m.group()
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) <= 0xFF else f"\\u{ord(c):04x}")


def one_line(text: str) -> str:
    """``text`` with each control character shown as a visible escape (``\\n``, ``\\x1b``, ``\\u2028``).

    For display, not for decoding: a backslash is left as it is, so applying it twice changes
    nothing (a message escaped where it is made passes unchanged where it is printed).
    """
    return _CONTROL.sub(_escape, text)


class HvError(Exception):
    """A failure the user can act on. Printed as one line; exit status ``exit_code``."""

    exit_code = 2
    http_status = 400

    def __init__(self, message: str, hint: str | None = None) -> None:
        message, hint = one_line(message), None if hint is None else one_line(hint)
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


class InputError(HvError):
    """Bad input: a field, a file or an argument. Exit 2, HTTP 400/422."""


class NotFound(HvError):
    """An image, VM or track that does not exist. Exit 2, HTTP 404."""

    http_status = 404


class Conflict(HvError):
    """The request collides with existing state. Exit 2, HTTP 409."""

    http_status = 409


class ImageRefused(InputError):
    """An image file failed a safety check; nothing was stored."""


class EnvError(HvError):
    """The environment is at fault (libvirtd down, disk full, tool missing). Exit 1."""

    exit_code = 1
    http_status = 503


class HealthError(HvError):
    """A guest did not become healthy in time."""

    exit_code = 1
    http_status = 500


class Unauthorized(HvError):
    """A missing, unknown or expired API token. HTTP 401."""

    http_status = 401


class Forbidden(HvError):
    """The principal may not do this (an admin-only call, a quota). Exit 2, HTTP 403."""

    http_status = 403
