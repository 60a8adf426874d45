"""Request/reply: `Task.call` waits for a worker's reply over RabbitMQ's direct reply-to.

The caller's side (`Caller`): one reply consumer per connection, on the channel that
publishes (RabbitMQ ties direct replies to that channel), shared by every concurrent call.
Each call registers a future under its message id before publishing, so a reply that beats
the publisher confirm is not missed; the reply's correlation id picks the future, so calls
never wait for each other (no lock around a call, unlike a request/reply built on one
shared response slot). A lost channel fails every pending call at once with
`CallInterruptedError`: RabbitMQ drops the replies of a channel that is gone.

The worker's side (`Replier`, a plug-in every app has): once a task whose message carries a
``reply_to`` is done, it publishes the reply: the value after a success, the error after
the last failure (retries exhausted, `Reject`, a dead letter). Nothing is replied while a
retry is pending. A caller that has gone is not the worker's problem: RabbitMQ drops the
reply. Replies go out before the request is acked, so a worker that dies in between replies
again on the redelivery; the caller takes the first and ignores the rest.

A reply: headers ``x-cuebx-reply`` (``ok`` or the final state), and for a failure
``x-cuebx-error-type``, ``x-cuebx-error`` and ``x-cuebx-reason``; the body is the value as
JSON (``b""`` for none).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

import anyio

from cuebx.brokers.base import Broker
from cuebx.errors import (
    CallInterruptedError,
    CallTimeoutError,
    PublishError,
    TaskFailed,
)
from cuebx.message import (
    ERROR_LIMIT,
    HEADER_ERROR,
    HEADER_ERROR_TYPE,
    HEADER_REASON,
    DeadLetterReason,
    OutgoingMessage,
    new_message_id,
)
from cuebx.middleware import Middleware, Outcome, Received, Skip, WorkerView
from cuebx.status import final_state
from cuebx.task import Task


class Requests(Protocol):
    """What a call publishes its request through (the app's `cuebx.publisher.Publisher`)."""

    async def connected_broker(self) -> Broker: ...

    async def publish(
        self,
        task: Task[Any, Any],
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        *,
        message_id: str | None = None,
        reply_to: str | None = None,
    ) -> Any: ...


__all__ = ["HEADER_REPLY", "Caller", "Replier", "error_fields", "failure_from_reply"]

logger = logging.getLogger("cuebx.rpc")

HEADER_REPLY = "x-cuebx-reply"

_Reply = tuple[Mapping[str, Any], bytes]


def error_fields(error: BaseException | str) -> tuple[str, str]:
    """An error as ``(qualified type name, bounded message)``, as replies and records keep it."""
    if isinstance(error, BaseException):
        kind = f"{type(error).__module__}.{type(error).__qualname__}"
        text = str(error) or kind
    else:
        kind, text = "", error
    if len(text) > ERROR_LIMIT:
        text = text[: ERROR_LIMIT - 1] + "…"
    return kind, text


def failure_from_reply(task_id: str, headers: Mapping[str, Any]) -> TaskFailed | None:
    """The `TaskFailed` a reply stands for, or None when it carries a value."""
    state = headers.get(HEADER_REPLY)
    if state == "ok":
        return None
    reason = headers.get(HEADER_REASON)
    return TaskFailed(
        task_id,
        state=str(state or "failed"),
        error_type=str(headers.get(HEADER_ERROR_TYPE, "")),
        error=str(headers.get(HEADER_ERROR, "")),
        reason=None if reason is None else str(reason),
    )


class Caller:
    """The calls of one app that wait for their replies.

    Args:
        default_timeout: seconds `Task.call` waits when not given another timeout.
    """

    def __init__(self, default_timeout: float) -> None:
        self.default_timeout = default_timeout
        self._pending: dict[str, asyncio.Future[_Reply]] = {}
        self._address: str | None = None
        self._registering = anyio.Lock()

    @property
    def pending(self) -> int:
        """How many calls wait for their reply now."""
        return len(self._pending)

    async def _reply_address(self, broker: Broker) -> str:
        address = self._address
        if address is not None:
            return address
        async with self._registering:
            if self._address is None:
                self._address = await broker.consume_replies(self._on_reply, self._on_lost)
            return self._address

    def _on_reply(
        self, correlation_id: str | None, headers: Mapping[str, Any], body: bytes
    ) -> None:
        future = self._pending.get(correlation_id or "")
        if future is None or future.done():
            # Timed out, or a second reply after a redelivery: the caller moved on.
            logger.debug("reply for %s: no call waits for it", correlation_id)
            return
        future.set_result((headers, body))

    def _on_lost(self, error: BaseException | None) -> None:
        self._address = None
        why = f": {error}" if error else ""
        for message_id, future in list(self._pending.items()):
            if not future.done():
                future.set_exception(
                    CallInterruptedError(
                        f"call {message_id}: the connection its reply would come on was "
                        f"lost{why}; the task may still run, but its reply cannot arrive"
                    )
                )

    async def call(
        self,
        publisher: Requests,
        task: Task[Any, Any],
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        *,
        limit: float | None,
    ) -> Any:
        """Publish a request for `task` and wait for its reply (see `Task.call`)."""
        broker = await publisher.connected_broker()
        reply_to = await self._reply_address(broker)
        message_id = new_message_id()
        future: asyncio.Future[_Reply] = asyncio.get_running_loop().create_future()
        self._pending[message_id] = future
        seconds = self.default_timeout if limit is None else limit
        try:
            await publisher.publish(task, args, kwargs, message_id=message_id, reply_to=reply_to)
            try:
                with anyio.fail_after(seconds):
                    headers, body = await future
            except TimeoutError:
                raise CallTimeoutError(
                    f"task {task.name!r}: no reply to call {message_id} within {seconds:g}s "
                    "(the task may still run, or be waiting in its queue)"
                ) from None
        finally:
            del self._pending[message_id]
            if not future.done():
                future.cancel()
            elif not future.cancelled():
                future.exception()  # retrieved: a lost connection may have set one
        failure = failure_from_reply(message_id, headers)
        if failure is not None:
            raise failure
        return task.decode_result(body) if body else None


class Replier(Middleware):
    """Replies to requests made with `Task.call` once their task is done (always installed).

    Messages without ``reply_to`` (every ``delay()``) pass through untouched.
    """

    def __init__(self) -> None:
        self._broker: Broker | None = None

    async def on_worker_start(self, worker: WorkerView) -> None:
        self._broker = worker.broker

    async def after_handler(self, received: Received, outcome: Outcome) -> None:
        reply_to = received.context.reply_to
        if reply_to is None or received.task is None:
            return
        error = outcome.error
        if error is None:
            try:
                body = received.task.encode_result(outcome.result)
            except Exception as exc:
                await self._reply(received, reply_to, b"", "failed", exc, "invalid-result")
                return
            await self._reply(received, reply_to, body, "ok")
        elif isinstance(error, Skip):
            await self._reply(received, reply_to, b"", "skipped", error.reason, "skipped")

    async def on_dead_letter(
        self, received: Received, reason: DeadLetterReason, error: BaseException | str
    ) -> None:
        reply_to = received.context.reply_to
        if reply_to is not None:
            await self._reply(received, reply_to, b"", final_state(reason), error, reason)

    async def _reply(
        self,
        received: Received,
        reply_to: str,
        body: bytes,
        state: str,
        error: BaseException | str | None = None,
        reason: str | None = None,
    ) -> None:
        broker = self._broker
        if broker is None:
            return
        context = received.context
        headers: dict[str, Any] = {HEADER_REPLY: state}
        if error is not None:
            headers[HEADER_ERROR_TYPE], headers[HEADER_ERROR] = error_fields(error)
        if reason is not None:
            headers[HEADER_REASON] = reason
        message = OutgoingMessage(
            body=body,
            message_id=new_message_id(),
            correlation_id=context.correlation_id,
            content_type="application/json",
            headers=headers,
            timestamp=datetime.now(UTC),
        )
        try:
            await broker.reply(reply_to, message)
        except PublishError as exc:
            # The caller times out or sees its connection lost; the task itself is done.
            logger.warning(
                "task %s message %s: the reply to its caller was not confirmed: %s",
                context.task_name,
                context.message_id,
                exc,
                extra={
                    "task": context.task_name,
                    "message_id": context.message_id,
                    "attempt": context.attempt,
                },
            )
