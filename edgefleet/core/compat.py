"""What Python 3.11 added that edgefleet uses, made to work on Python 3.10 too.

The agent and the client run on 3.10 (JetPack 6 and Ubuntu 22.04 ship it). Import these
names from here, never from the standard library, so one place knows the difference;
`tests/test_python310.py` (vermin) fails on a 3.11-only construct anywhere else.
"""

from __future__ import annotations

import sys
from enum import Enum

__all__ = ["StrEnum"]


class StrEnum310(str, Enum):
    """3.11's `enum.StrEnum` on 3.10: members are strings, and `str()` and `format()` of a
    member give its value ("ready", not "State.READY"); `auto()` gives the lowercased name.
    Defined on every version so that its tests run where the suite runs."""

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, format_spec: str) -> str:
        return str.__format__(self, format_spec)

    @staticmethod
    def _generate_next_value_(name: str, start: int, count: int, last_values: list[str]) -> str:
        return name.lower()


if sys.version_info >= (3, 11):
    from enum import StrEnum  # novm: the standard library's own where it has one
else:
    StrEnum = StrEnum310
