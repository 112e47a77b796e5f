"""Maintenance windows: when a latest-track VM may be swapped.

A window is days and a time range in a time zone: ``Sat 02:00-04:00``, ``Mon-Fri 22:00-02:00``
(a range past midnight ends the next day), ``Sat,Sun 00:00-24:00``, ``daily 03:00-05:00``. It is
set per host (``maintenance`` in the configuration) and per VM (``maintenance`` in its spec);
a VM's own window wins. A VM with neither may be swapped at any time.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator, model_validator

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_RE = re.compile(r"^(?P<days>\S+)\s+(?P<h1>\d{2}):(?P<m1>\d{2})-(?P<h2>\d{2}):(?P<m2>\d{2})$")
ACCEPTED = "accepted: DAYS HH:MM-HH:MM, DAYS as Sat, Mon-Fri, Sat,Sun or daily, e.g. \"Sat 02:00-04:00\""


@dataclass(frozen=True)
class Window:
    days: frozenset[int]  # 0 Monday .. 6 Sunday: the days a window starts on
    start: int  # minutes after midnight
    end: int  # minutes after midnight; <= start: the window ends the next day
    tz: ZoneInfo
    text: str

    def _spans(self, day: dt.date) -> tuple[dt.datetime, dt.datetime]:
        opens = dt.datetime.combine(day, dt.time(), self.tz) + dt.timedelta(minutes=self.start)
        length = self.end - self.start if self.end > self.start else self.end + 24 * 60 - self.start
        return opens, opens + dt.timedelta(minutes=length)

    def is_open(self, at: float) -> bool:
        return self.next_open(at) <= at

    def next_open(self, at: float) -> float:
        """``at`` itself while the window is open, else when it opens next (epoch seconds)."""
        now = dt.datetime.fromtimestamp(at, self.tz)
        for offset in range(-1, 8):  # yesterday's window may still be open past midnight
            day = now.date() + dt.timedelta(days=offset)
            if day.weekday() not in self.days:
                continue
            opens, closes = self._spans(day)
            if closes > now:
                return at if opens <= now else opens.timestamp()
        raise AssertionError("a window with a day opens within a week")

    def __str__(self) -> str:
        return f"{self.text} {self.tz.key}"


def parse_window(text: str, tz: str = "UTC") -> Window:
    """``text`` in time zone ``tz``; ValueError naming what is wrong and what is accepted."""
    m = _RE.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a window; {ACCEPTED}")
    days: set[int] = set()
    for part in m["days"].lower().split(","):
        if part in ("daily", "*"):
            days |= set(range(7))
        elif "-" in part and all(p in DAYS for p in part.split("-", 1)):
            first, last = (DAYS.index(p) for p in part.split("-", 1))
            days |= {d % 7 for d in range(first, last + 1 + (7 if last < first else 0))}
        elif part[:3] in DAYS and part in (part[:3], _full(part[:3])):
            days.add(DAYS.index(part[:3]))
        else:
            raise ValueError(f"{text!r}: {part!r} is not a day; {ACCEPTED}")
    h1, m1, h2, m2 = (int(m[k]) for k in ("h1", "m1", "h2", "m2"))
    if h1 > 23 or m1 > 59 or h2 > 24 or m2 > 59 or (h2 == 24 and m2):
        raise ValueError(f"{text!r}: a time is out of range (00:00 to 24:00)")
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if start == end % (24 * 60) and end != 24 * 60:
        raise ValueError(f"{text!r}: the window is empty (it starts when it ends)")
    try:
        zone = ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError) as e:
        raise ValueError(f"tz: {tz!r} is not a known time zone (IANA names, e.g. UTC, Europe/Berlin)") from e
    return Window(frozenset(days), start, end, zone, text.strip())


def _full(abbrev: str) -> str:
    return {"mon": "monday", "tue": "tuesday", "wed": "wednesday", "thu": "thursday", "fri": "friday",
            "sat": "saturday", "sun": "sunday"}[abbrev]


class Maintenance(BaseModel):
    """``maintenance: {window: "Sat 02:00-04:00", tz: UTC}`` in the configuration or a VM's spec."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    window: StrictStr = Field(max_length=64, description="DAYS HH:MM-HH:MM, e.g. \"Sat 02:00-04:00\"")
    tz: StrictStr = Field("UTC", max_length=64, description="IANA time zone of the window")

    @field_validator("window")
    @classmethod
    def _window(cls, v: str) -> str:
        parse_window(v)
        return v

    @model_validator(mode="after")
    def _tz(self) -> Maintenance:
        parse_window(self.window, self.tz)
        return self

    def parsed(self) -> Window:
        return parse_window(self.window, self.tz)
