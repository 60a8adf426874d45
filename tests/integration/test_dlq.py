"""``app.dlq``: list, show, replay, purge and export dead letters, on RabbitMQ and in memory,
with classic and quorum queues."""

from __future__ import annotations

import base64
import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest

from cuebx import Cuebx, Reject, TaskContext
from cuebx.message import OutgoingMessage, dead_letter_copy, new_message_id
from cuebx.ops.records import decode_body
from cuebx.topology import QueueSpec, Topology
from tests.conftest import AppFactory, wait_for

pytestmark = pytest.mark.anyio

QUEUE_TYPES = pytest.mark.parametrize("queue_type", ["classic", "quorum"])


def stamped(
    task: str,
    origin: str,
    *,
    reason: Any = "exhausted",
    body: bytes = b'{"n": 1}',
    message_id: str | None = None,
    failed_at: datetime | None = None,
    headers: dict[str, Any] | None = None,
) -> OutgoingMessage:
    """A message as a worker dead-letters it from `origin`."""
    message_id = message_id or new_message_id()
    message = OutgoingMessage(
        body=body,
        message_id=message_id,
        correlation_id=message_id,
        content_type="application/json",
        headers={"x-cuebx-task": task, "x-retry-attempt": 2, **(headers or {})},
        timestamp=datetime.now(UTC),
    )
    return dead_letter_copy(
        message, reason=reason, queue=origin, error=ValueError(f"{task} broke"), now=failed_at
    )


async def fill(app: Cuebx, queue: str, messages: list[OutgoingMessage]) -> None:
    await app.connect()
    errors = await app.broker.publish_many("", [(queue, m) for m in messages], window=256)
    assert errors == [None] * len(messages)


async def ready(app: Cuebx, queue: str) -> int:
    state = await app.broker.queue_state(queue)
    assert state is not None
    return state.ready


@QUEUE_TYPES
async def test_ls_groups_what_a_worker_dead_lettered_by_task_and_reason(
    make_app: AppFactory, prefix: str, queue_type: str
) -> None:
    app = make_app(queue_type=queue_type)
    queue, dlq = f"{prefix}.jobs", f"{prefix}.jobs.dlq"

    @app.task(queue=queue)
    async def refuse(n: int) -> None:
        raise Reject("not today")

    @app.task(queue=queue)
    async def crash(n: int) -> None:
        raise ValueError(f"crash {n}")

    worker = await app.start_consumers()
    for n in range(3):
        await refuse.delay(n)
    for n in range(2):
        await crash.delay(n)
    await app.broker.publish(
        "",
        queue,
        OutgoingMessage(
            body=b'{"n": "x"}',
            message_id="bad-args",
            correlation_id="bad-args",
            content_type="application/json",
            headers={"x-cuebx-task": "crash"},
            timestamp=datetime.now(UTC),
        ),
    )
    await wait_for(_count_is(app, dlq, 6), what="six dead letters")
    await worker.stop()

    listing = await app.dlq.ls()
    assert listing.queues == (dlq,)
    assert (listing.looked_at, listing.matched) == (6, 6)
    groups = {(g.task, g.reason): g.count for g in listing.groups}
    assert groups == {
        ("refuse", "rejected"): 3,
        ("crash", "exhausted"): 2,
        ("crash", "invalid-arguments"): 1,
    }
    biggest = listing.groups[0]
    assert (biggest.task, biggest.count) == ("refuse", 3)
    assert biggest.oldest is not None
    assert biggest.newest is not None
    assert biggest.oldest <= biggest.newest <= datetime.now(UTC)

    assert (await app.dlq.ls(queue, task="refuse")).matched == 3
    assert (await app.dlq.ls(dlq, reason="exhausted")).matched == 2
    assert (await app.dlq.ls(since="1h")).matched == 6
    assert (await app.dlq.ls(since=datetime.now(UTC) + timedelta(minutes=1))).matched == 0
    limited = await app.dlq.ls(limit=2)
    assert len(limited.messages) == 2
    assert limited.matched == 6
    # Browsing took nothing away.
    assert await ready(app, dlq) == 6


def _count_is(app: Cuebx, queue: str, count: int) -> Any:
    async def check() -> bool:
        return await ready(app, queue) == count

    return check


async def test_show_decodes_the_arguments_and_reads_the_error(
    make_app: AppFactory, prefix: str
) -> None:
    app = make_app(serializer="msgpack")
    queue, dlq = f"{prefix}.jobs", f"{prefix}.jobs.dlq"

    @app.task(queue=queue)
    async def crash(order: int, note: str) -> None:
        raise KeyError(f"order {order} is gone")

    worker = await app.start_consumers()
    handle = await crash.delay(42, "rush")
    await wait_for(_count_is(app, dlq, 1), what="the dead letter")
    await worker.stop()

    entry = await app.dlq.show(handle.id)
    assert (entry.message_id, entry.task, entry.reason) == (handle.id, "crash", "exhausted")
    assert (entry.queue, entry.origin_queue, entry.attempt) == (dlq, queue, 0)
    assert entry.error_type == "builtins.KeyError"
    assert "order 42 is gone" in entry.error
    assert entry.content_type == "application/msgpack"
    assert decode_body(entry.content_type, entry.body) == ({"order": 42, "note": "rush"}, None)
    assert entry.headers["x-cuebx-task"] == "crash"
    with pytest.raises(LookupError, match=f"no message 'nope' in '{dlq}'"):
        await app.dlq.show("nope")


@QUEUE_TYPES
async def test_purge_with_filters_removes_only_those_and_keeps_the_order(
    make_app: AppFactory, prefix: str, queue_type: str
) -> None:
    app = make_app(queue_type=queue_type)
    queue, dlq = f"{prefix}.jobs", f"{prefix}.jobs.dlq"
    app.task(queue=queue, name="a")(_noop)
    app.task(queue=queue, name="b")(_noop)
    messages = [stamped("ab"[i % 2], queue, message_id=f"m{i}") for i in range(10)]
    await fill(app, dlq, messages)

    with pytest.raises(ValueError, match="say which messages"):
        await app.dlq.purge()
    dry = await app.dlq.purge(task="a", dry_run=True)
    assert (dry.matched, dry.done, dry.dry_run) == (5, 5, True)
    assert await ready(app, dlq) == 10

    report = await app.dlq.purge(queue, task="a")
    assert (report.looked_at, report.matched, report.done) == (10, 5, 5)
    left = await app.dlq.ls()
    assert [m.message_id for m in left.messages] == [f"m{i}" for i in range(1, 10, 2)]
    assert {m.task for m in left.messages} == {"b"}

    assert (await app.dlq.purge(ids=["m3", "m7"])).done == 2
    assert (await app.dlq.purge(all=True)).done == 3
    assert await ready(app, dlq) == 0


async def _noop(n: int) -> None: ...


async def test_listing_a_quorum_dead_letter_queue_30_times_drops_nothing(
    make_app: AppFactory, prefix: str
) -> None:
    app = make_app(queue_type="quorum")
    queue, dlq = f"{prefix}.jobs", f"{prefix}.jobs.dlq"
    app.task(queue=queue, name="a")(_noop)
    await fill(app, dlq, [stamped("a", queue, message_id=f"m{i}") for i in range(5)])
    for _ in range(30):
        listing = await app.dlq.ls()
        assert [m.message_id for m in listing.messages] == [f"m{i}" for i in range(5)]
    assert await ready(app, dlq) == 5

    # The proof: a quorum queue whose delivery limit is 1 drops a message returned twice
    # (which is what peeking with basic.get and a requeue does), yet 30 listings keep all.
    strict = Topology(
        "cuebx",
        (
            QueueSpec(
                f"{prefix}.strict", "dead-letter", {"x-queue-type": "quorum", "x-delivery-limit": 1}
            ),
        ),
    )
    broker = app.broker
    await broker.declare(strict)
    try:
        await fill(
            app, f"{prefix}.strict", [stamped("a", queue, message_id=f"s{i}") for i in range(5)]
        )
        for _ in range(30):
            assert (await app.dlq.ls(f"{prefix}.strict")).matched == 5
        assert await ready(app, f"{prefix}.strict") == 5
        for _ in range(2):  # peek at the head message twice
            delivery = await broker.get(f"{prefix}.strict")
            assert delivery is not None
            await delivery.reject(requeue=True)
        await wait_for(_count_is(app, f"{prefix}.strict", 4), what="the peeked message dropped")
    finally:
        await broker.delete(strict)


@QUEUE_TYPES
async def test_replaying_1000_dead_letters_with_the_worker_running_runs_each_once(
    make_app: AppFactory, prefix: str, queue_type: str
) -> None:
    app = make_app(queue_type=queue_type)
    queue, dlq = f"{prefix}.jobs", f"{prefix}.jobs.dlq"
    runs: Counter[str] = Counter()
    seen: list[tuple[int, Any, str]] = []

    @app.task(queue=queue, prefetch=50)
    async def job(ctx: TaskContext, n: int) -> None:
        runs[ctx.message_id] += 1
        if n == 0:
            seen.append(
                (ctx.attempt, ctx.headers.get("x-cuebx-replayed"), ctx.headers.get("traceparent"))
            )

    trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    messages = [
        stamped(
            "job",
            queue,
            body=b'{"n": %d}' % i,
            message_id=f"m{i:04d}",
            headers={"traceparent": trace},
        )
        for i in range(1000)
    ]
    await fill(app, dlq, messages)
    worker = await app.start_consumers()
    try:
        report = await app.dlq.replay(all=True)
        assert (report.looked_at, report.done, report.targets) == (1000, 1000, {queue: 1000})
        await wait_for(lambda: len(runs) == 1000, timeout=30, what="1000 replayed tasks run")
    finally:
        await worker.stop()
    assert set(runs) == {m.message_id for m in messages}
    assert set(runs.values()) == {1}
    assert seen == [(0, 1, trace)]
    assert await ready(app, dlq) == 0


async def test_replay_goes_where_it_can_and_skips_what_it_cannot(
    make_app: AppFactory, prefix: str
) -> None:
    app = make_app()
    queue, other, dlq = f"{prefix}.jobs", f"{prefix}.other", f"{prefix}.jobs.dlq"
    app.task(queue=queue, name="a")(_noop)
    app.task(queue=other, name="b")(_noop)
    await fill(
        app,
        dlq,
        [
            stamped("a", queue, message_id="home"),
            stamped("a", f"{prefix}.gone", message_id="orphan"),
            stamped("a", queue, message_id="keep", reason="rejected"),
        ],
    )
    dry = await app.dlq.replay(reason="exhausted", dry_run=True)
    assert (dry.done, dry.targets) == (1, {queue: 1})
    assert dry.skipped == {f"queue '{prefix}.gone' does not exist": 1}
    assert await ready(app, dlq) == 3

    with pytest.raises(ValueError, match="a queue being replayed from"):
        await app.dlq.replay(all=True, to=dlq)
    report = await app.dlq.replay(ids=["home", "orphan"], to=other)
    assert (report.done, report.targets) == (2, {other: 2})
    assert await ready(app, other) == 2
    assert [m.message_id for m in (await app.dlq.ls()).messages] == ["keep"]
    copy = await app.broker.get(other)
    assert copy is not None
    await copy.ack()
    assert copy.message_id == "home"
    assert not any(
        k.startswith("x-cuebx-") and k != "x-cuebx-task" and k != "x-cuebx-replayed"
        for k in copy.headers
    )
    assert (copy.headers["x-retry-attempt"], copy.headers["x-cuebx-replayed"]) == (0, 1)


async def test_export_writes_every_dead_letter_as_a_json_line_and_keeps_them(
    make_app: AppFactory, prefix: str, tmp_path: Path
) -> None:
    app = make_app()
    queue, dlq = f"{prefix}.jobs", f"{prefix}.jobs.dlq"
    app.task(queue=queue, name="a")(_noop)
    await fill(
        app,
        dlq,
        [
            stamped("a", queue, message_id="text"),
            stamped("a", queue, message_id="binary", body=b"\xff\x00raw"),
        ],
    )
    report = await app.dlq.export(tmp_path / "dead.jsonl")
    assert (report.looked_at, report.done) == (2, 2)
    lines = [json.loads(line) for line in (tmp_path / "dead.jsonl").read_text().splitlines()]
    assert [line["message_id"] for line in lines] == ["text", "binary"]
    assert (lines[0]["body"], lines[0]["body_encoding"]) == ('{"n": 1}', "utf-8")
    assert base64.b64decode(lines[1]["body"]) == b"\xff\x00raw"
    assert lines[1]["body_encoding"] == "base64"
    assert lines[0]["reason"] == "exhausted"
    assert lines[0]["headers"]["x-cuebx-task"] == "a"
    assert msgspec.json.decode(json.dumps(lines[0]["failed_at"]).encode(), type=datetime)
    assert await ready(app, dlq) == 2


async def test_replaying_the_delay_ladder_s_unroutable_queue_delivers_to_the_destination() -> None:
    app = Cuebx("memory://")

    @app.task(queue="later")
    async def remind(n: int) -> None: ...

    async with app:
        await remind.apply_async((1,), countdown="3s")
        await app.broker.delete(app.topology())  # the queue goes away while the message waits
        unroutable = app.delays.ladder.unroutable
        await wait_for(lambda: _depth(app, unroutable, 1), what="the message in unroutable")
        await app.declare()  # the queue is back
        listing = await app.dlq.ls(unroutable)
        assert [m.origin_queue for m in listing.messages] == ["later"]
        report = await app.dlq.replay(unroutable, all=True)
        assert report.done == 1
        assert await app.broker.queue_length("later") == 1
        assert await app.broker.queue_length(unroutable) == 0
        # A ladder level is never a replay target: it would drop what it was given.
        refused = await app.dlq.replay("later", all=True, to=f"{app.settings.exchange}.delay.3")
        assert refused.done == 0
        assert await app.broker.queue_length("later") == 1


async def _depth(app: Cuebx, queue: str, count: int) -> bool:
    return await app.broker.queue_length(queue) == count
