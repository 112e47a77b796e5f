"""Image versions and tracks: pure logic, no I/O.

A version is ``MAJOR.MINOR`` (the family is the major), compared numerically, so 1.10 > 1.9.
A track is what a VM asks for: ``tiny-1.18`` (pinned) or ``tiny-1.*`` (latest in family 1).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import total_ordering

from agent.errors import InputError, NotFound

_NUM = r"(0|[1-9][0-9]{0,5})"
_VERSION_RE = re.compile(rf"^{_NUM}\.{_NUM}$")
_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,30}$")
_TRACK_RE = re.compile(rf"^(?P<name>[a-z][a-z0-9]{{0,30}})-(?P<major>{_NUM})\.(?P<minor>{_NUM}|\*)$")


@total_ordering
@dataclass(frozen=True)
class Version:
    major: int
    minor: int

    @classmethod
    def parse(cls, text: object, field: str = "version") -> Version:
        if not isinstance(text, str) or not _VERSION_RE.match(text):
            raise InputError(
                f"{field}: {text!r} is not a version; accepted: MAJOR.MINOR in decimal without "
                "leading zeros, e.g. 1.18"
            )
        major, minor = text.split(".")
        return cls(int(major), int(minor))

    @property
    def family(self) -> int:
        return self.major

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return (self.major, self.minor) < (other.major, other.minor)

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"


def check_image_name(name: object, field: str = "name") -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InputError(
            f"{field}: {name!r} is not an image name; accepted: a lowercase letter then up to 30 "
            "lowercase letters or digits, e.g. tiny"
        )
    return name


@dataclass(frozen=True)
class Track:
    """``name-MAJOR.MINOR`` pins one version; ``name-MAJOR.*`` follows the family's latest."""

    name: str
    family: int
    minor: int | None  # None: latest in family

    @classmethod
    def parse(cls, text: object, field: str = "image") -> Track:
        m = _TRACK_RE.match(text) if isinstance(text, str) else None
        if m is None:
            raise InputError(
                f"{field}: {text!r} is not an image track; accepted: NAME-MAJOR.MINOR to pin a "
                "version (tiny-1.18) or NAME-MAJOR.* for the latest in a family (tiny-1.*)"
            )
        minor = m.group("minor")
        return cls(m.group("name"), int(m.group("major")), None if minor == "*" else int(minor))

    @property
    def pinned(self) -> bool:
        return self.minor is not None

    @property
    def pinned_version(self) -> Version | None:
        return None if self.minor is None else Version(self.family, self.minor)

    def __str__(self) -> str:
        return f"{self.name}-{self.family}.{'*' if self.minor is None else self.minor}"

    def resolve(self, available: Iterable[tuple[str, Version]], usable: Iterable[tuple[str, Version]]) -> Version:
        """Pick the version this track runs.

        ``available``: every (name, version) in the catalog, whatever its state.
        ``usable``: those a track may choose (active, not bad). A pinned track needs its
        version to exist; a latest track takes the newest usable version of its family and
        never another family.
        """
        have = [v for n, v in available if n == self.name]
        if not any(v.family == self.family for v in have):
            known = sorted({v.family for v in have})
            families = ", ".join(f"{self.name}-{f}.*" for f in known) or "none"
            raise NotFound(f"image: no family {self.name}-{self.family} in the catalog; available: {families}")
        if self.pinned_version is not None:
            if self.pinned_version not in have:
                versions = ", ".join(str(v) for v in sorted(have) if v.family == self.family)
                raise NotFound(f"image: {self} is not in the catalog; family {self.family} has: {versions}")
            return self.pinned_version
        candidates = [v for n, v in usable if n == self.name and v.family == self.family]
        if not candidates:
            raise NotFound(f"image: {self} has no active version that is not marked bad")
        return max(candidates)
