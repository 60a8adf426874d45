"""Checked by mypy (strict, with warn_unused_ignores), never run: results and calls are typed.

Each wrong use carries a ``type: ignore`` for the exact error: if cuebx's typing stopped
catching it, the ignore would become unused and mypy would fail the test command.
"""

from __future__ import annotations

from cuebx import Cuebx, TaskContext, TaskHandle, TaskStatus

app = Cuebx("memory://", store="memory://")


@app.task
async def add(a: int, b: int) -> int:
    return a + b


@app.task
async def greet(ctx: TaskContext, name: str, *, loud: bool = False) -> str:
    return name.upper() if loud else name


@app.task
def report(day: str) -> list[str]:
    return [day]


async def handles_are_typed_by_the_return_annotation() -> tuple[int, str, list[str]]:
    total: TaskHandle[int] = await add.delay(2, 3)
    greeting = await greet.delay("Ann", loud=True)
    lines = await report.delay("monday")
    status: TaskStatus = await total.status()
    assert status.state != "unknown"
    return await total.result(timeout="5s"), await greeting.result(), await lines.result(1.5)


async def calls_are_typed_like_delay() -> tuple[int, str, list[str], int]:
    return (
        await add.call(2, 3),
        await greet.call("Ann", loud=True),  # the TaskContext is injected, not passed
        await report.call(day="monday"),
        await add.call_within("5s", 2, b=3),
    )


async def a_rebuilt_handle_keeps_its_task_type() -> int:
    return await add.handle("some-id").result()


async def wrong_uses() -> None:
    await add.call(2, "3")  # type: ignore[arg-type]
    await add.call(2)  # type: ignore[call-arg]
    await greet.call("Ann", shout=True)  # type: ignore[call-arg]
    await add.call_within("5s", "2", 3)  # type: ignore[arg-type]
    text: str = await add.call(2, 3)  # type: ignore[assignment]
    number: int = await (await greet.delay("Ann")).result()  # type: ignore[assignment]
    del text, number
