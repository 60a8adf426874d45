"""`diff_topology`: the live broker against the app's plan, before a deploy.

Without the management plugin, AMQP can still tell a queue's state: a passive
``queue.declare`` says whether it exists, and declaring it again on a scratch channel with
the planned arguments either succeeds (it matches) or is refused with PRECONDITION_FAILED
naming one argument and both values; the broker's value goes into the next try, until one
succeeds (`cuebx.brokers.base.Broker.compare_queue`). Nothing missing is created.
`cuebx.topology.diff` then compares the plan with what was learnt, as RabbitMQ would, and
`cuebx.topology.describe_differences` words it.

A queue whose arguments differ is never "fixed" here: RabbitMQ cannot change a queue's
arguments, and deleting a queue drops its messages. `migration` says what an operator runs
instead. Bindings are not compared: AMQP cannot list them (``cuebx worker`` binds every
queue at start, which is idempotent).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from cuebx.brokers.base import UNREADABLE, Broker
from cuebx.topology import ArgumentDifference, QueueSpec, Topology, describe_differences, diff

__all__ = ["ExchangeDifference", "QueueDifference", "TopologyDiff", "diff_topology", "migration"]

State = Literal["ok", "missing", "different"]


@dataclass(frozen=True, slots=True)
class QueueDifference:
    """How one planned queue compares with the broker's.

    Attributes:
        name: the queue.
        role: ``main``, ``retry``, ``dead-letter``, or another role of the plan.
        state: ``ok``, ``missing`` or ``different``.
        differences: the arguments that differ.
        durable: False when the broker's queue is not durable (cuebx's are), else None.
        ready: messages ready in it, when it exists.
        consumers: its consumers, when it exists.
        incomplete: RabbitMQ cut a reply short (long names), so arguments after the last
            one named were not compared.
    """

    name: str
    role: str
    state: State
    differences: tuple[ArgumentDifference, ...] = ()
    durable: bool | None = None
    ready: int | None = None
    consumers: int | None = None
    incomplete: bool = False

    def describe(self) -> str:
        """One line: what is wrong, in the words of a `TopologyConflictError`."""
        if self.state == "missing":
            return "missing (the next `cuebx worker` or app.connect() declares it)"
        words = [describe_differences(self.differences)] if self.differences else []
        if self.durable is False:
            words.append("the broker's queue is not durable; cuebx's are")
        if self.incomplete:
            words.append(
                "RabbitMQ cut its reply short (long names), so later arguments were not "
                "compared: rabbitmqctl list_queues name arguments shows them all"
            )
        return "; ".join(words) or "matches"

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for ``--json``."""
        return {
            "name": self.name,
            "role": self.role,
            "state": self.state,
            "differences": [
                {"argument": d.argument, "wanted": d.wanted, "current": d.current}
                for d in self.differences
            ],
            "durable": self.durable,
            "ready": self.ready,
            "consumers": self.consumers,
            "incomplete": self.incomplete,
            "detail": self.describe(),
            "migration": list(migration(self)),
        }


@dataclass(frozen=True, slots=True)
class ExchangeDifference:
    """How the app's exchange compares: ``current`` holds the broker's differing values."""

    name: str
    state: State
    current: dict[str, Any]

    def describe(self) -> str:
        if self.state == "missing":
            return "missing (the next `cuebx worker` or app.connect() declares it)"
        wanted = {"type": "direct", "durable": True}
        return (
            "; ".join(
                f"{key}: cuebx wants {wanted.get(key)!r}, the broker has {value!r}"
                for key, value in sorted(self.current.items())
            )
            or "matches"
        )


@dataclass(frozen=True, slots=True)
class TopologyDiff:
    """The whole comparison: `matches` is what ``cuebx topology diff`` exits on."""

    exchange: ExchangeDifference
    queues: tuple[QueueDifference, ...]

    @property
    def matches(self) -> bool:
        """True when the broker has everything the plan declares, as planned."""
        return self.exchange.state == "ok" and all(q.state == "ok" for q in self.queues)

    @property
    def problems(self) -> tuple[QueueDifference, ...]:
        """The queues that are missing or different."""
        return tuple(q for q in self.queues if q.state != "ok")

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for ``--json``."""
        return {
            "matches": self.matches,
            "exchange": {
                "name": self.exchange.name,
                "state": self.exchange.state,
                "detail": self.exchange.describe(),
            },
            "queues": [q.to_dict() for q in self.queues],
        }


async def diff_topology(broker: Broker, topology: Topology) -> TopologyDiff:
    """Compare every exchange and queue of `topology` with the broker, changing nothing.

    Raises:
        BrokerUnavailableError: the broker cannot be reached.
        TopologyError: RabbitMQ refused a comparison for another reason (a queue in
            exclusive use by another connection, permissions).
    """
    await broker.connect()
    current = await broker.compare_exchange(topology.exchange, "direct")
    exchange = ExchangeDifference(
        topology.exchange,
        "missing" if current is None else "different" if current else "ok",
        current or {},
    )
    return TopologyDiff(exchange, tuple([await _queue(broker, q) for q in topology.queues]))


async def _queue(broker: Broker, spec: QueueSpec) -> QueueDifference:
    found = await broker.compare_queue(spec.name, spec.arguments)
    if found is None:
        return QueueDifference(spec.name, spec.role, "missing")
    durable = found.pop("durable", None)
    found.pop("auto_delete", None)
    incomplete = any(value is UNREADABLE for value in found.values())
    theirs = {**spec.arguments, **found}
    theirs = {k: v for k, v in theirs.items() if v is not None}
    differences = diff(spec.arguments, theirs)
    state = await broker.queue_state(spec.name)
    return QueueDifference(
        spec.name,
        spec.role,
        "different" if differences or durable is False or incomplete else "ok",
        differences,
        False if durable is False else None,
        None if state is None else state.ready,
        None if state is None else state.consumers,
        incomplete,
    )


def migration(difference: QueueDifference) -> tuple[str, ...]:
    """What an operator runs to give a differing queue its planned arguments.

    RabbitMQ never changes the arguments of a queue, so the queue must be deleted and
    declared again; its messages are moved aside first, never dropped. An empty queue with
    no consumer can simply be deleted (the next deploy declares it).
    """
    if difference.state != "different":
        return ()
    q = difference.name
    if difference.role == "limit":
        return (
            f"{q} is a rate limiter's queue and holds only permits, which expire within one "
            f"window: delete it (rabbitmqctl delete_queue {q}) and deploy. Until the new "
            "version declares it, limited handlers are held back (a permit cannot be "
            "asked for), never run past the limit; the workers of the old version declare "
            "it again with their rate, so stop them first.",
        )
    if not difference.ready and not difference.consumers:
        return (
            f"{q} is empty and nothing consumes it: delete it (rabbitmqctl delete_queue {q}) "
            "and deploy; the new version declares it with the planned arguments. A publish "
            "meanwhile is refused as unroutable (cuebx publishes are mandatory), not lost.",
        )
    steps = [
        f"{q} holds messages or has consumers; move them through a temporary queue:",
        f"1. stop what consumes {q} (for a retry tier or dead-letter queue, the workers of its "
        "task queue)",
        "2. rabbitmq-plugins enable rabbitmq_shovel   (once per cluster)",
        f"3. rabbitmqctl set_parameter shovel {q}-out "
        + _shovel(q, f"{q}.migrate")
        + f"   (moves what {q} holds, then stops)",
        f"4. once {q} shows 0 messages (rabbitmqctl list_queues name messages): "
        f"rabbitmqctl delete_queue {q}",
        f"5. deploy: the new version declares {q} with the planned arguments",
        f"6. rabbitmqctl set_parameter shovel {q}-back "
        + _shovel(f"{q}.migrate", q)
        + f", then rabbitmqctl delete_queue {q}.migrate",
    ]
    if difference.role == "main":
        steps.append(
            f"or, without a pause: give its tasks a new queue (queue='{q}.v2'), deploy, let "
            f"the old workers drain {q}, then delete it"
        )
    return tuple(steps)


def _shovel(source: str, destination: str) -> str:
    return (
        f'\'{{"src-uri": "amqp://", "src-queue": "{source}", "dest-uri": "amqp://", '
        f'"dest-queue": "{destination}", "src-delete-after": "queue-length"}}\''
    )
