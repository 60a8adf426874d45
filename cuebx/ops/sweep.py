"""One pass over a queue that leaves it as it was, except for what was meant to change.

Every dead-letter operation, browsing included, is a `sweep`: it takes each message that
was ready when the sweep began (``basic.get``), asks `decide` what to do with it, and

- `Keep`: publishes a confirmed copy to the tail of the same queue, then acks the original;
- `Move`: publishes a confirmed copy elsewhere (a replay), then acks the original;
- `Remove`: acks it (a purge).

Why rotate instead of peeking (``basic.get`` and requeue)? A requeued message is a
returned one: a quorum queue counts each return against its delivery limit, which
RabbitMQ 4 sets to 20 by default, and drops the message (or dead-letters it onwards) past
it; a dead-letter queue has nowhere further to go, so a few listings would destroy it. A
confirmed copy followed by an ack never returns anything, so no count grows, on any queue
type or version, without a change to how queues are declared. The original is acked only
once its copy is confirmed, so a sweep killed at any point leaves every message in place,
at worst twice (the unacked originals of the batch come back when the connection drops).
After a whole sweep the kept messages are in their first order, behind any that arrived
meanwhile.

Messages are taken in batches of at most `window`: that many are unacked at once, and a
cancelled sweep puts its unsettled batch back before it ends.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import anyio

from cuebx.brokers.base import Broker, Delivery
from cuebx.errors import PublishError
from cuebx.message import OutgoingMessage

__all__ = ["Decide", "Keep", "Move", "Plan", "Progress", "Remove", "kept_copy", "sweep"]


@dataclass(frozen=True, slots=True)
class Keep:
    """Leave the message in its queue (as a confirmed copy at the tail)."""


@dataclass(frozen=True, slots=True)
class Move:
    """Publish `message` to `queue` (by the default exchange), confirmed; remove the original."""

    queue: str
    message: OutgoingMessage


@dataclass(frozen=True, slots=True)
class Remove:
    """Remove the message."""


Plan = Keep | Move | Remove
Decide = Callable[[Delivery], Awaitable[Plan]]
Progress = Callable[[int, int], None]
"""Called after each batch with (messages looked at, messages there were at the start)."""

#: Headers a broker adds on delivery, not part of the message: dropped from a kept copy.
_DELIVERY_HEADERS = frozenset({"x-delivery-count"})


def kept_copy(delivery: Delivery) -> OutgoingMessage:
    """The message of `delivery` as it was stored, to publish again.

    Everything is kept, RabbitMQ's ``x-death`` and ``x-first-death-*`` headers included,
    except the delivery count a quorum queue adds on delivery. A message without a
    timestamp gets the current time (the protocol's messages always have one).
    """
    headers = {k: v for k, v in delivery.headers.items() if k not in _DELIVERY_HEADERS}
    return OutgoingMessage(
        body=delivery.body,
        message_id=delivery.message_id or "",
        correlation_id=delivery.correlation_id or "",
        content_type=delivery.content_type,
        headers=headers,
        timestamp=delivery.timestamp or datetime.now(UTC),
        priority=delivery.priority,
    )


async def sweep(
    broker: Broker,
    queue: str,
    decide: Decide,
    *,
    window: int = 64,
    rate: float | None = None,
    progress: Progress | None = None,
) -> int:
    """Visit each message ready in `queue` now, once, and carry out what `decide` says.

    Args:
        broker: a connected broker.
        queue: the queue to sweep.
        decide: called once per message, in queue order.
        window: messages taken (and unacked) at once.
        rate: at most this many `Move` per second, for replays into busy queues.
        progress: told after each batch how far the sweep is.

    Returns:
        How many messages it looked at.

    Raises:
        LookupError: the queue does not exist.
        PublishError: some copies were not confirmed; their originals were put back and
            the sweep stopped (nothing is lost).
    """
    state = await broker.queue_state(queue)
    if state is None:
        raise LookupError(f"queue {queue!r} does not exist")
    total = remaining = state.ready
    batch_size = max(1, min(window, int(rate / 4) if rate else window))
    started = anyio.current_time()
    looked = moved = 0
    while remaining > 0:
        taken = await _take(broker, queue, min(batch_size, remaining))
        if not taken:
            break  # someone else took the rest
        remaining -= len(taken)
        moved += await _carry_out(broker, queue, taken, decide)
        looked += len(taken)
        if progress is not None:
            progress(looked, total)
        if rate and moved:
            await anyio.sleep(max(0.0, started + moved / rate - anyio.current_time()))
    return looked


async def _take(broker: Broker, queue: str, count: int) -> list[Delivery]:
    taken: list[Delivery] = []
    try:
        while len(taken) < count:
            delivery = await broker.get(queue)
            if delivery is None:
                break
            taken.append(delivery)
    except BaseException:
        await _put_back(taken)
        raise
    return taken


async def _carry_out(broker: Broker, queue: str, taken: list[Delivery], decide: Decide) -> int:
    """Decide, publish the copies, then settle the batch; return how many were moved."""
    unsettled = list(taken)
    try:
        plans = [await decide(delivery) for delivery in taken]
        copies = [
            (plan.queue, plan.message) if isinstance(plan, Move) else (queue, kept_copy(d))
            for d, plan in zip(taken, plans, strict=True)
            if not isinstance(plan, Remove)
        ]
        errors = iter(await broker.publish_many("", copies, window=len(copies)) if copies else [])
        failed: list[BaseException] = []
        for delivery, plan in zip(taken, plans, strict=True):
            error = None if isinstance(plan, Remove) else next(errors)
            if error is None:
                await delivery.ack()
                unsettled.remove(delivery)
            else:
                failed.append(error)
    finally:
        # Not confirmed, or interrupted: back where they were, never lost.
        await _put_back(unsettled)
    if failed:
        raise PublishError(
            f"{len(failed)} of {len(taken)} copies from {queue!r} were not confirmed, so "
            f"their messages stay in {queue!r}; stopped (first error: {failed[0]})"
        )
    return sum(1 for plan in plans if isinstance(plan, Move))


async def _put_back(deliveries: list[Delivery]) -> None:
    with anyio.CancelScope(shield=True):
        for delivery in deliveries:
            await delivery.reject(requeue=True)
