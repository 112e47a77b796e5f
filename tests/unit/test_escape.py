"""One line means one line: what is echoed back carries no control character."""

from __future__ import annotations

import logging
import unicodedata
from pathlib import Path

import pytest

from agent.errors import HvError, ImageRefused, one_line
from agent.state import State, logfmt

pytestmark = pytest.mark.unit

EVIL = "esc\n\x1b[31mred.qcow2"
ALL = "".join(chr(c) for c in range(0x10000) if not 0xD800 <= c <= 0xDFFF)  # every control is in the BMP


def _clean(text: str) -> bool:
    return len(text.splitlines()) <= 1 and not any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in text)


@pytest.mark.parametrize(("raw", "shown"), [
    ("a\nb", "a\\nb"), ("a\rb", "a\\rb"), ("a\tb", "a\\tb"), ("\x00", "\\x00"), ("\x1b[31m", "\\x1b[31m"),
    ("\x7f", "\\x7f"), ("\x85", "\\x85"), ("\x9b", "\\x9b"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029"),
    ("plain text, é, 日本, \\n as typed", "plain text, é, 日本, \\n as typed"),
])
def test_one_line_shows_controls_as_escapes(raw: str, shown: str) -> None:
    assert one_line(raw) == shown


def test_no_character_survives_as_a_control_or_a_line_break() -> None:
    shown = one_line(ALL)
    assert _clean(shown)
    assert one_line(shown) == shown  # escaping where made and again where printed changes nothing


def test_an_error_is_one_line_message_and_hint() -> None:
    e = ImageRefused(f"{EVIL}: sha256 differs", hint="see\u2028this")
    assert str(e) == "esc\\n\\x1b[31mred.qcow2: sha256 differs (hint: see\\u2028this)"
    assert isinstance(e, HvError) and _clean(str(e)) and _clean(e.message)


@pytest.mark.parametrize(("value", "shown"), [
    ("red\x1b[31m", "msg=red\\x1b[31m"),
    ("two\nlines", "msg=two\\nlines"),
    ("with space\x1b", 'msg="with space\\\\x1b"'),
    ("", 'msg=""'),
])
def test_logfmt_escapes_controls(value: str, shown: str) -> None:
    assert logfmt({"msg": value, "vm": None}) == shown


def test_logfmt_of_every_character_is_one_clean_line() -> None:
    assert _clean(logfmt({"msg": ALL, "file": EVIL}))


def test_event_messages_are_stored_and_logged_escaped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = State(tmp_path / "state.db")
    with caplog.at_level(logging.INFO, logger="hvagent.event"):
        state.event("image.inbox-failed", f"{EVIL}: refused")
    assert state.events()[-1].message == "esc\\n\\x1b[31mred.qcow2: refused"
    assert [r.getMessage() for r in caplog.records] == ['event=image.inbox-failed msg="esc\\\\n\\\\x1b[31mred.qcow2:'
                                                        ' refused"']
