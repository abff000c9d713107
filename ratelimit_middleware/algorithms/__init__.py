"""Rate limiting algorithms, each a pure evaluation of one window over a stored state.

``ALGORITHMS`` maps the public names (the ``algorithm=`` argument) to their classes. DESIGN.md compares them.
"""

from __future__ import annotations

from typing import Any

from .base import Algorithm, Verdict
from .fixed_window import FixedWindow
from .gcra import GCRA
from .sliding_log import SlidingLog
from .sliding_window import SlidingWindow

__all__ = ["ALGORITHMS", "Algorithm", "Verdict", "algorithm_class"]

ALGORITHMS: dict[str, type[Algorithm[Any]]] = {
    cls.name: cls for cls in (SlidingLog, SlidingWindow, GCRA, FixedWindow)
}


def algorithm_class(name: str) -> type[Algorithm[Any]]:
    """The class for ``name``; ``ValueError`` listing the choices otherwise."""
    try:
        return ALGORITHMS[name]
    except (KeyError, TypeError):
        choices = ", ".join(repr(known) for known in ALGORITHMS)
        raise ValueError(f"unknown algorithm {name!r}: choose one of {choices}") from None
