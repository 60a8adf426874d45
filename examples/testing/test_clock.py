"""The in-memory clock: it jumps over retry delays on its own, or waits for the test."""

from __future__ import annotations

import anyio
import pytest
import signups

from cuebx.testing import running, settle, use_memory_broker

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_a_flaky_mail_server_gets_the_email_out_on_the_third_try(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tries = 0
    sent = anyio.Event()

    async def flaky(to: str, subject: str) -> None:
        nonlocal tries
        tries += 1
        if tries < 3:
            raise ConnectionError("mail server down")
        sent.set()

    monkeypatch.setattr(signups, "deliver_email", flaky)
    with use_memory_broker(signups.app):  # the default clock jumps over retry delays
        async with running(signups.app):
            await signups.send_welcome.delay("ann@example.com")
            with anyio.fail_after(1):  # 30 s and 5 min of retry delays, in milliseconds
                await sent.wait()

    assert tries == 3


async def test_a_retry_waits_in_its_tier_until_the_test_moves_the_clock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tries: list[str] = []

    async def down(to: str, subject: str) -> None:
        tries.append(to)
        raise ConnectionError("mail server down")

    monkeypatch.setattr(signups, "deliver_email", down)
    with use_memory_broker(signups.app, clock="manual") as broker:
        async with running(signups.app):
            await signups.send_welcome.delay("ann@example.com")
            await settle(signups.app)  # the first attempt failed...
            assert len(broker.messages("signups.retry.30s")) == 1  # ...and its copy waits here

            await broker.clock.advance(29)  # not yet
            assert len(broker.messages("signups.retry.30s")) == 1

            await broker.clock.advance(1)  # back in "signups"
            await settle(signups.app)  # handled again

    assert len(tries) == 2
