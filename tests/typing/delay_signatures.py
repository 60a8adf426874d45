"""Checked by mypy (strict, with warn_unused_ignores), never run.

Each wrong call carries a ``type: ignore`` for the exact error: if cuebx's typing stopped
catching it, the ignore would become unused and mypy would fail the test command.
"""

from __future__ import annotations

from typing import Any

from cuebx import Cuebx, TaskContext, TaskHandle

app = Cuebx("memory://")


@app.task(queue="emails", retries=["30s", "5m"])
async def send_welcome(email: str, name: str, *, urgent: bool = False) -> None: ...


@app.task
async def with_context(ctx: TaskContext, user_id: int) -> int:
    return user_id


@app.task(queue="reports")
def sync_report(day: str) -> str:
    return day


async def good_calls() -> list[TaskHandle[Any]]:
    return [
        await send_welcome.delay("a@example.com", "Ann"),
        await send_welcome.delay("a@example.com", name="Ann", urgent=True),
        await with_context.delay(42),  # the TaskContext is injected, not passed
        await with_context.delay(user_id=42),
        await sync_report.delay("2026-11-23"),
    ]


async def bad_calls() -> None:
    await send_welcome.delay("a@example.com")  # type: ignore[call-arg]
    await send_welcome.delay("a@example.com", 42)  # type: ignore[arg-type]
    await send_welcome.delay("a@example.com", "Ann", True)  # type: ignore[call-arg]
    await send_welcome.delay("a@example.com", "Ann", colour="red")  # type: ignore[call-arg]
    await with_context.delay("forty-two")  # type: ignore[arg-type]
    await sync_report.delay(day=3)  # type: ignore[arg-type]


def direct_call_keeps_the_return_type() -> str:
    return sync_report("2026-11-23")


async def direct_async_call_is_awaited() -> int:
    # A direct call runs the handler in place: the context is made up, not passed.
    return await with_context(42)


def direct_call_wrong_argument() -> None:
    sync_report(3)  # type: ignore[arg-type]
