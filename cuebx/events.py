"""Events: one message emitted, a copy for every subscriber, each on a queue of its own.

A task is one-to-one: ``delay()`` sends a message to one queue, for one handler. An event is
one-to-many: ``await app.emit("order.created", order)`` publishes once to the topic exchange
``<exchange>.events`` (``cuebx.events`` by default), and RabbitMQ puts a copy in the queue of
every subscriber whose pattern matches the routing key::

                                                  ┌─▶ queue inventory  ─▶ reserve(order)
    emit("order.created") ─▶ exchange cuebx.events ├─▶ queue shipping   ─▶ prepare(order)
           (topic)           "order.created"       └─▶ queue analytics  ─▶ track(event)
                             "order.*" / "order.#"       (each: own retry tiers and .dlq)

A subscriber (``@app.on("order.created", queue="inventory")``) is a task in every other way:
its queue has its own retry tiers and dead-letter queue, so a slow or failing subscriber
never holds up the others, and a retry or a dead letter is that subscriber's alone.

The body is the payload itself (a msgspec Struct, a dataclass, a pydantic model or plain
values, encoded as the app's serializer says), not an object of named arguments as a task's
is: the emitter cannot know what each subscriber calls its parameter. Each subscriber
decodes it as the annotation of its one parameter, so a subscriber that reads fewer fields
than the emitter sends keeps working (unknown fields are ignored), and one that needs a
field the emitter does not send dead-letters the message as ``invalid-arguments``.

The message names no task (``x-cuebx-task``): it reaches many queues, each with its own
subscriber. It carries ``x-cuebx-event`` (the routing key) instead, and each worker hands it
to its queue's subscriber (`cuebx.policy.admit`); a queue has at most one subscriber, and
may also hold tasks, whose messages name them.

An event no subscriber is bound for is not dropped. The publish is mandatory, so RabbitMQ
returns it; by default (``mandatory=False``) the emitter logs a warning, counts it
(`Events.unrouted`) and keeps a copy in the bounded queue ``<exchange>.events.unrouted``
(the newest 10,000); with ``mandatory=True`` it raises `UnroutableError` and keeps nothing.
The return costs nothing when the event is routed, and the emitter learns of it at once,
which an alternate exchange on the events exchange would hide from it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ParamSpec, Protocol, TypeVar

import anyio
import msgspec

from cuebx.brokers.base import Broker
from cuebx.errors import ArgumentsError, ConfigurationError, PublishError, UnroutableError
from cuebx.message import (
    HEADER_EVENT,
    SERIALIZERS,
    Codec,
    OutgoingMessage,
    codec_for,
    first_message,
)
from cuebx.middleware import Publish, Stack, notify
from cuebx.settings import Settings, check_count
from cuebx.task import AsyncTask, Task, TaskOptions, TaskPublisher
from cuebx.topology import Binding, ExchangeSpec, QueueSpec, Topology

__all__ = [
    "UNROUTED_LIMIT",
    "AsyncSubscriber",
    "Emitted",
    "Events",
    "Subscriber",
    "check_pattern",
    "check_routing_key",
    "events_exchange",
    "unrouted_queue",
]

logger = logging.getLogger("cuebx.events")

P = ParamSpec("P")
R = TypeVar("R")

#: How many unrouted events ``<exchange>.events.unrouted`` keeps: the oldest go first.
UNROUTED_LIMIT = 10_000

#: AMQP's limit on a routing key (and so on a binding's pattern), in bytes.
_MAX_KEY_BYTES = 255


def events_exchange(exchange: str) -> str:
    """Name the topic exchange events of an app exchange go to: ``cuebx.events``."""
    return f"{exchange}.events"


def unrouted_queue(exchange: str) -> str:
    """Name the queue that keeps the events no subscriber was bound for."""
    return f"{exchange}.events.unrouted"


# -- routing keys and patterns -----------------------------------------------------------------


def _words(text: str, where: str, what: str, error: type[Exception]) -> list[str]:
    if not isinstance(text, str) or not text:
        raise error(f"{where}: {what} must be a non-empty string such as 'order.created'")
    if len(text.encode()) > _MAX_KEY_BYTES:
        raise error(f"{where}: {what} {text!r} is longer than AMQP's {_MAX_KEY_BYTES} bytes")
    words = text.split(".")
    if "" in words:
        raise error(
            f"{where}: {what} {text!r} has an empty word (two dots in a row, or a dot at an "
            "end); words are separated by single dots: 'order.created'"
        )
    return words


def check_pattern(pattern: str, where: str) -> str:
    """Return a subscriber's topic pattern, or refuse it naming `where`.

    Words are separated by dots; ``*`` stands for exactly one word and ``#`` for zero or
    more. A word such as ``order*`` is refused: RabbitMQ would match it literally, which
    is never what its author meant.

    Raises:
        ConfigurationError: empty, too long, an empty word, or a wildcard inside a word.
    """
    for word in _words(pattern, where, "the routing pattern", ConfigurationError):
        if word not in ("*", "#") and ("*" in word or "#" in word):
            raise ConfigurationError(
                f"{where}: the routing pattern {pattern!r} has {word!r}: '*' and '#' are "
                "whole words ('order.*' matches one word after 'order', 'order.#' any number)"
            )
    return pattern


def check_routing_key(routing_key: str, where: str) -> str:
    """Return an event's routing key, or refuse it naming `where`.

    Raises:
        ArgumentsError: empty, too long, an empty word, or a ``*`` or ``#`` in it (wildcards
            belong to subscribers' patterns; in a routing key RabbitMQ takes them literally).
    """
    for word in _words(routing_key, where, "the routing key", ArgumentsError):
        if "*" in word or "#" in word:
            raise ArgumentsError(
                f"{where}: the routing key {routing_key!r} has a wildcard; wildcards belong "
                "to subscribers' patterns (@app.on('order.*')); emit a concrete key such as "
                "'order.created'"
            )
    return routing_key


# -- subscribers ---------------------------------------------------------------------------------


class Subscriber(Task[P, R]):
    """A task registered with ``@app.on``: its message body is the payload itself.

    The handler takes one parameter (besides an optional `TaskContext` first), the payload,
    validated against its annotation; or none, to be told only that the event happened.
    ``delay(payload)`` sends one to this subscriber alone (to test it, say, or to replay).

    Raises:
        ConfigurationError: the handler takes more than one parameter.
    """

    def __init__(self, publisher: TaskPublisher, fn: Callable[..., Any], options: TaskOptions):
        super().__init__(publisher, fn, options)
        fields = msgspec.structs.fields(self.args_type)
        if len(fields) > 1:
            names = ", ".join(f.name for f in fields)
            raise ConfigurationError(
                f"subscriber {options.name!r} takes {len(fields)} parameters ({names}); a "
                "subscriber takes one, the event's payload, annotated with the type to "
                "validate it against (and may take a TaskContext first)"
            )
        #: The parameter the payload is passed as; None for a handler without one.
        self.payload_name: str | None = fields[0].name if fields else None
        self.payload_type: Any = fields[0].type if fields else None
        self._payload_decoders = (
            {c: codec_for(c).decoder(self.payload_type) for c in SERIALIZERS} if fields else {}
        )

    def __repr__(self) -> str:
        return f"<Subscriber {self.name!r} queue={self.queue!r} on {list(self.options.subscribes)}>"

    def encode(self, codec: Codec, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bytes:
        """Encode the payload (the one argument) as the body, checked by its annotation.

        Raises:
            ArgumentsError: not exactly the handler's one argument, or one that does not fit.
        """
        try:
            bound = self.args_type(*args, **kwargs)
            value = None if self.payload_name is None else getattr(bound, self.payload_name)
            body = codec.encoder.encode(value)
            self.decode(codec, body)
        except (TypeError, msgspec.ValidationError, msgspec.EncodeError) as exc:
            raise ArgumentsError(f"subscriber {self.name!r}: invalid payload: {exc}") from None
        return body

    def decode(self, codec: Codec, body: bytes) -> msgspec.Struct:
        """Decode the body as the payload's annotation; the handler's arguments from it.

        A handler without a parameter ignores the body.

        Raises:
            msgspec.ValidationError: the payload does not fit the annotation.
            msgspec.DecodeError: the body does not decode at all.
        """
        if self.payload_name is None:
            return self.args_type()
        value = self._payload_decoders[codec.name].decode(body)
        arguments: msgspec.Struct = self.args_type(**{self.payload_name: value})
        return arguments


class AsyncSubscriber(Subscriber[P, R], AsyncTask[P, R]):
    """A subscriber whose handler is a coroutine function (see `AsyncTask`)."""


# -- emitting ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Emitted:
    """What `cuebx.Cuebx.emit` returns.

    Attributes:
        id: the message id, the same in every subscriber's `TaskContext.message_id`.
        routing_key: the event's routing key.
        correlation_id: the message's correlation id (its id unless the caller gave one).
        routed: False when no subscriber was bound for it and it was kept in the unrouted
            queue instead.
    """

    id: str
    routing_key: str
    correlation_id: str
    routed: bool = True


class Connection(Protocol):
    """What emitting needs of the app's publisher: its broker, connected on first use."""

    @property
    def stack(self) -> Stack: ...
    async def connected_broker(self) -> Broker: ...


class Events:
    """An app's events: the exchange and bindings its subscribers need, and `emit`.

    Args:
        settings: the app's settings (exchange, serializer, size limit).
        connection: the app's publisher: connects on first use, holds the middleware.
    """

    def __init__(self, settings: Settings, connection: Connection) -> None:
        self.settings = settings
        self.connection = connection
        #: The topic exchange events are published to.
        self.exchange = events_exchange(settings.exchange)
        #: The queue that keeps events no subscriber was bound for.
        self.unrouted_queue = unrouted_queue(settings.exchange)
        #: Events this app emitted that no subscriber was bound for (kept or not).
        self.unrouted = 0
        self._declared_on: Broker | None = None
        self._lock = anyio.Lock()

    # -- topology ---------------------------------------------------------------------------

    def topology(self) -> Topology:
        """The events exchange and the unrouted queue, without any subscriber's binding.

        What `emit` declares; the unrouted queue keeps the newest `UNROUTED_LIMIT` events
        (``x-max-length``, dropping from the head). It is a classic queue whatever the
        app's queue type, so that apps of both types can emit on one exchange.
        """
        arguments = {"x-max-length": UNROUTED_LIMIT}
        return Topology(
            self.settings.exchange,
            (QueueSpec(self.unrouted_queue, "events", arguments),),
            exchanges=(ExchangeSpec(self.exchange, "topic"),),
        )

    def extend(self, topology: Topology, tasks: Iterable[Task[Any, Any]]) -> Topology:
        """Add the events exchange, the unrouted queue and the subscribers' bindings.

        An app without subscribers gets nothing: `emit` declares the exchange and the
        unrouted queue on first use.
        """
        bindings = [
            Binding(self.exchange, task.queue, pattern)
            for task in tasks
            for pattern in task.options.subscribes
        ]
        if not bindings:
            return topology
        base = self.topology()
        return topology.extend(queues=base.queues, exchanges=base.exchanges, bindings=bindings)

    async def declare(self, broker: Broker) -> None:
        """Declare the events exchange and the unrouted queue on `broker`, once.

        Raises:
            TopologyConflictError: the unrouted queue exists with other arguments.
        """
        if broker is self._declared_on:
            return
        async with self._lock:
            if broker is not self._declared_on:
                await broker.declare(self.topology())
                self._declared_on = broker

    # -- emitting ---------------------------------------------------------------------------

    def message(
        self,
        routing_key: str,
        payload: Any,
        *,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        correlation_id: str | None = None,
        priority: int | None = None,
    ) -> OutgoingMessage:
        """Build the message of one event (nothing is published).

        Raises:
            ArgumentsError: a bad routing key or priority, or a payload that does not
                encode, or encodes over ``max_message_size``.
        """
        where = f"event {routing_key!r}"
        check_routing_key(routing_key, "emit()")
        if priority is not None:
            try:
                check_count(priority, where, "priority", low=0, high=255)
            except ConfigurationError as exc:
                raise ArgumentsError(str(exc)) from None
        settings = self.settings
        try:
            body = settings.codec.encoder.encode(payload)
        except (TypeError, msgspec.EncodeError) as exc:
            raise ArgumentsError(f"{where}: the payload cannot be encoded: {exc}") from None
        if len(body) > settings.max_message_size:
            raise ArgumentsError(
                f"{where}: the encoded payload is {len(body)} bytes, over max_message_size "
                f"({settings.max_message_size} bytes); emit a reference (a URL, a key) instead"
            )
        return first_message(
            body,
            settings.codec.content_type,
            headers,
            (HEADER_EVENT, routing_key),
            message_id=message_id,
            correlation_id=correlation_id,
            priority=priority,
        )

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
        """Publish an event to the events exchange and wait for the broker's confirm.

        See `cuebx.Cuebx.emit`, which calls this.
        """
        message = self.message(
            routing_key,
            payload,
            headers=headers,
            message_id=message_id,
            correlation_id=correlation_id,
            priority=priority,
        )
        broker = await self.connection.connected_broker()
        await self.declare(broker)
        stack = self.connection.stack
        if not (stack.before_publish or stack.after_publish):
            routed = await self._publish(broker, routing_key, message, mandatory)
        else:
            publish = Publish(self.exchange, routing_key, message, "", event=True)
            for hook in stack.before_publish:
                await hook(publish)
            message = publish.message
            try:
                routed = await self._publish(broker, publish.routing_key, message, mandatory)
            except BaseException as exc:
                await notify(stack.after_publish, publish, exc)
                raise
            await notify(stack.after_publish, publish, None)
        return Emitted(message.message_id, routing_key, message.correlation_id, routed)

    async def _publish(
        self, broker: Broker, routing_key: str, message: OutgoingMessage, mandatory: bool
    ) -> bool:
        """Publish to the events exchange; True when a subscriber's queue took it.

        Raises:
            UnroutableError: no subscriber is bound for it and `mandatory` is set.
            PublishError: it was not confirmed (or could not be kept).
        """
        try:
            await broker.publish(self.exchange, routing_key, message)
        except UnroutableError:
            if mandatory:
                raise UnroutableError(
                    f"event {routing_key!r} (message {message.message_id}) has no subscriber: "
                    f"no queue is bound to exchange {self.exchange!r} for that routing key; "
                    "nothing was kept"
                ) from None
        except PublishError:
            self._declared_on = None  # was the events exchange deleted? declare it next time
            raise
        else:
            return True
        self.unrouted += 1
        logger.warning(
            "event %r (message %s) has no subscriber: kept in queue %r (%d unrouted so far); "
            "emit(..., mandatory=True) makes this an error",
            routing_key,
            message.message_id,
            self.unrouted_queue,
            self.unrouted,
            extra={"event": routing_key, "message_id": message.message_id},
        )
        await self._keep(broker, message)
        return False

    async def _keep(self, broker: Broker, message: OutgoingMessage) -> None:
        """Put an unrouted event in the unrouted queue; declare it again if it was deleted."""
        try:
            await broker.publish("", self.unrouted_queue, message)
        except UnroutableError:
            self._declared_on = None
            await self.declare(broker)
            await broker.publish("", self.unrouted_queue, message)
