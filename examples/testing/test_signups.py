"""How a user tests tasks that retry and dead-letter: in memory, in milliseconds."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import signups

from cuebx import Cuebx, Worker
from cuebx.brokers.memory import MemoryBroker
from cuebx.testing import dead_letters, drain

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def worker(
    cuebx_memory: Callable[[Cuebx], MemoryBroker],
    cuebx_worker: Callable[..., Awaitable[Worker]],
) -> Worker:
    cuebx_memory(signups.app)  # this test's own broker, in memory
    return await cuebx_worker(signups.app)  # consumers in the test's event loop


async def test_the_welcome_email_is_sent(worker: Worker, monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[str] = []

    async def deliver(to: str, subject: str) -> None:
        sent.append(to)

    monkeypatch.setattr(signups, "deliver_email", deliver)
    await signups.send_welcome.delay("ann@example.com")
    await drain(signups.app)
    assert sent == ["ann@example.com"]


async def test_a_mail_outage_retries_three_times_then_dead_letters(
    worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    tries: list[str] = []

    async def down(to: str, subject: str) -> None:
        tries.append(to)
        raise ConnectionError("mail server down")

    monkeypatch.setattr(signups, "deliver_email", down)
    await signups.send_welcome.delay("ann@example.com")
    await drain(signups.app)  # follows the 30s, 5m and 1h tiers without waiting for them

    assert len(tries) == 4  # the first attempt and three retries
    [dead] = await dead_letters(signups.app, "signups")
    assert dead.reason == "exhausted"
    assert dead.error == "mail server down"
    assert dead.arguments == {"email": "ann@example.com"}


async def test_a_bad_address_is_rejected_without_retries(worker: Worker) -> None:
    await signups.send_welcome.delay("not-an-address")
    await drain(signups.app)
    [dead] = await dead_letters(signups.app, "signups")
    assert dead.reason == "rejected"
    assert dead.attempt == 0
