"""Shared fixtures: an injected clock, so that no test sleeps, and the storages every behaviour test runs on.

A behaviour test takes ``storage`` (bound to the test's ``clock``) and passes it to a limiter: it then runs
once per entry of ``STORAGES``, the shared contract that every backend must keep.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ratelimit_middleware import ALGORITHMS, MemoryStorage
from ratelimit_middleware.backends.base import Storage


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


StorageFactory = Callable[[FakeClock], Storage]
STORAGES: dict[str, StorageFactory] = {
    "memory": lambda clock: MemoryStorage(clock=clock),
}


@pytest.fixture(params=sorted(STORAGES))
def storage_for(request: pytest.FixtureRequest) -> StorageFactory:
    """Each storage in turn, as a factory taking the clock."""
    return STORAGES[str(request.param)]


@pytest.fixture
def storage(storage_for: StorageFactory, clock: FakeClock) -> Storage:
    """Each storage in turn, bound to the test's clock."""
    return storage_for(clock)
