"""The middleware `Stack`: which hooks run, in which order, and what it refuses."""

from __future__ import annotations

import pytest

from cuebx import Cuebx, Middleware, Outcome, Publish, Received
from cuebx.middleware import Stack


class PublishOnly(Middleware):
    async def before_publish(self, publish: Publish) -> None: ...


class HandlerOnly(Middleware):
    async def after_handler(self, received: Received, outcome: Outcome) -> None: ...


def test_an_empty_stack_has_no_hooks_to_run() -> None:
    stack = Stack()
    assert not stack.before_publish
    assert not stack.after_publish
    assert not stack.before_handler
    assert not stack.after_handler
    assert not stack.handles
    assert len(stack) == 0


def test_a_middleware_is_called_only_for_the_hooks_it_overrides() -> None:
    stack = Stack([Middleware(), PublishOnly()])
    assert len(stack.before_publish) == 1
    assert not stack.after_publish
    assert not stack.handles  # publishing hooks alone cost a handler run nothing


def test_after_hooks_are_kept_innermost_first() -> None:
    first, second = HandlerOnly(), HandlerOnly()
    stack = Stack([first])
    stack.add(second)
    assert [hook.__self__ for hook in stack.after_handler] == [second, first]  # type: ignore[attr-defined]
    assert stack.handles


def test_something_that_is_not_a_middleware_is_refused_by_name() -> None:
    with pytest.raises(TypeError, match="is not a cuebx Middleware"):
        Cuebx("memory://", middleware=[object()])  # type: ignore[list-item]


def test_add_middleware_reaches_the_publish_path_of_existing_tasks() -> None:
    app = Cuebx("memory://")

    @app.task
    async def job() -> None: ...

    app.add_middleware(PublishOnly())
    assert job.publisher.stack.before_publish  # type: ignore[attr-defined]


def test_find_returns_the_first_middleware_of_a_kind() -> None:
    only = HandlerOnly()
    stack = Stack([PublishOnly(), only])
    assert stack.find(HandlerOnly) is only
    assert stack.find(type("Other", (Middleware,), {})) is None
