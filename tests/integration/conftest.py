"""Fixtures of the result-store suites: one store per test, on each backend."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.stores import STORE_KINDS, store_url


@pytest.fixture(params=STORE_KINDS)
async def any_store(request: pytest.FixtureRequest, prefix: str) -> AsyncIterator[str]:
    """A store URL for this test, on memory://, Redis and PostgreSQL in turn."""
    async for url in store_url(request.param, prefix):
        yield url


@pytest.fixture(params=["redis", "postgres"])
async def real_store(request: pytest.FixtureRequest, prefix: str) -> AsyncIterator[str]:
    """A store URL for this test on Redis and on PostgreSQL."""
    async for url in store_url(request.param, prefix):
        yield url
