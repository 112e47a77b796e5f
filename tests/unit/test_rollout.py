"""Pure logic of rollouts: batch sizes, durations, family names."""

from __future__ import annotations

import pytest

from agent.errors import InputError
from agent.rollout import batch_size, parse_duration, parse_family, parse_max_unavailable

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("text,total,size", [
    ("1", 5, 1), ("3", 12, 3), ("20", 4, 20), ("25%", 12, 3), ("50%", 3, 1), ("100%", 7, 7), ("1%", 3, 1),
    ("34%", 3, 1), ("67%", 3, 2),
])
def test_batch_size(text: str, total: int, size: int) -> None:
    assert batch_size(parse_max_unavailable(text), total) == size


@pytest.mark.parametrize("bad", ["0", "0%", "101%", "-1", "1.5", "", "x", "10 %", "%", "007", 0])
def test_max_unavailable_refused(bad: object) -> None:
    with pytest.raises(InputError, match="max_unavailable"):
        parse_max_unavailable(bad)


@pytest.mark.parametrize("text,seconds", [("0", 0), ("90s", 90), ("30m", 1800), ("12h", 43200), ("14d", 1209600),
                                          ("5", 5)])
def test_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["-1d", "1w", "d", "1.5h", "", "14 d"])
def test_duration_refused(bad: str) -> None:
    with pytest.raises(InputError, match="grace"):
        parse_duration(bad)


@pytest.mark.parametrize("text,parsed", [("tiny-1", ("tiny", 1)), ("tiny-1.*", ("tiny", 1)),
                                         ("debian-12", ("debian", 12)), ("my-os-2", ("my-os", 2))])
def test_family(text: str, parsed: tuple[str, int]) -> None:
    assert parse_family(text) == parsed


@pytest.mark.parametrize("bad", ["tiny", "tiny-1.2", "tiny-x", "Tiny-1", "tiny-01", "-1", "tiny-1.*.*"])
def test_family_refused(bad: str) -> None:
    with pytest.raises(InputError, match="family"):
        parse_family(bad)
