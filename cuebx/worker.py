"""The worker: consume queues, run handlers, carry out what `cuebx.policy` decides.

Per queue, a channel with ``basic.qos(prefetch)`` delivers messages, and the broker runs
the worker's handler for each one in a task of its own: at most `prefetch` handlers of one
queue run at once (also across reconnections, see `_Slots`), nothing is buffered beyond what
RabbitMQ already delivered, and no message waits for a hand-over between tasks. A message
is acked only after
its handler returned, or after its retry or dead-letter copy was confirmed; whatever is
not acked when the worker stops or dies goes back to its queue.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
from anyio.abc import TaskStatus

from cuebx.brokers.base import Delivery, Subscription
from cuebx.context import TaskContext, _current
from cuebx.errors import PublishError, Retry
from cuebx.message import (
    BROKER_HEADERS,
    HEADER_ATTEMPT,
    HEADER_REDELIVERIES,
    HEADER_TASK,
    DeadLetterReason,
    OutgoingMessage,
    codec_for_content_type,
    dead_letter_copy,
    new_message_id,
    retry_copy,
)
from cuebx.policy import DeadLetter, Decision, RetryThrough
from cuebx.topology import QueueSpec

if TYPE_CHECKING:
    from cuebx.app import Cuebx
    from cuebx.task import Task

__all__ = ["Worker"]

logger = logging.getLogger("cuebx.worker")


class _Slots:
    """The handlers of one queue that run now; a delivery beyond `size` waits for a slot.

    RabbitMQ's prefetch bounds the unacked deliveries of one channel. After a reconnection
    (or a reopened channel) the new channel has a fresh window while handlers of the lost
    one may still be finishing: waiting here keeps prefetch the bound on running handlers.
    """

    __slots__ = ("_freed", "size", "used")

    def __init__(self, size: int) -> None:
        self.size = size
        self.used = 0
        self._freed: anyio.Event | None = None

    async def wait(self, stopping: anyio.Event) -> None:
        """Return when a slot is free, or when the worker is stopping."""
        while self.used >= self.size and not stopping.is_set():
            if self._freed is None:
                self._freed = anyio.Event()
            await self._freed.wait()

    def release(self) -> None:
        self.used -= 1
        self.wake()

    def wake(self) -> None:
        if self._freed is not None:
            self._freed.set()
            self._freed = None


@dataclass(frozen=True, slots=True)
class _Queue:
    """What the worker knows about one consumed queue."""

    spec: QueueSpec
    tasks: Mapping[str, Task[Any, Any]]
    default: Task[Any, Any] | None
    prefetch: int
    #: Count redeliveries ourselves: classic queues have no delivery limit of their own.
    redelivery_limit: int | None
    slots: _Slots

    @property
    def name(self) -> str:
        return self.spec.name


class Worker:
    """Consumers for a set of queues inside one event loop.

    Use `Cuebx.start_consumers` (in a running app, such as a FastAPI lifespan) or the
    ``cuebx worker`` command rather than building one directly.
    """

    def __init__(
        self,
        app: Cuebx,
        *,
        queues: Sequence[str] | None = None,
        prefetch: int | None = None,
        shutdown_timeout: float = 30.0,
    ) -> None:
        self.app = app
        self.shutdown_timeout = shutdown_timeout
        self.queues = self._plan_queues(queues, prefetch)
        self._threads = anyio.CapacityLimiter(max(1, app.settings.thread_limit))
        self._stopping = anyio.Event()
        self._stopped = anyio.Event()
        # One cancel scope per running handler, to requeue them all on an immediate stop.
        self._running: set[anyio.CancelScope] = set()
        # Set when the last running handler returns, and on an immediate stop.
        self._wake = anyio.Event()
        self._immediate = False
        self._consumers_cancelled = False
        # While a redelivered message's copy is being swapped for it, no handler starts:
        # see `_redelivered`.
        self._swapping = 0
        self._swapped = anyio.Event()

    def _plan_queues(self, names: Sequence[str] | None, prefetch: int | None) -> list[_Queue]:
        topology = self.app.topology()
        mains = {q.name: q for q in topology.main_queues}
        wanted = list(names) if names else list(mains)
        unknown = [n for n in wanted if n not in mains]
        if unknown:
            raise LookupError(
                f"no task is registered on queue(s) {', '.join(map(repr, unknown))}; "
                f"queues with tasks: {', '.join(map(repr, mains)) or 'none'}"
            )
        queues = []
        for name in wanted:
            spec = mains[name]
            tasks = {t: self.app.tasks[t] for t in spec.tasks}
            default = next(iter(tasks.values())) if len(tasks) == 1 else None
            size = prefetch or spec.prefetch or self.app.settings.prefetch
            quorum = spec.arguments.get("x-queue-type") == "quorum"
            limit = None if quorum else self.app.settings.delivery_limit
            queues.append(_Queue(spec, tasks, default, size, limit, _Slots(size)))
        return queues

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        """True when no handler is running."""
        return not self._running

    @property
    def stopping(self) -> bool:
        """True once a stop was asked for."""
        return self._stopping.is_set()

    def request_stop(self, *, immediate: bool = False) -> None:
        """Ask the worker to stop: gracefully, or `immediate` (cancel and requeue in-flight)."""
        self._stopping.set()
        for queue in self.queues:
            queue.slots.wake()  # deliveries waiting for a slot give up
        if immediate:
            self._immediate = True
            self._wake.set()

    async def stop(self) -> None:
        """Stop gracefully and wait until the worker has stopped."""
        self.request_stop()
        await self._stopped.wait()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Consume until a stop is requested; `task_status.started()` once consuming.

        On stop: cancel every consumer at once, let running handlers finish for up to
        `shutdown_timeout` seconds (or not at all on an immediate stop), requeue the rest,
        close the channels. Cancelling `run` itself is an immediate stop.
        """
        subscriptions: list[Subscription] = []
        try:
            for queue in self.queues:
                handler = functools.partial(self._on_delivery, queue)
                subscriptions.append(
                    await self.app.broker.consume(queue.name, queue.prefetch, handler)
                )
                logger.info(
                    "consuming %r (prefetch %d) for tasks: %s",
                    queue.name,
                    queue.prefetch,
                    ", ".join(queue.tasks),
                )
            task_status.started()
            await self._stopping.wait()
            logger.info(
                "stopping: no new messages; waiting up to %gs for running handlers",
                self.shutdown_timeout,
            )
            await self._cancel_consumers(subscriptions)
            with anyio.move_on_after(self.shutdown_timeout):
                await self._wait_for_handlers(until_immediate=True)
            if self._running:
                logger.warning(
                    "%s: requeueing %d unfinished messages",
                    "stopping now" if self._immediate else "shutdown timeout reached",
                    len(self._running),
                )
        finally:
            with anyio.CancelScope(shield=True):
                # Consumers first: a handler cancelled now requeues its message, which must
                # not come straight back to a consumer that is still active.
                self.request_stop()
                await self._cancel_consumers(subscriptions)
                self._cancel_running()
                # A cancelled handler returns at once, except one moving its message to a
                # retry tier or the dead-letter queue: that finishes, within the publish
                # timeout, before the channels close.
                with anyio.move_on_after(self.app.settings.publish_timeout + 1):
                    await self._wait_for_handlers(until_immediate=False)
                if self._running:
                    logger.warning(
                        "%d handler(s) ignored cancellation and still run; closing anyway",
                        len(self._running),
                    )
                for subscription in subscriptions:
                    await subscription.close()
                self._stopped.set()
                logger.info("worker stopped")

    async def _cancel_consumers(self, subscriptions: list[Subscription]) -> None:
        """Stop new deliveries on every queue at once (basic.cancel, concurrently)."""
        if self._consumers_cancelled:
            return
        self._consumers_cancelled = True
        async with anyio.create_task_group() as group:
            for subscription in subscriptions:
                group.start_soon(subscription.cancel)

    def _cancel_running(self) -> None:
        for scope in list(self._running):
            scope.cancel()

    async def _wait_for_handlers(self, *, until_immediate: bool) -> None:
        """Wait until no handler runs, or (`until_immediate`) an immediate stop is asked."""
        while self._running and not (until_immediate and self._immediate):
            self._wake = anyio.Event()
            await self._wake.wait()

    async def _on_delivery(self, queue: _Queue, delivery: Delivery) -> None:
        """Handle one delivery, in the task the broker started for it."""
        if self._stopping.is_set():
            # Delivered after the stop began, before basic.cancel took effect. Left
            # unsettled, it goes back to its queue once, when the channel closes: a reject
            # now would have the still active consumer get it again at once, and a quorum
            # queue count every such bounce against its delivery limit.
            return
        slots = queue.slots
        if slots.used >= slots.size:
            # Handlers of a channel lost to a reconnection are still finishing.
            await slots.wait(self._stopping)
            if self._stopping.is_set():
                return  # not started: it goes back when the channel closes
        slots.used += 1
        scope = anyio.CancelScope()
        self._running.add(scope)
        try:
            with scope:
                await self._process(queue, delivery)
        except Exception:
            # A fault of cuebx's own (a handler's exceptions are caught in `_run`): keep the
            # message, and let the redelivery limit end it if it keeps failing this way.
            logger.exception(
                "internal error handling message %s on %r: requeueing it",
                delivery.message_id,
                queue.name,
                extra={"message_id": delivery.message_id},
            )
            with anyio.CancelScope(shield=True):
                await delivery.reject(requeue=True)
        finally:
            slots.release()
            self._running.discard(scope)
            if not self._running:
                self._wake.set()

    # -- one message ------------------------------------------------------------------------

    async def _process(self, queue: _Queue, delivery: Delivery) -> None:
        headers = delivery.headers
        name = headers.get(HEADER_TASK)
        task = queue.default if name is None else queue.tasks.get(name)
        message_id = delivery.message_id or new_message_id()
        attempt = _attempt(headers.get(HEADER_ATTEMPT))
        if delivery.redelivered and queue.redelivery_limit is not None:
            ref = _Ref(name, message_id, attempt)
            await self._redelivered(queue, delivery, ref, queue.redelivery_limit)
            return
        if task is None:
            known = ", ".join(map(repr, queue.tasks))
            why = (
                f"no task named {name!r} on queue {queue.name!r} (tasks: {known})"
                if name is not None
                else f"no {HEADER_TASK} header and queue {queue.name!r} has tasks {known}"
            )
            ref = _Ref(name, message_id, attempt)
            await self._dead_letter(queue, delivery, ref, "unknown-task", why)
            return
        arguments = self._arguments(task, delivery)
        if isinstance(arguments, _Poison):
            ref = _Ref(task.name, message_id, attempt)
            await self._dead_letter(queue, delivery, ref, arguments.reason, arguments.error)
            return
        context = TaskContext(
            message_id=message_id,
            correlation_id=delivery.correlation_id or message_id,
            attempt=attempt,
            headers=headers,
            task_name=task.name,
            queue=queue.name,
            # A classic queue's redelivered message comes back as a counted copy.
            redelivered=delivery.redelivered or HEADER_REDELIVERIES in headers,
        )
        await self._run(queue, task, context, arguments, delivery)

    def _arguments(self, task: Task[Any, Any], delivery: Delivery) -> msgspec.Struct | _Poison:
        """Decode and validate the body into the task's arguments, or say why it cannot be."""
        limit = self.app.settings.max_message_size
        if len(delivery.body) > limit:
            why = f"body of {len(delivery.body)} bytes is over the limit of {limit} bytes"
            return _Poison("too-large", why)
        codec = codec_for_content_type(delivery.content_type)
        if codec is None:
            return _Poison("undecodable", f"unknown content type {delivery.content_type!r}")
        try:
            return task.decode(codec, delivery.body)
        except msgspec.ValidationError as exc:
            return _Poison("invalid-arguments", exc)
        except msgspec.DecodeError as exc:
            return _Poison("undecodable", exc)

    async def _run(
        self,
        queue: _Queue,
        task: Task[Any, Any],
        context: TaskContext,
        arguments: msgspec.Struct,
        delivery: Delivery,
    ) -> None:
        if self._swapping:
            await self._swapped.wait()
        token = _current.set(context)
        try:
            timeout = task.options.timeout
            if timeout is None:
                await self._call(task, context, arguments)
            else:
                with anyio.move_on_after(timeout) as limit:
                    await self._call(task, context, arguments)
                if limit.cancelled_caught:
                    raise TimeoutError(f"task {task.name!r} ran over its timeout of {timeout:g}s")
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await delivery.reject(requeue=True)
            logger.warning(
                "task %s message %s attempt %d interrupted by the worker stopping: requeued",
                task.name,
                context.message_id,
                context.attempt,
                extra=_Ref.of(context).extra,
            )
            raise
        except Exception as exc:
            await self._failed(queue, task, context, delivery, exc)
        else:
            await delivery.ack()
        finally:
            _current.reset(token)

    async def _call(
        self, task: Task[Any, Any], context: TaskContext, arguments: msgspec.Struct
    ) -> None:
        if task.is_async:
            await task.invoke(context, arguments)
        else:
            await self._run_in_thread(task, context, arguments)

    async def _run_in_thread(
        self, task: Task[Any, Any], context: TaskContext, arguments: msgspec.Struct
    ) -> None:
        args, kwargs = task.call_args(context, arguments)
        # anyio runs it in a copy of this task's context: current_context() works there.
        call = functools.partial(task.fn, *args, **kwargs)
        try:
            await anyio.to_thread.run_sync(call, limiter=self._threads, abandon_on_cancel=True)
        except anyio.get_cancelled_exc_class():
            logger.warning(
                "task %s message %s: sync handler abandoned in its thread (a thread cannot be "
                "killed; it runs on until it returns)",
                task.name,
                context.message_id,
                extra=_Ref.of(context).extra,
            )
            raise

    async def _redelivered(self, queue: _Queue, delivery: Delivery, ref: _Ref, limit: int) -> None:
        """Count a classic queue's redelivery in a header, so a poison message cannot loop.

        RabbitMQ sets `redelivered` when an earlier delivery ended without an ack (a worker
        died or stopped mid-task) but keeps no count on classic queues. The worker moves
        the message to the back of its queue with the count raised, and past the limit
        dead-letters it, instead of running a handler that may kill the process again.

        No handler starts until the original's ack is on the wire: otherwise the copy could
        be handled, and kill the process, before that ack left, and both would come back.
        """
        count = _attempt(delivery.headers.get(HEADER_REDELIVERIES)) + 1
        if count >= limit:
            why = f"delivered {count} times without finishing (the limit is {limit})"
            await self._dead_letter(queue, delivery, ref, "delivery-limit", why)
            return
        logger.warning(
            "message %s on %r was redelivered (%d of %d): a worker stopped or died handling it",
            ref.message_id,
            queue.name,
            count,
            limit,
            extra=ref.extra,
        )
        out = _outgoing(delivery, ref.message_id)
        copy = replace(out, headers={**out.headers, HEADER_REDELIVERIES: count})
        if not self._swapping:
            self._swapped = anyio.Event()
        self._swapping += 1
        try:
            await self._forward(delivery, queue.name, copy, ref)
        finally:
            self._swapping -= 1
            if not self._swapping:
                self._swapped.set()

    # -- carrying out decisions -------------------------------------------------------------

    async def _failed(
        self,
        queue: _Queue,
        task: Task[Any, Any],
        context: TaskContext,
        delivery: Delivery,
        error: Exception,
    ) -> None:
        if isinstance(error, Retry) and (error.every is not None or error.times is not None):
            logger.warning(
                "task %s raised Retry(every=%r, times=%r): a raised Retry goes through the "
                "task's next retry tier; every= and times= only apply in retries=",
                task.name,
                error.every,
                error.times,
                extra=_Ref.of(context).extra,
            )
        decision: Decision = task.retry_policy.on_failure(context.attempt, error)
        if isinstance(decision, RetryThrough):
            logger.warning(
                "task %s message %s attempt %d failed: %s: %s; retrying through %s",
                task.name,
                context.message_id,
                context.attempt,
                type(error).__name__,
                error,
                decision.queue,
                extra=_Ref.of(context).extra,
            )
            copy = retry_copy(_outgoing(delivery, context.message_id), decision.attempt)
            await self._forward(delivery, decision.queue, copy, _Ref.of(context))
            return
        assert isinstance(decision, DeadLetter)
        logger.error(
            "task %s message %s attempt %d failed (%s): %s: %s",
            task.name,
            context.message_id,
            context.attempt,
            decision.reason,
            type(error).__name__,
            error,
            exc_info=error,
            extra=_Ref.of(context).extra,
        )
        await self._dead_letter(queue, delivery, _Ref.of(context), decision.reason, error)

    async def _dead_letter(
        self,
        queue: _Queue,
        delivery: Delivery,
        ref: _Ref,
        reason: DeadLetterReason,
        error: BaseException | str,
    ) -> None:
        target = queue.spec.dead_letter_queue
        if reason not in ("exhausted", "rejected", "failed"):
            logger.error(
                "message %s on %r dead-lettered (%s): %s",
                ref.message_id,
                queue.name,
                reason,
                error,
                extra=ref.extra,
            )
        if target is None:
            logger.error(
                "queue %r has no dead-letter queue: message %s dropped",
                queue.name,
                ref.message_id,
                extra=ref.extra,
            )
            await delivery.ack()
            return
        copy = dead_letter_copy(
            _outgoing(delivery, ref.message_id), reason=reason, queue=queue.name, error=error
        )
        await self._forward(delivery, target, copy, ref)

    async def _forward(
        self, delivery: Delivery, queue: str, copy: OutgoingMessage, ref: _Ref
    ) -> None:
        """Publish a copy through the default exchange, then ack the original.

        Shielded: a stop that lands between the two would leave both the copy and the
        original in the broker.
        """
        with anyio.CancelScope(shield=True):
            try:
                await self.app.broker.publish("", queue, copy)
            except PublishError as exc:
                # Not confirmed: keep the original, so the message is never lost.
                logger.error(
                    "could not move message %s to %r: %s; requeueing it",
                    ref.message_id,
                    queue,
                    exc,
                    extra=ref.extra,
                )
                await delivery.reject(requeue=True)
                return
            await delivery.ack()


def _attempt(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return 0


def _outgoing(delivery: Delivery, message_id: str) -> OutgoingMessage:
    return OutgoingMessage(
        body=delivery.body,
        message_id=message_id,
        correlation_id=delivery.correlation_id or message_id,
        content_type=delivery.content_type,
        headers={k: v for k, v in delivery.headers.items() if k not in BROKER_HEADERS},
        timestamp=delivery.timestamp or datetime.now(UTC),
        priority=delivery.priority,
    )


@dataclass(frozen=True, slots=True)
class _Poison:
    """Why a message cannot be handled at all: it goes to the dead-letter queue as is."""

    reason: DeadLetterReason
    error: BaseException | str


@dataclass(frozen=True, slots=True)
class _Ref:
    """The message a log record is about: every such record carries these as extras."""

    task: str | None
    message_id: str
    attempt: int

    @classmethod
    def of(cls, context: TaskContext) -> _Ref:
        return cls(context.task_name, context.message_id, context.attempt)

    @property
    def extra(self) -> dict[str, Any]:
        return {"task": self.task, "message_id": self.message_id, "attempt": self.attempt}
