"""`Cuebx`: the application object: settings, the task registry, and the lifecycle."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, Self, TypeVar, overload

import anyio

from cuebx.brokers.base import Broker, broker_for_url, mask_url
from cuebx.context import TaskContext
from cuebx.durations import Duration, to_seconds
from cuebx.errors import ArgumentsError, ConfigurationError, DuplicateTaskError, PublishError
from cuebx.message import (
    HEADER_ATTEMPT,
    HEADER_TASK,
    Codec,
    OutgoingMessage,
    codec_for,
    new_message_id,
)
from cuebx.policy import RetrySpec
from cuebx.task import TASK_OPTIONS, Task, TaskHandle, TaskOptions
from cuebx.topology import QueueType, Topology, plan
from cuebx.worker import Worker

__all__ = ["BatchPublishError", "Cuebx", "Settings"]

P = ParamSpec("P")
R = TypeVar("R")

DEFAULT_URL = "amqp://guest:guest@localhost:5672/"
URL_ENV = "CUEBX_BROKER_URL"


@dataclass(frozen=True, slots=True)
class Settings:
    """The app's settings, resolved once: argument, then environment, then default."""

    url: str
    exchange: str
    queue_type: QueueType
    serializer: str
    delivery_limit: int | None
    max_priority: int | None
    prefetch: int
    max_message_size: int
    publish_timeout: float
    connect_timeout: float
    shutdown_timeout: float
    thread_limit: int
    connection_name: str | None


class BatchPublishError(PublishError):
    """Some messages of a batch were not confirmed.

    Attributes:
        handles: one entry per item, in order: the handle when confirmed, else None.
        errors: ``{index: error}`` for every item that was not confirmed.
    """

    def __init__(self, handles: list[TaskHandle | None], errors: dict[int, BaseException]):
        self.handles = handles
        self.errors = errors
        first = next(iter(errors.items()))
        super().__init__(
            f"{len(errors)} of {len(handles)} messages were not confirmed "
            f"(item {first[0]}: {first[1]})"
        )


class TaskDecorator:
    """What ``@app.task(...)`` returns: applies the options to the function it decorates."""

    def __init__(self, app: Cuebx, options: dict[str, Any]) -> None:
        self._app = app
        self._options = options

    @overload
    def __call__(self, fn: Callable[Concatenate[TaskContext, P], R]) -> Task[P, R]: ...
    @overload
    def __call__(self, fn: Callable[P, R]) -> Task[P, R]: ...
    def __call__(self, fn: Callable[..., Any]) -> Task[Any, Any]:
        return self._app._register(fn, **self._options)


class Cuebx:
    """A cuebx application: the tasks, the broker they live on, and their topology.

    Args:
        url: broker URL; else ``CUEBX_BROKER_URL``; else ``amqp://guest:guest@localhost:5672/``.
            ``memory://`` runs everything in process (for tests).
        exchange: the direct exchange tasks are published to.
        queue_type: ``"classic"`` or ``"quorum"``, for queues whose tasks do not say.
        serializer: ``"json"`` (default) or ``"msgpack"``.
        delivery_limit: deliveries of a message that never got acked (it kept killing
            workers) after which it is dead-lettered as a poison message: RabbitMQ counts
            on quorum queues (``x-delivery-limit``), the worker on classic ones. None for
            no limit.
        max_priority: give main (classic) queues ``x-max-priority``; None for no priorities.
        prefetch: default unacked messages (= concurrent handlers) per queue.
        max_message_size: bodies above this many bytes are refused by ``delay()`` and, from
            other publishers, dead-lettered by the worker as ``too-large``.
        publish_timeout: longest wait for a publisher confirm, reconnection included.
        connect_timeout: longest wait for the first connection.
        shutdown_timeout: how long a stopping worker lets running handlers finish.
        thread_limit: worker threads for sync handlers.
        connection_name: shown by ``rabbitmqctl list_connections``.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        exchange: str = "cuebx",
        queue_type: QueueType = "classic",
        serializer: str = "json",
        delivery_limit: int | None = 10,
        max_priority: int | None = None,
        prefetch: int = 10,
        max_message_size: int = 1024 * 1024,
        publish_timeout: Duration = "30s",
        connect_timeout: Duration = "10s",
        shutdown_timeout: Duration = "30s",
        thread_limit: int = 40,
        connection_name: str | None = None,
    ) -> None:
        if queue_type not in ("classic", "quorum"):
            raise ConfigurationError(
                f"queue_type must be 'classic' or 'quorum', got {queue_type!r}"
            )
        if max_priority is not None and not 1 <= max_priority <= 255:
            raise ConfigurationError(f"max_priority must be 1..255, got {max_priority!r}")
        if prefetch < 1:
            raise ConfigurationError(f"prefetch must be >= 1, got {prefetch!r}")
        try:
            self.codec: Codec = codec_for(serializer)
            timeouts = {
                name: to_seconds(value, what=name)
                for name, value in (
                    ("publish_timeout", publish_timeout),
                    ("connect_timeout", connect_timeout),
                    ("shutdown_timeout", shutdown_timeout),
                )
            }
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        self.settings = Settings(
            url=url or os.environ.get(URL_ENV) or DEFAULT_URL,
            exchange=exchange,
            queue_type=queue_type,
            serializer=serializer,
            delivery_limit=delivery_limit,
            max_priority=max_priority,
            prefetch=prefetch,
            max_message_size=max_message_size,
            thread_limit=thread_limit,
            connection_name=connection_name,
            **timeouts,
        )
        self.tasks: dict[str, Task[Any, Any]] = {}
        self._topology: Topology | None = None
        self._broker: Broker | None = None
        self._connected = False
        self._connect_lock = anyio.Lock()
        # Workers started by start_consumers, with the task running each (None when the
        # caller runs it, with keep_alive=True).
        self._workers: list[tuple[Worker, asyncio.Task[None] | None]] = []

    def __repr__(self) -> str:
        return f"<Cuebx {mask_url(self.settings.url)} tasks={list(self.tasks)}>"

    # -- registry ---------------------------------------------------------------------------

    @overload
    def task(self, fn: Callable[Concatenate[TaskContext, P], R], /) -> Task[P, R]: ...
    @overload
    def task(self, fn: Callable[P, R], /) -> Task[P, R]: ...
    @overload
    def task(
        self,
        *,
        queue: str = "default",
        name: str | None = None,
        retries: RetrySpec = None,
        dead_letter: bool | str = True,
        prefetch: int | None = None,
        timeout: Duration | None = None,
        priority: int | None = None,
        queue_type: QueueType | None = None,
        routing_keys: Sequence[str] = (),
        retry_on: type[BaseException] | Sequence[type[BaseException]] | None = None,
        dont_retry_on: type[BaseException] | Sequence[type[BaseException]] | None = None,
    ) -> TaskDecorator: ...
    def task(self, *args: Any, **options: Any) -> Any:
        """Register a function as a task: ``@app.task`` or ``@app.task(queue=..., ...)``.

        Args:
            queue: the queue its messages go to (and the routing key that binds it).
            name: the task name in ``x-cuebx-task``; defaults to the function's name.
            retries: delays between attempts (``["30s", "5m"]``) or ``Retry(every=, times=)``.
            dead_letter: True for ``<queue>.dlq``, a name to share one, False for none.
            prefetch: unacked messages, so concurrent handlers, on this queue.
            timeout: cancel the handler after this long; counts as a failure.
            priority: default message priority (needs ``Cuebx(max_priority=N)``).
            queue_type: ``"classic"`` or ``"quorum"`` for this queue.
            routing_keys: more routing keys binding the queue to the exchange.
            retry_on: only these exception types are retried.
            dont_retry_on: these exception types are never retried.

        Raises:
            DuplicateTaskError: a task with that name exists.
            ConfigurationError: an option is invalid; the message names it.
        """
        if args:
            if len(args) > 1 or options or not callable(args[0]):
                raise ConfigurationError(
                    "use @app.task or @app.task(queue=..., ...), with options by keyword"
                )
            return self._register(args[0])
        return TaskDecorator(self, options)

    def _register(
        self, fn: Callable[..., Any], *, name: str | None = None, **options: Any
    ) -> Task[Any, Any]:
        task_name = name or getattr(fn, "__name__", None)
        if not task_name:
            raise ConfigurationError(f"cannot name task {fn!r}: pass name=")
        if task_name in self.tasks:
            other = self.tasks[task_name].fn
            raise DuplicateTaskError(
                f"task name {task_name!r} is already registered by "
                f"{other.__module__}.{other.__qualname__}; pass name= to tell them apart"
            )
        unknown = sorted(set(options) - TASK_OPTIONS)
        if unknown:
            raise ConfigurationError(
                f"task {task_name!r}: unknown option(s) {', '.join(unknown)}; "
                f"options are: name, {', '.join(sorted(TASK_OPTIONS))}"
            )
        task: Task[Any, Any] = Task(self, fn, TaskOptions.build(name=task_name, **options))
        # Check the topology with this task before keeping it, so a clash names this task.
        self._plan([*self.tasks.values(), task])
        self.tasks[task_name] = task
        self._topology = None
        return task

    def _plan(self, tasks: Iterable[Task[Any, Any]]) -> Topology:
        s = self.settings
        return plan(
            (t.options.route() for t in tasks),
            exchange=s.exchange,
            queue_type=s.queue_type,
            delivery_limit=s.delivery_limit,
            max_priority=s.max_priority,
        )

    def topology(self) -> Topology:
        """The exchange and queues the registered tasks need (no broker involved)."""
        if self._topology is None:
            self._topology = self._plan(self.tasks.values())
        return self._topology

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def broker(self) -> Broker:
        """The broker for the app's URL (created on first use, not connected)."""
        if self._broker is None:
            s = self.settings
            self._broker = broker_for_url(
                s.url,
                publish_timeout=s.publish_timeout,
                connect_timeout=s.connect_timeout,
                connection_name=s.connection_name,
            )
        return self._broker

    async def connect(self) -> None:
        """Connect and declare the whole topology (idempotent).

        Declaring on connect means a producer deployed before any worker never publishes
        into a queue that does not exist yet.

        Raises:
            BrokerUnavailableError: the broker cannot be reached.
            TopologyConflictError: a queue exists with other arguments.
        """
        async with self._connect_lock:
            if self._connected:
                return
            await self.broker.connect()
            try:
                await self.broker.declare(self.topology())
            except BaseException:
                # Leave nothing open behind a failed connect: `async with app` does not
                # reach its exit, and an open connection would outlive the error.
                with anyio.CancelScope(shield=True):
                    await self.broker.close()
                raise
            self._connected = True

    async def declare(self) -> None:
        """Declare the exchange, queues and bindings of every registered task."""
        await self.broker.connect()
        await self.broker.declare(self.topology())

    async def close(self) -> None:
        """Stop consumers started by `start_consumers`, then close the connection."""
        workers, self._workers = self._workers, []
        for worker, runner in workers:
            await worker.stop()
            if runner is not None:
                await runner
        if self._broker is not None:
            await self._broker.close()
        self._connected = False

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- publishing -------------------------------------------------------------------------

    def _message(
        self,
        task: Task[Any, Any],
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        *,
        priority: int | None = None,
        headers: Mapping[str, Any] | None = None,
        correlation_id: str | None = None,
        message_id: str | None = None,
    ) -> OutgoingMessage:
        body = task.encode(self.codec, args, kwargs)
        if len(body) > self.settings.max_message_size:
            raise ArgumentsError(
                f"task {task.name!r}: the encoded arguments are {len(body)} bytes, over "
                f"max_message_size ({self.settings.max_message_size} bytes), so a worker "
                "would dead-letter the message as too-large; pass a reference (a URL, a key) "
                "instead of the data, or raise max_message_size on every app of the queue"
            )
        message_id = message_id or new_message_id()
        all_headers: dict[str, Any] = dict(headers) if headers else {}
        all_headers[HEADER_TASK] = task.name
        all_headers[HEADER_ATTEMPT] = 0
        return OutgoingMessage(
            body=body,
            message_id=message_id,
            correlation_id=correlation_id or message_id,
            content_type=self.codec.content_type,
            headers=all_headers,
            timestamp=datetime.now(UTC),
            priority=task.options.priority if priority is None else priority,
        )

    async def publish(
        self,
        task: Task[Any, Any],
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        **properties: Any,
    ) -> TaskHandle:
        """Publish one message for `task` and wait for its confirm (used by `Task.delay`)."""
        message = self._message(task, args, kwargs, **properties)
        if not self._connected:
            await self.connect()
        await self.broker.publish(self.settings.exchange, task.queue, message)
        return TaskHandle(message.message_id, task.name, task.queue, message.correlation_id)

    async def publish_many(
        self,
        task: Task[Any, Any],
        arguments: Iterable[Sequence[Any] | Mapping[str, Any]],
        *,
        window: int = 256,
    ) -> list[TaskHandle]:
        """Publish one message per item, keeping up to `window` confirms in flight.

        Every item is encoded and validated before anything is published.

        Raises:
            ArgumentsError: an item's arguments do not fit (nothing was published).
            BatchPublishError: some messages were not confirmed; it lists which.
        """
        messages = []
        for index, item in enumerate(arguments):
            try:
                if isinstance(item, Mapping):
                    messages.append(self._message(task, (), item))
                else:
                    messages.append(self._message(task, tuple(item), {}))
            except ArgumentsError as exc:
                raise ArgumentsError(f"item {index}: {exc}") from None
        if not self._connected:
            await self.connect()
        results = await self.broker.publish_many(
            self.settings.exchange, [(task.queue, m) for m in messages], window=window
        )
        handles: list[TaskHandle | None] = [
            TaskHandle(m.message_id, task.name, task.queue, m.correlation_id)
            if error is None
            else None
            for m, error in zip(messages, results, strict=True)
        ]
        errors = {i: e for i, e in enumerate(results) if e is not None}
        if errors:
            raise BatchPublishError(handles, errors)
        return [h for h in handles if h is not None]

    # -- consuming --------------------------------------------------------------------------

    def worker(
        self,
        *,
        queues: Sequence[str] | None = None,
        prefetch: int | None = None,
        shutdown_timeout: Duration | None = None,
    ) -> Worker:
        """Build a worker for some or all queues (run it with `Worker.run`)."""
        seconds = (
            self.settings.shutdown_timeout
            if shutdown_timeout is None
            else to_seconds(shutdown_timeout, what="shutdown_timeout")
        )
        return Worker(self, queues=queues, prefetch=prefetch, shutdown_timeout=seconds)

    async def start_consumers(
        self,
        *,
        queues: Sequence[str] | None = None,
        prefetch: int | None = None,
        keep_alive: bool = False,
    ) -> Worker:
        """Start consuming inside the running event loop (a FastAPI lifespan, say).

        Returns once every consumer is registered with the broker. With ``keep_alive=False``
        the consumers run in the background until `Worker.stop` or `close`; with
        ``keep_alive=True`` this call runs them itself until it is cancelled (an immediate
        stop) or `close` stops them (a graceful one).
        """
        await self.connect()
        worker = self.worker(queues=queues, prefetch=prefetch)
        if keep_alive:
            entry: tuple[Worker, asyncio.Task[None] | None] = (worker, None)
            self._workers.append(entry)
            try:
                await worker.run()
            finally:
                if entry in self._workers:
                    self._workers.remove(entry)
            return worker
        ready = asyncio.Event()

        async def run() -> None:
            await worker.run(task_status=_Started(ready))

        # The one background task cuebx starts: its owner is the app, which awaits it in
        # close(); Worker.stop() ends it.
        runner = asyncio.get_running_loop().create_task(run(), name="cuebx-worker")
        self._workers.append((worker, runner))
        waiter = asyncio.ensure_future(ready.wait())
        done, _ = await asyncio.wait({runner, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if runner in done:
            waiter.cancel()
            self._workers.remove((worker, runner))
            runner.result()  # raises what stopped it
            raise RuntimeError("cuebx worker stopped before its consumers were registered")
        return worker


class _Started:
    """A task_status that sets an asyncio event, for starting a worker outside a group."""

    def __init__(self, event: asyncio.Event) -> None:
        self._event = event

    def started(self, value: None = None) -> None:
        self._event.set()
