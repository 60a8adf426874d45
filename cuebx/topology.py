"""The broker topology as a value: which exchange and queues exist, with which arguments.

Every naming rule and every ``x-`` argument cuebx uses lives here, as pure functions, so the
topology can be printed, diffed and tested without a broker. For a queue ``Q`` with retries
``[30s, 5m]``::

    publisher ──▶ exchange "cuebx" (direct) ──key Q──▶ Q ──▶ worker
                                                       │ handler fails
                        ┌──────────────────────────────┘ (worker publishes a copy)
                        ▼
           Q.retry.30s / Q.retry.5m   (x-message-ttl; when it expires RabbitMQ
                        │              dead-letters the message back to Q)
                        └──────────────▶ Q
           Q.dlq   ◀── last attempt failed, Reject, invalid input (worker publishes a copy)
                   ◀── rejected / delivery limit reached (RabbitMQ dead-letters from Q)

Beyond that one direct exchange, a topology can hold exchanges of any type (`ExchangeSpec`)
and bindings between exchanges and queues or other exchanges (`Binding`): the delay ladder
(`cuebx.delays`) is built from them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from cuebx.durations import label
from cuebx.errors import ConfigurationError

__all__ = [
    "ArgumentDifference",
    "Binding",
    "DestinationType",
    "ExchangeSpec",
    "ExchangeType",
    "QueueRoute",
    "QueueSpec",
    "QueueType",
    "Topology",
    "dead_letter_queue_name",
    "describe_differences",
    "diff",
    "plan",
    "retry_queue_name",
]

QueueType = Literal["classic", "quorum"]
QueueRole = Literal[
    "main", "retry", "dead-letter", "scheduler", "delay", "unroutable", "events", "limit"
]
ExchangeType = Literal["direct", "topic", "headers", "fanout"]
DestinationType = Literal["queue", "exchange"]


def retry_queue_name(queue: str, delay_ms: int) -> str:
    """Name the retry tier of `queue` for a delay: ``emails.retry.30s``."""
    return f"{queue}.retry.{label(delay_ms)}"


def dead_letter_queue_name(queue: str, dead_letter: bool | str) -> str | None:
    """Name the dead-letter queue of `queue`: ``emails.dlq``, a shared name, or None."""
    if dead_letter is True:
        return f"{queue}.dlq"
    if dead_letter is False:
        return None
    return dead_letter


@dataclass(frozen=True, slots=True)
class QueueRoute:
    """What one task asks of its queue; several tasks on one queue are merged by `plan`."""

    task: str
    queue: str
    retry_delays_ms: tuple[int, ...] = ()
    dead_letter: bool | str = True
    queue_type: QueueType | None = None
    routing_keys: tuple[str, ...] = ()
    prefetch: int | None = None
    #: At most this many handlers of the queue at once, across all workers: the queue gets
    #: ``x-single-active-consumer`` and the active consumer a prefetch of this.
    concurrency: int | None = None
    #: True for a subscriber (``@app.on``): it takes the queue's messages that name no task.
    subscriber: bool = False


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """One queue to declare: durable, with its arguments and its bindings on the exchange."""

    name: str
    role: QueueRole
    arguments: Mapping[str, Any]
    queue_type: QueueType = "classic"
    routing_keys: tuple[str, ...] = ()
    prefetch: int | None = None
    tasks: tuple[str, ...] = ()
    retry_tiers: tuple[str, ...] = ()
    dead_letter_queue: str | None = None
    #: Handlers of this queue at once across all workers (a task's ``concurrency=``): the
    #: prefetch of its single active consumer, whatever a worker's own prefetch says.
    concurrency: int | None = None
    #: The task that takes the messages naming no task (``x-cuebx-task``): the queue's
    #: subscriber, since an event reaches many queues and cannot name one.
    subscriber: str | None = None


@dataclass(frozen=True, slots=True)
class ExchangeSpec:
    """One durable exchange to declare, of a type, with its arguments.

    Attributes:
        name: the exchange's name.
        type: ``direct``, ``topic`` (``*`` one word, ``#`` zero or more), ``headers``
            (matched on the bindings' arguments) or ``fanout``.
        arguments: e.g. ``alternate-exchange``: where RabbitMQ sends what this exchange
            itself routes nowhere, instead of dropping or returning it.
    """

    name: str
    type: ExchangeType = "direct"
    arguments: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Binding:
    """One binding: what exchange `source` routes for `routing_key` goes to `destination`.

    Attributes:
        source: the exchange the binding belongs to.
        destination: a queue, or an exchange (an exchange-to-exchange binding, which
            RabbitMQ follows on publish and on dead-lettering alike).
        routing_key: the key (direct), the pattern (topic), or ignored (headers, fanout).
        arguments: a headers exchange matches on these: ``x-match`` (``all`` or ``any``)
            and the headers to compare; RabbitMQ ignores headers starting with ``x-``.
        destination_type: ``queue`` or ``exchange``.
    """

    source: str
    destination: str
    routing_key: str = ""
    arguments: Mapping[str, Any] = field(default_factory=dict)
    destination_type: DestinationType = "queue"


@dataclass(frozen=True, slots=True)
class Topology:
    """Everything cuebx declares, in declaration order.

    The direct `exchange` comes first, then `exchanges`, then `queues` (each bound to
    `exchange` by its routing keys), then `bindings`. Dead-letter queues come first and
    main queues last, so that every queue a ``x-dead-letter-routing-key`` names exists
    before a message could be dead-lettered to it; exchanges come before queues for the
    same reason (``x-dead-letter-exchange``).
    """

    exchange: str
    queues: tuple[QueueSpec, ...]
    exchanges: tuple[ExchangeSpec, ...] = ()
    bindings: tuple[Binding, ...] = ()
    _by_name: Mapping[str, QueueSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {q.name: q for q in self.queues})

    def queue(self, name: str) -> QueueSpec:
        """Return the spec of one queue by name."""
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"queue {name!r} is not part of the topology") from None

    @property
    def main_queues(self) -> tuple[QueueSpec, ...]:
        """The queues tasks are consumed from."""
        return tuple(q for q in self.queues if q.role == "main")

    def extend(
        self,
        *,
        queues: Iterable[QueueSpec] = (),
        exchanges: Iterable[ExchangeSpec] = (),
        bindings: Iterable[Binding] = (),
    ) -> Topology:
        """Add what a capability needs (events, rate limits) to a planned topology.

        The new queues come first: they dead-letter nowhere, so nothing they name must
        exist before them, while bindings may name any queue of the result.

        Raises:
            ConfigurationError: a new queue has the name of another queue of the plan.
        """
        extra = tuple(queues)
        if not (extra or exchanges or bindings):
            return self
        merged = (*extra, *self.queues)
        _check_unique(merged)
        return Topology(
            self.exchange,
            merged,
            (*self.exchanges, *exchanges),
            (*self.bindings, *bindings),
        )


def plan(
    routes: Iterable[QueueRoute],
    *,
    exchange: str = "cuebx",
    queue_type: QueueType = "classic",
    delivery_limit: int | None = 10,
    max_priority: int | None = None,
) -> Topology:
    """Compute the topology for a set of task routes.

    Raises:
        ConfigurationError: two tasks on one queue disagree on its queue type, dead-letter
            queue or prefetch, or a queue name collides with a tier or dead-letter name.
    """
    merged: dict[str, list[QueueRoute]] = {}
    for route in routes:
        merged.setdefault(route.queue, []).append(route)

    mains: list[QueueSpec] = []
    tiers: list[QueueSpec] = []
    dead_letters: dict[str, QueueSpec] = {}
    for name, group in merged.items():
        qtype = _agree(name, group, "queue_type", default=queue_type)
        dead_letter = _agree(name, group, "dead_letter", default=True)
        # Concurrency first: it sets the prefetch too, and a clash should name what was set.
        concurrency = _agree(name, group, "concurrency", default=None)
        prefetch = _agree(name, group, "prefetch", default=None)
        subscriber = _subscriber(name, group)
        delays = sorted({ms for r in group for ms in r.retry_delays_ms})
        dlq = dead_letter_queue_name(name, dead_letter)
        quorum = qtype == "quorum"
        tier_names = tuple(retry_queue_name(name, ms) for ms in delays)
        for ms, tier in zip(delays, tier_names, strict=True):
            tiers.append(QueueSpec(tier, "retry", _tier_arguments(name, ms, quorum=quorum), qtype))
        if dlq is not None:
            spec = QueueSpec(dlq, "dead-letter", _type_arguments(quorum), qtype)
            if dead_letters.setdefault(dlq, spec) != spec:
                raise ConfigurationError(
                    f"dead-letter queue {dlq!r} is shared by classic and quorum queues; "
                    f"queue {name!r} is {qtype}: give them one queue_type or separate "
                    "dead-letter queues"
                )
        keys = tuple(dict.fromkeys((name, *(k for r in group for k in r.routing_keys))))
        mains.append(
            QueueSpec(
                name,
                "main",
                _main_arguments(
                    dlq,
                    quorum=quorum,
                    delivery_limit=delivery_limit,
                    max_priority=max_priority,
                    single_active=concurrency is not None,
                ),
                queue_type=qtype,
                routing_keys=keys,
                prefetch=concurrency or prefetch,
                tasks=tuple(r.task for r in group),
                retry_tiers=tier_names,
                dead_letter_queue=dlq,
                concurrency=concurrency,
                subscriber=subscriber,
            )
        )
    queues = (*dead_letters.values(), *tiers, *mains)
    _check_unique(queues)
    return Topology(exchange, queues)


def _agree(queue: str, group: list[QueueRoute], option: str, *, default: Any) -> Any:
    """Return the one value the tasks of a queue set for `option`, or the default."""
    chosen = {(r.task, getattr(r, option)) for r in group if getattr(r, option) is not None}
    values = {value for _, value in chosen}
    if len(values) > 1:
        detail = ", ".join(f"task {t!r} has {option}={v!r}" for t, v in sorted(chosen, key=str))
        raise ConfigurationError(f"tasks on queue {queue!r} disagree: {detail}")
    return values.pop() if values else default


def _subscriber(queue: str, group: list[QueueRoute]) -> str | None:
    """The one subscriber of a queue, if any.

    One message reaches a queue once however many of its bindings match, so two
    subscribers on one queue would share each event instead of each getting it.
    """
    subscribers = [r.task for r in group if r.subscriber]
    if len(subscribers) > 1:
        raise ConfigurationError(
            f"subscribers {', '.join(map(repr, subscribers))} share queue {queue!r}: each "
            "subscriber needs a queue of its own (an event reaches a queue once, so they "
            "would split it between them); give each its own queue="
        )
    return subscribers[0] if subscribers else None


def _check_unique(queues: Iterable[QueueSpec]) -> None:
    seen: dict[str, QueueSpec] = {}
    for spec in queues:
        other = seen.get(spec.name)
        if other is not None and other != spec:
            raise ConfigurationError(
                f"queue name {spec.name!r} is used both as a {other.role} queue and as a "
                f"{spec.role} queue; rename the task queue or the dead-letter queue"
            )
        seen[spec.name] = spec


def _type_arguments(quorum: bool) -> dict[str, Any]:
    return {"x-queue-type": "quorum"} if quorum else {}


def _main_arguments(
    dlq: str | None,
    *,
    quorum: bool,
    delivery_limit: int | None,
    max_priority: int | None,
    single_active: bool = False,
) -> dict[str, Any]:
    args = _type_arguments(quorum)
    if single_active:
        # One consumer at a time gets deliveries, with `concurrency` as its prefetch: at
        # most that many handlers run, whichever worker holds the queue.
        args["x-single-active-consumer"] = True
    if dlq is not None:
        args["x-dead-letter-exchange"] = ""
        args["x-dead-letter-routing-key"] = dlq
    if quorum:
        # A classic queue's dead-letter hop is not confirmed; the quorum one is, but only
        # with reject-publish overflow. The delivery limit stops a message that crashes
        # every worker from cycling: RabbitMQ dead-letters it to the DLQ instead.
        args["x-dead-letter-strategy"] = "at-least-once"
        args["x-overflow"] = "reject-publish"
        if delivery_limit is not None:
            args["x-delivery-limit"] = delivery_limit
    elif max_priority is not None:
        # Quorum queues of RabbitMQ 3.10-3.12 refuse x-max-priority, so it is classic only.
        args["x-max-priority"] = max_priority
    return args


def _tier_arguments(queue: str, ms: int, *, quorum: bool) -> dict[str, Any]:
    args = _type_arguments(quorum)
    args["x-message-ttl"] = ms
    args["x-dead-letter-exchange"] = ""
    args["x-dead-letter-routing-key"] = queue
    if quorum:
        args["x-dead-letter-strategy"] = "at-least-once"
        args["x-overflow"] = "reject-publish"
    return args


# -- comparing with what the broker has ----------------------------------------------------

#: The queue arguments RabbitMQ compares when a queue of that type is declared again (its
#: ``queue_arguments`` capability); it ignores the others, e.g. a classic queue's
#: ``x-delivery-limit``.
_CHECKED_ARGUMENTS: Final[Mapping[str, frozenset[str]]] = {
    "classic": frozenset(
        {
            "x-dead-letter-exchange",
            "x-dead-letter-routing-key",
            "x-expires",
            "x-max-length",
            "x-max-length-bytes",
            "x-max-priority",
            "x-message-ttl",
            "x-overflow",
            "x-queue-master-locator",
            "x-queue-mode",
            "x-queue-type",
            "x-queue-version",
            "x-single-active-consumer",
        }
    ),
    "quorum": frozenset(
        {
            "x-dead-letter-exchange",
            "x-dead-letter-routing-key",
            "x-dead-letter-strategy",
            "x-delivery-limit",
            "x-expires",
            "x-max-in-memory-bytes",
            "x-max-in-memory-length",
            "x-max-length",
            "x-max-length-bytes",
            "x-message-ttl",
            "x-overflow",
            "x-queue-leader-locator",
            "x-queue-type",
            "x-quorum-initial-group-size",
            "x-single-active-consumer",
        }
    ),
    "stream": frozenset(
        {
            "x-initial-cluster-size",
            "x-max-age",
            "x-max-length-bytes",
            "x-queue-leader-locator",
            "x-queue-type",
            "x-stream-max-segment-size-bytes",
        }
    ),
}


@dataclass(frozen=True, slots=True)
class ArgumentDifference:
    """One queue argument whose value cuebx wants differs from the one the queue has.

    None on either side means that side does not set the argument.
    """

    argument: str
    wanted: Any
    current: Any


def diff(wanted: Mapping[str, Any], current: Mapping[str, Any]) -> tuple[ArgumentDifference, ...]:
    """Compare a queue's arguments as RabbitMQ does when the queue is declared again.

    Only the arguments RabbitMQ checks for the type of the existing queue count: a classic
    queue ignores ``x-delivery-limit``, for instance, so a difference there is no conflict.
    A queue without ``x-queue-type`` is a classic queue, and values compare with their AMQP
    type, so ``True`` is not ``1`` and ``1`` is not ``1.0``. Where RabbitMQ names only the
    first difference, this returns all of them, which saves a round of fixes. For a queue
    type it does not know, every argument is compared.

    Args:
        wanted: the arguments cuebx declares the queue with.
        current: the arguments of the queue on the broker.

    Returns:
        The differences, sorted by argument name; empty when a declaration would succeed.
    """
    queue_type = _effective(current, "x-queue-type")
    checked = _CHECKED_ARGUMENTS.get(queue_type) if isinstance(queue_type, str) else None
    keys = wanted.keys() | current.keys()
    differences = []
    for key in sorted(keys if checked is None else checked & keys):
        mine, theirs = _effective(wanted, key), _effective(current, key)
        if not _same(mine, theirs):
            differences.append(ArgumentDifference(key, mine, theirs))
    return tuple(differences)


def describe_differences(differences: Iterable[ArgumentDifference]) -> str:
    """Describe differences the way a `TopologyConflictError` shows them.

    Each reads ``argument 'x-message-ttl': cuebx wants 1000, the broker has 2000`` (an
    absent argument is ``none``); they are joined with ``"; "``, and none gives ``""``.
    """
    return "; ".join(
        f"argument {d.argument!r}: cuebx wants {_show(d.wanted)}, the broker has {_show(d.current)}"
        for d in differences
    )


def _effective(arguments: Mapping[str, Any], key: str) -> Any:
    # A queue declared without x-queue-type is a classic queue.
    if key == "x-queue-type":
        return arguments.get(key, "classic")
    return arguments.get(key)


def _same(a: Any, b: Any) -> bool:
    # AMQP tables type their values, and RabbitMQ compares the types too: true is not 1,
    # and an integer is not a float (its integer types are interchangeable, Python's too).
    return _amqp_kind(a) == _amqp_kind(b) and a == b


def _amqp_kind(value: Any) -> type:
    return bool if isinstance(value, bool) else float if isinstance(value, float) else object


def _show(value: Any) -> str:
    return "none" if value is None else repr(value)
