"""The public names of cuebx: an explicit, sorted __all__ that all import."""

import importlib
import re
from typing import Any

import pytest

import cuebx
from cuebx import ConfigurationError, Cuebx


def test_all_is_sorted() -> None:
    assert cuebx.__all__ == sorted(cuebx.__all__)


def test_all_has_no_duplicates() -> None:
    assert len(cuebx.__all__) == len(set(cuebx.__all__))


@pytest.mark.parametrize("name", cuebx.__all__)
def test_every_public_name_is_importable_from_cuebx(name: str) -> None:
    module = importlib.import_module("cuebx")
    assert getattr(module, name) is not None


@pytest.mark.parametrize(
    "name", ["Cuebx", "Retry", "Reject", "TaskContext", "current_context", "ArgumentsError"]
)
def test_the_names_design_md_promises_are_public(name: str) -> None:
    assert name in cuebx.__all__


def test_star_import_gives_exactly_the_public_names() -> None:
    namespace: dict[str, object] = {}
    exec("from cuebx import *", namespace)
    namespace.pop("__builtins__")
    assert sorted(namespace) == sorted(cuebx.__all__)


def test_retry_and_reject_cannot_be_swallowed_by_except_cuebx_error() -> None:
    assert not issubclass(cuebx.Retry, cuebx.CuebxError)
    assert not issubclass(cuebx.Reject, cuebx.CuebxError)
    assert issubclass(cuebx.Retry, cuebx.TaskSignal)
    assert issubclass(cuebx.Reject, cuebx.TaskSignal)


@pytest.mark.parametrize(
    "name", [n for n in cuebx.__all__ if n.endswith("Error") and n != "CuebxError"]
)
def test_every_public_error_derives_from_cuebx_error(name: str) -> None:
    assert issubclass(getattr(cuebx, name), cuebx.CuebxError)


def test_current_context_outside_a_handler_raises_lookup_error() -> None:
    with pytest.raises(LookupError, match="outside a running task handler"):
        cuebx.current_context()


def test_the_version_is_a_string() -> None:
    assert isinstance(cuebx.__version__, str)
    assert cuebx.__version__


def test_an_app_can_be_given_its_broker_and_switch_brokers_publicly() -> None:
    from cuebx.brokers.memory import MemoryBroker

    first, second = MemoryBroker(), MemoryBroker()
    app = Cuebx("amqp://localhost/", broker=first)
    assert app.broker is first
    assert app.use_broker(second) is first
    assert app.broker is second
    assert not app.connected


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"prefetch": 0}, "prefetch must be an integer >= 1, got 0"),
        ({"queue_type": "stream"}, "queue_type must be 'classic' or 'quorum', got 'stream'"),
        ({"max_priority": 256}, "max_priority must be an integer 1..255, got 256"),
        ({"delivery_limit": 0}, "delivery_limit must be an integer >= 1, got 0"),
        ({"thread_limit": True}, "thread_limit must be an integer >= 1, got True"),
        ({"exchange": ""}, "exchange must be a non-empty name"),
        ({"exchange": "amq.direct"}, "exchange must be a non-empty name not starting with 'amq.'"),
        ({"serializer": "pickle"}, "serializer 'pickle' is not supported"),
        ({"publish_timeout": "0s"}, "publish_timeout must be above zero"),
        ({"url": "redis://u:secret@host/"}, "broker URL 'redis://u:***@host/' has scheme 'redis'"),
    ],
)
def test_app_options_are_checked_once_with_a_message_naming_them(
    options: dict[str, Any], message: str
) -> None:
    url = options.pop("url", "memory://")
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        Cuebx(url, **options)


def test_a_worker_refuses_a_prefetch_of_zero_instead_of_using_the_default() -> None:
    app = Cuebx("memory://")

    @app.task
    async def job() -> None: ...

    with pytest.raises(ConfigurationError, match="worker: prefetch must be an integer >= 1, got 0"):
        app.worker(prefetch=0)
