"""Deprecated names: one :class:`DeprecationWarning` naming the replacement.

``warn_deprecated(old, new)`` issues ``"<old> is deprecated: use <new>"``, a constant message per name, so Python's
warning filter (its default action for a location) shows it once per place that uses the old name; no registry of
ours. ``deprecated_attribute(module_name, aliases)`` is a module ``__getattr__`` (PEP 562) resolving old names.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, Tuple

__all__ = ["warn_deprecated", "deprecated_attribute"]


def warn_deprecated(old: str, new: str, stacklevel: int = 3) -> None:
    """A DeprecationWarning "``old`` is deprecated: use ``new``" attributed to the caller's caller."""
    warnings.warn(f"{old} is deprecated: use {new}", DeprecationWarning, stacklevel=stacklevel)


def deprecated_attribute(module_name: str, aliases: Dict[str, Tuple[str, Callable[[], Any]]]) -> Callable[[str], Any]:
    """A module ``__getattr__``: ``aliases[name] = (new name, getter)`` warns (:func:`warn_deprecated`) and returns
    ``getter()``; any other name is the usual AttributeError."""

    def __getattr__(name: str) -> Any:
        if name in aliases:
            new, get = aliases[name]
            warn_deprecated(f"{module_name}.{name}", new)
            return get()
        raise AttributeError(f"module {module_name!r} has no attribute {name!r}")

    return __getattr__
