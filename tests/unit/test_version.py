import pytest

from agent.errors import InputError, NotFound
from agent.version import Track, Version

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("text", ["1", "1.x", "01.2", "1.02", "-1.0", "1.2.3", "", " 1.2", "1.2 ", "1..2", 1.2, None])
def test_malformed_versions_are_refused(text: object) -> None:
    with pytest.raises(InputError, match=r"version: .* accepted: MAJOR\.MINOR"):
        Version.parse(text)


def test_versions_compare_numerically() -> None:
    assert Version.parse("1.10") > Version.parse("1.9")
    assert Version.parse("2.0") > Version.parse("1.99")
    assert sorted(Version.parse(v) for v in ["1.10", "1.2", "0.0", "1.9"]) == [
        Version(0, 0), Version(1, 2), Version(1, 9), Version(1, 10)]
    assert Version.parse("1.18").family == 1
    assert str(Version.parse("1.18")) == "1.18"


@pytest.mark.parametrize("text,name,family,minor", [
    ("tiny-1.18", "tiny", 1, 18), ("tiny-1.*", "tiny", 1, None), ("debian-12.0", "debian", 12, 0)])
def test_track_parse(text: str, name: str, family: int, minor: int | None) -> None:
    t = Track.parse(text)
    assert (t.name, t.family, t.minor) == (name, family, minor)
    assert str(t) == text
    assert t.pinned == (minor is not None)


@pytest.mark.parametrize("text", ["tiny", "tiny-1", "tiny-*", "tiny-*.*", "Tiny-1.2", "tiny-1.2.3", "tiny-01.2",
                                  "tiny-1.x", "../etc-1.2", "tiny-1.*;rm", "tiny 1.2"])
def test_bad_tracks(text: str) -> None:
    with pytest.raises(InputError, match=r"image: .* accepted"):
        Track.parse(text)


CATALOG = [("tiny", Version(1, 0)), ("tiny", Version(1, 9)), ("tiny", Version(1, 10)), ("tiny", Version(2, 0)),
           ("other", Version(1, 50))]


def test_latest_track_takes_newest_usable_of_its_family_only() -> None:
    assert Track.parse("tiny-1.*").resolve(CATALOG, CATALOG) == Version(1, 10)
    assert Track.parse("tiny-2.*").resolve(CATALOG, CATALOG) == Version(2, 0)
    # 1.10 bad or retired: not usable, so the track falls back within the family, never to 2.x
    usable = [c for c in CATALOG if c != ("tiny", Version(1, 10))]
    assert Track.parse("tiny-1.*").resolve(CATALOG, usable) == Version(1, 9)


def test_pinned_track_stays() -> None:
    assert Track.parse("tiny-1.9").resolve(CATALOG, CATALOG) == Version(1, 9)
    # pinned even if not usable for new latest-track choices
    assert Track.parse("tiny-1.9").resolve(CATALOG, []) == Version(1, 9)


def test_unknown_family_or_version_is_an_error() -> None:
    with pytest.raises(NotFound, match="no family tiny-3"):
        Track.parse("tiny-3.*").resolve(CATALOG, CATALOG)
    with pytest.raises(NotFound, match=r"tiny-1\.5 is not in the catalog"):
        Track.parse("tiny-1.5").resolve(CATALOG, CATALOG)
    with pytest.raises(NotFound, match="no active version"):
        Track.parse("tiny-2.*").resolve(CATALOG, [])
    with pytest.raises(NotFound, match="no family nope-1"):
        Track.parse("nope-1.*").resolve(CATALOG, CATALOG)
