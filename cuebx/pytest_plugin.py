"""The cuebx pytest plugin, loaded through the ``pytest11`` entry point.

Fixtures (async ones need an async test runner such as anyio's pytest plugin):

- ``cuebx_memory``: ``cuebx_memory(app)`` points an app at a fresh in-memory broker for the
  test and returns that broker; the app's own broker is restored afterwards. Pass
  ``clock="manual"`` to move its time only by hand.
- ``cuebx_worker``: ``await cuebx_worker(app)`` connects the app and runs its consumers in
  the test's event loop; they are stopped and the app closed when the test ends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, ExitStack
from typing import Any

import pytest

from cuebx.app import Cuebx
from cuebx.brokers.memory import ClockMode, MemoryBroker
from cuebx.testing import running, use_memory_broker
from cuebx.worker import Worker

__all__ = ["cuebx_memory", "cuebx_worker"]


@pytest.fixture
def cuebx_memory() -> Iterator[Callable[..., MemoryBroker]]:
    """Point apps at in-memory brokers for one test: ``cuebx_memory(app, clock="manual")``."""
    with ExitStack() as stack:

        def use(app: Cuebx, *, clock: ClockMode | None = None) -> MemoryBroker:
            return stack.enter_context(use_memory_broker(app, clock=clock))

        yield use


@pytest.fixture
async def cuebx_worker() -> AsyncIterator[Callable[..., Awaitable[Worker]]]:
    """Run apps' consumers in the test's event loop until the test ends."""
    async with AsyncExitStack() as stack:

        async def start(app: Cuebx, **options: Any) -> Worker:
            return await stack.enter_async_context(running(app, **options))

        yield start
