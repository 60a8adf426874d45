"""`Cuebx`: the application object: settings, the task registry, and the lifecycle.

Publishing lives in `cuebx.publisher`, consuming in `cuebx.worker`, cross-cutting features
in middleware (`cuebx.middleware`); the app wires them to one broker and one topology.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, Self, TypeVar, overload

import anyio

from cuebx.brokers.base import Broker, broker_for_url, mask_url
from cuebx.context import TaskContext
from cuebx.delays import Delays, Ladder
from cuebx.durations import Duration
from cuebx.errors import ConfigurationError, DuplicateTaskError, StoreError
from cuebx.events import AsyncSubscriber, Emitted, Events, Subscriber, check_pattern
from cuebx.idempotency import Idempotency
from cuebx.limits import Limiter, Limits
from cuebx.middleware import Middleware, Stack
from cuebx.ops.dlq import DeadLetters
from cuebx.policy import RetrySpec
from cuebx.publisher import Publisher
from cuebx.results import Results
from cuebx.rpc import Caller, Replier
from cuebx.scheduling import Job, Misfire, Overlap, Scheduler
from cuebx.settings import Settings, check_seconds
from cuebx.status import TaskStatus
from cuebx.stores.base import Store, store_for_url
from cuebx.task import TASK_OPTIONS, AsyncTask, Task, TaskHandle, TaskOptions
from cuebx.topology import QueueType, Topology, plan
from cuebx.worker import Worker

__all__ = ["Cuebx"]

logger = logging.getLogger("cuebx.app")

P = ParamSpec("P")
R = TypeVar("R")


class TaskDecorator:
    """What ``@app.task(...)`` returns: applies the options to the function it decorates."""

    def __init__(self, app: Cuebx, options: dict[str, Any]) -> None:
        self._app = app
        self._options = options

    @overload
    def __call__(
        self, fn: Callable[Concatenate[TaskContext, P], Coroutine[Any, Any, R]]
    ) -> AsyncTask[P, R]: ...
    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, R]]) -> AsyncTask[P, R]: ...
    @overload
    def __call__(self, fn: Callable[Concatenate[TaskContext, P], R]) -> Task[P, R]: ...
    @overload
    def __call__(self, fn: Callable[P, R]) -> Task[P, R]: ...
    def __call__(self, fn: Callable[..., Any]) -> Task[Any, Any]:
        return self._app._register(fn, **self._options)


class PeriodicDecorator:
    """What ``@app.periodic(...)`` returns: registers the task, then its schedule."""

    def __init__(self, app: Cuebx, schedule: dict[str, Any], options: dict[str, Any]) -> None:
        self._app = app
        self._schedule = schedule
        self._options = options

    @overload
    def __call__(self, fn: Callable[[TaskContext], R]) -> Task[[], R]: ...
    @overload
    def __call__(self, fn: Callable[[], R]) -> Task[[], R]: ...
    def __call__(self, fn: Callable[..., Any]) -> Task[Any, Any]:
        return self._app._register_periodic(fn, self._schedule, self._options)


class Cuebx:
    """A cuebx application: the tasks, the broker they live on, and their topology.

    Args:
        url: broker URL; else ``CUEBX_BROKER_URL``; else ``amqp://guest:guest@localhost:5672/``.
            ``memory://`` runs everything in process (for tests). Several URLs (a list, or
            one string with commas, as ``CUEBX_BROKER_URL`` takes them) name the nodes of a
            RabbitMQ cluster: a lost connection moves to the next node that answers.
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
        delay_unit: the step of the delay ladder (`cuebx.delays`): a countdown is rounded
            up to a whole number of units, never early. Each level's TTL is
            ``delay_unit · 2^k``.
        delay_levels: the number of levels: the longest delay is ``2^delay_levels - 1``
            units (32 at 100ms: about 13.6 years). Apps that share an exchange share its
            ladder, so they must agree on `delay_unit` and `queue_type`.
        middleware: plug-ins that hook into publishing and handling (see
            `cuebx.Middleware`); more can be added with `add_middleware`.
        broker: a broker object to use instead of the one `url` names (a test's own
            `MemoryBroker`, say); see also `use_broker`.
        store: where task states, results and idempotency keys live: a URL
            (``"redis://localhost:6379/0"`` with ``cuebx[redis]``,
            ``"postgresql://..."`` with ``cuebx[postgres]``, ``"memory://"``) or a
            `cuebx.stores.Store`. None: no status, no results, no idempotency.
        result_ttl: how long a task's state and result are kept after its last change.
        call_timeout: how long `Task.call` waits for a reply unless told otherwise.

    Raises:
        ConfigurationError: an option is invalid; the message names it.
    """

    def __init__(
        self,
        url: str | Sequence[str] | None = None,
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
        delay_unit: Duration = "100ms",
        delay_levels: int = 32,
        middleware: Iterable[Middleware] = (),
        broker: Broker | None = None,
        store: str | Store | None = None,
        result_ttl: Duration = "1d",
        call_timeout: Duration = "30s",
    ) -> None:
        self.settings = Settings.build(
            url,
            exchange=exchange,
            queue_type=queue_type,
            serializer=serializer,
            delivery_limit=delivery_limit,
            max_priority=max_priority,
            prefetch=prefetch,
            max_message_size=max_message_size,
            publish_timeout=publish_timeout,
            connect_timeout=connect_timeout,
            shutdown_timeout=shutdown_timeout,
            thread_limit=thread_limit,
            connection_name=connection_name,
            delay_unit=delay_unit,
            delay_levels=delay_levels,
        )
        self.tasks: dict[str, Task[Any, Any]] = {}
        self.middleware = Stack(middleware)
        #: The delay ladder: declared on the broker the first time the app delays a message.
        self.delays = Delays(
            Ladder.of(self.settings), lambda: [q.name for q in self.topology().main_queues]
        )
        self.store: Store | None = store_for_url(store) if isinstance(store, str) else store
        self.results: Results | None = None
        # The replier first, so that its after_handler (in reverse order) replies last,
        # once the result is stored and the idempotency key settled.
        self.middleware.add(Replier())
        if self.store is not None:
            idempotency = self.middleware.find(Idempotency)
            if idempotency is None:
                idempotency = Idempotency()
                self.middleware.add(idempotency)
            idempotency.bind(self.store)
            ttl = check_seconds(result_ttl, "Cuebx", "result_ttl", positive=True)
            self.results = Results(self.store, self.tasks, ttl=ttl)
            self.middleware.add(self.results)
        self.publisher = Publisher(
            self,
            self.settings,
            self.middleware,
            caller=Caller(check_seconds(call_timeout, "Cuebx", "call_timeout", positive=True)),
            source=self.results,
            delays=self.delays,
        )
        #: Events: the subscribers' exchange and bindings, and what `emit` publishes through.
        self.events = Events(self.settings, self.publisher)
        #: Rate limits (`cuebx.limits`): installed with the first limiter or limited task.
        self.limits: Limits | None = None
        self._topology: Topology | None = None
        self._broker: Broker | None = broker
        self._connected = False
        self._connect_lock = anyio.Lock()
        self._workers: list[Worker] = []
        self._scheduler: Scheduler | None = None

    def __repr__(self) -> str:
        return f"<Cuebx {mask_url(self.settings.url)} tasks={list(self.tasks)}>"

    # -- registry ---------------------------------------------------------------------------

    @overload
    def task(
        self, fn: Callable[Concatenate[TaskContext, P], Coroutine[Any, Any, R]], /
    ) -> AsyncTask[P, R]: ...
    @overload
    def task(self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> AsyncTask[P, R]: ...
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
        track: bool = True,
        idempotent: bool = False,
        idempotency_key: Callable[..., str] | None = None,
        rate_limit: str | Limiter | None = None,
        concurrency: int | None = None,
    ) -> TaskDecorator: ...
    def task(self, *args: Any, **options: Any) -> Any:
        """Register a function as a task: ``@app.task`` or ``@app.task(queue=..., ...)``.

        Keyword Args:
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
            track: record this task's status and result in the app's store (if it has one).
            idempotent: run it at most once per message id (needs a store).
            idempotency_key: run it at most once per key, a function of its arguments
                returning a string (needs a store).
            rate_limit: at most this many starts per window across all workers: a rate
                (``"100/s"``, ``"10/m"``, ``"5/10s"``) or a limiter made with `limiter`
                (or its name). A message held back waits on the broker and spends no
                attempt (see `cuebx.limits`).
            concurrency: at most this many handlers of the queue at once across all
                workers: the queue gets a single active consumer with this prefetch.

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
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        subscribes: tuple[str, ...] = (),
        **options: Any,
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
        is_async = inspect.iscoroutinefunction(fn)
        if subscribes:
            kind: type[Task[Any, Any]] = AsyncSubscriber if is_async else Subscriber
            options.setdefault("queue", task_name)  # each subscriber: a queue of its own
        else:
            kind = AsyncTask if is_async else Task
        task = kind(
            self.publisher, fn, TaskOptions.build(name=task_name, subscribes=subscribes, **options)
        )
        if task.options.idempotent and self.store is None:
            raise ConfigurationError(
                f"task {task_name!r}: idempotent= and idempotency_key= need a store to "
                "remember keys in: Cuebx(url, store='redis://...' or 'postgresql://...')"
            )
        limiter = None
        if task.options.rate_limit is not None:
            limiter = self._limits().resolve(task)
        # Check the topology with this task before keeping it, so a clash names this task.
        self._plan([*self.tasks.values(), task])
        self.tasks[task_name] = task
        if limiter is not None:
            self._limits().bind(task, limiter)
        self._topology = None
        return task

    # -- events (cuebx.events) --------------------------------------------------------------

    def on(
        self,
        *patterns: str,
        queue: str | None = None,
        name: str | None = None,
        retries: RetrySpec = None,
        dead_letter: bool | str = True,
        prefetch: int | None = None,
        timeout: Duration | None = None,
        priority: int | None = None,
        queue_type: QueueType | None = None,
        retry_on: type[BaseException] | Sequence[type[BaseException]] | None = None,
        dont_retry_on: type[BaseException] | Sequence[type[BaseException]] | None = None,
        idempotent: bool = False,
        idempotency_key: Callable[..., str] | None = None,
        rate_limit: str | Limiter | None = None,
        concurrency: int | None = None,
    ) -> TaskDecorator:
        """Subscribe a handler to events: ``@app.on("order.created", queue="inventory")``.

        Every event emitted (`emit`) with a routing key one of `patterns` matches reaches
        the subscriber's queue once; every subscriber has a queue of its own, so each gets
        its own copy, retries and dead letters. A pattern's words are separated by dots;
        ``*`` stands for exactly one word, ``#`` for zero or more (``"order.*"``,
        ``"order.#"``, ``"#"``). The handler takes one parameter, the payload, validated
        against its annotation (fields it does not declare are ignored), and may take a
        `TaskContext` first; ``context.headers["x-cuebx-event"]`` is the routing key.

        The other keywords are those of `task`; the queue defaults to the subscriber's
        name. A subscriber is not tracked in the store: the event's id is shared by all
        its subscribers.

        Raises:
            ConfigurationError: no pattern or a bad one, another subscriber on the queue, a
                handler with more than one parameter, or a bad option.
            DuplicateTaskError: a task with that name exists.
        """
        if not patterns:
            raise ConfigurationError(
                "app.on() needs at least one routing pattern: @app.on('order.created', ...)"
            )
        where = f"subscriber {name!r}" if name else "app.on()"
        checked = tuple(dict.fromkeys(check_pattern(p, where) for p in patterns))
        options: dict[str, Any] = {
            "subscribes": checked,
            "name": name,
            "retries": retries,
            "dead_letter": dead_letter,
            "prefetch": prefetch,
            "timeout": timeout,
            "priority": priority,
            "queue_type": queue_type,
            "retry_on": retry_on,
            "dont_retry_on": dont_retry_on,
            "idempotent": idempotent,
            "idempotency_key": idempotency_key,
            "rate_limit": rate_limit,
            "concurrency": concurrency,
            "track": False,
        }
        if queue is not None:
            options["queue"] = queue
        return TaskDecorator(self, options)

    async def emit(
        self,
        routing_key: str,
        payload: Any = None,
        *,
        mandatory: bool = False,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        correlation_id: str | None = None,
        priority: int | None = None,
    ) -> Emitted:
        """Publish an event to every subscriber whose pattern matches `routing_key`.

        The payload (a msgspec Struct, a dataclass, a pydantic model or plain values) is
        encoded as the message body and published, confirmed, to the topic exchange
        ``<exchange>.events``. Middleware sees it as a publish (``Publish.event`` is True).

        Args:
            routing_key: the event's name, words separated by dots: ``"order.created"``.
            payload: the event's data; each subscriber validates it against its own
                annotation.
            mandatory: raise `UnroutableError` when no subscriber is bound for it; by
                default it is logged, counted (`Events.unrouted`) and kept in the queue
                ``<exchange>.events.unrouted``.
            headers: extra headers, seen by subscribers in ``TaskContext.headers``.
            message_id: the message id (your own idempotency key, say); a new one by default.
            correlation_id: the correlation id; the message id by default.
            priority: the message priority (needs ``Cuebx(max_priority=N)``).

        Returns:
            The message id and whether a subscriber's queue took it.

        Raises:
            ArgumentsError: a routing key with a wildcard or an empty word, a payload that
                does not encode or is too large.
            UnroutableError: `mandatory` and no subscriber is bound for it.
            PublishError: the broker did not confirm it.
        """
        return await self.events.emit(
            routing_key,
            payload,
            mandatory=mandatory,
            headers=headers,
            message_id=message_id,
            correlation_id=correlation_id,
            priority=priority,
        )

    # -- rate limits (cuebx.limits) ---------------------------------------------------------

    def limiter(self, name: str, rate: str) -> Limiter:
        """Make a rate limit several tasks share: ``rate_limit="stripe"`` or the object.

        ``app.limiter("stripe", "100/s")``: at most 100 starts per second of all the tasks
        that name it together, across every worker. Make it before those tasks.

        Raises:
            ConfigurationError: a bad name or rate, or the name exists with another rate.
        """
        return self._limits().add(name, rate)

    def _limits(self) -> Limits:
        if self.limits is None:
            self.limits = Limits(self.settings.exchange, lambda: self.broker)
            # First in line: a message held back by its limit reaches no other plug-in.
            self.middleware.add(self.limits, first=True)
        return self.limits

    # -- periodic tasks (cuebx.scheduling) --------------------------------------------------

    def periodic(
        self,
        *,
        cron: str | None = None,
        every: Duration | None = None,
        tz: str | None = None,
        misfire: Misfire = "once",
        overlap: Overlap = "allow",
        overlap_timeout: Duration = "1h",
        name: str | None = None,
        **task_options: Any,
    ) -> PeriodicDecorator:
        """Register a task without arguments and run it on a schedule.

        ``@app.periodic(cron="*/5 * * * *", tz="Europe/Paris")`` or ``@app.periodic(every=
        "30s")``; the other keywords are those of `task` (``queue=``, ``retries=``...). The
        job is named after the task. See `schedule` for the schedule options.

        Raises:
            ConfigurationError: an option is wrong, or the function takes arguments.
        """
        schedule = {
            "cron": cron,
            "every": every,
            "tz": tz,
            "misfire": misfire,
            "overlap": overlap,
            "overlap_timeout": overlap_timeout,
        }
        return PeriodicDecorator(self, schedule, {"name": name, **task_options})

    def _register_periodic(
        self, fn: Callable[..., Any], schedule: dict[str, Any], options: dict[str, Any]
    ) -> Task[Any, Any]:
        task = self._register(fn, **options)
        try:
            self.scheduler.add(task, **schedule)
        except BaseException:
            # Leave no task behind without its schedule.
            del self.tasks[task.name]
            self._topology = None
            raise
        return task

    def schedule(
        self,
        task: Task[Any, Any],
        *,
        cron: str | None = None,
        every: Duration | None = None,
        tz: str | None = None,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        misfire: Misfire = "once",
        overlap: Overlap = "allow",
        overlap_timeout: Duration = "1h",
        name: str | None = None,
    ) -> Job:
        """Publish a message for `task` on a schedule, from whichever worker is elected.

        Args:
            task: a task of this app.
            cron: a cron expression: five fields (minute hour day-of-month month
                day-of-week), or six with seconds first; ``@daily`` and the like.
            every: an interval instead of `cron` (``"30s"``, ``"1h"``), counted from the
                epoch: ``"1h"`` fires on the hour.
            tz: the IANA time zone of `cron` (UTC by default); daylight saving time is
                handled as cron does.
            args: positional arguments of each message.
            kwargs: keyword arguments of each message.
            misfire: ``"once"`` runs one catch-up for slots missed while no scheduler ran;
                ``"skip"`` runs none.
            overlap: ``"allow"`` fires even while the previous run is going; ``"skip"``
                skips a slot while it is.
            overlap_timeout: with ``overlap="skip"``, how long a run that never reported its
                end holds the job back.
            name: the job's name (the task's name by default); unique per exchange.

        Raises:
            ConfigurationError: an option is wrong; the message names the job and the option.
        """
        if self.tasks.get(task.name) is not task:
            raise ConfigurationError(
                f"job {name or task.name!r}: {task!r} is not a task of this app"
            )
        return self.scheduler.add(
            task,
            cron=cron,
            every=every,
            tz=tz,
            args=args,
            kwargs=kwargs,
            misfire=misfire,
            overlap=overlap,
            overlap_timeout=overlap_timeout,
            name=name,
        )

    @property
    def scheduler(self) -> Scheduler:
        """The app's periodic jobs and the scheduler that fires them (a middleware)."""
        if self._scheduler is None:
            self._scheduler = Scheduler(self)
            self.add_middleware(self._scheduler)
        return self._scheduler

    def _plan(self, tasks: Iterable[Task[Any, Any]]) -> Topology:
        s = self.settings
        tasks = list(tasks)
        topology = plan(
            (t.options.route() for t in tasks),
            exchange=s.exchange,
            queue_type=s.queue_type,
            delivery_limit=s.delivery_limit,
            max_priority=s.max_priority,
        )
        topology = self.events.extend(topology, tasks)
        if self.limits is not None:
            topology = self.limits.extend(topology, tasks)
        return topology

    def topology(self) -> Topology:
        """The exchange and queues the registered tasks need (no broker involved)."""
        if self._topology is None:
            self._topology = self._plan(self.tasks.values())
        return self._topology

    @property
    def dlq(self) -> DeadLetters:
        """Dead-letter operations on this app's broker: ``await app.dlq.ls()``, ``replay``...

        See `cuebx.ops.dlq.DeadLetters`; ``cuebx dlq`` is the same from the command line.
        """
        return DeadLetters(self.broker, self.topology())

    def add_middleware(self, middleware: Middleware) -> None:
        """Add a plug-in; its ``before_*`` hooks run after those added before it.

        Add middleware before workers start: a running worker sees it from its next
        message on, but its ``on_worker_start`` hook never ran.
        """
        self.middleware.add(middleware)

    # -- status -----------------------------------------------------------------------------

    def _results(self) -> Results:
        if self.results is None:
            raise ConfigurationError(
                "task status needs a store: Cuebx(url, store='redis://...' or "
                "'postgresql://...' or 'memory://')"
            )
        return self.results

    async def status(self, task_id: str) -> TaskStatus:
        """Read the status of any task by id: ``unknown`` for an id the store never saw.

        Raises:
            ConfigurationError: the app has no store.
            StoreError: the store did not answer.
        """
        return await self._results().status(task_id)

    def handle(self, task_id: str) -> TaskHandle[Any]:
        """Rebuild a handle from a task id (from a URL, say): its `status` and `result`.

        The result is decoded as its task's return type when that task is registered here;
        `Task.handle` gives a handle typed by a task you name.
        """
        return TaskHandle(task_id, "", "", task_id, self._results(), None)

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def broker(self) -> Broker:
        """The broker for the app's URL (created on first use, not connected)."""
        if self._broker is None:
            s = self.settings
            self._broker = broker_for_url(
                s.url,
                urls=s.urls,
                publish_timeout=s.publish_timeout,
                connect_timeout=s.connect_timeout,
                connection_name=s.connection_name,
            )
        return self._broker

    def use_broker(self, broker: Broker) -> Broker:
        """Talk to `broker` from now on (a test's in-memory broker, say); return the old one.

        The app counts as not connected afterwards: its next publish or `connect` connects
        `broker` and declares the topology there. The previous broker is left as it is
        (close it yourself if you opened it).

        Raises:
            RuntimeError: consumers started by `start_consumers` are running.
        """
        if self._workers:
            raise RuntimeError("stop the app's consumers before it changes brokers")
        previous = self.broker
        self._broker = broker
        self._connected = False
        return previous

    @property
    def connected(self) -> bool:
        """True once `connect` declared the topology on the current broker."""
        return self._connected

    @property
    def workers(self) -> tuple[Worker, ...]:
        """The workers `start_consumers` started that have not been stopped by `close`."""
        return tuple(self._workers)

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
            broker = self.broker
            await broker.connect()
            try:
                await broker.declare(self.topology())
            except BaseException:
                # Leave nothing open behind a failed connect: `async with app` does not
                # reach its exit, and an open connection would outlive the error.
                with anyio.CancelScope(shield=True):
                    await broker.close()
                raise
            self._connected = True
            if self.store is not None:
                try:
                    await self.store.connect()
                except StoreError as exc:
                    # Publishing and consuming never wait for the store: say it, go on.
                    logger.warning("the store does not answer yet: %s; carrying on", exc)

    async def declare(self) -> None:
        """Declare the exchange, queues and bindings of every registered task."""
        await self.broker.connect()
        await self.broker.declare(self.topology())

    async def close(self) -> None:
        """Stop consumers started by `start_consumers`, then close the connection."""
        workers, self._workers = self._workers, []
        for worker in workers:
            await worker.stop()
        if self._broker is not None:
            await self._broker.close()
        if self.store is not None:
            await self.store.close()
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

    # -- consuming --------------------------------------------------------------------------

    def worker(
        self,
        *,
        queues: Sequence[str] | None = None,
        prefetch: int | None = None,
        shutdown_timeout: Duration | None = None,
    ) -> Worker:
        """Build a worker for some or all queues (run it with `Worker.run` or `start`).

        Raises:
            LookupError: a queue has no task.
            ConfigurationError: `prefetch` or `shutdown_timeout` is invalid.
        """
        return Worker(
            self.broker,
            self.settings,
            self.topology(),
            self.tasks,
            stack=self.middleware,
            queues=queues,
            prefetch=prefetch,
            shutdown_timeout=(
                None
                if shutdown_timeout is None
                else check_seconds(shutdown_timeout, "worker", "shutdown_timeout")
            ),
            delays=self.delays,
        )

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
        self._workers.append(worker)
        try:
            if keep_alive:
                await worker.run()
            else:
                await worker.start()
                return worker
        except BaseException:
            self._workers.remove(worker)
            raise
        if worker in self._workers:
            self._workers.remove(worker)
        return worker
