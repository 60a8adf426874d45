"""The AMQP broker's pure parts: reply texts, batched acks under faults (no broker needed)."""

from __future__ import annotations

import asyncio

import aiormq
import anyio
import pytest

from cuebx.brokers.amqp import _Acks, _precondition_detail


@pytest.mark.parametrize(
    ("reply", "detail"),
    [
        (
            "PRECONDITION_FAILED - inequivalent arg 'x-message-ttl' for queue 'q.retry.5s' in "
            "vhost '/': received the value '10000' of type 'signedint' but current is the "
            "value '5000' of type 'long'",
            "argument 'x-message-ttl': cuebx wants 10000, the broker has 5000",
        ),
        (
            "PRECONDITION_FAILED - inequivalent arg 'x-message-ttl' for queue 'q.retry.5s' in "
            "vhost '/': received '2000' but current is '1000'",
            "argument 'x-message-ttl': cuebx wants 2000, the broker has 1000",
        ),
        (
            "PRECONDITION_FAILED - inequivalent arg 'x-dead-letter-routing-key' for queue 'q' "
            "in vhost '/': received the value 'q.other' of type 'longstr' but current is the "
            "value 'q.dlq' of type 'longstr'",
            "argument 'x-dead-letter-routing-key': cuebx wants 'q.other', the broker has 'q.dlq'",
        ),
        (
            "PRECONDITION_FAILED - inequivalent arg 'x-dead-letter-routing-key' for queue 'q' "
            "in vhost '/': received 'it's' but current is ''",
            "argument 'x-dead-letter-routing-key': cuebx wants \"it's\", the broker has ''",
        ),
        (
            "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'q' in vhost "
            "'/': received the value 'quorum' of type 'longstr' but current is none",
            "argument 'x-queue-type': cuebx wants 'quorum', the broker has none",
        ),
        (
            "PRECONDITION_FAILED - inequivalent arg 'x-max-priority' for queue 'q' in vhost "
            "'/': received none but current is the value '5' of type 'signedint'",
            "argument 'x-max-priority': cuebx wants none, the broker has 5",
        ),
        (
            "PRECONDITION_FAILED - inequivalent arg 'x-dead-letter-routing-key' for queue 'q' "
            "in vhost '/': received the value '007' of type 'longstr' but current is the "
            "value '-5' of type 'longstr'",
            "argument 'x-dead-letter-routing-key': cuebx wants '007', the broker has -5",
        ),
        (
            "PRECONDITION_FAILED - invalid arg 'x-message-ttl' for queue 'q'",
            "PRECONDITION_FAILED - invalid arg 'x-message-ttl' for queue 'q'",
        ),
    ],
    ids=[
        "an integer reads as a number",
        "values RabbitMQ quotes without their type read the same",
        "a string reads quoted",
        "quotes inside a value and an empty value are kept",
        "a missing current value reads none",
        "a missing wanted value reads none",
        "only text that is exactly an integer reads as one",
        "a reply naming no inequivalent argument is kept as it is",
    ],
)
def test_a_precondition_failure_reads_like_a_topology_diff(reply: str, detail: str) -> None:
    error = aiormq.exceptions.ChannelPreconditionFailed(reply)

    assert _precondition_detail(error) == detail


class _ChannelClosedUnder:
    """An aiormq channel whose connection aiormq closed after a missed heartbeat: it fails
    pending frames with the reader's CancelledError (a stand-in for that one fault)."""

    def __init__(self) -> None:
        self.acked: list[tuple[int, bool]] = []

    async def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        self.acked.append((delivery_tag, multiple))
        raise asyncio.CancelledError()


@pytest.mark.anyio
async def test_acks_whose_connection_died_with_a_cancelled_error_fail_instead_of_hanging() -> None:
    acks = _Acks(_ChannelClosedUnder())  # type: ignore[arg-type]
    with anyio.fail_after(5):  # before the fix, every ack waited forever
        results = await asyncio.gather(
            *(acks.ack(tag) for tag in (1, 2, 3)), return_exceptions=True
        )
    assert all(isinstance(r, ConnectionError) for r in results), results
    # A later ack gets a sender of its own, not a dead one.
    with anyio.fail_after(5), pytest.raises(ConnectionError):
        await acks.ack(4)


@pytest.mark.anyio
async def test_a_cancelled_ack_caller_still_lets_the_others_finish() -> None:
    channel = _ChannelClosedUnder()
    acks = _Acks(channel)  # type: ignore[arg-type]
    first = asyncio.ensure_future(acks.ack(1))
    second = asyncio.ensure_future(acks.ack(2))
    await asyncio.sleep(0)
    first.cancel()
    with anyio.fail_after(5), pytest.raises(ConnectionError):
        await second
