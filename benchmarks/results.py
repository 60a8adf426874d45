"""What status tracking and request/reply cost: drain with a store, and call() round trips.

    .venv/bin/python benchmarks/results.py                    # n=10,000, 3 rounds, ~2 min
    .venv/bin/python benchmarks/results.py --n 2000 --repeats 1 --calls 500   # a smoke run

**drain**: n preloaded ``work`` messages (the bytes cuebx sends), one ``cuebx worker``
(prefetch 100) per side, first to last handled, as ``run.py``'s drain. Sides: ``none`` (no
store), ``redis`` and ``postgres`` (the worker writes ``started`` and ``succeeded`` for each
task). The sides run one after the other in each round, in an order that rotates between
rounds. Reported: msg/s, worker CPU per message, and each store side against ``none`` (the
goal: ≥ 0.7x on Redis), with the cost per task in µs (1/rate - 1/untracked rate).

**call**: a worker (prefetch 100, no store) and the runner's app; 1, 10 and 100 concurrent
callers each loop on ``await work.call(i, 0.0)`` until ``--calls`` calls are done at that
level. Reported: p50 and p99 of the round trip, and p99 at 100 callers against p99 at one
(the goal: within 2x).

Stores: ``CUEBX_TEST_REDIS_URL`` / ``CUEBX_TEST_POSTGRES_URL`` (the test suite's defaults),
each run under its own key prefix / schema, deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import time
import uuid
from typing import Any

from bench_app import build_app
from harness import (
    DEFAULT_URL,
    Collector,
    FloorPublisher,
    Rabbit,
    cuebx_worker,
    iter_lanes,
    preload,
    run_or_exit,
    stop_all_children,
    wait_until,
)
from wire import work_queue

REDIS_URL = os.environ.get("CUEBX_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get(
    "CUEBX_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
PREFETCH = 100


def _stores(prefix: str) -> dict[str, str]:
    name = "bench_" + prefix.rsplit(".", 1)[-1]
    return {
        "none": "",
        "redis": f"{REDIS_URL}?prefix={name}",
        "postgres": f"{POSTGRES_URL}?schema={name}",
    }


async def _drain(
    side: str,
    store: str,
    n: int,
    *,
    prefix: str,
    url: str,
    rabbit: Rabbit,
    floor: FloorPublisher,
    collector: Collector,
) -> tuple[float, float]:
    """Drain n messages with one worker on `store`; return (msg/s, CPU µs per message)."""
    queue = work_queue(prefix)
    await preload(rabbit, floor, queue, "work", n)
    cpu_at_first: list[float] = []
    holder: list[Any] = []
    collector.arm(
        range(n), lambda: cpu_at_first.append(holder[0].cpu_seconds()) if holder else None
    )
    os.environ["CUEBX_BENCH_STORE"] = store
    child = cuebx_worker([queue], prefix=prefix, udp=collector.address, url=url, prefetch=PREFETCH)
    holder.append(child)
    try:
        await wait_until(
            collector.complete,
            within=120 + n / 50,
            what=f"{n} handled ({side})",
            child=child,
            interval=0.02,
        )
        cpu = child.cpu_seconds() - (cpu_at_first[0] if cpu_at_first else 0.0)
    finally:
        window = collector.disarm()
        child.stop()
        os.environ.pop("CUEBX_BENCH_STORE", None)
    first, last = window.records[0], window.records[-1]
    rate = (n - 1) / (last.received - first.received)
    print(
        f"    drain {side:<9} {rate:>9,.0f} msg/s  {cpu / n * 1e6:>7.1f} µs CPU/msg",
        file=sys.stderr,
        flush=True,
    )
    return rate, cpu / n * 1e6


async def _calls(app: Any, callers: int, total: int) -> list[float]:
    """Round trips (seconds) of `total` calls made by `callers` concurrent loops."""
    work = app.tasks["work"]
    times: list[float] = []

    async def loop(numbers: range) -> None:
        for i in numbers:
            started = time.perf_counter()
            await work.call_within(30, i, 0.0)
            times.append(time.perf_counter() - started)

    await asyncio.gather(*(loop(r) for r in iter_lanes(total, callers)))
    return times


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _cleanup_stores(stores: dict[str, str]) -> None:
    import psycopg
    import redis.asyncio as aioredis

    name = stores["redis"].rsplit("=", 1)[-1]
    client = aioredis.Redis.from_url(REDIS_URL)
    with contextlib.suppress(Exception):
        keys = [k async for k in client.scan_iter(match=f"{name}:*", count=1000)]
        if keys:
            await client.delete(*keys)
    await client.aclose()
    with contextlib.suppress(Exception):
        async with await psycopg.AsyncConnection.connect(POSTGRES_URL, autocommit=True) as conn:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    url = args.url or DEFAULT_URL
    prefix = f"bench.{uuid.uuid4().hex[:12]}"
    stores = _stores(prefix)
    rabbit = await Rabbit.connect(url, f"cuebx results benchmark {prefix}")
    collector = Collector()
    collector.start()
    app = build_app(prefix, collector.address, url=url)
    floor: FloorPublisher | None = None
    results: dict[str, Any] = {"drain": {s: [] for s in stores}, "call": {}}
    try:
        await app.connect()
        floor = await FloorPublisher.connect(url, prefix)
        sides = list(stores)
        for round_ in range(args.repeats):
            order = sides[round_ % 3 :] + sides[: round_ % 3]
            print(f"round {round_ + 1}: {' '.join(order)}", file=sys.stderr, flush=True)
            for side in order:
                results["drain"][side].append(
                    await _drain(
                        side,
                        stores[side],
                        args.n,
                        prefix=prefix,
                        url=url,
                        rabbit=rabbit,
                        floor=floor,
                        collector=collector,
                    )
                )
        child = cuebx_worker(
            [work_queue(prefix)], prefix=prefix, udp=collector.address, url=url, prefetch=PREFETCH
        )
        try:
            collector.arm(range(-1, 0))
            await _calls(app, 1, 50)  # warm-up: the reply consumer, connections
            for callers in (1, 10, 100):
                times = await _calls(app, callers, args.calls)
                results["call"][callers] = (_pct(times, 0.5) * 1000, _pct(times, 0.99) * 1000)
                print(
                    f"    call  {callers:>3} callers  p50 {_pct(times, 0.5) * 1000:.2f} ms"
                    f"  p99 {_pct(times, 0.99) * 1000:.2f} ms",
                    file=sys.stderr,
                    flush=True,
                )
        finally:
            collector.disarm()
            child.stop()
    finally:
        stop_all_children()
        with contextlib.suppress(Exception):
            await app.close()
        if floor is not None:
            await floor.close()
        await rabbit.delete([q.name for q in app.topology().queues], prefix)
        await rabbit.close()
        collector.stop()
        await _cleanup_stores(stores)
    return results


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    drains = results["drain"]
    base = statistics.median(r for r, _ in drains["none"])
    lines = [
        f"n = {args.n:,}, {args.repeats} round(s); median (min-max) over rounds",
        "",
        "| drain side | msg/s | worker CPU µs/msg | vs no store (per round) | cost per task |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for side, samples in drains.items():
        rates = [r for r, _ in samples]
        cpus = [c for _, c in samples]
        rate = statistics.median(rates)
        # Each round's ratio: its sides ran one right after the other.
        pairs = zip(samples, drains["none"], strict=True)
        per_round = [mine / plain for (mine, _), (plain, _) in pairs]
        ratio = (
            ""
            if side == "none"
            else f"{rate / base:.2f}x ({min(per_round):.2f}-{max(per_round):.2f})"
        )
        cost = "" if side == "none" else f"{(1 / rate - 1 / base) * 1e6:.0f} µs"
        lines.append(
            f"| {side} | {rate:,.0f} ({min(rates):,.0f}-{max(rates):,.0f}) | "
            f"{statistics.median(cpus):.1f} | {ratio} | {cost} |"
        )
    lines += ["", "| concurrent callers | call p50 | call p99 |", "| ---: | ---: | ---: |"]
    for callers, (p50, p99) in results["call"].items():
        lines.append(f"| {callers} | {p50:.2f} ms | {p99:.2f} ms |")
    one, hundred = results["call"][1][1], results["call"][100][1]
    lines += [
        "",
        f"Redis drain vs no store: {statistics.median(r for r, _ in drains['redis']) / base:.2f}x "
        "(goal ≥ 0.7x)",
        f"call p99 at 100 callers vs 1: {hundred / one:.2f}x (goal ≤ 2x)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="messages per drain")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the three drains")
    parser.add_argument("--calls", type=int, default=2_000, help="calls per concurrency level")
    parser.add_argument("--url", default=None, help="RabbitMQ URL (else CUEBX_BROKER_URL)")
    args = parser.parse_args(argv)
    results = run_or_exit(
        main_async(args), interrupted="interrupted: workers stopped, stores and queues deleted"
    )
    print(report(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
