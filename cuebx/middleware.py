"""The extension seam: plug-ins that hook into publishing and into the worker.

Cross-cutting behaviour (results, idempotency, metrics, tracing, rate limits, your own) is a
`Middleware`: a class whose hooks cuebx calls around each publish and each handler run. The
publish path and the worker never name a plug-in; they only run the hooks of a `Stack`.

Order: ``before_*`` and ``on_*`` hooks run in the order the middleware were added,
``after_*`` hooks in the reverse order, so the first middleware added wraps all the others.
A middleware whose hook is not overridden is not called at all: with no middleware, or none
that overrides the hooks of a path, that path costs what it costs without the seam.

Hooks of one message, in a worker::

    before_handler ─▶ handler ─▶ after_handler ─▶ ack
                                              └─▶ retry copy ─▶ on_retry
                                              └─▶ dead-letter copy ─▶ on_dead_letter

``on_dead_letter`` also runs for a message the worker cannot hand to a handler at all
(undecodable, unknown task, too large); ``received.task`` is then None. A ``before_handler``
hook may raise `Skip` (ack, do not run) or `Postpone` (run later, same attempt); the
handler does not run and ``after_handler`` hooks see the signal as the outcome's error.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import msgspec

from cuebx.brokers.base import Broker
from cuebx.context import TaskContext
from cuebx.durations import Duration, to_ms
from cuebx.message import DeadLetterReason, OutgoingMessage
from cuebx.task import Task

__all__ = [
    "Middleware",
    "Outcome",
    "Postpone",
    "Publish",
    "Received",
    "Skip",
    "Stack",
    "WorkerView",
    "notify",
]

logger = logging.getLogger("cuebx.middleware")


class Skip(Exception):
    """Raised by a ``before_handler`` hook: ack the message without running the handler.

    For a duplicate that already completed, say. The worker logs the reason and acks. Every
    ``after_handler`` hook then runs with the `Skip` as `Outcome.error`, including those of
    middleware whose ``before_handler`` did not run: check `Received.state` for what yours
    set up.
    """

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason)
        self.reason = reason


class Postpone(Exception):
    """Raised by a ``before_handler`` hook: handle the message later, spending no attempt.

    The worker sends the message down the delay ladder (`cuebx.delays`) with the same
    attempt number and acks it; it comes back after `delay`, to this or any other worker.
    A rate limit that is full, or an idempotency key another worker holds, say. Every
    ``after_handler`` hook then runs with the `Postpone` as `Outcome.error`, as for `Skip`.

    Args:
        delay: how long from now: seconds, ``"250ms"``, ``"1m"`` or a `timedelta`.
        reason: logged by the worker.

    Raises:
        ValueError: `delay` is not a duration.
    """

    def __init__(self, delay: Duration, reason: str = "") -> None:
        super().__init__(reason)
        self.delay = delay
        self.delay_ms = to_ms(delay, what="Postpone(delay)")
        self.reason = reason


class Publish(msgspec.Struct):
    """A message about to be published (``before_publish``) or just published (``after_publish``).

    Attributes:
        exchange: the exchange it goes to.
        routing_key: its routing key (the task's queue, for a task).
        message: body and properties. ``message.headers`` is a fresh dict owned by this
            publish: ``before_publish`` hooks may add headers to it (see `headers`).
        task_name: the task it is for; ``""`` for an event.
        event: True for an event (`cuebx.Cuebx.emit`): it goes to the events exchange
            under `routing_key`, and every subscriber whose pattern matches gets a copy.
    """

    exchange: str
    routing_key: str
    message: OutgoingMessage
    task_name: str
    event: bool = False

    @property
    def headers(self) -> dict[str, Any]:
        """The message's headers, to read or to add to before it is published."""
        headers = self.message.headers
        assert isinstance(headers, dict)
        return headers


class Received(msgspec.Struct):
    """A message the worker is handling, as the handler hooks see it.

    Attributes:
        context: what the handler sees: ids, attempt, headers, task name, queue.
        task: the task it is for; None when no task can take it (an ``on_dead_letter``
            for an unknown task or an undecodable body).
        arguments: the decoded, validated arguments (None when there are none).
        state: scratch space for middleware, kept from ``before_handler`` to the last
            hook of this attempt (a start time, a span): key it by your middleware's name.
    """

    context: TaskContext
    task: Task[Any, Any] | None
    arguments: msgspec.Struct | None = None
    state: dict[str, Any] = msgspec.field(default_factory=dict)


class Outcome(msgspec.Struct, frozen=True):
    """How a handler run ended, for ``after_handler``.

    Attributes:
        result: what the handler returned (None when it raised).
        error: what it raised, or the `Skip` that kept it from running; None on success.
        duration: seconds from the handler's start to its end (0 when it did not run).
    """

    result: Any = None
    error: BaseException | None = None
    duration: float = 0.0

    @property
    def succeeded(self) -> bool:
        return self.error is None


class WorkerView(Protocol):
    """What worker hooks can see of the worker that runs them (a `cuebx.Worker`)."""

    @property
    def broker(self) -> Broker: ...
    @property
    def queue_names(self) -> tuple[str, ...]: ...
    @property
    def tasks(self) -> Mapping[str, Task[Any, Any]]: ...
    @property
    def stopping(self) -> bool: ...


class Middleware:
    """Base class of plug-ins: override the hooks you need, leave the others alone.

    Every hook is a coroutine. An exception from ``before_publish`` fails the publish
    (nothing is published); one from another hook is logged on ``cuebx.middleware`` and
    changes nothing for the message, except `Skip` and `Postpone` from ``before_handler``.
    """

    async def before_publish(self, publish: Publish) -> None:
        """Called before a task's message is published; may add headers."""

    async def after_publish(self, publish: Publish, error: BaseException | None) -> None:
        """Called once the broker confirmed the message (`error` None) or did not."""

    async def after_publish_many(
        self, publishes: Sequence[Publish], errors: Sequence[BaseException | None]
    ) -> None:
        """Called once for a batch (`Task.map`), with each message's error or None.

        By default, ``after_publish`` for each message in turn. Override it to handle the
        batch at once (a store writing every ``pending`` state in one round trip).
        """
        for publish, error in zip(publishes, errors, strict=True):
            await notify((self.after_publish,), publish, error)

    async def on_worker_start(self, worker: WorkerView) -> None:
        """Called when a worker starts, before it consumes."""

    async def on_worker_stop(self, worker: WorkerView) -> None:
        """Called when a worker has stopped consuming and its handlers are done."""

    async def serve(self, worker: WorkerView) -> None:
        """Run beside a worker's consumers: from when they are registered until the worker
        stopped and its running handlers are done (or the shutdown timeout ran out), when it
        is cancelled. ``worker.stopping`` says when a stop began.

        For a plug-in's own long-running work (a scheduler, renewing leases, an HTTP
        endpoint). An exception is logged and the worker goes on without it.
        """

    async def before_handler(self, received: Received) -> None:
        """Called before the handler runs; raise `Skip` to ack without running it, or
        `Postpone` to run it later without spending an attempt."""

    async def after_handler(self, received: Received, outcome: Outcome) -> None:
        """Called after the handler returned or raised, before the message is settled."""

    async def on_retry(
        self, received: Received, error: BaseException, *, attempt: int, delay: float
    ) -> None:
        """Called once the message's retry copy is confirmed: `attempt` comes next, in
        `delay` seconds."""

    async def on_dead_letter(
        self, received: Received, reason: DeadLetterReason, error: BaseException | str
    ) -> None:
        """Called once the message is in its dead-letter queue (or dropped, without one)."""


def _overrides(middleware: Middleware, hook: str) -> bool:
    default = getattr(Middleware, hook)
    return getattr(type(middleware), hook, default) is not default


def _overriding(middleware: Iterable[Middleware], hook: str) -> tuple[Any, ...]:
    """The bound `hook` of each middleware that overrides it, in order."""
    default = getattr(Middleware, hook)
    return tuple(
        getattr(m, hook) for m in middleware if getattr(type(m), hook, default) is not default
    )


class Stack:
    """The middleware of an app, with each hook's implementations looked up once.

    The publish path and the worker test a hook's tuple before calling it, so a hook
    nobody implements costs one truth test.
    """

    def __init__(self, middleware: Iterable[Middleware] = ()) -> None:
        self.middleware: tuple[Middleware, ...] = ()
        for m in middleware:
            self.add(m)
        if not self.middleware:
            self._index()

    def add(self, middleware: Middleware, *, first: bool = False) -> None:
        """Add `middleware` last: its ``before_*`` hooks run after the others'.

        With `first`, add it before all the others instead: a rate limit decides whether
        a handler starts at all, before any other plug-in records a start.

        Raises:
            TypeError: it is not a `Middleware`.
        """
        if not isinstance(middleware, Middleware):
            raise TypeError(f"{middleware!r} is not a cuebx Middleware: subclass cuebx.Middleware")
        if first:
            self.middleware = (middleware, *self.middleware)
        else:
            self.middleware = (*self.middleware, middleware)
        self._index()

    def _index(self) -> None:
        found = self.middleware
        self.before_publish: tuple[Callable[[Publish], Awaitable[None]], ...] = _overriding(
            found, "before_publish"
        )
        self.after_publish: tuple[
            Callable[[Publish, BaseException | None], Awaitable[None]], ...
        ] = tuple(reversed(_overriding(found, "after_publish")))
        # For a batch: each middleware that handles publishes at all, through its batch hook.
        batched = {id(m) for m in found if _overrides(m, "after_publish_many")}
        self.after_publish_many = tuple(
            m.after_publish_many
            for m in reversed(found)
            if id(m) in batched or _overrides(m, "after_publish")
        )
        self.on_worker_start = _overriding(found, "on_worker_start")
        self.on_worker_stop = tuple(reversed(_overriding(found, "on_worker_stop")))
        self.serve: tuple[Callable[[Any], Awaitable[None]], ...] = _overriding(found, "serve")
        self.before_handler: tuple[Callable[[Received], Awaitable[None]], ...] = _overriding(
            found, "before_handler"
        )
        self.after_handler = tuple(reversed(_overriding(found, "after_handler")))
        self.on_retry = _overriding(found, "on_retry")
        self.on_dead_letter = _overriding(found, "on_dead_letter")
        #: True when a handler run needs a `Received` at all.
        self.handles = bool(
            self.before_handler or self.after_handler or self.on_retry or self.on_dead_letter
        )

    def __len__(self) -> int:
        return len(self.middleware)

    def find(self, kind: type[M]) -> M | None:
        """The first middleware of type `kind`, or None."""
        return next((m for m in self.middleware if isinstance(m, kind)), None)

    async def run_before_handler(self, received: Received) -> None:
        """Run the ``before_handler`` hooks in order; a failing hook is logged and skipped.

        Raises:
            Skip: a hook asked to skip the message; the hooks after it did not run.
            Postpone: a hook asked to handle it later; the hooks after it did not run.
        """
        for hook in self.before_handler:
            try:
                await hook(received)
            except (Skip, Postpone):
                raise
            except Exception:
                _log_hook_error(hook, received.context)


async def notify(
    hooks: Iterable[Callable[..., Awaitable[None]]], *args: Any, **kwargs: Any
) -> None:
    """Run hooks one after the other; one that raises is logged and the others still run."""
    for hook in hooks:
        try:
            await hook(*args, **kwargs)
        except Exception:
            context = args[0].context if args and isinstance(args[0], Received) else None
            _log_hook_error(hook, context)


def _log_hook_error(hook: Callable[..., Any], context: TaskContext | None) -> None:
    owner = type(getattr(hook, "__self__", hook)).__name__
    extra = (
        {}
        if context is None
        else {
            "task": context.task_name,
            "message_id": context.message_id,
            "attempt": context.attempt,
        }
    )
    logger.exception(
        "middleware %s failed in %s; carrying on without it", owner, hook.__name__, extra=extra
    )


M = TypeVar("M", bound=Middleware)
