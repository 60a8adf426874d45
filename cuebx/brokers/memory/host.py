"""The memory broker's own task group, where handler calls and its timer run."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Coroutine
from typing import Any, TypeVarTuple

import anyio
from anyio.abc import TaskGroup

from cuebx.errors import BrokerUnavailableError

__all__ = ["TaskHost"]

Ts = TypeVarTuple("Ts")


class TaskHost:
    """The broker's own task group, held open by one host task from `connect` to `close`.

    A task group is entered and left by the same task, and `connect` and `close` may run in
    different tasks (a FastAPI lifespan, a pytest fixture), so a host task holds it. That
    task is the one asyncio-specific piece; the tasks inside it are plain anyio.

    Its tasks start in a copy of the context given to `start_soon`, else in the host
    task's: never in whoever happened to start them (a publisher whose message a consumer
    gets at once).
    """

    def __init__(self) -> None:
        self._group: TaskGroup | None = None
        self._context: contextvars.Context | None = None
        self._stop: anyio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError("MemoryBroker runs on anyio's asyncio backend only") from None
        started = anyio.Event()
        stop = self._stop = anyio.Event()

        async def host() -> None:
            async with anyio.create_task_group() as group:
                self._group = group
                self._context = contextvars.copy_context()
                started.set()
                await stop.wait()
                group.cancel_scope.cancel()

        self._task = loop.create_task(host(), name="cuebx memory broker")
        # Shielded: a connect() cancelled here must still leave a host that close() stops.
        with anyio.CancelScope(shield=True):
            await started.wait()

    def start_soon(
        self,
        func: Callable[[*Ts], Coroutine[Any, Any, None]],
        *args: *Ts,
        context: contextvars.Context | None = None,
    ) -> None:
        group, own = self._group, self._context
        if group is None or own is None:
            raise BrokerUnavailableError("the memory broker is closed")
        (context if context is not None else own).run(lambda: group.start_soon(func, *args))

    async def stop(self) -> None:
        task, self._task, self._group, self._context = self._task, None, None, None
        if task is None or self._stop is None:
            return
        self._stop.set()
        with anyio.CancelScope(shield=True):
            await task
