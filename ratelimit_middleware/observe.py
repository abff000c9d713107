"""Watching what the limiter decides: observers for metrics and audit logs, without touching the decision.

The middlewares (and anything else holding a ``Gate``) report to each observer every decision with its
latency, every failure (a key function or limiter that raised, and what the failure policy did), and every
settled reservation. ``Observer`` does nothing by default: subclass it and override what you need.
``EventHook`` turns denials and failures into ``Event`` objects for a callback (audit logs). Observers must
be quick and must not raise; an observer that raises is logged and the request goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .decision import Decision

__all__ = ["Event", "EventHook", "Observer", "notify"]

logger = logging.getLogger("ratelimit_middleware")


class Observer:
    """Receives decisions, failures and settlements; every method does nothing unless overridden."""

    def decision(self, decision: Decision, user: str, model: str, seconds: float, shadow: bool) -> None:
        """A request was decided in ``seconds``; ``shadow``: denied, but let through by shadow mode."""

    def failure(self, stage: str, error: BaseException, outcome: str) -> None:
        """``stage`` ("the key function", "the limiter"...) raised; ``outcome`` is what happened next."""

    def settlement(self, model: str, reserved: tuple[int, int], actual: tuple[int, int] | None) -> None:
        """A reservation was settled with ``actual`` ``(input, output)`` tokens, or cancelled (``None``)."""

    def fallback(self, policy: str, decision: Decision) -> None:
        """The storage was unreachable and its ``on_error`` ``policy`` (allow, local) decided instead."""


@dataclass(frozen=True)
class Event:
    """A denial or a failure, for audit logs."""

    kind: str
    """``"denied"``, ``"shadow_denied"`` or ``"failure"``."""
    user: str | None = None
    model: str | None = None
    decision: Decision | None = None
    stage: str | None = None
    error: BaseException | None = None
    outcome: str | None = None


class EventHook(Observer):
    """Calls ``callback(event)`` on every denial (shadow ones included) and every failure."""

    def __init__(self, callback: Callable[[Event], None]) -> None:
        if not callable(callback):
            raise TypeError(f"callback must be callable, got {callback!r}")
        self.callback = callback

    def decision(self, decision: Decision, user: str, model: str, seconds: float, shadow: bool) -> None:
        if not decision.allowed:
            self.callback(Event("shadow_denied" if shadow else "denied", user, model, decision))

    def failure(self, stage: str, error: BaseException, outcome: str) -> None:
        self.callback(Event("failure", stage=stage, error=error, outcome=outcome))


def notify(observers: Sequence[Observer], method: str, *args: object) -> None:
    """Call ``method`` on every observer; one that raises is logged, never propagated."""
    for observer in observers:
        try:
            getattr(observer, method)(*args)
        except Exception:
            logger.exception("observer %r failed in %s()", observer, method)
