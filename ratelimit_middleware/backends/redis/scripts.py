"""The Lua scripts, one per algorithm, read from the ``lua`` folder beside this module.

Each script is ``common.lua`` + ``<algorithm>.lua`` + ``concurrency.lua`` + ``driver.lua``: shared helpers,
the algorithm's functions (mirroring ``algorithms/<algorithm>.py``), the concurrency leases, and the
all-or-nothing decision over every rule (for one call, or for each call of a batch: see ``coalescer``).
"""

from __future__ import annotations

import hashlib
from functools import cache
from importlib.resources import files
from typing import NamedTuple

from ...algorithms import ALGORITHMS

__all__ = ["Script", "script_for"]


class Script(NamedTuple):
    """A script's source and the SHA1 that EVALSHA names it by."""

    name: str
    source: str
    sha: str


def _read(name: str) -> str:
    return (files(__package__) / "lua" / f"{name}.lua").read_text(encoding="utf-8")


@cache
def script_for(algorithm: str) -> Script:
    """The script deciding every rule of a policy that uses ``algorithm``."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"no Redis script for algorithm {algorithm!r}")
    source = "\n".join((_read("common"), _read(algorithm), _read("concurrency"), _read("driver")))
    return Script(algorithm, source, hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest())
