"""Shared fixtures: an injected clock, so that no test sleeps."""

from __future__ import annotations

import pytest

from ratelimit_middleware import ALGORITHMS


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=sorted(ALGORITHMS))
def algorithm(request: pytest.FixtureRequest) -> str:
    """Each algorithm in turn."""
    return str(request.param)
