"""The floor consumer: what a hand-written aio-pika consumer does for the same work.

Run by the benchmark runner as a subprocess, like ``cuebx worker``::

    python benchmarks/floor_consumer.py --queues Q1,Q2 --prefetch 100

One robust connection, one channel per queue with ``basic.qos(prefetch)``, manual acks, and
the same handler side effect as ``bench_app.work``: decode and validate the JSON body into a
msgspec Struct of the task's arguments, send one datagram to the collector, ack. uvloop when
it is installed, as ``cuebx worker`` does. Stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import time

import aio_pika
import msgspec
from aio_pika.abc import AbstractIncomingMessage
from wire import DATAGRAM, ENV_UDP, parse_address

URL_ENV = "CUEBX_BROKER_URL"


class Arguments(msgspec.Struct):
    """The arguments of ``bench_app.work``, as cuebx encodes them."""

    i: int
    sent: float


async def consume(url: str, queues: list[str], prefetch: int, udp: tuple[str, int]) -> None:
    """Consume `queues` until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    decode = msgspec.json.Decoder(Arguments).decode
    pack = DATAGRAM.pack
    now = time.time

    async def on_message(message: AbstractIncomingMessage) -> None:
        started = now()
        arguments = decode(message.body)
        sock.sendto(pack(arguments.i, arguments.sent, started), udp)
        await message.ack()

    connection = await aio_pika.connect_robust(
        url, client_properties={"connection_name": "cuebx benchmark floor consumer"}
    )
    async with connection:
        for name in queues:
            channel = await connection.channel(publisher_confirms=False)
            await channel.set_qos(prefetch_count=prefetch)
            queue = await channel.declare_queue(name, passive=True)
            await queue.consume(on_message, no_ack=False)
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queues", required=True, help="comma-separated queue names")
    parser.add_argument("--prefetch", type=int, default=100)
    options = parser.parse_args()
    url = os.environ.get(URL_ENV, "amqp://guest:guest@127.0.0.1:5672/")
    udp = parse_address(os.environ.get(ENV_UDP, "127.0.0.1:9"))
    queues = [q for q in options.queues.split(",") if q]
    try:
        import uvloop
    except ImportError:
        asyncio.run(consume(url, queues, options.prefetch, udp))
    else:
        uvloop.run(consume(url, queues, options.prefetch, udp))


if __name__ == "__main__":
    main()
