"""Prometheus metrics for the rate limiter (the ``prometheus`` extra: ``prometheus_client``).

``PrometheusMetrics`` is an ``Observer``: pass it to a middleware (``observers=[metrics]``) and expose its
registry (``prometheus_client.make_asgi_app(metrics.registry)``). Labels stay bounded: no user label, and
as model names either the ``models`` given (any other is counted as ``"other"``) or the first ``max_models``
names seen (later ones are ``"other"``). Clients choose model names: give ``models`` so that junk names
cannot take the slots of real ones.

- ``ratelimit_decisions_total{outcome, tier, unit, model}``: outcome ``allowed``, ``denied`` or
  ``shadow_denied`` (denied, let through by shadow mode); the binding tier and unit.
- ``ratelimit_failures_total{stage, outcome}``: key functions, limiters (storage outages) and settlements
  that failed, and whether the request was ``allowed`` or ``denied`` by the failure policy (a storage that
  fails closed shows here as ``limiter``, ``denied``), or, for a step after the response (usage, settling),
  ``unsettled``.
- ``ratelimit_fallbacks_total{policy}``: decisions a storage's ``on_error`` policy made while the storage
  could not be reached: ``allow`` (fail open, unchecked) or ``local`` (in memory).
- ``ratelimit_decision_seconds``: how long deciding took (a histogram).
- ``ratelimit_tokens_reserved_total{model}`` and ``ratelimit_tokens_settled_total{model}``: estimated and
  actual tokens of settled reservations (their ratio is the estimate's error); cancelled ones count as 0
  settled.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram

from .decision import Decision
from .observe import Observer

__all__ = ["PrometheusMetrics"]


def _label(model: str) -> str:
    """``model`` as a label value the exposition can encode: a client's name may hold a lone surrogate (JSON
    carries them), which would make every later scrape fail."""
    try:
        model.encode("utf-8")
    except UnicodeEncodeError:
        return model.encode("utf-8", "backslashreplace").decode("utf-8")
    return model


_LATENCY_BUCKETS = (0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 0.5)


class PrometheusMetrics(Observer):
    """Counts decisions, failures and tokens into a Prometheus registry."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        models: Iterable[str] | None = None,
        max_models: int = 100,
    ) -> None:
        if isinstance(max_models, bool) or not isinstance(max_models, int) or max_models < 0:
            raise ValueError(f"max_models must be an int >= 0, got {max_models!r}")
        if isinstance(models, str):
            raise TypeError(f"models must be an iterable of model names, not one string: {models!r}")
        if registry is not None and not isinstance(registry, CollectorRegistry):
            raise TypeError(
                f"registry must be a prometheus_client CollectorRegistry or None, got {registry!r}"
            )
        self.registry = CollectorRegistry(auto_describe=True) if registry is None else registry
        self.max_models = max_models
        # Model name -> its label: the names allowed up front (fixed), else those seen so far.
        self._fixed = models is not None
        self._labels: dict[str, str] = {}
        for model in models or ():
            if not isinstance(model, str):
                raise TypeError(f"models must be model names (strings), got {model!r}")
            self._labels[model] = _label(model)
        self._lock = threading.Lock()
        self.decisions = Counter(
            "ratelimit_decisions",
            "Rate limit decisions by outcome, binding tier, unit and model.",
            ["outcome", "tier", "unit", "model"],
            registry=self.registry,
        )
        self.failures = Counter(
            "ratelimit_failures",
            "Key functions, limiters and settlements that raised, by what the failure policy did.",
            ["stage", "outcome"],
            registry=self.registry,
        )
        self.fallbacks = Counter(
            "ratelimit_fallbacks",
            "Decisions made by a storage's failure policy (allow, local) while it could not be reached.",
            ["policy"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "ratelimit_decision_seconds", "Time to decide.", buckets=_LATENCY_BUCKETS, registry=self.registry
        )
        self.tokens_reserved = Counter(
            "ratelimit_tokens_reserved",
            "Tokens estimated by settled reservations.",
            ["model"],
            registry=self.registry,
        )
        self.tokens_settled = Counter(
            "ratelimit_tokens_settled",
            "Tokens actually used by settled reservations.",
            ["model"],
            registry=self.registry,
        )

    def _model(self, model: str) -> str:
        """The label of ``model``: itself (made valid text), or ``"other"`` when ``models`` does not list
        it or ``max_models`` names are in use (bounded label values)."""
        label = self._labels.get(model)
        if label is not None:
            return label
        if self._fixed:
            return "other"
        with self._lock:
            if len(self._labels) < self.max_models:
                label = self._labels[model] = _label(model)
                return label
        return "other"

    def decision(self, decision: Decision, user: str, model: str, seconds: float, shadow: bool) -> None:
        outcome = "allowed" if decision.allowed else "shadow_denied" if shadow else "denied"
        self.decisions.labels(outcome, decision.tier, decision.unit, self._model(model)).inc()
        self.latency.observe(seconds)

    def failure(self, stage: str, error: BaseException, outcome: str) -> None:
        self.failures.labels(stage.removeprefix("the ").replace(" ", "_"), outcome).inc()

    def fallback(self, policy: str, decision: Decision) -> None:
        self.fallbacks.labels(policy).inc()

    def settlement(self, model: str, reserved: tuple[int, int], actual: tuple[int, int] | None) -> None:
        label = self._model(model)
        self.tokens_reserved.labels(label).inc(sum(reserved))
        self.tokens_settled.labels(label).inc(sum(actual) if actual is not None else 0)
