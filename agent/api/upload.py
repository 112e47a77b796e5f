"""A multipart/form-data body read part by part as it arrives: nothing is spooled.

python-multipart's parser is pushed the body's chunks as the reader asks for them, so a part's
data can stream straight into its destination (the image into the store's hashing copy).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from agent.errors import InputError

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks


@dataclass(frozen=True)
class Part:
    name: str
    filename: str | None


_PART_END = object()  # in the event queue: the current part's data is over


class FormStream:
    """The parts of a multipart/form-data body, in order. ``pull`` returns the body's next chunk,
    ``b""`` at its end; ``next_part`` moves to the next part, ``read`` reads the current one."""

    def __init__(self, content_type: str | None, pull: Callable[[], bytes]) -> None:
        ctype, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if ctype != b"multipart/form-data" or not boundary:
            raise InputError("request body: must be multipart/form-data (with a boundary)")
        self._pull = pull
        self._events: deque[Part | bytes | object] = deque()
        self._headers: list[tuple[bytes, bytes]] = []
        self._field = bytearray()
        self._value = bytearray()
        self._complete = False  # the closing boundary was seen
        self._drained = False  # ... and ``pull`` returned b""
        self._part: Part | None = None
        self._last = False
        self._pending = b""
        callbacks: MultipartCallbacks = {
            "on_part_begin": self._headers.clear,
            "on_header_field": lambda data, start, end: self._field.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": lambda data, start, end: self._events.append(data[start:end]) if end > start else None,
            "on_part_end": lambda: self._events.append(_PART_END),
            "on_end": self._end,
        }
        try:
            self._parser = MultipartParser(boundary, callbacks)
        except MultipartParseError as e:
            raise InputError(f"request body: {e}") from None

    # -- reading ---------------------------------------------------------------------------------
    def next_part(self, *, last: bool = False) -> Part | None:
        """The next part (what is left of the current one is skipped); None after the last one.
        With ``last``, its data ends only with the form: a part after it is refused."""
        while self._part is not None:
            self._pending = b""
            self.read()
        event = self._next_event()
        if event is None:
            return None
        assert isinstance(event, Part), event  # a part's data and end come after its start
        self._part, self._last = event, last
        return event

    def read(self, size: int = -1, /) -> bytes:
        """The current part's data, up to ``size`` bytes; ``b""`` at its end."""
        while not self._pending:
            if self._part is None:
                return b""
            event = self._next_event()
            if event is _PART_END:
                if self._last and isinstance(after := self._next_event(), Part):
                    raise InputError(f"multipart: part {_shown(after.name)!r} after {_shown(self._part.name)!r}, "
                                     f"which must be the last part")
                self._part = None
                return b""
            assert isinstance(event, bytes), event
            self._pending = event
        n = len(self._pending) if size < 0 else size
        data, self._pending = self._pending[:n], self._pending[n:]
        return data

    def read_all(self, limit: int, what: str) -> bytes:
        """The rest of the current part, refused if longer than ``limit`` bytes."""
        buf = bytearray()
        while chunk := self.read(limit + 1 - len(buf)):
            buf += chunk
            if len(buf) > limit:
                raise InputError(f"{what}: larger than {limit} bytes")
        return bytes(buf)

    def finish(self) -> None:
        """Read what follows the form (its epilogue) to the end of the body."""
        if self.next_part() is not None:
            raise InputError("multipart: more parts than expected")
        while not self._drained:
            self._drained = not self._pull()

    # -- the parser's side -----------------------------------------------------------------------
    def _next_event(self) -> Part | bytes | object | None:
        while not self._events:
            if self._complete:
                return None
            chunk = self._pull()
            if not chunk:
                self._drained = True
                raise InputError("request body: ended before the multipart form did")
            try:
                self._parser.write(chunk)
            except MultipartParseError as e:
                raise InputError(f"request body: not a valid multipart form ({e})") from None
        return self._events.popleft()

    def _header_end(self) -> None:
        self._headers.append((bytes(self._field).lower(), bytes(self._value)))
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        disposition = dict(self._headers).get(b"content-disposition")
        kind, params = parse_options_header(disposition)
        name = params.get(b"name")
        if kind != b"form-data" or name is None:
            raise InputError("multipart: a part without Content-Disposition: form-data; name=...")
        filename = params.get(b"filename")
        self._events.append(Part(name.decode(errors="replace"),
                                 None if filename is None else filename.decode(errors="replace")))

    def _end(self) -> None:
        self._complete = True


def _shown(name: str) -> str:
    return name if len(name) <= 64 else name[:64] + "…"
