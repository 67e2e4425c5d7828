"""A patch record for CPU mode: which attribute to replace, how, and why (applied by :mod:`.cpu`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["Patch"]


@dataclass(frozen=True)
class Patch:
    """Replace ``<module>.<attr>`` (``attr`` may be ``Class.method``) while CPU mode is on.

    ``make(original) -> replacement`` builds the replacement from the original (so a patch can wrap it).
    """

    module: str
    attr: str
    make: Callable[[Any], Any]
    why: str

    @property
    def target(self) -> str:
        return f"{self.module}.{self.attr}"
