"""Checked by mypy (strict), never run: both brokers implement the protocols of base.py.

Code above the brokers (a scheduler, the delay ladder) reads and waits on ``broker.clock``
through `cuebx.brokers.base.Clock`, never branching on the broker type.
"""

from __future__ import annotations

from cuebx.brokers.amqp import AmqpBroker
from cuebx.brokers.base import Broker, Clock, SystemClock
from cuebx.brokers.memory import Clock as MemoryClock
from cuebx.brokers.memory import MemoryBroker


def brokers(amqp: AmqpBroker, memory: MemoryBroker) -> list[Broker]:
    return [amqp, memory]


def clocks(system: SystemClock, memory: MemoryClock) -> list[Clock]:
    return [system, memory]


async def wait_for_the_next_slot(broker: Broker, slot: float) -> float:
    await broker.clock.sleep_until(slot)
    return broker.clock.time()
