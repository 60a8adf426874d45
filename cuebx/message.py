"""The message cuebx puts on the wire: body, properties, headers, and dead-letter stamps.

A message's body is the task's arguments bound by parameter name, encoded by msgspec as a
JSON or MessagePack object. Properties carry the task id (``message_id``), stable across
retries. Headers carry the task name and the attempt number; a dead-lettered copy adds
why it was dead-lettered, keeping the original body, properties and headers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec

__all__ = [
    "BROKER_HEADERS",
    "CONTENT_TYPES",
    "ERROR_LIMIT",
    "HEADER_ATTEMPT",
    "HEADER_DELAY_AFTER",
    "HEADER_DELAY_TO",
    "HEADER_ERROR",
    "HEADER_ERROR_TYPE",
    "HEADER_ETA",
    "HEADER_EVENT",
    "HEADER_FAILED_AT",
    "HEADER_ORIGIN_QUEUE",
    "HEADER_REDELIVERIES",
    "HEADER_REASON",
    "HEADER_REPLAYED",
    "HEADER_TASK",
    "Codec",
    "DEAD_LETTER_HEADERS",
    "DeadLetterReason",
    "OutgoingMessage",
    "SERIALIZERS",
    "Serializer",
    "codec_for",
    "dead_letter_copy",
    "decode_other",
    "encode_other",
    "eta_of",
    "first_message",
    "is_delay_header",
    "header_count",
    "is_model_type",
    "new_message_id",
    "replay_copy",
    "retry_copy",
]

HEADER_TASK = "x-cuebx-task"
HEADER_ATTEMPT = "x-retry-attempt"
HEADER_REASON = "x-cuebx-reason"
HEADER_ERROR_TYPE = "x-cuebx-error-type"
HEADER_ERROR = "x-cuebx-error"
HEADER_FAILED_AT = "x-cuebx-failed-at"
HEADER_ORIGIN_QUEUE = "x-cuebx-origin-queue"
#: Deliveries of this message on a classic queue that ended without an ack or reject.
HEADER_REDELIVERIES = "x-cuebx-redeliveries"
#: When a delayed message is due: epoch milliseconds, UTC. A worker that gets it earlier
#: (its clock is ahead of the publisher's) sends it back down the delay ladder.
HEADER_ETA = "x-cuebx-eta"
#: The queue a delayed message goes to when it leaves the ladder. The ladder's headers
#: exchange matches on it, and RabbitMQ leaves headers starting with ``x-`` out of such
#: matches: hence no ``x-`` here.
HEADER_DELAY_TO = "cuebx-delay-to"
#: The prefix of the headers that lead a delayed message through the ladder:
#: ``cuebx-delay-after-<k>: j`` sends it from level k to level j (-1: out of the ladder).
#: Level k's headers exchange matches on it, so no ``x-`` here either.
HEADER_DELAY_AFTER = "cuebx-delay-after-"

#: The routing key an event was emitted with (`cuebx.Cuebx.emit`). One event reaches the
#: queue of every subscriber whose pattern matches, so it names no task: each queue's
#: subscriber takes it (see `cuebx.policy.admit`).
HEADER_EVENT = "x-cuebx-event"

#: Times a message was replayed out of a dead-letter queue (``cuebx dlq replay``).
HEADER_REPLAYED = "x-cuebx-replayed"

#: The stamps of a dead-lettered copy (see `dead_letter_copy`).
DEAD_LETTER_HEADERS = frozenset(
    {HEADER_REASON, HEADER_ERROR_TYPE, HEADER_ERROR, HEADER_FAILED_AT, HEADER_ORIGIN_QUEUE}
)

#: Headers RabbitMQ sets when it dead-letters or redelivers a message. A copy cuebx
#: publishes is a new message: carrying them over would let RabbitMQ's dead-letter cycle
#: detection drop a retried message that once died in the same queue.
BROKER_HEADERS = frozenset(
    {
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
        "x-delivery-count",
    }
)

#: Longest ``x-cuebx-error`` text; the full traceback goes to the log, not the header.
ERROR_LIMIT = 1024

Serializer = Literal["json", "msgpack"]
DeadLetterReason = Literal[
    "exhausted",
    "rejected",
    "invalid-arguments",
    "undecodable",
    "unknown-task",
    "too-large",
    "failed",
    "delivery-limit",
]

SERIALIZERS: tuple[Serializer, ...] = ("json", "msgpack")

CONTENT_TYPES: Mapping[Serializer, str] = {
    "json": "application/json",
    "msgpack": "application/msgpack",
}


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """A message ready to publish: bytes and AMQP properties, nothing task-specific."""

    body: bytes
    message_id: str
    correlation_id: str
    content_type: str | None
    headers: Mapping[str, Any]
    timestamp: datetime
    priority: int | None = None
    #: Where the worker sends the task's value (`Task.call`): RabbitMQ's direct reply-to.
    reply_to: str | None = None


def is_model_type(type_: Any) -> bool:
    """Tell whether `type_` is a pydantic (v2) model class, which msgspec does not know.

    Checked by duck typing, so cuebx does not import pydantic: a model validates itself
    from plain data (``model_validate``) and dumps itself to it (``model_dump``).
    """
    return isinstance(type_, type) and all(
        callable(getattr(type_, name, None)) for name in ("model_validate", "model_dump")
    )


def encode_other(value: Any) -> Any:
    """msgspec's ``enc_hook``: a pydantic model becomes its JSON-compatible dump."""
    if is_model_type(type(value)):
        return value.model_dump(mode="json")
    raise TypeError(f"Encoding objects of type {type(value).__qualname__} is unsupported")


def decode_other(type_: type[Any], value: Any) -> Any:
    """msgspec's ``dec_hook``: plain data becomes a pydantic model, validated by pydantic.

    Pydantic's ValidationError is a ValueError, which msgspec reports as a
    `msgspec.ValidationError` naming the field.
    """
    if is_model_type(type_):
        return type_.model_validate(value)
    raise TypeError(f"Decoding objects of type {type_.__qualname__} is unsupported")


@dataclass(frozen=True, slots=True)
class Codec:
    """One serializer: its content type and a way to build typed decoders.

    Besides what msgspec supports natively, both serializers encode and validate pydantic
    models (a FastAPI app's request bodies, passed on to a task as they are).
    """

    name: Serializer
    content_type: str
    encoder: msgspec.json.Encoder | msgspec.msgpack.Encoder

    def decoder(self, type_: Any) -> msgspec.json.Decoder[Any] | msgspec.msgpack.Decoder[Any]:
        """Build a decoder that validates into `type_` (built once per task, then reused)."""
        if self.name == "json":
            return msgspec.json.Decoder(type_, dec_hook=decode_other)
        return msgspec.msgpack.Decoder(type_, dec_hook=decode_other)


_CODECS: dict[str, Codec] = {
    "json": Codec("json", CONTENT_TYPES["json"], msgspec.json.Encoder(enc_hook=encode_other)),
    "msgpack": Codec(
        "msgpack", CONTENT_TYPES["msgpack"], msgspec.msgpack.Encoder(enc_hook=encode_other)
    ),
}
_BY_CONTENT_TYPE = {c.content_type: c for c in _CODECS.values()}
# Spellings other publishers use for MessagePack.
_BY_CONTENT_TYPE["application/x-msgpack"] = _CODECS["msgpack"]
_BY_CONTENT_TYPE["application/vnd.msgpack"] = _CODECS["msgpack"]


def codec_for(serializer: str) -> Codec:
    """Return the codec for a serializer name (``json`` or ``msgpack``)."""
    try:
        return _CODECS[serializer]
    except KeyError:
        raise ValueError(
            f"serializer {serializer!r} is not supported; use 'json' or 'msgpack'"
        ) from None


def codec_for_content_type(content_type: str | None) -> Codec | None:
    """Return the codec for a received content type; JSON when the publisher gave none."""
    if not content_type:
        return _CODECS["json"]
    exact = _BY_CONTENT_TYPE.get(content_type)
    if exact is not None:
        return exact
    return _BY_CONTENT_TYPE.get(content_type.split(";", 1)[0].strip().lower())


def header_count(value: Any) -> int:
    """Read a count header (an attempt, a redelivery count): a non-negative int, else 0."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return 0


_LEFT_BEHIND = frozenset({HEADER_REDELIVERIES, HEADER_ETA, HEADER_DELAY_TO})


def is_delay_header(name: str) -> bool:
    """Tell whether a header is one of the ladder's ways (``cuebx-delay-after-<k>``)."""
    return name.startswith(HEADER_DELAY_AFTER)


def eta_of(headers: Mapping[str, Any]) -> int | None:
    """Read ``x-cuebx-eta`` (epoch ms); None when absent or not a finite number."""
    value = headers.get(HEADER_ETA)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value) if math.isfinite(value) else None


def retry_copy(message: OutgoingMessage, attempt: int) -> OutgoingMessage:
    """Copy a message for its next attempt: same body, ids and properties, attempt set.

    A redelivery count is left behind: it belongs to the attempt that ended; so is a delay
    (``x-cuebx-eta``), which was for the attempt that ended.
    """
    headers = {
        k: v for k, v in message.headers.items() if k not in _LEFT_BEHIND and not is_delay_header(k)
    }
    headers[HEADER_ATTEMPT] = attempt
    return replace(message, headers=headers)


def dead_letter_copy(
    message: OutgoingMessage,
    *,
    reason: DeadLetterReason,
    queue: str,
    error: BaseException | str | None = None,
    now: datetime | None = None,
) -> OutgoingMessage:
    """Copy a message for a dead-letter queue, stamped with why and where it failed."""
    if isinstance(error, BaseException):
        error_type = f"{type(error).__module__}.{type(error).__qualname__}"
        text = str(error) or error_type
    else:
        error_type = ""
        text = error or reason
    if len(text) > ERROR_LIMIT:
        text = text[: ERROR_LIMIT - 1] + "…"
    stamped = {
        **message.headers,
        HEADER_REASON: reason,
        HEADER_ERROR_TYPE: error_type,
        HEADER_ERROR: text,
        HEADER_FAILED_AT: (now or datetime.now(UTC)).isoformat(timespec="milliseconds"),
        HEADER_ORIGIN_QUEUE: queue,
    }
    return replace(message, headers=stamped)


def replay_copy(message: OutgoingMessage) -> OutgoingMessage:
    """Copy a dead-lettered message for a new run: as first published, counted as replayed.

    The dead-letter stamps, RabbitMQ's dead-letter and delivery headers and the redelivery
    count go; the attempt is 0 again (a full set of retries); ``x-cuebx-replayed`` counts
    the replays. Body, ids, timestamp and every other header (a W3C ``traceparent``, say)
    stay. If it fails again, its new dead-letter stamps say why.
    """
    dropped = DEAD_LETTER_HEADERS | BROKER_HEADERS | {HEADER_REDELIVERIES}
    headers = {k: v for k, v in message.headers.items() if k not in dropped}
    headers[HEADER_ATTEMPT] = 0
    headers[HEADER_REPLAYED] = header_count(message.headers.get(HEADER_REPLAYED)) + 1
    return replace(message, headers=headers)


# A random 128-bit number with the version (4) and variant bits of a UUID4 put in place.
_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)


def first_message(
    body: bytes,
    content_type: str,
    headers: Mapping[str, Any] | None,
    mark: tuple[str, str],
    *,
    message_id: str | None = None,
    correlation_id: str | None = None,
    priority: int | None = None,
    reply_to: str | None = None,
) -> OutgoingMessage:
    """A message as first published: attempt 0, a new id unless given, stamped now.

    `mark` is the header that says what it is for (``x-cuebx-task``, ``x-cuebx-event``);
    `headers` are the caller's own, copied.
    """
    message_id = message_id or new_message_id()
    all_headers: dict[str, Any] = dict(headers) if headers else {}
    all_headers[mark[0]] = mark[1]
    all_headers[HEADER_ATTEMPT] = 0
    return OutgoingMessage(
        body=body,
        message_id=message_id,
        correlation_id=correlation_id or message_id,
        content_type=content_type,
        headers=all_headers,
        timestamp=datetime.now(UTC),
        priority=priority,
        reply_to=reply_to,
    )


def new_message_id() -> str:
    """Make a task id: a random UUID4 as 32 hex digits (half the cost of `uuid.uuid4().hex`)."""
    return f"{int.from_bytes(os.urandom(16)) & _UUID4_CLEAR | _UUID4_SET:032x}"
