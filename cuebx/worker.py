"""The worker: consume queues, run handlers, carry out what `cuebx.policy` decides.

Per queue, a channel with ``basic.qos(prefetch)`` delivers messages, and the broker runs
the worker's handler for each one in a task of its own: at most `prefetch` handlers of one
queue run at once (also across reconnections, see `_Slots`), nothing is buffered beyond what
RabbitMQ already delivered, and no message waits for a hand-over between tasks. A message
is acked only after its handler returned, or after its retry or dead-letter copy was
confirmed; whatever is not acked when the worker stops or dies goes back to its queue.

The worker decides nothing itself: `cuebx.policy.admit` sorts each delivery (run it, count
a redelivery, send back one that is not due yet, or dead-letter poison),
`RetryPolicy.on_failure` sorts each failure, and the middleware `Stack` adds whatever
plug-ins do around a handler. Whatever must wait (not due, ``Retry(delay=)``, `Postpone`)
goes down the broker's delay ladder (`cuebx.delays`): the worker never sleeps on a message
nor holds one unacked while it waits, so RabbitMQ's consumer timeout never bites.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskStatus

from cuebx.brokers.base import Broker, Delivery, Subscription
from cuebx.context import TaskContext, _current
from cuebx.delays import Delays, Ladder, now_us
from cuebx.errors import BrokerError, PublishError, Retry, TopologyError
from cuebx.message import (
    BROKER_HEADERS,
    HEADER_ATTEMPT,
    HEADER_REDELIVERIES,
    HEADER_TASK,
    OutgoingMessage,
    dead_letter_copy,
    header_count,
    new_message_id,
    retry_copy,
)
from cuebx.middleware import Outcome, Postpone, Received, Skip, Stack, notify
from cuebx.policy import (
    CountRedelivery,
    DeadLetter,
    NotDue,
    RetryAfter,
    RetryThrough,
    Run,
    admit,
)
from cuebx.settings import Settings, check_prefetch
from cuebx.task import Task
from cuebx.topology import QueueSpec, Topology

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
    prefetch: int
    #: Count redeliveries ourselves: classic queues have no delivery limit of their own.
    redelivery_limit: int | None
    slots: _Slots

    @property
    def name(self) -> str:
        return self.spec.name


def _log_fields(task: str | None, message_id: str | None, attempt: int) -> dict[str, Any]:
    """The extras every log record about one message carries."""
    return {"task": task, "message_id": message_id, "attempt": attempt}


def _context_fields(context: TaskContext) -> dict[str, Any]:
    return _log_fields(context.task_name, context.message_id, context.attempt)


class Worker:
    """Consumers for a set of queues inside one event loop.

    Use `Cuebx.start_consumers` (in a running app, such as a FastAPI lifespan) or the
    ``cuebx worker`` command rather than building one directly: `Cuebx.worker` builds one
    from the app's broker, settings, topology, tasks and middleware.

    Args:
        broker: the connected broker to consume from and publish copies to.
        settings: the app's settings (prefetch, limits, timeouts).
        topology: the app's topology; the worker consumes some or all of its main queues.
        tasks: the app's tasks by name.
        stack: the app's middleware.
        queues: the main queues to consume; all of them when None.
        prefetch: unacked messages per queue, for every queue; else the task's or app's.
        shutdown_timeout: seconds running handlers may finish on a graceful stop; else
            the app's setting.
        delays: the app's delay ladder, shared with its publisher; else one of its own
            from `settings`.

    Raises:
        LookupError: a queue in `queues` has no task.
        ConfigurationError: `prefetch` is not a whole number above zero.
    """

    def __init__(
        self,
        broker: Broker,
        settings: Settings,
        topology: Topology,
        tasks: Mapping[str, Task[Any, Any]],
        *,
        stack: Stack | None = None,
        queues: Sequence[str] | None = None,
        prefetch: int | None = None,
        shutdown_timeout: float | None = None,
        delays: Delays | None = None,
    ) -> None:
        self.broker = broker
        self.settings = settings
        self.delays = delays or Delays(
            Ladder.of(settings), lambda: [q.name for q in topology.main_queues]
        )
        self.stack = stack if stack is not None else Stack()
        self.shutdown_timeout = (
            settings.shutdown_timeout if shutdown_timeout is None else shutdown_timeout
        )
        if prefetch is not None:
            prefetch = check_prefetch(prefetch, "worker")
        self.queues = self._plan_queues(topology, tasks, queues, prefetch)
        self._threads = anyio.CapacityLimiter(settings.thread_limit)
        self._stopping = anyio.Event()
        self._stopped = anyio.Event()
        # One cancel scope per running handler, to requeue them all on an immediate stop.
        self._running: set[anyio.CancelScope] = set()
        # Set when the last running handler returns, and on an immediate stop.
        self._wake = anyio.Event()
        self._immediate = False
        self._consumers_cancelled = False
        # True from the moment every consumer is registered until the stop begins.
        self._consuming = False
        self._subscriptions: list[Subscription] = []
        # While a classic queue's redelivered message is re-published with its count, no
        # handler starts: see `_count_redelivery`.
        self._recounting = 0
        self._recounted = anyio.Event()
        # The task running `run` when started by `start`.
        self._runner: asyncio.Task[None] | None = None

    def _plan_queues(
        self,
        topology: Topology,
        tasks: Mapping[str, Task[Any, Any]],
        names: Sequence[str] | None,
        prefetch: int | None,
    ) -> list[_Queue]:
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
            # A queue's concurrency bounds its handlers across all workers: no worker's own
            # prefetch may raise it.
            size = spec.concurrency or prefetch or spec.prefetch or self.settings.prefetch
            # Quorum queues count deliveries themselves (x-delivery-limit).
            limit = None if spec.queue_type == "quorum" else self.settings.delivery_limit
            queue_tasks = {t: tasks[t] for t in spec.tasks}
            queues.append(_Queue(spec, queue_tasks, size, limit, _Slots(size)))
        return queues

    # -- what middleware sees ---------------------------------------------------------------

    @property
    def queue_names(self) -> tuple[str, ...]:
        """The queues this worker consumes."""
        return tuple(q.name for q in self.queues)

    @property
    def tasks(self) -> Mapping[str, Task[Any, Any]]:
        """The tasks of the queues this worker consumes, by name."""
        return {name: task for q in self.queues for name, task in q.tasks.items()}

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        """True when no handler is running."""
        return not self._running

    @property
    def stopping(self) -> bool:
        """True once a stop was asked for."""
        return self._stopping.is_set()

    @property
    def consuming(self) -> bool:
        """True once every consumer is registered, until a stop begins (health checks)."""
        return (
            self._consuming
            and not self._stopping.is_set()
            and all(s.consuming for s in self._subscriptions)
        )

    def request_stop(self, *, immediate: bool = False) -> None:
        """Ask the worker to stop: gracefully, or `immediate` (cancel and requeue in-flight)."""
        self._stopping.set()
        for queue in self.queues:
            queue.slots.wake()  # deliveries waiting for a slot give up
        if immediate:
            self._immediate = True
            self._wake.set()

    async def start(self) -> None:
        """Run the worker in a background task; return once its consumers are registered.

        The task is the worker's own: `stop` ends it and waits for it, so nothing outlives
        the worker. For running in the foreground (until cancelled), await `run` instead.

        Raises:
            RuntimeError: it was started already.
            Exception: whatever kept the consumers from starting (the broker's error).
        """
        if self._runner is not None:
            raise RuntimeError("this worker was started already")
        ready = asyncio.Event()
        runner = self._runner = asyncio.get_running_loop().create_task(
            self.run(task_status=_Started(ready)), name="cuebx-worker"
        )
        waiter = asyncio.ensure_future(ready.wait())
        done, _ = await asyncio.wait({runner, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if runner in done:
            waiter.cancel()
            runner.result()  # raises what stopped it
            raise RuntimeError("cuebx worker stopped before its consumers were registered")

    async def stop(self) -> None:
        """Stop gracefully and wait until the worker has stopped (and its task ended)."""
        self.request_stop()
        runner = self._runner
        if runner is not None:
            await runner
        else:
            await self._stopped.wait()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Consume until a stop is requested; `task_status.started()` once consuming.

        On stop: cancel every consumer at once, let running handlers finish for up to
        `shutdown_timeout` seconds (or not at all on an immediate stop), requeue the rest,
        close the channels. Cancelling `run` itself is an immediate stop.
        """
        subscriptions: list[Subscription] = []
        self._subscriptions = subscriptions
        await notify(self.stack.on_worker_start, self)
        try:
            for queue in self.queues:
                handler = functools.partial(self._on_delivery, queue)
                subscriptions.append(await self.broker.consume(queue.name, queue.prefetch, handler))
                logger.info(
                    "consuming %r (prefetch %d) for tasks: %s",
                    queue.name,
                    queue.prefetch,
                    ", ".join(queue.tasks),
                )
            self._consuming = True
            task_status.started()
            async with self._services():
                await self._stopping.wait()
                await self._drain(subscriptions)
        finally:
            self._consuming = False
            with anyio.CancelScope(shield=True):
                await self._shut_down(subscriptions)

    async def _drain(self, subscriptions: list[Subscription]) -> None:
        """A graceful stop: no new deliveries; running handlers get the shutdown timeout."""
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

    @asynccontextmanager
    async def _services(self) -> AsyncIterator[None]:
        """Run the middleware's ``serve`` hooks for the block: beside the consumers, and on
        while running handlers finish (a lease a handler holds is renewed until it is done)."""
        serve = self.stack.serve
        if not serve:
            yield
            return
        async with anyio.create_task_group() as services:
            for hook in serve:
                services.start_soon(self._serve, hook)
            try:
                yield
            finally:
                services.cancel_scope.cancel()

    async def _serve(self, hook: Callable[[Worker], Awaitable[None]]) -> None:
        try:
            await hook(self)
        except Exception:
            # A plug-in's service failing must not stop the tasks: say so and go on.
            owner = type(getattr(hook, "__self__", hook)).__name__
            logger.exception("middleware %s: its serve() failed; the worker goes on", owner)

    async def _shut_down(self, subscriptions: list[Subscription]) -> None:
        # Consumers first: a handler cancelled now requeues its message, which must not
        # come straight back to a consumer that is still active.
        self.request_stop()
        await self._cancel_consumers(subscriptions)
        self._cancel_running()
        # A cancelled handler returns at once, except one moving its message to a retry tier
        # or the dead-letter queue: that finishes, within the publish timeout, before the
        # channels close.
        with anyio.move_on_after(self.settings.publish_timeout + 1):
            await self._wait_for_handlers(until_immediate=False)
        if self._running:
            logger.warning(
                "%d handler(s) ignored cancellation and still run; closing anyway",
                len(self._running),
            )
        for subscription in subscriptions:
            await subscription.close()
        await notify(self.stack.on_worker_stop, self)
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
            headers = delivery.headers
            logger.exception(
                "internal error handling message %s on %r: requeueing it",
                delivery.message_id,
                queue.name,
                extra=_log_fields(
                    headers.get(HEADER_TASK),
                    delivery.message_id,
                    header_count(headers.get(HEADER_ATTEMPT)),
                ),
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
        decision = admit(
            queue=queue.name,
            headers=headers,
            body=delivery.body,
            content_type=delivery.content_type,
            redelivered=delivery.redelivered,
            tasks=queue.tasks,
            max_size=self.settings.max_message_size,
            redelivery_limit=queue.redelivery_limit,
            now=self.broker.clock.time(),
            subscriber=queue.spec.subscriber,
        )
        message_id = delivery.message_id or new_message_id()
        if type(decision) is Run:
            task = decision.task
            context = TaskContext(
                message_id=message_id,
                correlation_id=delivery.correlation_id or message_id,
                attempt=header_count(headers.get(HEADER_ATTEMPT)),
                headers=headers,
                task_name=task.name,
                queue=queue.name,
                # A classic queue's redelivered message comes back as a counted copy.
                redelivered=delivery.redelivered or HEADER_REDELIVERIES in headers,
                published_at=delivery.timestamp,
                reply_to=delivery.reply_to,
            )
            await self._run(queue, task, context, decision.arguments, delivery)
            return
        if isinstance(decision, NotDue):
            await self._send_back(queue, delivery, message_id, decision.eta_ms)
            return
        name = headers.get(HEADER_TASK)
        known = name if isinstance(name, str) and name in queue.tasks else None
        if known is None and name is None:
            known = queue.spec.subscriber or (
                next(iter(queue.tasks)) if len(queue.tasks) == 1 else None
            )
        context = TaskContext(
            message_id=message_id,
            correlation_id=delivery.correlation_id or message_id,
            attempt=header_count(headers.get(HEADER_ATTEMPT)),
            headers=headers,
            task_name=known or "",
            queue=queue.name,
            redelivered=delivery.redelivered,
            reply_to=delivery.reply_to,
        )
        if isinstance(decision, CountRedelivery):
            await self._count_redelivery(queue, delivery, context, decision.count)
            return
        assert isinstance(decision, DeadLetter)
        owner = queue.tasks.get(known) if known else None
        received = Received(context, owner) if self.stack.on_dead_letter else None
        await self._dead_letter(queue, delivery, context, decision, received)

    async def _run(
        self,
        queue: _Queue,
        task: Task[Any, Any],
        context: TaskContext,
        arguments: msgspec.Struct,
        delivery: Delivery,
    ) -> None:
        if self._recounting:
            await self._recounted.wait()
        stack = self.stack
        received = Received(context, task, arguments) if stack.handles else None
        token = _current.set(context)
        try:
            if received is not None and stack.before_handler:
                try:
                    await stack.run_before_handler(received)
                except Skip as skip:
                    await self._skip(received, skip, delivery)
                    return
                except Postpone as postpone:
                    await self._postpone(queue, received, postpone, delivery)
                    return
            await self._attempt(queue, task, context, arguments, delivery, received)
        finally:
            _current.reset(token)

    async def _attempt(
        self,
        queue: _Queue,
        task: Task[Any, Any],
        context: TaskContext,
        arguments: msgspec.Struct,
        delivery: Delivery,
        received: Received | None,
    ) -> None:
        """Run the handler once and settle its message by how it ended."""
        started = time.perf_counter()
        try:
            timeout = task.options.timeout
            if timeout is None:
                result = await self._call(task, context, arguments)
            else:
                with anyio.move_on_after(timeout) as limit:
                    result = await self._call(task, context, arguments)
                if limit.cancelled_caught:
                    raise TimeoutError(f"task {task.name!r} ran over its timeout of {timeout:g}s")
        except anyio.get_cancelled_exc_class() as exc:
            with anyio.CancelScope(shield=True):
                await delivery.reject(requeue=True)
                logger.warning(
                    "task %s message %s attempt %d interrupted by the worker stopping: requeued",
                    task.name,
                    context.message_id,
                    context.attempt,
                    extra=_context_fields(context),
                )
                if received is not None and self.stack.after_handler:
                    with anyio.move_on_after(self.settings.publish_timeout):
                        outcome = Outcome(error=exc, duration=time.perf_counter() - started)
                        await notify(self.stack.after_handler, received, outcome)
            raise
        except Exception as exc:
            if received is not None and self.stack.after_handler:
                outcome = Outcome(error=exc, duration=time.perf_counter() - started)
                await notify(self.stack.after_handler, received, outcome)
            await self._failed(queue, task, context, delivery, exc, received)
        else:
            if received is not None and self.stack.after_handler:
                outcome = Outcome(result=result, duration=time.perf_counter() - started)
                await notify(self.stack.after_handler, received, outcome)
            await delivery.ack()

    async def _skip(self, received: Received, skip: Skip, delivery: Delivery) -> None:
        context = received.context
        logger.info(
            "task %s message %s attempt %d skipped: %s",
            context.task_name,
            context.message_id,
            context.attempt,
            skip.reason or "a middleware skipped it",
            extra=_context_fields(context),
        )
        await notify(self.stack.after_handler, received, Outcome(error=skip))
        await delivery.ack()

    async def _call(
        self, task: Task[Any, Any], context: TaskContext, arguments: msgspec.Struct
    ) -> Any:
        if task.is_async:
            return await task.invoke(context, arguments)
        return await self._run_in_thread(task, context, arguments)

    async def _run_in_thread(
        self, task: Task[Any, Any], context: TaskContext, arguments: msgspec.Struct
    ) -> Any:
        args, kwargs = task.call_args(context, arguments)
        # anyio runs it in a copy of this task's context: current_context() works there.
        call = functools.partial(task.fn, *args, **kwargs)
        try:
            return await anyio.to_thread.run_sync(
                call, limiter=self._threads, abandon_on_cancel=True
            )
        except anyio.get_cancelled_exc_class():
            logger.warning(
                "task %s message %s: sync handler abandoned in its thread (a thread cannot be "
                "killed; it runs on until it returns)",
                task.name,
                context.message_id,
                extra=_context_fields(context),
            )
            raise

    async def _count_redelivery(
        self, queue: _Queue, delivery: Delivery, context: TaskContext, count: int
    ) -> None:
        """Re-publish a classic queue's redelivered message with its redelivery count.

        RabbitMQ sets `redelivered` when an earlier delivery ended without an ack (a worker
        died or stopped mid-task) but keeps no count on classic queues. The worker moves
        the message to the back of its queue with the count raised (`cuebx.policy.admit`
        dead-letters it past the limit), instead of running a handler that may kill the
        process again.

        No handler starts until the original's ack is on the wire: otherwise the copy could
        be handled, and kill the process, before that ack left, and both would come back.
        """
        logger.warning(
            "message %s on %r was redelivered (%d of %d): a worker stopped or died handling it",
            context.message_id,
            queue.name,
            count,
            queue.redelivery_limit,
            extra=_log_fields(context.task_name or None, context.message_id, context.attempt),
        )
        out = _outgoing(delivery, context.message_id)
        copy = replace(out, headers={**out.headers, HEADER_REDELIVERIES: count})
        if not self._recounting:
            self._recounted = anyio.Event()
        self._recounting += 1
        try:
            await self._forward(delivery, queue.name, copy, context)
        finally:
            self._recounting -= 1
            if not self._recounting:
                self._recounted.set()

    # -- carrying out decisions -------------------------------------------------------------

    async def _failed(
        self,
        queue: _Queue,
        task: Task[Any, Any],
        context: TaskContext,
        delivery: Delivery,
        error: Exception,
        received: Received | None,
    ) -> None:
        if isinstance(error, Retry) and (error.every is not None or error.times is not None):
            logger.warning(
                "task %s raised Retry(every=%r, times=%r): a raised Retry goes through the "
                "task's next retry tier; every= and times= only apply in retries=",
                task.name,
                error.every,
                error.times,
                extra=_context_fields(context),
            )
        decision = task.retry_policy.on_failure(context.attempt, error)
        if isinstance(decision, RetryAfter):
            await self._retry_after(queue, context, delivery, error, received, decision)
            return
        if isinstance(decision, RetryThrough):
            logger.warning(
                "task %s message %s attempt %d failed: %s: %s; retrying through %s",
                task.name,
                context.message_id,
                context.attempt,
                type(error).__name__,
                error,
                decision.queue,
                extra=_context_fields(context),
            )
            copy = retry_copy(
                _outgoing(delivery, context.message_id, context.task_name), decision.attempt
            )
            if await self._forward(delivery, decision.queue, copy, context):
                await self._retried(received, error, decision)
            return
        logger.error(
            "task %s message %s attempt %d failed (%s): %s: %s",
            task.name,
            context.message_id,
            context.attempt,
            decision.reason,
            type(error).__name__,
            error,
            exc_info=error,
            extra=_context_fields(context),
        )
        await self._dead_letter(
            queue, delivery, context, DeadLetter(decision.reason, error), received
        )

    async def _dead_letter(
        self,
        queue: _Queue,
        delivery: Delivery,
        context: TaskContext,
        decision: DeadLetter,
        received: Received | None,
    ) -> None:
        reason, error = decision.reason, decision.detail
        target = queue.spec.dead_letter_queue
        fields = _log_fields(context.task_name or None, context.message_id, context.attempt)
        if reason not in ("exhausted", "rejected", "failed"):
            # Poison input: the handler never ran, so nothing else logged it.
            logger.error(
                "message %s on %r dead-lettered (%s): %s",
                context.message_id,
                queue.name,
                reason,
                error,
                extra=fields,
            )
        if target is None:
            logger.error(
                "queue %r has no dead-letter queue: message %s (%s) dropped",
                queue.name,
                context.message_id,
                reason,
                extra=fields,
            )
            await delivery.ack()
            moved = True
        else:
            copy = dead_letter_copy(
                _outgoing(delivery, context.message_id, context.task_name),
                reason=reason,
                queue=queue.name,
                error=error,
            )
            moved = await self._forward(delivery, target, copy, context)
        if moved and received is not None and self.stack.on_dead_letter:
            await notify(self.stack.on_dead_letter, received, reason, error)

    # -- the delay ladder -------------------------------------------------------------------

    async def _send_back(
        self, queue: _Queue, delivery: Delivery, message_id: str, eta_ms: int
    ) -> None:
        """Send a message that came before its eta back down the ladder for the rest."""
        headers = delivery.headers
        now = self.broker.clock.time()
        logger.info(
            "message %s on %r came %.3fs before its eta (this worker's clock is behind the "
            "publisher's?): sent back down the delay ladder",
            message_id,
            queue.name,
            eta_ms / 1000 - now,
            extra=_log_fields(
                headers.get(HEADER_TASK), message_id, header_count(headers.get(HEADER_ATTEMPT))
            ),
        )
        copy = _outgoing(delivery, message_id)
        await self._delay(queue.name, delivery, copy, message_id, due_us=eta_ms * 1000)

    async def _retry_after(
        self,
        queue: _Queue,
        context: TaskContext,
        delivery: Delivery,
        error: Exception,
        received: Received | None,
        decision: RetryAfter,
    ) -> None:
        logger.warning(
            "task %s message %s attempt %d failed: %s: %s; retrying in %gs through the delay "
            "ladder",
            context.task_name,
            context.message_id,
            context.attempt,
            type(error).__name__,
            error,
            decision.delay_ms / 1000,
            extra=_context_fields(context),
        )
        copy = retry_copy(
            _outgoing(delivery, context.message_id, context.task_name), decision.attempt
        )
        due = now_us(self.broker.clock) + decision.delay_ms * 1000
        if await self._delay(queue.name, delivery, copy, context.message_id, due_us=due):
            await self._retried(received, error, decision)

    async def _retried(
        self, received: Received | None, error: Exception, decision: RetryAfter | RetryThrough
    ) -> None:
        """Tell the plug-ins of a retry once its copy is on the broker."""
        if received is not None and self.stack.on_retry:
            await notify(
                self.stack.on_retry,
                received,
                error,
                attempt=decision.attempt,
                delay=decision.delay_ms / 1000,
            )

    async def _postpone(
        self, queue: _Queue, received: Received, postpone: Postpone, delivery: Delivery
    ) -> None:
        context = received.context
        # DEBUG: a postponement is routine (a rate limit holds back every message past it);
        # the plug-in that postpones says more, once, if it is worth saying.
        logger.debug(
            "task %s message %s attempt %d postponed by %gs: %s",
            context.task_name,
            context.message_id,
            context.attempt,
            postpone.delay_ms / 1000,
            postpone.reason or "a middleware postponed it",
            extra=_context_fields(context),
        )
        await notify(self.stack.after_handler, received, Outcome(error=postpone))
        copy = _outgoing(delivery, context.message_id, context.task_name)
        due = now_us(self.broker.clock) + postpone.delay_ms * 1000
        await self._delay(queue.name, delivery, copy, context.message_id, due_us=due)

    async def _delay(
        self,
        queue: str,
        delivery: Delivery,
        copy: OutgoingMessage,
        message_id: str,
        *,
        due_us: int,
    ) -> bool:
        """Publish a copy down the delay ladder, due at `due_us`, then ack the original.

        Returns:
            True once moved; False when the original was requeued (the copy was not
            confirmed, or the ladder could not be declared).
        """
        delays = self.delays
        headers = copy.headers
        fields = _log_fields(
            headers.get(HEADER_TASK), message_id, header_count(headers.get(HEADER_ATTEMPT))
        )
        try:
            if delays.ladder.units(due_us, now_us(self.broker.clock)):
                await delays.declare(self.broker, queue)
        except (TopologyError, BrokerError) as exc:
            logger.error(
                "cannot declare the delay ladder to move message %s of %r: %s; requeueing it",
                message_id,
                queue,
                exc,
                extra=fields,
            )
            with anyio.CancelScope(shield=True):
                await delivery.reject(requeue=True)
            return False
        # Planned after declaring, which may have taken a while.
        now = now_us(self.broker.clock)
        exchange, key, copy = delays.ladder.prepare(copy, queue, due_us=due_us, now_us=now)
        moved = await self._publish_then_ack(delivery, exchange, key, copy, message_id, fields)
        if not moved:
            delays.forget()  # was the ladder deleted? declare it again next time
        return moved

    async def _forward(
        self, delivery: Delivery, queue: str, copy: OutgoingMessage, context: TaskContext
    ) -> bool:
        """Publish a copy through the default exchange, then ack the original.

        Returns:
            True once the copy is confirmed and the original acked; False when the copy was
            not confirmed and the original was requeued.
        """
        fields = _log_fields(context.task_name or None, context.message_id, context.attempt)
        return await self._publish_then_ack(delivery, "", queue, copy, context.message_id, fields)

    async def _publish_then_ack(
        self,
        delivery: Delivery,
        exchange: str,
        routing_key: str,
        copy: OutgoingMessage,
        message_id: str,
        fields: dict[str, Any],
    ) -> bool:
        """Publish a copy, then ack the original; requeue the original if not confirmed.

        Shielded: a stop that lands between the two would leave both the copy and the
        original in the broker.
        """
        moved = False
        with anyio.CancelScope(shield=True):
            try:
                await self.broker.publish(exchange, routing_key, copy)
            except PublishError as exc:
                # Not confirmed: keep the original, so the message is never lost.
                logger.error(
                    "could not move message %s to %r: %s; requeueing it",
                    message_id,
                    routing_key if not exchange else exchange,
                    exc,
                    extra=fields,
                )
                await delivery.reject(requeue=True)
            else:
                await delivery.ack()
                moved = True
        return moved


def _outgoing(delivery: Delivery, message_id: str, task: str = "") -> OutgoingMessage:
    """Copy a delivery for publishing again; a copy names the `task` that took it.

    A message that named no task (an event, or a plain publisher's message on a queue with
    one task) names it from then on: its retries go straight to that task, and its dead
    letter says whose it was.
    """
    headers = {k: v for k, v in delivery.headers.items() if k not in BROKER_HEADERS}
    if task and HEADER_TASK not in headers:
        headers[HEADER_TASK] = task
    return OutgoingMessage(
        body=delivery.body,
        message_id=message_id,
        correlation_id=delivery.correlation_id or message_id,
        content_type=delivery.content_type,
        headers=headers,
        timestamp=delivery.timestamp or datetime.now(UTC),
        priority=delivery.priority,
        reply_to=delivery.reply_to,
    )


class _Started:
    """A task_status that sets an asyncio event, for starting a worker outside a group."""

    def __init__(self, event: asyncio.Event) -> None:
        self._event = event

    def started(self, value: None = None) -> None:
        self._event.set()
