"""agent.api.upload: a multipart body read part by part, pulled in chunks of any size, never all at once."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest

from agent.api.upload import FormStream, Part
from agent.errors import InputError

pytestmark = pytest.mark.unit

IMAGE = bytes(range(256)) * 1000  # crosses every chunk size below many times
MANIFEST = b"name: tiny\nversion: '1.0'\n"


def encoded(parts: list[tuple[str, tuple[str, bytes]]]) -> tuple[str, bytes]:
    """A multipart/form-data body as httpx (the CLI's client) writes it, and its content type."""
    request = httpx.Request("POST", "http://hvagent/v1/images", files=parts)
    return request.headers["content-type"], request.read()


class Body:
    """Hands out ``body`` in chunks of ``size``; counts what was pulled."""

    def __init__(self, body: bytes, size: int) -> None:
        self.chunks: Iterator[bytes] = (body[i:i + size] for i in range(0, len(body), size))
        self.pulled = 0

    def __call__(self) -> bytes:
        chunk = next(self.chunks, b"")
        self.pulled += len(chunk)
        return chunk


def form(parts: list[tuple[str, tuple[str, bytes]]], size: int = 4096) -> tuple[FormStream, Body]:
    ctype, body = encoded(parts)
    pull = Body(body, size)
    return FormStream(ctype, pull), pull


def read_all(read: Callable[[int], bytes], n: int) -> bytes:
    out = bytearray()
    while chunk := read(n):
        out += chunk
    return bytes(out)


@pytest.mark.parametrize("size", [1, 7, 100, 4096, 1 << 20])
def test_parts_in_order_whatever_the_chunks(size: int) -> None:
    f, _ = form([("manifest", ("m.yaml", MANIFEST)), ("image", ("x.qcow2", IMAGE))], size)
    assert f.next_part() == Part("manifest", "m.yaml")
    assert f.read_all(1 << 20, "manifest") == MANIFEST
    assert f.next_part(last=True) == Part("image", "x.qcow2")
    assert read_all(f.read, 3000) == IMAGE
    f.finish()
    assert f.next_part() is None


def test_the_image_is_read_as_it_arrives() -> None:
    f, pull = form([("manifest", ("m.yaml", MANIFEST)), ("image", ("x.qcow2", IMAGE))], 4096)
    f.next_part()
    f.read_all(1 << 20, "manifest")
    f.next_part(last=True)
    assert len(f.read(10)) == 10
    assert pull.pulled <= 2 * 4096  # nothing read ahead beyond the chunk at hand


def test_a_part_after_the_last_is_refused_before_the_last_one_ends() -> None:
    f, _ = form([("manifest", ("m.yaml", MANIFEST)), ("image", ("x.qcow2", IMAGE)), ("policy", ("p", b"auto"))])
    f.next_part()
    f.next_part(last=True)
    with pytest.raises(InputError, match="part 'policy' after 'image', which must be the last part"):
        read_all(f.read, 1 << 16)


def test_a_body_cut_short_is_refused() -> None:
    ctype, body = encoded([("manifest", ("m.yaml", MANIFEST)), ("image", ("x.qcow2", IMAGE))])
    f = FormStream(ctype, Body(body[:-200], 4096))
    f.next_part()
    f.next_part(last=True)
    with pytest.raises(InputError, match="ended before the multipart form did"):
        read_all(f.read, 1 << 16)


def test_a_manifest_over_its_limit_is_refused() -> None:
    f, pull = form([("manifest", ("m.yaml", b"x" * 5000)), ("image", ("x.qcow2", IMAGE))], 1000)
    f.next_part()
    with pytest.raises(InputError, match="manifest: larger than 4096 bytes"):
        f.read_all(4096, "manifest")
    assert pull.pulled < 6000


def test_skipping_a_part() -> None:
    f, _ = form([("junk", ("j", IMAGE)), ("image", ("x.qcow2", b"abc"))], 999)
    assert f.next_part() == Part("junk", "j")
    assert f.next_part() == Part("image", "x.qcow2")
    assert f.read() == b"abc"


@pytest.mark.parametrize("ctype", [None, "application/json", "multipart/form-data", "text/plain; boundary=x"])
def test_not_a_multipart_form(ctype: str | None) -> None:
    with pytest.raises(InputError, match="must be multipart/form-data"):
        FormStream(ctype, Body(b"", 1))


def test_garbage_and_parts_without_a_name_are_refused() -> None:
    unnamed = b"--xyz\r\nContent-Type: text/plain\r\n\r\nhi\r\n--xyz--"
    f = FormStream("multipart/form-data; boundary=xyz", Body(unnamed, 5))
    with pytest.raises(InputError, match="Content-Disposition"):
        f.next_part()
    f = FormStream("multipart/form-data; boundary=xyz", Body(b"--abc\r\n" + b"x" * 100, 5))
    with pytest.raises(InputError, match="not a valid multipart form"):
        f.next_part()
