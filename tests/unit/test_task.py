"""Tasks: registration, options, the argument Struct, and encoding/decoding of arguments."""

import asyncio
import json
from datetime import datetime

import msgspec
import pydantic
import pytest

from cuebx import (
    ArgumentsError,
    ConfigurationError,
    Cuebx,
    DuplicateTaskError,
    TaskContext,
    current_context,
)
from cuebx.message import Codec, codec_for

JSON = codec_for("json")
MSGPACK = codec_for("msgpack")


@pytest.fixture
def app() -> Cuebx:
    return Cuebx("memory://")


def context(task_name: str = "job") -> TaskContext:
    return TaskContext(
        message_id="m1",
        correlation_id="c1",
        attempt=0,
        headers={},
        task_name=task_name,
        queue="default",
    )


def field_defaults(struct: type[msgspec.Struct]) -> dict[str, object]:
    return {
        f.name: (f.default if f.default is not msgspec.NODEFAULT else "<required>")
        for f in msgspec.structs.fields(struct)
    }


# -- registration -------------------------------------------------------------------------


def test_a_bare_decorator_registers_the_task_under_the_function_name(app: Cuebx) -> None:
    @app.task
    async def send_welcome(email: str) -> None: ...

    assert app.tasks == {"send_welcome": send_welcome}
    assert send_welcome.name == "send_welcome"
    assert send_welcome.queue == "default"
    assert send_welcome.is_async


def test_the_decorator_with_options_applies_them(app: Cuebx) -> None:
    @app.task(
        queue="emails",
        name="emails.welcome",
        retries=["30s", "5m"],
        prefetch=4,
        timeout="2m",
        priority=7,
        queue_type="quorum",
        routing_keys=["welcome"],
        retry_on=[TimeoutError],
        dont_retry_on=PermissionError,
    )
    async def send_welcome(email: str) -> None: ...

    options = send_welcome.options
    assert app.tasks == {"emails.welcome": send_welcome}
    assert options.queue == "emails"
    assert options.retry_delays_ms == (30_000, 300_000)
    assert options.prefetch == 4
    assert options.timeout == 120.0
    assert options.priority == 7
    assert options.queue_type == "quorum"
    assert options.routing_keys == ("welcome",)
    assert options.retry_on == (TimeoutError,)
    assert options.dont_retry_on == (PermissionError,)
    assert options.dead_letter is True


def test_a_sync_function_can_be_a_task(app: Cuebx) -> None:
    @app.task(queue="reports")
    def build_report(day: str) -> str:
        return f"report for {day}"

    assert not build_report.is_async
    assert build_report("monday") == "report for monday"
    assert build_report.encode(JSON, ("monday",), {}) == b'{"day":"monday"}'


def test_calling_a_task_runs_the_plain_function(app: Cuebx) -> None:
    @app.task
    async def add(a: int, b: int) -> int:
        return a + b

    assert asyncio.run(add(2, 3)) == 5


def test_calling_a_task_that_takes_a_context_gives_it_a_local_one(app: Cuebx) -> None:
    @app.task(queue="billing")
    async def charge(ctx: TaskContext, amount: int) -> tuple[str, str, int, int, bool]:
        return ctx.task_name, ctx.queue, ctx.attempt, amount, ctx.message_id == ctx.correlation_id

    @app.task(queue="billing")
    def refund(ctx: TaskContext, amount: int) -> str:
        return ctx.message_id

    assert asyncio.run(charge(7)) == ("charge", "billing", 0, 7, True)
    first, second = refund(1), refund(1)
    assert len(first) == 32
    assert first != second


def test_a_direct_call_sets_current_context_for_sync_and_async_handlers(app: Cuebx) -> None:
    @app.task(queue="thumbnails")
    def thumbnail(image_id: int) -> tuple[str, int]:
        return current_context().task_name, image_id

    @app.task(queue="thumbnails")
    async def athumbnail(image_id: int) -> tuple[str, int]:
        return current_context().task_name, image_id

    assert thumbnail(3) == ("thumbnail", 3)
    assert asyncio.run(athumbnail(4)) == ("athumbnail", 4)
    with pytest.raises(LookupError):
        current_context()  # only inside the call


def test_the_task_keeps_the_function_docstring(app: Cuebx) -> None:
    @app.task
    async def job() -> None:
        """Do the job."""

    assert job.__doc__ == "Do the job."
    assert job.__wrapped__ is job.fn


def test_a_duplicate_task_name_is_refused_naming_the_first_function(app: Cuebx) -> None:
    @app.task
    async def send() -> None: ...

    first = send

    with pytest.raises(DuplicateTaskError, match=r"'send'.*already registered.*name=") as info:

        @app.task(queue="other")
        async def send() -> None: ...

    assert first.fn.__qualname__ in str(info.value)
    assert app.tasks == {"send": first}


def test_a_duplicate_task_name_is_also_a_configuration_error(app: Cuebx) -> None:
    @app.task(name="job")
    async def one() -> None: ...

    with pytest.raises(ConfigurationError):

        @app.task(name="job")
        async def two() -> None: ...


def test_name_tells_two_functions_of_one_name_apart(app: Cuebx) -> None:
    @app.task
    async def send() -> None: ...

    @app.task(name="send_again")
    async def send() -> None: ...  # noqa: F811

    assert list(app.tasks) == ["send", "send_again"]


def test_two_apps_keep_separate_registries() -> None:
    first, second = Cuebx("memory://"), Cuebx("memory://")

    @first.task
    async def job() -> None: ...

    @second.task
    async def job() -> None: ...  # noqa: F811

    assert list(first.tasks) == list(second.tasks) == ["job"]


@pytest.mark.parametrize(
    "call",
    [
        lambda app: app.task("emails"),
        lambda app: app.task(lambda: None, queue="emails"),
        lambda app: app.task(lambda: None, lambda: None),
    ],
    ids=["queue-positional", "function-and-options", "two-functions"],
)
def test_options_must_be_given_by_keyword(app: Cuebx, call: object) -> None:
    with pytest.raises(ConfigurationError, match="by keyword"):
        call(app)  # type: ignore[operator]


# -- option validation --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"queue": ""}, "queue"),
        ({"queue": 5}, "queue"),
        ({"prefetch": 0}, "prefetch"),
        ({"prefetch": -1}, "prefetch"),
        ({"prefetch": True}, "prefetch"),
        ({"prefetch": 2.5}, "prefetch"),
        ({"priority": 300}, "priority"),
        ({"priority": -1}, "priority"),
        ({"priority": True}, "priority"),
        ({"queue_type": "stream"}, "queue_type"),
        ({"timeout": "abc"}, "timeout"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": "0s"}, "timeout"),
        ({"timeout": -5}, "timeout"),
        ({"retry_on": str}, "retry_on"),
        ({"retry_on": "ValueError"}, "retry_on"),
        ({"retry_on": [ValueError, 3]}, "retry_on"),
        ({"dont_retry_on": [ValueError("x")]}, "dont_retry_on"),
        ({"dead_letter": ""}, "dead_letter"),
        ({"dead_letter": None}, "dead_letter"),
        ({"retries": "30s"}, "retries"),
        ({"retries": ["30s", "soon"]}, "retries"),
    ],
)
def test_an_invalid_option_is_refused_naming_the_task_and_the_option(
    app: Cuebx, options: dict[str, object], words: str
) -> None:
    with pytest.raises(ConfigurationError) as info:

        @app.task(**options)  # type: ignore[call-overload]
        async def job() -> None: ...

    assert "task 'job'" in str(info.value)
    assert words in str(info.value)
    assert app.tasks == {}


def test_an_invalid_timeout_names_the_bad_value(app: Cuebx) -> None:
    with pytest.raises(ConfigurationError, match=r"task 'job': timeout: .*'abc'"):

        @app.task(timeout="abc")
        async def job() -> None: ...


@pytest.mark.parametrize(("timeout", "seconds"), [("250ms", 0.25), (90, 90.0), ("1h", 3600.0)])
def test_a_timeout_is_stored_in_seconds(app: Cuebx, timeout: str | int, seconds: float) -> None:
    @app.task(timeout=timeout)
    async def job() -> None: ...

    assert job.options.timeout == seconds


@pytest.mark.parametrize("priority", [0, 255])
def test_the_priority_bounds_are_allowed(app: Cuebx, priority: int) -> None:
    @app.task(priority=priority)
    async def job() -> None: ...

    assert job.options.priority == priority


# -- the argument Struct ------------------------------------------------------------------


def test_the_argument_struct_has_one_field_per_parameter_with_its_default(app: Cuebx) -> None:
    @app.task
    async def send(email: str, name: str = "friend", *, tries: int = 1) -> None: ...

    assert field_defaults(send.args_type) == {
        "email": "<required>",
        "name": "friend",
        "tries": 1,
    }


def test_the_argument_struct_uses_the_parameter_annotations(app: Cuebx) -> None:
    @app.task
    async def job(count: int, tags: list[str], when: datetime | None = None) -> None: ...

    types = {f.name: f.type for f in msgspec.structs.fields(job.args_type)}
    assert types == {"count": int, "tags": list[str], "when": datetime | None}


def test_an_unannotated_parameter_accepts_any_value(app: Cuebx) -> None:
    @app.task
    async def job(payload) -> None: ...  # type: ignore[no-untyped-def]

    body = job.encode(JSON, ({"a": [1, 2]},), {})
    assert msgspec.structs.asdict(job.decode(JSON, body)) == {"payload": {"a": [1, 2]}}


def test_a_task_context_first_parameter_is_injected_and_not_encoded(app: Cuebx) -> None:
    @app.task
    async def send(ctx: TaskContext, email: str) -> None: ...

    assert send.takes_context
    assert [f.name for f in msgspec.structs.fields(send.args_type)] == ["email"]
    body = send.encode(JSON, ("a@example.com",), {})
    assert json.loads(body) == {"email": "a@example.com"}
    ctx = context("send")
    assert send.call_args(ctx, send.decode(JSON, body)) == ((ctx, "a@example.com"), {})


def test_a_task_context_parameter_may_have_any_name(app: Cuebx) -> None:
    @app.task
    async def send(meta: TaskContext) -> None: ...

    assert send.takes_context
    assert msgspec.structs.fields(send.args_type) == ()


def test_a_task_context_found_through_a_string_annotation_is_injected(app: Cuebx) -> None:
    @app.task
    async def send(ctx: "TaskContext", email: str) -> None: ...

    assert send.takes_context
    assert [f.name for f in msgspec.structs.fields(send.args_type)] == ["email"]


def test_a_task_without_a_context_is_called_with_its_arguments_only(app: Cuebx) -> None:
    @app.task
    async def send(email: str) -> None: ...

    assert not send.takes_context
    value = send.decode(JSON, send.encode(JSON, ("a@example.com",), {}))
    assert send.call_args(context("send"), value) == (("a@example.com",), {})


def test_a_task_context_that_is_not_the_first_parameter_is_refused(app: Cuebx) -> None:
    with pytest.raises(ConfigurationError, match=r"task 'send'.*TaskContext.*first parameter"):

        @app.task
        async def send(email: str, ctx: TaskContext) -> None: ...

    assert app.tasks == {}


def test_a_keyword_only_task_context_is_refused_at_registration(app: Cuebx) -> None:
    def send(*, ctx: TaskContext, email: str) -> str:
        return f"{ctx.message_id}:{email}"

    with pytest.raises(ConfigurationError, match=r"task 'send'.*'ctx' must be positional"):
        app.task(send)


@pytest.mark.parametrize(
    "define",
    [
        lambda: lambda *items: None,
        lambda: lambda **options: None,
        lambda: lambda first, *rest: None,
    ],
    ids=["args", "kwargs", "first-and-args"],
)
def test_star_args_and_star_kwargs_are_refused_naming_the_task(app: Cuebx, define: object) -> None:
    fn = define()  # type: ignore[operator]
    with pytest.raises(ConfigurationError, match=r"task 'variadic'.*\*args/\*\*kwargs"):
        app.task(name="variadic")(fn)


def test_an_annotation_that_cannot_be_resolved_is_refused_naming_the_task(app: Cuebx) -> None:
    with pytest.raises(ConfigurationError, match=r"task 'job'.*annotations.*NoSuchType"):

        @app.task
        async def job(value: "NoSuchType") -> None: ...  # type: ignore[name-defined]  # noqa: F821


def test_a_parameter_type_msgspec_cannot_decode_is_refused_at_registration(app: Cuebx) -> None:
    # msgspec refuses unions of two str-like types; finding out only at the first
    # .delay() (as an ArgumentsError blaming the caller) or in the worker is too late.
    with pytest.raises(ConfigurationError, match="task 'job'"):

        @app.task
        async def job(when: str | datetime) -> None: ...


# -- encoding -----------------------------------------------------------------------------


def test_the_body_is_an_object_of_arguments_by_parameter_name(app: Cuebx) -> None:
    @app.task
    async def send_welcome(email: str, name: str) -> None: ...

    body = send_welcome.encode(JSON, ("a@example.com",), {"name": "Ann"})

    assert json.loads(body) == {"email": "a@example.com", "name": "Ann"}


def test_a_msgpack_body_is_an_object_of_arguments_by_parameter_name(app: Cuebx) -> None:
    @app.task
    async def send_welcome(email: str, name: str) -> None: ...

    body = send_welcome.encode(MSGPACK, ("a@example.com", "Ann"), {})

    assert msgspec.msgpack.decode(body) == {"email": "a@example.com", "name": "Ann"}


def test_positional_and_keyword_calls_give_the_same_body(app: Cuebx) -> None:
    @app.task
    async def send(email: str, name: str = "friend") -> None: ...

    assert (
        send.encode(JSON, ("a@example.com", "Ann"), {})
        == send.encode(JSON, (), {"name": "Ann", "email": "a@example.com"})
        == send.encode(JSON, ("a@example.com",), {"name": "Ann"})
    )


@pytest.mark.parametrize("codec", [JSON, MSGPACK], ids=["json", "msgpack"])
def test_arguments_survive_an_encode_decode_round_trip(app: Cuebx, codec: Codec) -> None:
    @app.task
    async def job(
        count: int,
        tags: list[str],
        when: datetime,
        ratio: float = 0.5,
        *,
        note: str | None = None,
    ) -> None: ...

    when = datetime(2024, 5, 1, 12, 30)
    body = job.encode(codec, (3, ["a", "b"], when), {"note": "hi"})
    value = job.decode(codec, body)

    assert job.call_args(context(), value) == (
        (3, ["a", "b"], when, 0.5),
        {"note": "hi"},
    )


def test_a_body_that_omits_a_defaulted_argument_decodes_with_the_default(app: Cuebx) -> None:
    @app.task
    async def send(email: str, name: str = "friend") -> None: ...

    value = send.decode(JSON, b'{"email":"a@example.com"}')
    assert send.call_args(context(), value) == (("a@example.com", "friend"), {})


def test_keyword_only_parameters_are_passed_back_by_keyword(app: Cuebx) -> None:
    @app.task
    async def send(email: str, *, urgent: bool = False) -> None: ...

    value = send.decode(JSON, send.encode(JSON, ("a@example.com",), {"urgent": True}))
    assert send.call_args(context(), value) == (("a@example.com",), {"urgent": True})


def test_a_required_keyword_only_parameter_may_follow_a_defaulted_one(app: Cuebx) -> None:
    @app.task
    async def send(email: str, name: str = "friend", *, template: str) -> None: ...

    body = send.encode(JSON, ("a@example.com",), {"template": "welcome"})

    assert json.loads(body) == {"email": "a@example.com", "name": "friend", "template": "welcome"}
    assert send.call_args(context(), send.decode(JSON, body)) == (
        ("a@example.com", "friend"),
        {"template": "welcome"},
    )
    with pytest.raises(ArgumentsError, match="template"):
        send.encode(JSON, ("a@example.com",), {})


def test_a_required_keyword_only_parameter_after_a_default_works_with_context(
    app: Cuebx,
) -> None:
    @app.task
    async def send(ctx: TaskContext, name: str = "friend", *, template: str) -> None: ...

    body = send.encode(JSON, ("Ann",), {"template": "welcome"})
    ctx = context("send")
    assert send.call_args(ctx, send.decode(JSON, body)) == ((ctx, "Ann"), {"template": "welcome"})


@pytest.mark.parametrize(
    ("args", "kwargs", "words"),
    [
        ((5, "Ann"), {}, "Expected `str`, got `int`"),
        (("a@example.com", "Ann", "three"), {}, "Expected `int`, got `str`"),
        ((), {"name": "Ann"}, "email"),
        (("a@example.com", "Ann", 3, "extra"), {}, "positional"),
        (("a@example.com",), {"nmae": "Ann"}, "nmae"),
        (("a@example.com", "Ann"), {"email": "b@example.com"}, "email"),
        (("a@example.com", object()), {}, "object"),
    ],
    ids=[
        "wrong-type",
        "wrong-type-for-default",
        "missing-required",
        "too-many-positional",
        "unknown-keyword",
        "given-twice",
        "unencodable-value",
    ],
)
def test_invalid_arguments_raise_arguments_error_naming_the_task(
    app: Cuebx, args: tuple[object, ...], kwargs: dict[str, object], words: str
) -> None:
    @app.task
    async def send_welcome(email: str, name: str, retries: int = 0, *, count: int = 1) -> None: ...

    with pytest.raises(ArgumentsError) as info:
        send_welcome.encode(JSON, args, kwargs)

    assert "task 'send_welcome'" in str(info.value)
    assert words in str(info.value)


def test_a_keyword_only_argument_given_positionally_is_refused(app: Cuebx) -> None:
    @app.task
    async def send(email: str, *, urgent: bool = False) -> None: ...

    with pytest.raises(ArgumentsError, match=r"task 'send'.*1 positional"):
        send.encode(JSON, ("a@example.com", True), {})


def test_a_required_after_default_task_refuses_too_many_positionals(app: Cuebx) -> None:
    @app.task
    async def send(email: str = "", *, template: str) -> None: ...

    with pytest.raises(ArgumentsError, match=r"task 'send'.*positional"):
        send.encode(JSON, ("a@example.com", "welcome"), {})
    with pytest.raises(ArgumentsError, match=r"task 'send'.*multiple values.*'email'"):
        send.encode(JSON, ("a@example.com",), {"email": "b", "template": "welcome"})


def test_an_arguments_error_is_also_a_type_error(app: Cuebx) -> None:
    @app.task
    async def send(email: str) -> None: ...

    with pytest.raises(TypeError):
        send.encode(JSON, (), {})


@pytest.mark.parametrize("codec", [JSON, MSGPACK], ids=["json", "msgpack"])
def test_decoding_a_body_with_wrong_types_raises_a_validation_error(
    app: Cuebx, codec: Codec
) -> None:
    @app.task
    async def send(email: str) -> None: ...

    body = codec.encoder.encode({"email": 5})
    with pytest.raises(msgspec.ValidationError, match="email"):
        send.decode(codec, body)


def test_decoding_a_body_that_is_not_an_object_raises_a_validation_error(app: Cuebx) -> None:
    @app.task
    async def send(email: str) -> None: ...

    with pytest.raises(msgspec.ValidationError):
        send.decode(JSON, b'["a@example.com"]')


def test_decoding_garbage_raises_a_decode_error(app: Cuebx) -> None:
    @app.task
    async def send(email: str) -> None: ...

    with pytest.raises(msgspec.DecodeError):
        send.decode(JSON, b"\x80not json")


class Address(pydantic.BaseModel):
    street: str
    zip_code: str = pydantic.Field(pattern=r"^\d{5}$")


class Signup(pydantic.BaseModel):
    email: str
    joined: datetime
    address: Address | None = None


@pytest.mark.parametrize("codec", [JSON, MSGPACK], ids=["json", "msgpack"])
def test_a_pydantic_model_argument_is_encoded_and_comes_back_as_the_model(
    app: Cuebx, codec: Codec
) -> None:
    @app.task
    async def welcome(signup: Signup, tags: list[Signup]) -> None: ...

    signup = Signup(email="a@example.com", joined=datetime(2026, 1, 2, 3, 4, 5))
    signup.address = Address(street="Main St 1", zip_code="12345")
    body = welcome.encode(codec, (signup,), {"tags": [signup]})
    value = welcome.decode(codec, body)
    assert value.signup == signup  # type: ignore[attr-defined]
    assert isinstance(value.tags[0], Signup)  # type: ignore[attr-defined]


def test_a_pydantic_validation_error_is_invalid_arguments_naming_the_field(app: Cuebx) -> None:
    @app.task
    async def welcome(signup: Signup) -> None: ...

    body = (
        b'{"signup": {"email": "a@example.com", "joined": "2026-01-02T00:00:00",'
        b' "address": {"street": "x", "zip_code": "abc"}}}'
    )
    with pytest.raises(msgspec.ValidationError, match=r"(?s)address.zip_code.*at `\$.signup`"):
        welcome.decode(JSON, body)


def test_delay_checks_a_pydantic_argument_before_publishing(app: Cuebx) -> None:
    @app.task
    async def welcome(signup: Signup) -> None: ...

    with pytest.raises(ArgumentsError, match="task 'welcome': invalid arguments"):
        welcome.encode(JSON, ({"email": "a@example.com"},), {})


def test_a_parameter_type_nothing_can_encode_is_refused_at_registration(app: Cuebx) -> None:
    class Opaque:
        pass

    def define() -> None:
        @app.task
        async def job(items: dict[str, list[Opaque]]) -> None: ...

    with pytest.raises(ConfigurationError, match=r"task 'job': parameter type .*Opaque cannot"):
        define()
