"""When Redis fails: the ``on_error`` policy of a storage, its circuit breaker, one log line per outage.

- ``"allow"`` (fail open): decisions are allowed, unchecked (``UncheckedDecision``, sent without rate limit
  headers);
- ``"deny"`` (fail closed): decisions raise ``RateLimiterUnavailable`` (503 with ``Retry-After`` in HTTP);
- ``"local"``: an in-memory limiter with the same policy decides, per process, until Redis answers again.

Counts and resets are not decisions: they raise ``RateLimiterUnavailable`` whatever the policy, since a
count or reset that quietly did nothing would be wrong. No Redis exception reaches the caller.

The breaker (see ``breaker``) sends nothing to a Redis that keeps failing: the policy answers at once, and
one call probes Redis every ``recovery`` seconds until it answers. The ``ratelimit_middleware`` logger gets
one warning when the breaker opens (the outage) and one when Redis answers again (the recovery); failures
that do not open it are logged at debug level, but the storage logs those of reservations and settlements,
whose effect may outlast the call, as warnings (``warn``: once a minute each). A failure that says the
limiter is misconfigured (see ``misconfig``: a wrong password, a missing ACL permission, a replica, a
database that does not exist, a cluster node taken for a standalone Redis) is logged at error level
instead, from the first one (each kind at most once a minute), saying what to change: it will not pass by
itself. ``RateLimiterUnavailable`` names the last failure and has it as its ``__cause__``.

A call Redis never ran for a reason of its own (``NotRun``: its event loop was blocked past its deadline
before it could be sent, its thread or the setup of its new connection waited for the interpreter's lock
until then, or its cluster slot was migrating until then) is answered by the policy too, but is
no failure of Redis: the breaker does not count it (one stalled loop or one moving slot would otherwise
open it for every call), and it is logged as a warning, once per batch of such calls, so that no call is
admitted unchecked unseen. Nor does a call that found its connection pool full (``MaxConnectionsError``:
the limiter's pools have no practical cap, see ``clients``, so this would be a limit of the process, never
of Redis), logged as a warning once a minute.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

from redis.exceptions import MaxConnectionsError, RedisClusterException, RedisError

from ...backends.base import Reserved
from ...backends.memory import MemoryBackend, MemoryStorage
from ...decision import Decision
from ...errors import LocalDecision, RateLimiterUnavailable, UncheckedDecision
from ...policy import Policy
from .breaker import CircuitBreaker
from .misconfig import Misconfiguration, misconfiguration
from .transport import NotRun

__all__ = ["ON_ERROR", "REDIS_ERRORS", "UNSENT", "Failover", "Fallback", "LocalCharge", "OnError"]

OnError = Literal["allow", "deny", "local"]
ON_ERROR: tuple[OnError, ...] = ("allow", "deny", "local")

REDIS_ERRORS = (RedisError, RedisClusterException, OSError)
"""What the policy answers: connection errors, timeouts, error replies, cluster errors, and ``UNSENT``."""

UNSENT = (NotRun, MaxConnectionsError)
"""Calls that never reached Redis, for reasons of this process (``RedisError``s too, but no failures of
Redis: see ``Failover.failed``)."""

logger = logging.getLogger("ratelimit_middleware")

_REPORT_EVERY = 60.0
"""Seconds between two error logs of one kind of misconfiguration."""


class Failover:
    """The failure policy of one storage, shared by every limiter bound to it."""

    def __init__(
        self,
        on_error: OnError,
        breaker: CircuitBreaker,
        clock: Callable[[], float] | None,
        *,
        cluster: bool,
        key_prefix: str,
    ) -> None:
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be 'allow', 'deny' or 'local', got {on_error!r}")
        if not isinstance(breaker, CircuitBreaker):
            raise TypeError(f"breaker must be a CircuitBreaker, got {breaker!r}")
        self.on_error = on_error
        self.breaker = breaker
        self.fallbacks = 0  # decisions answered by the policy in the current outage
        self.cluster = cluster
        self.key_prefix = key_prefix
        self._not_run: BaseException | None = None  # the last NotRun logged (a batch's calls share one)
        self._last: BaseException | None = None  # the last failure, which RateLimiterUnavailable names
        self._reported: dict[str, float] = {}  # kinds of problem logged at most once a minute: when last
        self.local_storage = MemoryStorage(clock=time.monotonic if clock is None else clock)

    def attempt(self) -> bool:
        """May this call go to Redis? False while the breaker is open (the policy answers)."""
        return self.breaker.allow()

    def succeeded(self) -> None:
        outage = self.breaker.succeeded()
        if outage is not None:
            logger.warning(
                "Redis answers again after %.1f s; %d decisions were made with on_error=%r meanwhile",
                outage,
                self.fallbacks,
                self.on_error,
            )
            self.fallbacks = 0

    def _misconfiguration(self, error: BaseException) -> Misconfiguration | None:
        return misconfiguration(error, cluster=self.cluster, key_prefix=self.key_prefix)

    def _due(self, kind: str) -> bool:
        """Whether a log of ``kind`` is due: none was logged within the last minute (now one is)."""
        now = self.breaker.clock()
        last = self._reported.get(kind)
        if last is not None and now - last < _REPORT_EVERY:
            return False
        self._reported[kind] = now
        return True

    def _report(self, problem: Misconfiguration) -> None:
        """Log ``problem`` at error level, unless its kind was logged within the last minute."""
        if self._due(problem.kind):
            logger.error(
                "the rate limiter is misconfigured: %s; decisions follow on_error=%r until it is fixed",
                problem.advice,
                self.on_error,
            )

    def warn(self, kind: str, message: str, *args: object) -> None:
        """Log ``message % args`` as a warning, unless one of ``kind`` was logged within the last minute."""
        if self._due(kind):
            logger.warning(message, *args)

    def failed(self, error: BaseException) -> None:
        """Record a call that Redis could not serve; an ``UNSENT`` call is logged but not counted."""
        self._last = error
        if isinstance(error, MaxConnectionsError):
            self.warn(
                "pool full",
                "a call was answered with on_error=%r, the limiter's connection pool being full (%s: %s), "
                "Redis never having got it (not counted as a failure of Redis; logged at most once a minute)",
                self.on_error,
                type(error).__name__,
                error,
            )
            return
        if isinstance(error, NotRun):
            if error is not self._not_run:
                self._not_run = error
                logger.warning(
                    "a call was answered with on_error=%r, Redis never having run it (not counted as a "
                    "failure of Redis): %s",
                    self.on_error,
                    error,
                )
            return
        problem = self._misconfiguration(error)
        opened = self.breaker.failed()
        if problem is not None:
            self._report(problem)
        elif opened:
            logger.warning(
                "Redis cannot be reached (%s: %s); decisions follow on_error=%r until it answers again, "
                "tried every %g s",
                type(error).__name__,
                error,
                self.on_error,
                self.breaker.recovery,
            )
        else:
            logger.debug("a Redis call failed (%s: %s)", type(error).__name__, error)

    def unavailable(self) -> RateLimiterUnavailable:
        """The error for a call that Redis could not serve: it names the last failure (its ``__cause__``)."""
        last = self._last
        problem = None if last is None else self._misconfiguration(last)
        if problem is not None:
            message = f"the rate limiter cannot use Redis: {problem.advice}"
        elif last is not None:
            message = f"the rate limiter cannot reach Redis ({type(last).__name__}: {last})"
        else:  # pragma: no cover - the policy answers only after a failure
            message = "the rate limiter cannot reach Redis"
        error = RateLimiterUnavailable(message, retry_after=max(self.breaker.retry_after(), 1.0))
        error.__cause__ = last
        return error

    def bind(self, policy: Policy) -> Fallback:
        return Fallback(self, policy)


class Fallback:
    """The policy's answer to one limiter's decisions while Redis cannot serve them."""

    def __init__(self, failover: Failover, policy: Policy) -> None:
        self._failover = failover
        self._policy = policy
        self._local: MemoryBackend | None = None

    def _local_backend(self) -> MemoryBackend:
        if self._local is None:
            self._local = self._failover.local_storage.bind(self._policy)
        return self._local

    def decide(self, user: str, model: str, cost: int) -> Decision:
        failover = self._failover
        failover.fallbacks += 1
        if failover.on_error == "allow":
            rule = self._policy.rules[0]
            return UncheckedDecision.of(rule.decision((True, max(rule.limit - cost, 0), 0.0, 0.0), cost))
        if failover.on_error == "deny":
            raise failover.unavailable()
        return LocalDecision.of(self._local_backend().decide(user, model, cost))

    def reserve(self, user: str, model: str, costs: Sequence[int]) -> Reserved:
        """A reservation while Redis cannot serve it: allowed unchecked (``allow``),
        ``RateLimiterUnavailable`` (``deny``), or made in memory (``local``).

        Its receipt is a ``LocalCharge`` (or ``None`` unchecked), which a Redis charge never is: ``adjust``
        so sends its settlement here, never to Redis.
        """
        failover = self._failover
        failover.fallbacks += 1
        if failover.on_error == "allow":
            verdicts = [
                (True, max(rule.limit - cost, 0), 0.0, 0.0)
                for rule, cost in zip(self._policy.all_rules, costs, strict=True)
            ]
            return Reserved(verdicts, None, fallback=UncheckedDecision)
        if failover.on_error == "deny":
            raise failover.unavailable()
        verdicts, receipt, used, _ = self._local_backend().reserve(user, model, costs)
        return Reserved(verdicts, LocalCharge(receipt), used, LocalDecision)

    def adjust(self, user: str, model: str, receipt: object, deltas: Sequence[int]) -> None:
        """Settle a reservation that ``reserve`` made: nothing for an unchecked one."""
        if isinstance(receipt, LocalCharge) and self._local is not None:
            self._local.adjust(user, model, receipt.receipt, deltas)


class LocalCharge(NamedTuple):
    """The receipt of a reservation made in memory while Redis could not be reached."""

    receipt: object
    """The in-memory backend's own."""
