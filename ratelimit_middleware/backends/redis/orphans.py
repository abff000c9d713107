"""Work that must not be lost when its caller is cancelled: a reservation that Redis makes all the same.

A caller cancelled while awaiting a script (an outer timeout, a server cancelling the task of a request whose
client left) cannot stop the script once it was sent. ``kept(work, orphan)`` runs ``work`` in a task of its
own, which the caller's cancellation does not stop: the caller gets its ``CancelledError`` at once, and
``orphan`` gets the result when it comes (a call on a standalone Redis needs no task: the coalescer hands
its reply to its orphan). ``detached(work, what)`` runs what an orphan starts (undoing a reservation) with
no one awaiting it, and logs its failure. An event loop holds its tasks only weakly: these are held here
until they end.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["detached", "kept"]

T = TypeVar("T")

logger = logging.getLogger("ratelimit_middleware")

_RUNNING: set[asyncio.Task[Any]] = set()


async def kept(work: Coroutine[Any, Any, T], orphan: Callable[[T], object]) -> T:
    """``work``'s result; if the caller is cancelled meanwhile, ``work`` goes on and ``orphan`` gets its
    result (nothing if it fails: its error has no one to go to)."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        _hold(task)
        task.add_done_callback(functools.partial(_orphaned, orphan))
        raise


def detached(work: Coroutine[Any, Any, object], what: str) -> None:
    """Run ``work`` to its end, awaited by no one; a failure is logged as ``what`` failing."""
    task = asyncio.ensure_future(work)
    _hold(task)
    task.add_done_callback(functools.partial(_ended, what))


def _hold(task: asyncio.Task[Any]) -> None:
    _RUNNING.add(task)
    task.add_done_callback(_RUNNING.discard)


def _orphaned(orphan: Callable[[T], object], task: asyncio.Task[T]) -> None:
    if not task.cancelled() and task.exception() is None:
        orphan(task.result())


def _ended(what: str, task: asyncio.Task[Any]) -> None:
    error = None if task.cancelled() else task.exception()
    if error is not None:
        logger.warning("%s failed (%s: %s)", what, type(error).__name__, error)
