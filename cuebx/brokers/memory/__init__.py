"""An in-process broker with RabbitMQ's semantics, on a clock that tests move by hand.

`MemoryBroker` is a second real implementation of `cuebx.brokers.base.Broker`, not a mock: it
routes through direct, topic, headers and fanout exchanges, exchange-to-exchange bindings,
alternate exchanges and the default exchange, refuses unroutable mandatory publishes, calls a
consumer's handler once per delivery in a task of its own (as aiormq does), bounds unacked
deliveries by prefetch, round-robins consumers, orders by ``x-max-priority``, expires by
``x-message-ttl`` and dead-letters through ``x-dead-letter-exchange`` /
``x-dead-letter-routing-key`` (and all of that routing) with an ``x-death`` header, counts
quorum-queue redeliveries against ``x-delivery-limit``, delivers a ``x-single-active-consumer``
queue to its first consumer only (the next takes over when it is cancelled or its channel
closes), drops the oldest ready message past ``x-max-length`` (drop-head) or nacks the publish
that finds the queue full (``x-overflow: reject-publish``: `MemoryBroker.offer` answers False,
``publish`` raises), refuses a redeclaration with other arguments, and when a channel closes
requeues whatever is unacked (its running handlers go on; settling their deliveries then does
nothing). So a retry ladder runs
end to end in a unit test: once the clock passes 30 seconds, the message that waited in
``Q.retry.30s`` is back in ``Q``, delivered to the worker, with its ``x-death`` entry.

Time is a virtual `Clock` (TTLs expire in time order as it passes them). By default it
jumps ahead by itself whenever the broker is idle, so that ladder runs on its own in no
wall time; ``MemoryBroker(url, clock="manual")`` (or ``memory://?clock=manual``) makes it
stand still until `Clock.advance` moves it, and ``clock="real"`` makes it follow the
monotonic clock. The timers run in a task group owned by the broker between `connect` and
`close`.

Not modelled, on purpose: policies, internal and auto-delete exchanges, per-message
``expiration``, ``x-max-length-bytes``, ``x-expires``, quorum-queue priorities, and the retention
of unroutable dead letters by ``x-dead-letter-strategy: at-least-once`` (here a dead letter
nobody is bound for is dropped, as with the default at-most-once strategy). Publisher confirms
are positive but for a full ``reject-publish`` queue: nothing is lost in memory. Each broker
object is its own server: two ``MemoryBroker("memory://same")`` objects share nothing; the
name only shows in messages.

The package, by noun: `clock` (time), `queues` (entries, queues, consumers, deliveries),
`exchanges` (the matching rules of each exchange type), `host` (the task group handler calls
run in) and `broker` (routing, settling, expiry and dead-lettering).
"""

from cuebx.brokers.memory.broker import MemoryBroker
from cuebx.brokers.memory.clock import Clock, ClockMode

__all__ = ["Clock", "ClockMode", "MemoryBroker"]
