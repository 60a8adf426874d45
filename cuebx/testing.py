"""Test your tasks the way they run: encoded, retried through tiers, dead-lettered.

Point an app at an in-memory broker, run a worker in the test's event loop, publish, then
`drain` until every queue and retry tier is empty. On ``memory://`` the broker's clock jumps
to each TTL expiry instead of waiting (by itself, or through `drain` on a manual clock), so a
retry ladder of hours runs in milliseconds. Every helper also works against RabbitMQ
(waiting real time for the tiers).

    async def test_flaky_email_ends_in_the_dead_letter_queue() -> None:
        with use_memory_broker(app):
            async with running(app):
                await send_welcome.delay("ann@example.com", "Flaky")
                await drain(app)
            [dead] = await dead_letters(app, "emails")
            assert dead.reason == "exhausted"
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
import msgspec

from cuebx.app import Cuebx
from cuebx.brokers.base import Broker, Delivery
from cuebx.brokers.memory import ClockMode, MemoryBroker
from cuebx.message import (
    HEADER_ATTEMPT,
    HEADER_ERROR,
    HEADER_ERROR_TYPE,
    HEADER_ORIGIN_QUEUE,
    HEADER_REASON,
    HEADER_TASK,
    OutgoingMessage,
    codec_for_content_type,
)
from cuebx.worker import Worker

__all__ = [
    "DeadLetterRecord",
    "dead_letters",
    "drain",
    "messages",
    "running",
    "settle",
    "take",
    "use_memory_broker",
]


@contextmanager
def use_memory_broker(
    app: Cuebx, url: str = "memory://", *, clock: ClockMode | None = None
) -> Iterator[MemoryBroker]:
    """Point `app` at a fresh in-memory broker for the duration of the block.

    The app's own URL is untouched: after the block it talks to its real broker again.

    Args:
        app: the app under test.
        url: the memory broker's URL (``memory://?clock=manual`` is another way to pick
            the clock).
        clock: ``"auto"`` (the default: time jumps ahead whenever the broker is idle),
            ``"manual"`` (time moves only through `Clock.advance` and `drain`) or
            ``"real"``.
    """
    if app.workers:
        raise RuntimeError("use_memory_broker() must be entered before consumers start")
    broker = MemoryBroker(url, clock=clock)
    saved = app.use_broker(broker)
    try:
        yield broker
    finally:
        app.use_broker(saved)


@asynccontextmanager
async def running(
    app: Cuebx, *, queues: list[str] | None = None, prefetch: int | None = None
) -> AsyncIterator[Worker]:
    """Connect, declare, and run consumers in this event loop; stop them and close after."""
    worker = await app.start_consumers(queues=queues, prefetch=prefetch)
    try:
        yield worker
    finally:
        await worker.stop()
        await app.close()


async def drain(app: Cuebx, *, timeout: float = 10.0) -> None:  # noqa: ASYNC109
    """Wait until every main queue, retry tier and delay level is empty and every handler
    has finished.

    On an in-memory broker, when only messages waiting out a TTL (a retry tier's, a delay
    level's) are left, the broker's clock jumps to the next expiry, so retries and
    countdowns take no real time. On RabbitMQ it waits for them in real time; the levels of
    the delay ladder count once the app delayed a message (other apps on the exchange share
    them).

    Raises:
        RuntimeError: no consumers run for `app` (start them with `running`).
        TimeoutError: still busy after `timeout` seconds of real time.
    """
    await _quiet(app, "drain", timeout, follow_ttls=True)


async def settle(app: Cuebx, *, timeout: float = 10.0) -> None:  # noqa: ASYNC109
    """Wait until the workers have handled every ready message, without moving time.

    Meant for a manual clock (``use_memory_broker(app, clock="manual")``): an ``auto`` clock
    moves by itself whenever the broker is idle.

    Unlike `drain`, messages waiting out a retry tier's TTL stay there: on ``memory://``
    the clock does not move, so a test can look at the tier, then `Clock.advance` it.
    On RabbitMQ it waits until the main queues are empty and no handler runs.

    Raises:
        RuntimeError: no consumers run for `app` (start them with `running`).
        TimeoutError: still busy after `timeout` seconds of real time.
    """
    await _quiet(app, "settle", timeout, follow_ttls=False)


async def _quiet(app: Cuebx, caller: str, seconds: float, *, follow_ttls: bool) -> None:
    """Wait until the workers are idle with nothing ready; `follow_ttls`: retry tiers too."""
    workers = list(app.workers)
    if not workers:
        raise RuntimeError(
            f"{caller}() needs running consumers: use `async with cuebx.testing.running(app)`"
        )
    broker = app.broker
    with anyio.fail_after(seconds):
        if isinstance(broker, MemoryBroker):
            await _drain_memory(broker, workers, follow_ttls=follow_ttls)
        else:
            topology = app.topology()
            queues = list(topology.queues if follow_ttls else topology.main_queues)
            if follow_ttls and app.delays.declared_on(broker):
                # The levels of the delay ladder, shared with every app on the exchange.
                queues += app.delays.topology().queues
            # Queues nobody consumes: dead letters, unroutable messages and events, and the
            # permits of rate limiters (they leave by their TTL, and mean nothing to wait on).
            idle = ("dead-letter", "unroutable", "events", "limit")
            names = [q.name for q in queues if q.role not in idle]
            await _drain_waiting(broker, workers, names)


async def _drain_memory(broker: MemoryBroker, workers: list[Worker], *, follow_ttls: bool) -> None:
    idle_checks = 0
    while True:
        await anyio.lowlevel.checkpoint()
        if not (broker.is_idle() and all(w.idle for w in workers)):
            idle_checks = 0
            continue
        # A few checkpoints in a row without activity: the workers have nothing left.
        idle_checks += 1
        if idle_checks < 3:
            continue
        due = broker.next_expiry()
        if due is None or not follow_ttls:
            return
        await broker.clock.advance(max(0.0, due - broker.clock.now()))
        idle_checks = 0


async def _drain_waiting(broker: Broker, workers: list[Worker], queues: list[str]) -> None:
    quiet = 0
    while quiet < 3:  # three quiet looks in a row: nothing in flight between them
        lengths = [await broker.queue_length(q) for q in queues]
        quiet = quiet + 1 if not any(lengths) and all(w.idle for w in workers) else 0
        await anyio.sleep(0.02)


async def messages(app: Cuebx, queue: str, *, limit: int = 1000) -> list[OutgoingMessage]:
    """Return the messages ready in `queue`, oldest first, leaving them there.

    On RabbitMQ this reads with basic.get and puts them back, which marks them redelivered:
    use it on queues no worker consumes, such as dead-letter queues.
    """
    if not app.connected:
        await app.connect()
    return await app.broker.peek(queue, limit)


async def take(app: Cuebx, queue: str, *, timeout: float = 5.0) -> Delivery:  # noqa: ASYNC109
    """Consume one message from `queue` (waiting up to `timeout`), ack it and return it."""
    if not app.connected:
        await app.connect()
    taken: list[Delivery] = []
    arrived = anyio.Event()

    async def keep(delivery: Delivery) -> None:
        taken.append(delivery)
        arrived.set()

    subscription = await app.broker.consume(queue, 1, keep)
    try:
        with anyio.fail_after(timeout):
            await arrived.wait()
        # No next delivery may arrive after the ack, to be put back marked redelivered.
        await subscription.cancel()
        await taken[0].ack()
        return taken[0]
    finally:
        await subscription.close()


@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    """A message in a dead-letter queue, with why it is there."""

    reason: str
    error_type: str
    error: str
    task: str | None
    origin_queue: str | None
    attempt: int
    message_id: str
    arguments: Any
    headers: Mapping[str, Any]
    body: bytes


async def dead_letters(app: Cuebx, queue: str) -> list[DeadLetterRecord]:
    """Return what lies in the dead-letter queue of task queue `queue`, oldest first.

    `queue` is the task queue (``"emails"``); its dead-letter queue is looked up in the
    topology (``emails.dlq`` or a shared one). Arguments are decoded when they can be.
    """
    spec = app.topology().queue(queue)
    target = spec.dead_letter_queue if spec.role == "main" else queue
    if target is None:
        raise LookupError(f"queue {queue!r} has no dead-letter queue (dead_letter=False)")
    return [_record(m) for m in await messages(app, target)]


def _record(message: OutgoingMessage) -> DeadLetterRecord:
    headers = message.headers
    codec = codec_for_content_type(message.content_type)
    arguments = None
    if codec is not None:
        decode = msgspec.json.decode if codec.name == "json" else msgspec.msgpack.decode
        try:
            arguments = decode(message.body)
        except msgspec.DecodeError:
            pass
    return DeadLetterRecord(
        reason=str(headers.get(HEADER_REASON, "")),
        error_type=str(headers.get(HEADER_ERROR_TYPE, "")),
        error=str(headers.get(HEADER_ERROR, "")),
        task=headers.get(HEADER_TASK),
        origin_queue=headers.get(HEADER_ORIGIN_QUEUE),
        attempt=int(headers.get(HEADER_ATTEMPT, 0) or 0),
        message_id=message.message_id,
        arguments=arguments,
        headers=headers,
        body=message.body,
    )
