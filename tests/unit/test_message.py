"""The message envelope: dead-letter stamps, retry copies, and codecs."""

import uuid
from datetime import UTC, datetime, timedelta, timezone

import msgspec
import pytest

from cuebx.message import (
    CONTENT_TYPES,
    ERROR_LIMIT,
    HEADER_ATTEMPT,
    HEADER_ERROR,
    HEADER_ERROR_TYPE,
    HEADER_FAILED_AT,
    HEADER_ORIGIN_QUEUE,
    HEADER_REASON,
    HEADER_TASK,
    OutgoingMessage,
    codec_for,
    codec_for_content_type,
    dead_letter_copy,
    new_message_id,
    retry_copy,
)

SENT_AT = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
FAILED_AT = datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=UTC)


class PaymentDeclined(Exception):
    pass


@pytest.fixture
def message() -> OutgoingMessage:
    return OutgoingMessage(
        body=b'{"email":"a@example.com","name":"Ann"}',
        message_id="0123456789abcdef0123456789abcdef",
        correlation_id="request-42",
        content_type="application/json",
        headers={HEADER_TASK: "send_welcome", HEADER_ATTEMPT: 2, "tenant": "acme"},
        timestamp=SENT_AT,
        priority=5,
    )


def test_the_header_names_are_the_ones_design_md_promises() -> None:
    assert HEADER_TASK == "x-cuebx-task"
    assert HEADER_ATTEMPT == "x-retry-attempt"
    assert HEADER_REASON == "x-cuebx-reason"
    assert HEADER_ERROR_TYPE == "x-cuebx-error-type"
    assert HEADER_ERROR == "x-cuebx-error"
    assert HEADER_FAILED_AT == "x-cuebx-failed-at"
    assert HEADER_ORIGIN_QUEUE == "x-cuebx-origin-queue"


def test_a_dead_letter_copy_stamps_why_where_and_when_it_failed(message: OutgoingMessage) -> None:
    copy = dead_letter_copy(
        message,
        reason="exhausted",
        queue="emails",
        error=PaymentDeclined("card expired"),
        now=FAILED_AT,
    )

    assert copy.headers[HEADER_REASON] == "exhausted"
    assert copy.headers[HEADER_ERROR_TYPE] == f"{__name__}.PaymentDeclined"
    assert copy.headers[HEADER_ERROR] == "card expired"
    assert copy.headers[HEADER_FAILED_AT] == "2024-05-01T12:30:15.123+00:00"
    assert copy.headers[HEADER_ORIGIN_QUEUE] == "emails"


def test_a_dead_letter_copy_keeps_the_original_headers_body_and_properties(
    message: OutgoingMessage,
) -> None:
    copy = dead_letter_copy(message, reason="rejected", queue="emails", error="bad address")

    assert copy.body == message.body
    assert copy.message_id == message.message_id
    assert copy.correlation_id == message.correlation_id
    assert copy.content_type == message.content_type
    assert copy.timestamp == message.timestamp
    assert copy.priority == message.priority
    assert copy.headers[HEADER_TASK] == "send_welcome"
    assert copy.headers[HEADER_ATTEMPT] == 2
    assert copy.headers["tenant"] == "acme"


def test_a_dead_letter_copy_leaves_the_original_message_untouched(
    message: OutgoingMessage,
) -> None:
    before = dict(message.headers)
    dead_letter_copy(message, reason="rejected", queue="emails", error="bad")
    assert dict(message.headers) == before


def test_a_dead_letter_copy_replaces_the_stamps_of_an_earlier_dead_lettering(
    message: OutgoingMessage,
) -> None:
    first = dead_letter_copy(message, reason="exhausted", queue="emails", error="first")
    second = dead_letter_copy(first, reason="rejected", queue="replay", error="second")

    assert second.headers[HEADER_REASON] == "rejected"
    assert second.headers[HEADER_ERROR] == "second"
    assert second.headers[HEADER_ORIGIN_QUEUE] == "replay"


def test_a_string_error_has_no_error_type(message: OutgoingMessage) -> None:
    copy = dead_letter_copy(message, reason="rejected", queue="q", error="not for us")
    assert copy.headers[HEADER_ERROR_TYPE] == ""
    assert copy.headers[HEADER_ERROR] == "not for us"


def test_without_an_error_the_error_header_repeats_the_reason(message: OutgoingMessage) -> None:
    copy = dead_letter_copy(message, reason="unknown-task", queue="q")
    assert copy.headers[HEADER_ERROR] == "unknown-task"
    assert copy.headers[HEADER_ERROR_TYPE] == ""


def test_an_exception_without_a_message_is_described_by_its_type(
    message: OutgoingMessage,
) -> None:
    copy = dead_letter_copy(message, reason="exhausted", queue="q", error=KeyError())
    assert copy.headers[HEADER_ERROR_TYPE] == "builtins.KeyError"
    assert copy.headers[HEADER_ERROR] == "builtins.KeyError"


@pytest.mark.parametrize("length", [ERROR_LIMIT + 1, ERROR_LIMIT * 10])
def test_a_long_error_is_cut_to_the_error_limit(message: OutgoingMessage, length: int) -> None:
    text = "x" * length
    copy = dead_letter_copy(message, reason="exhausted", queue="q", error=ValueError(text))

    error = copy.headers[HEADER_ERROR]
    assert len(error) == ERROR_LIMIT
    assert error.endswith("…")
    assert error.startswith("x" * (ERROR_LIMIT - 1))


def test_an_error_of_exactly_the_limit_is_kept_whole(message: OutgoingMessage) -> None:
    text = "y" * ERROR_LIMIT
    copy = dead_letter_copy(message, reason="exhausted", queue="q", error=text)
    assert copy.headers[HEADER_ERROR] == text


def test_the_failure_time_defaults_to_now_in_utc(message: OutgoingMessage) -> None:
    before = datetime.now(UTC)
    copy = dead_letter_copy(message, reason="exhausted", queue="q")
    after = datetime.now(UTC)

    failed_at = datetime.fromisoformat(copy.headers[HEADER_FAILED_AT])
    assert failed_at.utcoffset() == timedelta(0)
    assert before - timedelta(milliseconds=1) <= failed_at <= after


def test_the_failure_time_keeps_the_given_offset(message: OutgoingMessage) -> None:
    now = datetime(2024, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    copy = dead_letter_copy(message, reason="exhausted", queue="q", now=now)
    assert datetime.fromisoformat(copy.headers[HEADER_FAILED_AT]) == now


def test_a_retry_copy_sets_only_the_attempt_header(message: OutgoingMessage) -> None:
    copy = retry_copy(message, 3)

    assert copy.headers == {**message.headers, HEADER_ATTEMPT: 3}
    assert copy.body == message.body
    assert copy.message_id == message.message_id
    assert copy.correlation_id == message.correlation_id
    assert copy.content_type == message.content_type
    assert copy.timestamp == message.timestamp
    assert copy.priority == message.priority
    assert message.headers[HEADER_ATTEMPT] == 2


def test_a_retry_copy_adds_the_attempt_header_when_it_was_missing() -> None:
    plain = OutgoingMessage(
        body=b"{}",
        message_id="m",
        correlation_id="m",
        content_type=None,
        headers={},
        timestamp=SENT_AT,
    )
    assert retry_copy(plain, 1).headers == {HEADER_ATTEMPT: 1}


def test_content_types_are_json_and_msgpack() -> None:
    assert CONTENT_TYPES == {"json": "application/json", "msgpack": "application/msgpack"}


@pytest.mark.parametrize(("name", "content_type"), list(CONTENT_TYPES.items()))
def test_codec_for_returns_the_serializer_with_its_content_type(
    name: str, content_type: str
) -> None:
    codec = codec_for(name)
    assert codec.name == name
    assert codec.content_type == content_type


def test_codec_for_returns_the_same_codec_every_time() -> None:
    assert codec_for("json") is codec_for("json")


@pytest.mark.parametrize("name", ["pickle", "yaml", "JSON", ""])
def test_an_unknown_serializer_raises_value_error_naming_it(name: str) -> None:
    with pytest.raises(ValueError, match="not supported") as info:
        codec_for(name)
    assert repr(name) in str(info.value)


@pytest.mark.parametrize("content_type", [None, ""])
def test_a_message_without_a_content_type_is_read_as_json(content_type: str | None) -> None:
    codec = codec_for_content_type(content_type)
    assert codec is not None
    assert codec.name == "json"


@pytest.mark.parametrize(
    ("content_type", "name"),
    [
        ("application/json", "json"),
        ("application/json; charset=utf-8", "json"),
        ("Application/JSON", "json"),
        ("application/msgpack", "msgpack"),
        ("application/x-msgpack", "msgpack"),
        ("application/vnd.msgpack", "msgpack"),
        (" APPLICATION/MSGPACK ", "msgpack"),
    ],
)
def test_a_content_type_selects_its_codec(content_type: str, name: str) -> None:
    codec = codec_for_content_type(content_type)
    assert codec is not None
    assert codec.name == name


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/python-pickle", "application/xml"]
)
def test_an_unknown_content_type_has_no_codec(content_type: str) -> None:
    assert codec_for_content_type(content_type) is None


class Arguments(msgspec.Struct):
    email: str
    count: int = 1


@pytest.mark.parametrize("name", ["json", "msgpack"])
def test_a_codec_encodes_and_decodes_into_a_typed_struct(name: str) -> None:
    codec = codec_for(name)
    body = codec.encoder.encode(Arguments("a@example.com", 3))
    assert codec.decoder(Arguments).decode(body) == Arguments("a@example.com", 3)


@pytest.mark.parametrize("name", ["json", "msgpack"])
def test_a_codec_decoder_validates_types(name: str) -> None:
    codec = codec_for(name)
    body = codec.encoder.encode({"email": "a@example.com", "count": "three"})
    with pytest.raises(msgspec.ValidationError, match="count"):
        codec.decoder(Arguments).decode(body)


def test_message_ids_are_distinct_uuid4_hex() -> None:
    ids = {new_message_id() for _ in range(2000)}
    assert len(ids) == 2000
    for value in list(ids)[:200]:
        parsed = uuid.UUID(value)
        assert len(value) == 32
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
