"""The public names of cuebx: an explicit, sorted __all__ that all import."""

import importlib

import pytest

import cuebx


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
