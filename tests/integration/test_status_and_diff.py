"""``cuebx.ops.status`` and ``cuebx.ops.diff``: queue depths and the plan against the broker,
without the management plugin, on RabbitMQ and in memory."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import anyio
import pytest

from cuebx.brokers.base import Delivery
from cuebx.message import OutgoingMessage
from cuebx.ops.diff import diff_topology, migration
from cuebx.ops.status import app_status, status, unacked_source
from cuebx.topology import Topology
from tests.conftest import AppFactory

pytestmark = pytest.mark.anyio


def _message(n: int) -> OutgoingMessage:
    return OutgoingMessage(
        body=b'{"n": %d}' % n,
        message_id=f"m{n}",
        correlation_id=f"m{n}",
        content_type="application/json",
        headers={},
        timestamp=datetime.now(UTC),
    )


async def _noop(n: int) -> None: ...


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_status_and_diff_report_a_deleted_tier(
    make_app: AppFactory, prefix: str, queue_type: str
) -> None:
    app = make_app(queue_type=queue_type)
    queue = f"{prefix}.jobs"
    tier, dlq = f"{queue}.retry.1m", f"{queue}.dlq"
    app.task(queue=queue, retries=["1m"], name="job")(_noop)
    await app.connect()
    broker = app.broker
    for n in range(2):
        await broker.publish("", dlq, _message(n))
    for n in range(3):
        await broker.publish("", queue, _message(n))
    before = await diff_topology(broker, app.topology())
    assert before.matches, [q.describe() for q in before.problems]

    await broker.delete(Topology(app.topology().exchange, (app.topology().queue(tier),)))
    held = anyio.Event()

    async def hold(delivery: Delivery) -> None:
        held.set()

    subscription = await broker.consume(queue, 1, hold)
    try:
        with anyio.fail_after(5):
            await held.wait()
        source = unacked_source(app.settings.url)
        found = await status(broker, app.topology(), unacked=source)
    finally:
        await subscription.close()
    [group] = found.groups
    assert (group.main.name, group.main.exists, group.main.consumers) == (queue, True, 1)
    assert group.main.ready == 2
    # rabbitmqctl reads a quorum queue's counters as of its last tick, a few seconds ago.
    lagging = queue_type == "quorum" and found.unacked_source == "rabbitmqctl"
    assert group.main.unacked in ((0, 1) if lagging else (1,))
    assert found.unacked_source in ("broker", "rabbitmqctl")
    assert [(t.name, t.exists, t.ready) for t in group.tiers] == [(tier, False, None)]
    assert group.dead_letter is not None
    assert (group.dead_letter.name, group.dead_letter.ready) == (dlq, 2)
    assert found.missing == (tier,)
    assert found.to_dict()["missing"] == [tier]

    after = await diff_topology(broker, app.topology())
    assert not after.matches
    assert [(q.name, q.state) for q in after.problems] == [(tier, "missing")]
    assert await broker.queue_state(tier) is None  # the diff created nothing


async def test_diff_names_every_differing_argument_and_prints_a_migration(
    make_app: AppFactory, prefix: str
) -> None:
    # Short names: RabbitMQ cuts a refusal's text at 255 bytes (see the test below).
    short = f"d{uuid.uuid4().hex[:6]}"
    queue = f"{short}.jobs"
    owner = make_app()
    owner.task(queue=queue, dead_letter=f"{short}.a", name="job")(_noop)
    await owner.connect()
    await owner.broker.publish("", queue, _message(1))

    planned = make_app(queue_type="quorum")
    planned.task(queue=queue, dead_letter=f"{short}.b", name="job")(_noop)
    found = await diff_topology(planned.broker, planned.topology())

    assert not found.matches
    states = {q.name: q.state for q in found.queues}
    assert states == {f"{short}.b": "missing", queue: "different"}
    main = next(q for q in found.queues if q.name == queue)
    assert not main.incomplete
    assert {d.argument: (d.wanted, d.current) for d in main.differences} == {
        "x-dead-letter-routing-key": (f"{short}.b", f"{short}.a"),
        "x-overflow": ("reject-publish", None),
        "x-queue-type": ("quorum", "classic"),
    }
    assert "argument 'x-queue-type': cuebx wants 'quorum', the broker has 'classic'" in (
        main.describe()
    )
    assert main.ready == 1
    steps = migration(main)
    assert any("shovel" in step and f"{queue}.migrate" in step for step in steps)
    assert not any("delete_queue" in step for step in steps[:3])
    assert await planned.broker.queue_state(f"{short}.b") is None
    assert found.to_dict()["queues"][1]["migration"] == list(steps)


async def test_diff_says_so_when_long_names_cut_rabbitmq_s_reply_short(
    make_rabbit_app: AppFactory, prefix: str
) -> None:
    queue = f"{prefix}.a-queue-name-long-enough-to-overrun-the-reply"
    owner = make_rabbit_app()
    owner.task(queue=queue, dead_letter=f"{queue}.one", name="job")(_noop)
    await owner.connect()
    planned = make_rabbit_app()
    planned.task(queue=queue, dead_letter=f"{queue}.two", name="job")(_noop)
    found = await diff_topology(planned.broker, planned.topology())
    main = next(q for q in found.queues if q.name == queue)
    assert (main.state, main.incomplete) == ("different", True)
    assert "RabbitMQ cut its reply short" in main.describe()
    assert [d.argument for d in main.differences] == ["x-dead-letter-routing-key"]


async def test_status_shows_the_delay_levels_that_hold_messages(
    make_app: AppFactory, prefix: str
) -> None:
    app = make_app(exchange=prefix)
    queue = f"{prefix}.later"
    job = app.task(queue=queue, name="job")(_noop)
    await app.connect()
    assert not [s for s in (await app_status(app)).sections if s.title == "delay"]
    await job.apply_async((1,), countdown="1h")
    found = await app_status(app)
    [delay] = [s for s in found.sections if s.title == "delay"]
    waiting = [(q.name, q.ready) for q in delay.queues if q.ready]
    # One hour at 100 ms units is 36,000 units: its highest level is 2^15 units.
    assert waiting == [(f"{prefix}.delay.15", 1)]
    assert delay.queues[-1].name == f"{prefix}.delay.unroutable"
    await app.broker.delete(app.delays.ladder.topology())
