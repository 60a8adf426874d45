"""`Task[P, R]`: a registered handler, its options, and its typed `.delay()`.

Everything derived from the handler's signature (the msgspec argument Struct, its encoders
and decoders, how to call the handler back) is built once, at decoration, so neither
publishing nor handling a message inspects a signature.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, Protocol, TypeVar

import msgspec
import msgspec.inspect

from cuebx.context import TaskContext, _current
from cuebx.durations import Duration
from cuebx.errors import ArgumentsError, ConfigurationError
from cuebx.message import (
    SERIALIZERS,
    Codec,
    codec_for,
    decode_other,
    encode_other,
    is_model_type,
    new_message_id,
)
from cuebx.policy import RetryPolicy, RetrySpec, retry_delays
from cuebx.settings import check_count, check_prefetch, check_queue_type, check_seconds
from cuebx.topology import QueueRoute, QueueType, retry_queue_name

if TYPE_CHECKING:
    from cuebx.rates import Limiter
    from cuebx.status import TaskStatus

__all__ = ["TASK_OPTIONS", "AsyncTask", "Task", "TaskHandle", "TaskOptions", "TaskPublisher"]

P = ParamSpec("P")
R = TypeVar("R")

#: The keyword options of ``@app.task`` besides ``name``.
TASK_OPTIONS = frozenset(
    {
        "queue",
        "retries",
        "dead_letter",
        "prefetch",
        "timeout",
        "priority",
        "queue_type",
        "routing_keys",
        "retry_on",
        "dont_retry_on",
        "track",
        "idempotent",
        "idempotency_key",
        "rate_limit",
        "concurrency",
    }
)

#: Encodes return values (and the pydantic models among them) for results and replies.
_RESULT_ENCODER = msgspec.json.Encoder(enc_hook=encode_other)


class HandleSource(Protocol):
    """Where a `TaskHandle` reads its task's status and result (the app's result store)."""

    async def status(self, task_id: str) -> TaskStatus: ...

    async def result(
        self, task: Task[Any, Any] | None, task_id: str, limit: float | None
    ) -> Any: ...


@dataclass(frozen=True, slots=True)
class TaskHandle(Generic[R]):
    """What `.delay()` returns: the task id, and with a store its status and result.

    Attributes:
        id: the message id, the same on every attempt (``TaskContext.message_id``).
        task_name: the task it runs.
        queue: the queue it was published to.
        correlation_id: the message's correlation id (its id unless the caller gave one).
    """

    id: str
    task_name: str
    queue: str
    correlation_id: str
    source: HandleSource | None = field(default=None, repr=False, compare=False)
    task: Task[Any, R] | None = field(default=None, repr=False, compare=False)

    def _source(self) -> HandleSource:
        if self.source is None:
            raise ConfigurationError(
                f"task {self.task_name!r}: status and results need a store: "
                "Cuebx(url, store='redis://...' or 'postgresql://...' or 'memory://')"
            )
        return self.source

    async def status(self) -> TaskStatus:
        """Read the task's status from the store (``unknown`` when it has none).

        Raises:
            ConfigurationError: the app has no store.
            StoreError: the store did not answer.
        """
        return await self._source().status(self.id)

    async def result(self, timeout: Duration | None = None) -> R:  # noqa: ASYNC109 (the contract names it)
        """Wait until the task is done and return its value, decoded as its return type.

        Args:
            timeout: the longest wait; None waits as long as it takes.

        Raises:
            TaskFailed: it failed, was dead-lettered or skipped (type, message, reason).
            ResultTimeoutError: not done within `timeout` (its status is in the message).
            ConfigurationError: the app has no store, or the task has ``track=False``.
            StoreError: the store did not answer.
        """
        seconds = None if timeout is None else check_seconds(timeout, "result()", "timeout")
        value: R = await self._source().result(self.task, self.id, seconds)
        return value


class TaskPublisher(Protocol):
    """What a task publishes through (the app's `cuebx.publisher.Publisher`)."""

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
        countdown: Duration | None = None,
        eta: datetime | None = None,
    ) -> TaskHandle[Any]: ...

    async def publish_many(
        self,
        task: Task[Any, Any],
        arguments: Iterable[Sequence[Any] | Mapping[str, Any]],
        *,
        window: int,
    ) -> list[TaskHandle[Any]]: ...

    async def call(
        self,
        task: Task[Any, Any],
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        *,
        limit: float | None,
    ) -> Any: ...


@dataclass(frozen=True, slots=True)
class TaskOptions:
    """The options of one task, checked and normalised at registration."""

    name: str
    queue: str
    retry_delays_ms: tuple[int, ...]
    dead_letter: bool | str
    prefetch: int | None
    timeout: float | None
    priority: int | None
    queue_type: QueueType | None
    routing_keys: tuple[str, ...]
    retry_on: tuple[type[BaseException], ...]
    dont_retry_on: tuple[type[BaseException], ...]
    track: bool = True
    idempotent: bool = False
    idempotency_key: Callable[..., str] | None = None
    #: A rate (``"100/s"``), a limiter's name or a `cuebx.limits.Limiter`, as given: the
    #: app resolves it (`cuebx.limits.Limits.bind`), which needs its limiters.
    rate_limit: str | Limiter | None = None
    concurrency: int | None = None
    #: The topic patterns of a subscriber (``@app.on``); empty for a task.
    subscribes: tuple[str, ...] = ()

    @classmethod
    def build(
        cls,
        *,
        name: str,
        queue: str = "default",
        retries: RetrySpec = None,
        dead_letter: bool | str = True,
        prefetch: int | None = None,
        timeout: Duration | None = None,
        priority: int | None = None,
        queue_type: str | None = None,
        routing_keys: Iterable[str] = (),
        retry_on: type[BaseException] | Sequence[type[BaseException]] | None = None,
        dont_retry_on: type[BaseException] | Sequence[type[BaseException]] | None = None,
        track: bool = True,
        idempotent: bool = False,
        idempotency_key: Callable[..., str] | None = None,
        rate_limit: str | Limiter | None = None,
        concurrency: int | None = None,
        subscribes: tuple[str, ...] = (),
    ) -> TaskOptions:
        """Check every option, naming the task and the option in any error."""
        where = f"task {name!r}"
        if not isinstance(queue, str) or not queue:
            raise ConfigurationError(f"{where}: queue must be a non-empty string, got {queue!r}")
        if not isinstance(dead_letter, bool) and not (isinstance(dead_letter, str) and dead_letter):
            raise ConfigurationError(
                f"{where}: dead_letter must be True, False or a queue name, got {dead_letter!r}"
            )
        keys = (routing_keys,) if isinstance(routing_keys, str) else tuple(routing_keys)
        for option, flag in (("track", track), ("idempotent", idempotent)):
            if not isinstance(flag, bool):
                raise ConfigurationError(f"{where}: {option} must be True or False, got {flag!r}")
        if idempotency_key is not None and not callable(idempotency_key):
            raise ConfigurationError(
                f"{where}: idempotency_key must be a function of the task's arguments "
                f"returning a string, got {idempotency_key!r}"
            )
        if concurrency is not None:
            concurrency = check_count(concurrency, where, "concurrency")
            if prefetch is not None and prefetch != concurrency:
                raise ConfigurationError(
                    f"{where}: concurrency={concurrency} is also the queue's prefetch; drop "
                    f"prefetch={prefetch!r} or make it equal"
                )
            prefetch = concurrency
        return cls(
            name=name,
            queue=queue,
            retry_delays_ms=retry_delays(retries, task=name),
            dead_letter=dead_letter,
            prefetch=None if prefetch is None else check_prefetch(prefetch, where),
            timeout=(
                None if timeout is None else check_seconds(timeout, where, "timeout", positive=True)
            ),
            priority=(
                None
                if priority is None
                else check_count(priority, where, "priority", low=0, high=255)
            ),
            queue_type=None if queue_type is None else check_queue_type(queue_type, where),
            routing_keys=keys,
            retry_on=_exception_types(retry_on, where, "retry_on", default=(Exception,)),
            dont_retry_on=_exception_types(dont_retry_on, where, "dont_retry_on", default=()),
            track=track,
            idempotent=idempotent or idempotency_key is not None,
            idempotency_key=idempotency_key,
            rate_limit=rate_limit,
            concurrency=concurrency,
            subscribes=subscribes,
        )

    def route(self) -> QueueRoute:
        """What this task asks of its queue, for `cuebx.topology.plan`."""
        return QueueRoute(
            task=self.name,
            queue=self.queue,
            retry_delays_ms=self.retry_delays_ms,
            dead_letter=self.dead_letter,
            queue_type=self.queue_type,
            routing_keys=self.routing_keys,
            prefetch=self.prefetch,
            concurrency=self.concurrency,
            subscriber=bool(self.subscribes),
        )

    def policy(self) -> RetryPolicy:
        """The retry ladder as tier queue names, one per retry."""
        return RetryPolicy(
            tiers=tuple(retry_queue_name(self.queue, ms) for ms in self.retry_delays_ms),
            retry_on=self.retry_on,
            dont_retry_on=self.dont_retry_on,
            delays_ms=self.retry_delays_ms,
        )


def _exception_types(
    value: type[BaseException] | Sequence[type[BaseException]] | None,
    where: str,
    option: str,
    *,
    default: tuple[type[BaseException], ...],
) -> tuple[type[BaseException], ...]:
    if value is None:
        return default
    types = (value,) if isinstance(value, type) else tuple(value)
    for t in types:
        if not (isinstance(t, type) and issubclass(t, BaseException)):
            raise ConfigurationError(f"{where}: {option} must list exception types, got {t!r}")
    return types


class _Signature:
    """The handler's parameters as a msgspec Struct, and how to call the handler from one."""

    __slots__ = (
        "args_type",
        "context",
        "keyword_names",
        "kw_only",
        "n_positional",
        "names",
        "result_type",
    )

    def __init__(self, fn: Callable[..., Any], task: str) -> None:
        params = list(inspect.signature(fn).parameters.values())
        try:
            hints = typing.get_type_hints(fn, include_extras=True)
        except Exception as exc:
            raise ConfigurationError(
                f"task {task!r}: cannot resolve the annotations of {fn.__qualname__}: {exc}"
            ) from exc
        self.result_type = hints.get("return", Any)
        self.context = bool(params) and hints.get(params[0].name) is TaskContext
        if self.context and params[0].kind == params[0].KEYWORD_ONLY:
            raise ConfigurationError(
                f"task {task!r}: the TaskContext parameter {params[0].name!r} must be "
                "positional (it is passed first)"
            )
        if self.context:
            params = params[1:]
        fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
        for p in params:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise ConfigurationError(
                    f"task {task!r}: parameter {p.name!r} is *args/**kwargs; a task's "
                    "arguments must be named so they can be encoded as an object"
                )
            if hints.get(p.name) is TaskContext:
                raise ConfigurationError(
                    f"task {task!r}: a TaskContext parameter must be the first parameter"
                )
            annotation = hints.get(p.name, Any)
            if p.default is p.empty:
                fields.append((p.name, annotation))
            else:
                fields.append((p.name, annotation, p.default))
        self.names = tuple(p.name for p in params)
        self.n_positional = sum(p.kind != p.KEYWORD_ONLY for p in params)
        self.keyword_names = self.names[self.n_positional :]
        # Keyword-only fields let a required parameter follow a defaulted one.
        required_after_default = any(
            len(f) == 2 and any(len(g) == 3 for g in fields[:i]) for i, f in enumerate(fields)
        )
        self.kw_only = required_after_default
        try:
            self.args_type: type[msgspec.Struct] = msgspec.defstruct(
                f"{task}_arguments",
                fields,
                kw_only=required_after_default,
                module=getattr(fn, "__module__", None),
            )
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"task {task!r}: unsupported signature: {exc}") from exc


class Task(Generic[P, R]):
    """A registered task: call it directly as the plain function, or `.delay()` it.

    Created by `Cuebx.task`; not instantiated by users.
    """

    def __init__(
        self,
        publisher: TaskPublisher,
        fn: Callable[..., Any],
        options: TaskOptions,
    ) -> None:
        self.publisher = publisher
        self.fn = fn
        self.options = options
        self.name = options.name
        self.queue = options.queue
        self.is_async = inspect.iscoroutinefunction(fn)
        self._signature = _Signature(fn, options.name)
        self.takes_context = self._signature.context
        self.args_type = self._signature.args_type
        self.retry_policy = options.policy()
        # Decoders for every serializer, built now: a type msgspec cannot decode is an
        # error at registration, not on every message.
        try:
            self._decoders = {c: codec_for(c).decoder(self.args_type) for c in SERIALIZERS}
        except TypeError as exc:
            raise ConfigurationError(
                f"task {options.name!r}: unsupported parameter type: {exc}"
            ) from None
        _refuse_unknown_types(self.args_type, options.name)
        self.result_type: Any = self._signature.result_type
        self._result_decoder = _result_decoder(self.result_type, options.name)
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    def __repr__(self) -> str:
        return f"<Task {self.name!r} queue={self.queue!r}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the handler in place, as the plain function (no broker, no validation).

        An async handler returns its coroutine, to be awaited. The handler runs with a local
        `TaskContext` (a new message id, attempt 0, no headers): as its first argument if
        it takes one, and from `current_context()` either way.
        """
        context = self.local_context()
        positional: tuple[Any, ...] = (context, *args) if self.takes_context else args
        if self.is_async:
            return typing.cast(R, _with_context(context, self.fn(*positional, **kwargs)))
        token = _current.set(context)
        try:
            result: R = self.fn(*positional, **kwargs)
            return result
        finally:
            _current.reset(token)

    def local_context(self) -> TaskContext:
        """A `TaskContext` for running this task outside a worker: attempt 0, a new id."""
        message_id = new_message_id()
        return TaskContext(
            message_id=message_id,
            correlation_id=message_id,
            attempt=0,
            headers={},
            task_name=self.name,
            queue=self.queue,
        )

    # -- publishing -------------------------------------------------------------------------

    async def delay(self, *args: P.args, **kwargs: P.kwargs) -> TaskHandle[R]:
        """Publish one message for this task and wait for the broker's confirm.

        Raises:
            ArgumentsError: the arguments do not fit the task's signature.
            PublishError: the broker did not confirm the message.
        """
        return await self.publisher.publish(self, args, kwargs)

    async def apply_async(
        self,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        countdown: Duration | None = None,
        eta: datetime | None = None,
        priority: int | None = None,
        headers: Mapping[str, Any] | None = None,
        correlation_id: str | None = None,
        message_id: str | None = None,
    ) -> TaskHandle[R]:
        """Publish with message options: a delay, priority, extra headers, ids.

        Arguments are checked at run time (``apply_async`` cannot be typed like ``delay``).
        A `countdown` or `eta` is held by the broker, in the app's delay ladder
        (`cuebx.delays`), never by a sleeping publisher or worker: the task starts no
        earlier than it is due, and within about one ``delay_unit`` after.

        Args:
            args: positional arguments of the task.
            kwargs: keyword arguments of the task.
            countdown: run no earlier than this long from now: seconds, ``"10m"``,
                ``"1h30m"`` or a `timedelta`; rounded up to the app's ``delay_unit``.
            eta: run no earlier than this moment: an aware `datetime` (with a time zone).
                A moment in the past runs now.
            priority: the message priority (needs ``Cuebx(max_priority=N)``); defaults to
                the task's ``priority=``.
            headers: extra message headers, passed to the handler in ``TaskContext.headers``.
            correlation_id: the correlation id; defaults to the message id.
            message_id: the task id to use (your own idempotency key, say); a new one by
                default.

        Raises:
            ArgumentsError: the arguments do not fit the task's signature.
            DelayError: both `countdown` and `eta`, a negative countdown, a naive eta, or a
                delay longer than the ladder holds (the message names the maximum).
            PublishError: the broker did not confirm the message.
        """
        return await self.publisher.publish(
            self,
            tuple(args),
            dict(kwargs or {}),
            priority=priority,
            headers=headers,
            correlation_id=correlation_id,
            message_id=message_id,
            countdown=countdown,
            eta=eta,
        )

    async def map(
        self, arguments: Iterable[Sequence[Any] | Mapping[str, Any]], *, window: int = 256
    ) -> list[TaskHandle[R]]:
        """Publish one message per item with pipelined confirms.

        Each item is a tuple of positional arguments or a dict of keyword arguments. Every
        item is checked before anything is published.

        Args:
            arguments: the items.
            window: how many confirms may be outstanding at once.

        Raises:
            ArgumentsError: an item does not fit (its index is in the message); nothing
                was published.
            BatchPublishError: some messages were not confirmed; it lists which.
        """
        return await self.publisher.publish_many(self, arguments, window=window)

    async def call(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the task on a worker and wait for its value (request/reply, no store needed).

        The message goes out with RabbitMQ's direct reply-to; the worker replies once the
        task is done: its value, or its final error after retries. Waits at most the app's
        ``call_timeout``; for another limit use `call_within`.

        Raises:
            TaskFailed: the task failed for good, or was dead-lettered.
            CallTimeoutError: no reply within the timeout (the task may still run).
            CallInterruptedError: the connection was lost before the reply came.
            ArgumentsError: the arguments do not fit the task's signature.
            PublishError: the broker did not confirm the request.
        """
        value: R = await self.publisher.call(self, args, kwargs, limit=None)
        return value

    async def call_within(self, limit: Duration, /, *args: P.args, **kwargs: P.kwargs) -> R:
        """`call` with its own timeout: ``await add.call_within("5s", 2, 3)``.

        The timeout comes first because a keyword argument cannot sit beside a
        ParamSpec's ``**kwargs`` (PEP 612): this way the task's arguments stay type-checked.
        """
        seconds = check_seconds(limit, f"task {self.name!r}", "call_within() limit", positive=True)
        value: R = await self.publisher.call(self, args, kwargs, limit=seconds)
        return value

    def handle(self, task_id: str) -> TaskHandle[R]:
        """Rebuild the handle of a task published earlier, from its id (typed by this task)."""
        source = getattr(self.publisher, "source", None)
        return TaskHandle(task_id, self.name, self.queue, task_id, source, self)

    # -- results ----------------------------------------------------------------------------

    def encode_result(self, value: Any) -> bytes:
        """Encode a return value as JSON, checked against the return annotation.

        Raises:
            msgspec.ValidationError: the value does not fit the annotation.
            msgspec.EncodeError: it cannot be encoded at all.
        """
        data = _RESULT_ENCODER.encode(value)
        if self._result_decoder is not None:
            self._result_decoder.decode(data)
        return data

    def decode_result(self, data: bytes) -> R:
        """Decode a stored or replied value as the handler's return type."""
        if self._result_decoder is None:
            value: R = msgspec.json.decode(data)
            return value
        result: R = self._result_decoder.decode(data)
        return result

    # -- encoding ---------------------------------------------------------------------------

    def encode(self, codec: Codec, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bytes:
        """Bind arguments by name, validate them, and encode the body.

        Raises:
            ArgumentsError: missing, extra or mistyped arguments, naming the task.
        """
        sig = self._signature
        try:
            if len(args) > sig.n_positional:
                raise TypeError(
                    f"takes {sig.n_positional} positional arguments but {len(args)} were given"
                )
            if sig.kw_only and args:
                args, kwargs = (), _merge_positional(sig.names, args, kwargs)
            value = self.args_type(*args, **kwargs)
            body = codec.encoder.encode(value)
            self.decode(codec, body)
        except (TypeError, msgspec.ValidationError, msgspec.EncodeError) as exc:
            raise ArgumentsError(f"task {self.name!r}: invalid arguments: {exc}") from None
        return body

    def decode(self, codec: Codec, body: bytes) -> msgspec.Struct:
        """Decode and validate a body into the argument Struct.

        Raises:
            msgspec.ValidationError: it decodes but does not hold valid arguments.
            msgspec.DecodeError: it does not decode at all.
        """
        value: msgspec.Struct = self._decoders[codec.name].decode(body)
        return value

    # -- running ----------------------------------------------------------------------------

    def call_args(
        self, context: TaskContext, value: msgspec.Struct
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Turn a decoded argument Struct back into the handler's call arguments."""
        values = msgspec.structs.astuple(value)
        sig = self._signature
        if sig.keyword_names:
            kwargs = dict(zip(sig.keyword_names, values[sig.n_positional :], strict=True))
            values = values[: sig.n_positional]
        else:
            kwargs = {}
        if self.takes_context:
            values = (context, *values)
        return values, kwargs

    def invoke(self, context: TaskContext, value: msgspec.Struct) -> Awaitable[Any]:
        """Start an async handler (sync handlers are run by the worker in a thread)."""
        args, kwargs = self.call_args(context, value)
        result: Awaitable[Any] = self.fn(*args, **kwargs)
        return result


class AsyncTask(Task[P, R]):
    """A task whose handler is a coroutine function: `R` is what the coroutine returns.

    The same as `Task` at run time; for the type checker, calling it directly gives the
    coroutine to await, while `delay`, `call` and results are typed by the awaited value.
    """

    def __call__(  # type: ignore[override]
        self, *args: P.args, **kwargs: P.kwargs
    ) -> Coroutine[Any, Any, R]:
        """Run the handler in place: the coroutine to await (see `Task.__call__`)."""
        return super().__call__(*args, **kwargs)  # type: ignore[return-value]


def _result_decoder(result_type: Any, task: str) -> msgspec.json.Decoder[Any] | None:
    """Build the decoder of a task's return type once, refusing types msgspec cannot encode.

    None for ``Any`` and ``None`` return annotations: nothing to check.
    """
    if result_type is Any or result_type is None or result_type is type(None):
        return None
    try:
        holder = msgspec.defstruct(f"{task}_result", [("value", result_type)])
        _refuse_unknown_types(holder, task, what="return type")
        return msgspec.json.Decoder(result_type, dec_hook=decode_other)
    except TypeError as exc:
        raise ConfigurationError(f"task {task!r}: unsupported return type: {exc}") from None


def _refuse_unknown_types(
    args_type: type[msgspec.Struct], task: str, *, what: str = "parameter type"
) -> None:
    """Refuse parameter types neither msgspec nor pydantic can encode and validate.

    msgspec accepts any class in a Struct and leaves it to hooks; without this check a task
    taking one would register fine and then fail on every `delay()`.
    """
    seen: set[int] = set()
    pending: list[Any] = [msgspec.inspect.type_info(args_type)]
    while pending:
        node = pending.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, msgspec.inspect.CustomType) and not is_model_type(node.cls):
            raise ConfigurationError(
                f"task {task!r}: {what} {node.cls.__qualname__} cannot be encoded; use "
                "types msgspec supports (builtins, datetime, UUID, Decimal, enums, "
                "dataclasses, msgspec Structs, TypedDicts) or a pydantic model"
            )
        if isinstance(node, tuple):
            pending.extend(node)
        elif isinstance(node, msgspec.inspect.Field | msgspec.inspect.Type):
            pending.extend(msgspec.structs.astuple(node))


def _merge_positional(
    names: tuple[str, ...], args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    merged = dict(zip(names, args, strict=False))
    for key, value in kwargs.items():
        if key in merged:
            raise TypeError(f"got multiple values for argument {key!r}")
        merged[key] = value
    return merged


async def _with_context(context: TaskContext, coroutine: Awaitable[Any]) -> Any:
    """Await a handler's coroutine with `current_context()` returning `context`."""
    token = _current.set(context)
    try:
        return await coroutine
    finally:
        _current.reset(token)
