"""Task status and results: a plug-in that records each task's state in a store.

`Results` writes a task's state at each step of its life (see `cuebx.status` for the
states and their order) and reads it back for `TaskHandle.status` and `TaskHandle.result`:

- ``pending`` once the broker confirmed the message (``after_publish``);
- ``started`` as each attempt's handler starts (queued, not waited for: the worker's
  service flushes it within about 5 ms, and a final write takes it along if it comes
  first); ``retrying`` once the retry copy is confirmed (``on_retry``, with the next
  attempt's number and when it is due);
- ``succeeded`` (with the return value, as JSON checked against the return annotation),
  ``failed`` / ``dead-lettered`` (``on_dead_letter``, with the error and the reason), or
  ``skipped`` (an idempotency key that already completed).

Writes are batched: those of one event-loop turn go to the store in one round trip (one
Lua script call, one SQL statement), at most two batches in flight, and the batches grow
while the store is busy. Every write is conditional in the store, so they may land late, twice
or out of order: the worker's ``started`` that beats the publisher's ``pending`` stays.

The store never holds a message back. A write that fails (the store is down or slow past
its timeout) is logged, kept in memory (up to `backlog` writes) and written again once the
store answers: with the next batch, or by the worker's plug-in service every second. For a
second after a failure, writes go straight to that backlog without trying the store, so an
outage does not add the store's timeout to every task.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import anyio
import msgspec
from anyio.lowlevel import checkpoint

from cuebx.errors import ConfigurationError, ResultTimeoutError, StoreError, TaskFailed
from cuebx.message import DeadLetterReason
from cuebx.middleware import Middleware, Outcome, Publish, Received, Skip, WorkerView
from cuebx.rpc import error_fields
from cuebx.status import TaskState, TaskStatus, decode_record, encode_record, final_state
from cuebx.status import generation as generation_of
from cuebx.status import rank as rank_of
from cuebx.stores.base import StatusWrite, Store
from cuebx.task import Task

__all__ = ["Results"]

logger = logging.getLogger("cuebx.results")

#: Longest pause between two reads of a task that `result()` waits for.
_POLL_MAX = 0.25
#: How long a ``started`` write may wait for company before the worker flushes it.
_STARTED_DELAY = 0.005


class _Batch:
    __slots__ = ("done", "writes")

    def __init__(self) -> None:
        self.writes: list[StatusWrite] = []
        self.done = anyio.Event()


class _Writer:
    """Writes status records in batches; keeps what failed for later. Never raises.

    One batch is written at a time (group commit): the writes that come while it is on its
    way wait together and go as the next batch. A lone write waits for nothing, and under
    load the batches grow by themselves. With two batches in flight, the second one left
    almost at once with a few writes: 3.5 tasks per Redis call and a drain at 0.70x of
    untracked, against 6.7 tasks per call and 0.84x with one (benchmarks/results.py).
    """

    def __init__(
        self, store: Store, *, backlog: int, in_flight: int = 1, pause: float = 1.0
    ) -> None:
        self.store = store
        self.pause = pause
        self.max_in_flight = in_flight
        self.backlog: deque[StatusWrite] = deque(maxlen=backlog)
        self.dropped = 0
        self.failures = 0
        self._open: _Batch | None = None
        self._in_flight = 0
        self._slot = anyio.Event()
        self._down_until = 0.0
        # Writes nobody waits for (``started``), taken by the next flush; `wake` is set
        # when the first one arrives, for the worker's service to flush them.
        self._soon: list[StatusWrite] = []
        self.wake = anyio.Event()

    @property
    def down(self) -> bool:
        """True for `pause` seconds after a failed write."""
        return time.monotonic() < self._down_until

    def write_soon(self, write: StatusWrite) -> None:
        """Queue a write for the next flush without waiting for it (see `Results.serve`)."""
        if self.down:
            self._keep([write])
            return
        self._soon.append(write)
        if len(self._soon) == 1:
            self.wake.set()

    async def flush_soon(self) -> None:
        """Flush the queued writes (and the backlog when the store answers again)."""
        self.wake = anyio.Event()
        await checkpoint()  # let the writes of this turn join
        with anyio.CancelScope(shield=True):
            await self._flush([])

    async def write_many(self, writes: Sequence[StatusWrite]) -> None:
        """Write records together (a batch's ``pending`` states), waiting for them."""
        for write in writes:
            self.write_soon(write)
        await self.flush_soon()

    async def write(self, write: StatusWrite) -> None:
        """Write one record with whatever else is written in this event-loop turn."""
        if self.down:
            self._keep([write])
            return
        batch = self._open
        if batch is not None:
            batch.writes.append(write)
            await batch.done.wait()
            return
        batch = self._open = _Batch()
        batch.writes.append(write)
        # Shielded: the writes of others ride on this batch, and every store operation is
        # bounded by the store's timeout.
        with anyio.CancelScope(shield=True):
            await checkpoint()  # let the other writes of this turn join
            while self._in_flight >= self.max_in_flight:
                await self._slot.wait()
            self._open = None
            try:
                await self._flush(batch.writes)
            finally:
                batch.done.set()  # the others never wait for a flush that went wrong

    async def flush_backlog(self) -> None:
        """Write what earlier failures left behind (no-op while the store is down)."""
        if (self.backlog or self._soon) and not self.down:
            with anyio.CancelScope(shield=True):
                await self._flush([])

    async def _flush(self, writes: list[StatusWrite]) -> None:
        if self._soon:
            writes = writes + self._soon
            self._soon = []
        backlog = self.backlog
        if backlog and not self.down:
            writes = writes + [backlog.popleft() for _ in range(min(len(backlog), 1000))]
        if not writes:
            return
        self._in_flight += 1
        try:
            await self.store.put_status(writes)
        except StoreError as exc:
            self._failed(writes, exc)
        finally:
            self._in_flight -= 1
            self._slot.set()
            self._slot = anyio.Event()

    def _failed(self, writes: list[StatusWrite], error: StoreError) -> None:
        self.failures += 1
        was_down = self.down
        self._down_until = time.monotonic() + self.pause
        self._keep(writes)
        if not was_down:
            logger.warning(
                "could not write %d task status record(s): %s; tasks go on, and the "
                "records are written again once the store answers (%d waiting)",
                len(writes),
                error,
                len(self.backlog),
            )

    def _keep(self, writes: list[StatusWrite]) -> None:
        overflow = len(self.backlog) + len(writes) - (self.backlog.maxlen or 0)
        if overflow > 0:
            self.dropped += overflow
            logger.error(
                "the store is still down: %d status record(s) dropped from the backlog; "
                "those tasks keep their last stored state until it expires",
                overflow,
            )
        self.backlog.extend(writes)


class Results(Middleware):
    """Record task states and return values in a store, and read them back.

    Installed by ``Cuebx(store=...)``; `TaskHandle.status`, `TaskHandle.result` and
    `Cuebx.status` read through it.

    Args:
        store: where the records live.
        tasks: the app's tasks by name (their ``track`` option, their return types).
        ttl: seconds a record lives after its last write (``result_ttl``).
        backlog: most failed writes kept in memory for a later try.
    """

    def __init__(
        self,
        store: Store,
        tasks: Mapping[str, Task[Any, Any]],
        *,
        ttl: float,
        backlog: int = 10_000,
    ) -> None:
        self.store = store
        self.tasks = tasks
        self.ttl_ms = max(1, round(ttl * 1000))
        self.writer = _Writer(store, backlog=backlog)

    # -- writing ----------------------------------------------------------------------------

    def _tracked(self, name: str | None) -> bool:
        task = self.tasks.get(name) if name else None
        return task is None or task.options.track

    async def _write(
        self,
        task_id: str,
        headers: Mapping[str, Any],
        state: TaskState,
        *,
        task: str,
        attempt: int,
        **fields: Any,
    ) -> None:
        data = encode_record(state, task=task, attempt=attempt, at=time.time(), **fields)
        write = StatusWrite(
            task_id, generation_of(headers), rank_of(state, attempt), data, self.ttl_ms
        )
        await self.writer.write(write)

    async def after_publish(self, publish: Publish, error: BaseException | None) -> None:
        # An event's id is shared by all its subscribers: there is no one task to track.
        if error is None and not publish.event and self._tracked(publish.task_name):
            await self.writer.write(self._pending(publish))

    async def after_publish_many(
        self, publishes: Sequence[Publish], errors: Sequence[BaseException | None]
    ) -> None:
        """``pending`` for every confirmed message of a batch, in one round trip."""
        writes = [
            self._pending(publish)
            for publish, error in zip(publishes, errors, strict=True)
            if error is None and not publish.event and self._tracked(publish.task_name)
        ]
        if writes:
            await self.writer.write_many(writes)

    def _pending(self, publish: Publish) -> StatusWrite:
        message = publish.message
        data = encode_record("pending", task=publish.task_name, attempt=0, at=time.time())
        return StatusWrite(
            message.message_id,
            generation_of(message.headers),
            rank_of("pending", 0),
            data,
            self.ttl_ms,
        )

    async def before_handler(self, received: Received) -> None:
        # Not waited for: the worker's service (`serve`) flushes it within an event-loop
        # turn or two, and the final write takes it along at the latest. A late ``started``
        # cannot overwrite what follows it (writes are conditional).
        context = received.context
        if self._tracked(context.task_name):
            data = encode_record(
                "started", task=context.task_name, attempt=context.attempt, at=time.time()
            )
            self.writer.write_soon(
                StatusWrite(
                    context.message_id,
                    generation_of(context.headers),
                    rank_of("started", context.attempt),
                    data,
                    self.ttl_ms,
                )
            )

    async def after_handler(self, received: Received, outcome: Outcome) -> None:
        context, task, error = received.context, received.task, outcome.error
        if task is None or not task.options.track:
            return
        common: dict[str, Any] = {"task": context.task_name, "attempt": context.attempt}
        if error is None:
            try:
                value = None if outcome.result is None else task.encode_result(outcome.result)
            except Exception as exc:
                kind, text = error_fields(exc)
                await self._write(
                    context.message_id,
                    context.headers,
                    "failed",
                    error_type=kind,
                    error=f"the return value does not fit the return annotation: {text}",
                    reason="invalid-result",
                    **common,
                )
                return
            await self._write(
                context.message_id, context.headers, "succeeded", value=value, **common
            )
        elif isinstance(error, Skip):
            await self._write(
                context.message_id,
                context.headers,
                "skipped",
                reason=error.reason or "skipped",
                **common,
            )

    async def on_retry(
        self, received: Received, error: BaseException, *, attempt: int, delay: float
    ) -> None:
        context = received.context
        if self._tracked(context.task_name):
            kind, text = error_fields(error)
            await self._write(
                context.message_id,
                context.headers,
                "retrying",
                task=context.task_name,
                attempt=attempt,
                next_attempt_at=time.time() + delay,
                error_type=kind,
                error=text,
            )

    async def on_dead_letter(
        self, received: Received, reason: DeadLetterReason, error: BaseException | str
    ) -> None:
        context = received.context
        if self._tracked(context.task_name):
            kind, text = error_fields(error)
            await self._write(
                context.message_id,
                context.headers,
                final_state(reason),
                task=context.task_name,
                attempt=context.attempt,
                error_type=kind,
                error=text,
                reason=reason,
            )

    async def on_worker_start(self, worker: WorkerView) -> None:
        try:
            await self.store.connect()
        except StoreError as exc:
            logger.warning("the result store does not answer yet: %s; tasks run anyway", exc)

    async def serve(self, worker: WorkerView) -> None:
        """Flush the ``started`` writes as they come, and the backlog of failed writes once
        the store answers again (every `pause` seconds)."""
        writer = self.writer
        while True:
            with anyio.move_on_after(writer.pause):
                await writer.wake.wait()
                # A short wait first: a task done by then has its final write take its
                # ``started`` along, as one record, and the batch is larger.
                await anyio.sleep(_STARTED_DELAY)
            await writer.flush_soon()

    async def on_worker_stop(self, worker: WorkerView) -> None:
        await self.writer.flush_backlog()
        if self.writer.backlog:
            logger.error(
                "stopping with %d task status record(s) the store never took; those tasks "
                "keep their last stored state until it expires",
                len(self.writer.backlog),
            )

    # -- reading ----------------------------------------------------------------------------

    async def status(self, task_id: str) -> TaskStatus:
        """Read a task's status; ``unknown`` when the store has no record of it."""
        return decode_record(task_id, await self.store.get_status(task_id))[0]

    async def result(self, task: Task[Any, Any] | None, task_id: str, limit: float | None) -> Any:
        """Wait for a task's final state and return its value (see `TaskHandle.result`)."""
        if task is not None and not task.options.track:
            raise ConfigurationError(
                f"task {task.name!r} has track=False: its status and result are not stored"
            )
        deadline = None if limit is None else time.monotonic() + limit
        pause = 0.005
        while True:
            status, value = decode_record(task_id, await self.store.get_status(task_id))
            if status.done:
                break
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                unknown = status.state == "unknown"
                raise ResultTimeoutError(
                    f"task {task_id} is not done after {limit:g}s: it is {status.state}"
                    + (" (no record of it: a wrong id, or it expired)" if unknown else "")
                )
            await anyio.sleep(pause if left is None else min(pause, left))
            pause = min(pause * 1.5, _POLL_MAX)
        if status.state != "succeeded":
            raise TaskFailed(
                task_id,
                state=status.state,
                error_type=status.error_type,
                error=status.error,
                reason=status.reason,
            )
        if value is None:
            return None
        decoder = task or self.tasks.get(status.task)
        if decoder is None:
            return msgspec.json.decode(value)
        return decoder.decode_result(value)
