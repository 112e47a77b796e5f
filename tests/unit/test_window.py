"""Maintenance windows: parsing, whether one is open, when it opens next (the clock injected)."""

from __future__ import annotations

import datetime as dt

import pytest
from pydantic import ValidationError

from agent.config import Config
from agent.errors import InputError
from agent.seed import new_ed25519
from agent.spec import parse_spec
from agent.window import Maintenance, parse_window

pytestmark = pytest.mark.unit


def at(text: str, tz: str = "UTC") -> float:
    """Epoch seconds of ``YYYY-MM-DD HH:MM`` in ``tz`` (2026-12-05 is a Saturday)."""
    from zoneinfo import ZoneInfo

    return dt.datetime.strptime(text, "%Y-%m-%d %H:%M").replace(tzinfo=ZoneInfo(tz)).timestamp()


def test_a_saturday_window() -> None:
    w = parse_window("Sat 02:00-04:00")
    assert not w.is_open(at("2026-12-05 01:59"))
    assert w.is_open(at("2026-12-05 02:00")) and w.is_open(at("2026-12-05 03:59"))
    assert not w.is_open(at("2026-12-05 04:00"))
    assert w.next_open(at("2026-12-04 17:00")) == at("2026-12-05 02:00")  # Friday: tomorrow
    assert w.next_open(at("2026-12-05 05:00")) == at("2026-12-12 02:00")  # just missed: a week on
    assert w.next_open(at("2026-12-05 03:00")) == at("2026-12-05 03:00")  # open: now


def test_past_midnight_ranges_and_day_lists() -> None:
    w = parse_window("Mon-Fri 22:00-02:00")
    assert w.is_open(at("2026-12-04 23:30"))  # Friday night
    assert w.is_open(at("2026-12-05 01:30"))  # Friday's window, on Saturday morning
    assert not w.is_open(at("2026-12-05 22:30"))  # Saturday night: not a listed day
    assert w.next_open(at("2026-12-05 12:00")) == at("2026-12-07 22:00")  # Monday
    weekend = parse_window("Sat,Sun 00:00-24:00")
    assert weekend.is_open(at("2026-12-06 23:59")) and not weekend.is_open(at("2026-12-07 00:00"))
    assert parse_window("daily 03:00-05:00").next_open(at("2026-12-09 06:00")) == at("2026-12-10 03:00")
    assert parse_window("Fri-Mon 01:00-02:00").days == frozenset({4, 5, 6, 0})


def test_time_zones() -> None:
    w = parse_window("Sat 02:00-04:00", "Europe/Berlin")  # 01:00-03:00 UTC in December (UTC+1)
    assert w.is_open(at("2026-12-05 02:30", "Europe/Berlin"))
    assert w.is_open(at("2026-12-05 01:30")) and w.is_open(at("2026-12-05 02:30"))
    assert not w.is_open(at("2026-12-05 00:30")) and not w.is_open(at("2026-12-05 03:30"))
    assert w.next_open(at("2026-12-04 12:00")) == at("2026-12-05 01:00")
    assert str(w) == "Sat 02:00-04:00 Europe/Berlin"


@pytest.mark.parametrize(("window", "tz", "needle"), [
    ("Sat", "UTC", "is not a window; accepted: DAYS HH:MM-HH:MM"),
    ("Caturday 02:00-04:00", "UTC", "'caturday' is not a day"),
    ("Sat 25:00-26:00", "UTC", "a time is out of range"),
    ("Sat 02:00-02:00", "UTC", "the window is empty"),
    ("Sat 02:00-04:00", "Mars/Olympus", "tz: 'Mars/Olympus' is not a known time zone"),
])
def test_bad_windows_are_one_line_naming_what_is_accepted(window: str, tz: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle) as e:
        parse_window(window, tz)
    assert "\n" not in str(e.value)
    with pytest.raises(ValidationError, match=needle):
        Maintenance(window=window, tz=tz)


def test_host_and_spec_take_a_window_and_refuse_a_bad_one() -> None:
    cfg = Config.model_validate({"maintenance": {"window": "Sat 02:00-04:00", "tz": "UTC"}})
    assert cfg.maintenance is not None and cfg.maintenance.parsed().is_open(at("2026-12-05 03:00"))
    vm = {"name": "w", "owner": "a", "image": "tiny-1.*", "ssh_keys": [new_ed25519("a").public]}
    plain = parse_spec({"vms": [vm]}).vms[0]
    windowed = parse_spec({"vms": [{**vm, "maintenance": {"window": "Sun 01:00-02:00"}}]}).vms[0]
    assert windowed.maintenance is not None and windowed.digest() != plain.digest()
    with pytest.raises(InputError, match="maintenance"):
        parse_spec({"vms": [{**vm, "maintenance": {"window": "Sun 1-2"}}]})
