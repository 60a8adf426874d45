"""The publish path: a task's arguments become a message, confirmed by the broker.

`Publisher` builds the message (encoded, validated, size-checked, ids and headers set), runs
the middleware's publish hooks, and publishes it mandatory with a confirm. It knows the app
only as a `Connection`: something with a broker that can be connected (and its topology
declared) on first use, so that a producer never publishes into a queue that does not exist.
A ``countdown=`` or ``eta=`` sends the message into the delay ladder (`cuebx.delays`) instead
of the app's exchange.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

from cuebx.brokers.base import Broker
from cuebx.delays import Delays, Ladder, due_us, now_us
from cuebx.durations import Duration
from cuebx.errors import ArgumentsError, BatchPublishError, PublishError
from cuebx.message import HEADER_TASK, OutgoingMessage, first_message
from cuebx.middleware import Publish, Stack, notify
from cuebx.rpc import Caller
from cuebx.settings import Settings
from cuebx.task import HandleSource, Task, TaskHandle

__all__ = ["Connection", "Publisher"]


class Connection(Protocol):
    """What the publisher needs of its app: the broker, connected on demand."""

    @property
    def broker(self) -> Broker: ...
    @property
    def connected(self) -> bool: ...
    async def connect(self) -> None: ...


class Publisher:
    """Publishes the messages of an app's tasks through its broker and middleware.

    Args:
        connection: the app, as far as publishing goes.
        settings: the app's settings.
        stack: the app's middleware.
        caller: waits for the replies of `Task.call`.
        source: where handles read status and results (the app's store), if anywhere.
        delays: the app's delay ladder (shared with its workers); else one of its own.
    """

    def __init__(
        self,
        connection: Connection,
        settings: Settings,
        stack: Stack,
        *,
        caller: Caller | None = None,
        source: HandleSource | None = None,
        delays: Delays | None = None,
    ) -> None:
        self.connection = connection
        self.settings = settings
        self.stack = stack
        #: Waits for the replies of `Task.call`.
        self.caller = caller or Caller(default_timeout=30.0)
        #: Where handles read status and results (the app's store), if anywhere.
        self.source = source
        self.delays = delays or Delays(Ladder.of(settings))

    def message(
        self,
        task: Task[Any, Any],
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        *,
        priority: int | None = None,
        headers: Mapping[str, Any] | None = None,
        correlation_id: str | None = None,
        message_id: str | None = None,
        reply_to: str | None = None,
    ) -> OutgoingMessage:
        """Build the message for one call of `task` (nothing is published).

        Raises:
            ArgumentsError: the arguments do not fit the task, or encode too large.
        """
        settings = self.settings
        body = task.encode(settings.codec, args, kwargs)
        if len(body) > settings.max_message_size:
            raise ArgumentsError(
                f"task {task.name!r}: the encoded arguments are {len(body)} bytes, over "
                f"max_message_size ({settings.max_message_size} bytes), so a worker "
                "would dead-letter the message as too-large; pass a reference (a URL, a key) "
                "instead of the data, or raise max_message_size on every app of the queue"
            )
        return first_message(
            body,
            settings.codec.content_type,
            headers,
            (HEADER_TASK, task.name),
            message_id=message_id,
            correlation_id=correlation_id,
            priority=task.options.priority if priority is None else priority,
            reply_to=reply_to,
        )

    async def connected_broker(self) -> Broker:
        """The app's broker, connected (and the topology declared) on first use."""
        return await self._broker()

    async def _broker(self) -> Broker:
        connection = self.connection
        if not connection.connected:
            await connection.connect()
        return connection.broker

    async def publish(
        self,
        task: Task[Any, Any],
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        *,
        priority: int | None = None,
        headers: Mapping[str, Any] | None = None,
        correlation_id: str | None = None,
        message_id: str | None = None,
        reply_to: str | None = None,
        countdown: Duration | None = None,
        eta: datetime | None = None,
    ) -> TaskHandle[Any]:
        """Publish one message for `task` and wait for its confirm.

        With a `countdown` or an `eta`, the message goes to the delay ladder, which holds it
        until it is due; middleware then sees the default exchange and the name of the ladder's
        level the message goes to first.

        Raises:
            ArgumentsError: the arguments do not fit the task's signature.
            DelayError: the countdown or eta cannot be held (naive, negative, too long).
            PublishError: the broker did not confirm the message.
        """
        message = self.message(
            task,
            args,
            kwargs,
            priority=priority,
            headers=headers,
            correlation_id=correlation_id,
            message_id=message_id,
            reply_to=reply_to,
        )
        exchange, routing_key = self.settings.exchange, task.queue
        if countdown is not None or eta is not None:
            exchange, routing_key, message = await self._delayed(task, message, countdown, eta)
        broker = await self._broker()
        stack = self.stack
        try:
            if not (stack.before_publish or stack.after_publish):
                await broker.publish(exchange, routing_key, message)
            else:
                message = await self._publish_with_hooks(
                    broker, exchange, routing_key, message, task
                )
        except PublishError:
            if routing_key != task.queue:  # into the ladder: was it deleted?
                self.delays.forget()  # declare it again next time
            raise
        return TaskHandle(
            message.message_id, task.name, task.queue, message.correlation_id, self.source, task
        )

    async def call(
        self,
        task: Task[Any, Any],
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        *,
        limit: float | None,
    ) -> Any:
        """Publish a request for `task` and wait for the worker's reply (`Task.call`)."""
        return await self.caller.call(self, task, args, kwargs, limit=limit)

    async def _delayed(
        self,
        task: Task[Any, Any],
        message: OutgoingMessage,
        countdown: Duration | None,
        eta: datetime | None,
    ) -> tuple[str, str, OutgoingMessage]:
        """Plan a delayed publish: where it goes, stamped; the ladder declared if need be.

        Raises:
            DelayError: the countdown or eta cannot be held; nothing was published.
        """
        clock = self.connection.broker.clock
        now = now_us(clock)
        due = due_us(countdown=countdown, eta=eta, now=now, task=task.name)
        ladder = self.delays.ladder
        units = 0 if due is None else ladder.units(due, now)
        if due is None or units == 0:
            return self.settings.exchange, task.queue, message  # nothing to wait for
        ladder.check(units, f"task {task.name!r}")
        await self.delays.declare(await self._broker(), task.queue)
        # Connecting and declaring the ladder took time: count the wait from now, so that
        # the first delayed message is not late by it.
        return ladder.prepare(message, task.queue, due_us=due, now_us=now_us(clock))

    async def _publish_with_hooks(
        self,
        broker: Broker,
        exchange: str,
        routing_key: str,
        message: OutgoingMessage,
        task: Task[Any, Any],
    ) -> OutgoingMessage:
        """Publish with the middleware's publish hooks around; return what was published."""
        stack = self.stack
        publish = Publish(exchange, routing_key, message, task.name)
        for hook in stack.before_publish:
            await hook(publish)
        try:
            await broker.publish(publish.exchange, publish.routing_key, publish.message)
        except BaseException as exc:
            await notify(stack.after_publish, publish, exc)
            raise
        await notify(stack.after_publish, publish, None)
        return publish.message

    async def publish_many(
        self,
        task: Task[Any, Any],
        arguments: Iterable[Sequence[Any] | Mapping[str, Any]],
        *,
        window: int = 256,
    ) -> list[TaskHandle[Any]]:
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
                    messages.append(self.message(task, (), item))
                else:
                    messages.append(self.message(task, tuple(item), {}))
            except ArgumentsError as exc:
                raise ArgumentsError(f"item {index}: {exc}") from None
        broker = await self._broker()
        exchange = self.settings.exchange
        stack = self.stack
        publishes = [Publish(exchange, task.queue, m, task.name) for m in messages]
        if stack.before_publish:
            for publish in publishes:
                for hook in stack.before_publish:
                    await hook(publish)
        results = await broker.publish_many(
            exchange, [(p.routing_key, p.message) for p in publishes], window=window
        )
        if stack.after_publish_many:
            await notify(stack.after_publish_many, publishes, results)
        handles: list[TaskHandle[Any] | None] = [
            None
            if error is not None
            else TaskHandle(
                p.message.message_id,
                task.name,
                task.queue,
                p.message.correlation_id,
                self.source,
                task,
            )
            for p, error in zip(publishes, results, strict=True)
        ]
        errors = {i: e for i, e in enumerate(results) if e is not None}
        if errors:
            raise BatchPublishError(handles, errors)
        return [h for h in handles if h is not None]
