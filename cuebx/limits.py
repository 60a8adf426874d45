"""Rate limits kept by RabbitMQ alone: at most N handler starts per window, across all workers.

``@app.task(rate_limit="100/s")`` (or ``/m``, ``/h``, ``"5/10s"``) limits the starts of a
task's handler, counted across every worker and process that consumes its queue; a limiter
made with ``app.limiter("stripe", "100/s")`` and named by several tasks
(``rate_limit="stripe"``) limits their starts together. No other server is involved.

Each limiter is a durable classic queue ``<exchange>.limit.<name>`` that nobody consumes::

    x-max-length: N    x-overflow: reject-publish    x-message-ttl: <window>

Before a limited handler starts, the worker publishes a small transient "permit" to it and
waits for the confirm (`cuebx.brokers.base.Broker.offer`):

- ack: the queue had room. The permit now holds one of its N places for exactly one window
  (every permit has the same TTL, so they expire in the order they came, from the head, on
  time), and the handler starts.
- nack: the queue is full, N permits were taken in the last window: the worker raises
  `Postpone`, so the message goes down the delay ladder (`cuebx.delays`) and comes back
  later, to any worker, with the same attempt number: a denial spends no retry.

So in any window of that length at most N permits are granted (each granted permit still
holds its place when a later one in the same window is asked for), whatever the number of
workers: no seeding, no leader, nothing to clean up when a worker dies (its permits expire).

Precision: the window is kept by the broker's clock. A handler starts after its permit's
confirm comes back, a millisecond or more after the broker counted it, and that lag varies
with the worker's load, so handler start times read in the workers can show a few more
than N in a window (the broker's N, seen through different lags). A broker restart forgets
the permits (they are transient): up to N more starts in the window after it.

Bursts: with a backlog, N handlers start as soon as a window's permits expire, then none
until the next; ``"10/100ms"`` spreads the same rate more evenly than ``"100/s"``.

A denied message waits `hold_back_ms`: the limiter's spacing (window / N) plus a random part
of one window, since every place frees within one window of a denial, at a moment no worker
knows. Each denial costs a permit publish and a trip down the delay ladder, so with a backlog
of B messages a limited queue sees about B denials per window.

`cuebx.rates` holds the pure part (`Rate`, `Limiter`, `parse_rate`, `hold_back_ms`,
re-exported here); this module holds `Limits`, the middleware that asks for permits. The app
installs it, first in line, when a task with a rate limit is registered.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cuebx.brokers.base import Broker
from cuebx.context import TaskContext
from cuebx.errors import BrokerError, ConfigurationError, TopologyError, UnroutableError
from cuebx.message import HEADER_TASK, OutgoingMessage
from cuebx.middleware import Middleware, Postpone, Received
from cuebx.rates import Limiter, Rate, hold_back_ms, limiter_queue_name, parse_rate
from cuebx.task import Task
from cuebx.topology import QueueSpec, Topology

__all__ = [
    "Limiter",
    "Limits",
    "PermitCounts",
    "Rate",
    "hold_back_ms",
    "limiter_queue_name",
    "parse_rate",
]

logger = logging.getLogger("cuebx.limits")

_MAX_NAME_BYTES = 255


@dataclass(slots=True)
class PermitCounts:
    """The permits one process asked a limiter for: granted (a start) and denied."""

    granted: int = 0
    denied: int = 0


class Limits(Middleware):
    """The middleware that asks a limiter for a permit before a limited handler starts.

    Installed by the app, before every other middleware (a denied message never reaches
    another plug-in's ``before_handler``), when it registers its first task with a
    ``rate_limit``; tasks without one cost a dictionary lookup.

    Args:
        exchange: the app's exchange; limiter queues are named after it.
        broker: the app's broker (looked up at each permit, so that a task registered
            after its worker started is limited too).
    """

    def __init__(self, exchange: str, broker: Callable[[], Broker]) -> None:
        self.exchange = exchange
        self.broker = broker
        #: The limiters made with `add` (``app.limiter``), by name.
        self.limiters: dict[str, Limiter] = {}
        #: The limiter of each limited task, by task name.
        self.tasks: dict[str, Limiter] = {}
        #: Permits granted and denied by this process, per limiter name.
        self.counts: dict[str, PermitCounts] = {}
        self._random = random.Random()

    # -- registration -----------------------------------------------------------------------

    def add(self, name: str, rate: str) -> Limiter:
        """Make a limiter several tasks can share by name (``app.limiter``).

        Raises:
            ConfigurationError: a bad name or rate, or the name is taken by another rate.
        """
        where = f"limiter {name!r}"
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            raise ConfigurationError(
                f"{where}: a limiter's name must be a non-empty string without spaces around it"
            )
        limiter = self._make(name, parse_rate(rate, where))
        existing = self.limiters.get(name)
        if existing is not None and existing != limiter:
            raise ConfigurationError(
                f"{where} exists already with rate {existing.rate}; it cannot also be {rate!r}"
            )
        self.limiters[name] = limiter
        return limiter

    def _make(self, name: str, rate: Rate) -> Limiter:
        queue = limiter_queue_name(self.exchange, name)
        if len(queue.encode()) > _MAX_NAME_BYTES:
            raise ConfigurationError(
                f"limiter {name!r}: its queue name {queue!r} is longer than AMQP's "
                f"{_MAX_NAME_BYTES} bytes; use a shorter name"
            )
        return Limiter(name, rate, queue)

    def resolve(self, task: Task[Any, Any]) -> Limiter | None:
        """The limiter a task's ``rate_limit=`` names, if any (nothing is stored).

        A rate (``"5/s"``) is the task's own limiter, named after the task; a name is one
        made with `add`; a `Limiter` is itself.

        Raises:
            ConfigurationError: not a rate, nor a limiter of this app.
        """
        spec = task.options.rate_limit
        where = f"task {task.name!r}"
        if spec is None:
            return None
        if isinstance(spec, Limiter):
            if self.limiters.get(spec.name) != spec:
                raise ConfigurationError(
                    f"{where}: rate_limit={spec!r} is not a limiter of this app; make it "
                    "with app.limiter(name, rate)"
                )
            return spec
        if not isinstance(spec, str):
            raise ConfigurationError(
                f"{where}: rate_limit must be a rate such as '100/s' or a limiter's name, "
                f"got {spec!r}"
            )
        if spec in self.limiters:
            return self.limiters[spec]
        if "/" not in spec:
            known = ", ".join(map(repr, self.limiters)) or "none yet"
            raise ConfigurationError(
                f"{where}: rate_limit={spec!r} is neither a rate such as '100/s' nor the name "
                f"of a limiter of this app (limiters: {known}); make it with "
                f"app.limiter({spec!r}, '100/s') before the task"
            )
        limiter = self._make(task.name, parse_rate(spec, f"{where}: rate_limit"))
        if task.name in self.limiters:
            raise ConfigurationError(
                f"{where}: its own rate_limit={spec!r} would use the queue of limiter "
                f"{task.name!r}; name that limiter otherwise, or use rate_limit={task.name!r}"
            )
        return limiter

    def bind(self, task: Task[Any, Any], limiter: Limiter) -> None:
        """Limit `task`'s starts by `limiter` from now on."""
        self.tasks[task.name] = limiter

    def extend(self, topology: Topology, tasks: Iterable[Task[Any, Any]]) -> Topology:
        """Add the queue of every limiter one of `tasks` uses."""
        used: dict[str, QueueSpec] = {}
        for task in tasks:
            limiter = self.resolve(task)
            if limiter is not None:
                used.setdefault(limiter.queue, limiter.spec())
        return topology.extend(queues=used.values())

    # -- permits ----------------------------------------------------------------------------

    async def before_handler(self, received: Received) -> None:
        """Ask the task's limiter for a permit; `Postpone` the message when it is full.

        Raises:
            Postpone: the limiter is full, or could not be asked (the broker failed).
        """
        context = received.context
        limiter = self.tasks.get(context.task_name)
        if limiter is None:
            return
        counts = self.counts.setdefault(limiter.name, PermitCounts())
        if await self._permit(limiter, context):
            counts.granted += 1
            return
        counts.denied += 1
        delay_ms = hold_back_ms(limiter.rate, self._random.random())
        raise Postpone(
            delay_ms / 1000, f"rate limit {limiter.name!r} ({limiter.rate}) is full for now"
        )

    async def _permit(self, limiter: Limiter, context: TaskContext) -> bool:
        """Publish a permit to the limiter's queue: True when it took it.

        A limiter queue deleted under a running app is declared again. Should the broker
        fail, the answer is no: a message is never run past a limit nobody could check.
        """
        broker = self.broker()
        permit = OutgoingMessage(
            body=b"",
            message_id=context.message_id,
            correlation_id=context.message_id,
            content_type=None,
            headers={HEADER_TASK: context.task_name},
            timestamp=datetime.now(UTC),
        )
        try:
            try:
                return await broker.offer(limiter.queue, permit)
            except UnroutableError:
                logger.warning("limiter queue %r is gone: declaring it again", limiter.queue)
                await broker.declare(Topology(self.exchange, (limiter.spec(),)))
                return await broker.offer(limiter.queue, permit)
        except (BrokerError, TopologyError) as exc:
            logger.warning(
                "could not ask limiter %r for a permit (%s): holding message %s back",
                limiter.name,
                exc,
                context.message_id,
                extra=_fields(context),
            )
            return False


def _fields(context: TaskContext) -> Mapping[str, Any]:
    return {"task": context.task_name, "message_id": context.message_id, "attempt": context.attempt}
