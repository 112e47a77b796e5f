"""The one user-facing failure path: an error is one line naming what is wrong."""

from __future__ import annotations


class HvError(Exception):
    """A failure the user can act on. Printed as one line; exit status ``exit_code``."""

    exit_code = 2
    http_status = 400

    def __init__(self, message: str, hint: str | None = None) -> None:
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
