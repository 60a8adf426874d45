"""Delayed delivery on the local RabbitMQ: lateness, publish throughput, broker CPU per hop.

    .venv/bin/python benchmarks/delays.py [--n 10000] [--spread 60] [--publish-n 5000]
                                          [--repeats 3] [--quick] [--url amqp://...]
                                          [--node rabbit@localhost]

- **lateness**: `n` tasks with countdowns drawn uniformly from 0-`spread` seconds, published
  by 100 concurrent callers, run by one ``cuebx worker`` subprocess (prefetch 100). Each
  handler reports its start time by UDP (the harness's collector); lateness is that start
  minus the due time (the publisher's clock just before the call, plus the countdown), as
  p50 / p99 / max next to the unit. Early starts are counted (the goal: none). The worker's
  RSS is read every second while the tasks wait.
- **publish throughput**: `publish-n` messages through `delay()` and through
  ``apply_async(countdown=3600)`` (into the ladder), by 100 concurrent callers and awaited one
  by one, in interleaved rounds; the ratio delayed / plain (the goal: at least 0.9x).
- **broker CPU per hop**: the RabbitMQ node's CPU time (utime + stime of its beam.smp, from
  /proc) over the lateness run, against the same number of plain messages through the same
  worker; the difference per message and per hop (a hop is one dead-lettering between levels).

Everything is declared under ``bench.<12 hex>`` and deleted at the end, also after a failure
or Ctrl-C. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_app import build_app
from harness import (
    BENCH_DIR,
    DEFAULT_URL,
    BenchmarkError,
    Child,
    Collector,
    Rabbit,
    cuebx_worker,
    in_lanes,
    markdown_table,
    run_or_exit,
    stop_all_children,
    wait_until,
)
from wire import enqueue_queue, work_queue

from cuebx import Cuebx, Task
from cuebx.delays import Ladder
from cuebx.topology import ExchangeSpec, Topology

PREFETCH = 100
PARKED = 3600.0  # seconds: the throughput benchmark's delayed messages wait this long
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Config:
    url: str
    n: int
    spread: float
    publish_n: int
    repeats: int
    node: str | None = None


@dataclass
class Results:
    throughput: dict[str, list[float]] = field(default_factory=dict)
    lateness_ms: list[float] = field(default_factory=list)
    #: Start minus (countdown + when the publish was confirmed): the ladder's own lateness.
    confirmed_lateness_ms: list[float] = field(default_factory=list)
    #: Seconds of the broker's CPU per second while none of this benchmark's work ran.
    beam_idle_rate: float = 0.0
    rss_mb: list[float] = field(default_factory=list)
    hops: list[int] = field(default_factory=list)
    beam_cpu_delayed: float = 0.0
    beam_cpu_plain: float = 0.0
    worker_cpu_delayed: float = 0.0
    worker_cpu_plain: float = 0.0
    notes: list[str] = field(default_factory=list)
    unit_ms: int = 0


# -- the broker's process ---------------------------------------------------------------------


def beam_pid(node: str | None) -> int:
    """The OS pid of the RabbitMQ node the benchmark talks to (``rabbitmqctl eval``)."""
    where = ["-n", node] if node else []
    out = subprocess.run(
        ["rabbitmqctl", *where, "eval", "os:getpid()."], capture_output=True, text=True, timeout=60
    ).stdout
    match = re.search(r"\d+", out)
    if match is None:
        raise BenchmarkError(f"cannot find the RabbitMQ node's pid: rabbitmqctl said {out!r}")
    return int(match.group())


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


# -- publishing -------------------------------------------------------------------------------


async def ladder_count(rabbit: Rabbit, ladder: Ladder) -> int:
    total = 0
    for k in range(ladder.levels):
        ready, _ = await rabbit.counts(ladder.level(k))
        total += ready
    return total


async def purge_ladder(rabbit: Rabbit, ladder: Ladder) -> None:
    for k in range(ladder.levels):
        await rabbit.purge(ladder.level(k))


async def throughput(
    config: Config, app: Cuebx, rabbit: Rabbit, results: Results, round_: int
) -> None:
    """One round: plain and delayed publishes, concurrent and awaited, in rotating order."""
    noop: Task[Any, Any] = app.tasks["noop"]
    ladder = app.delays.ladder
    queue = enqueue_queue(app.settings.exchange)
    n, awaited_n = config.publish_n, max(100, config.publish_n // 5)
    variants: list[tuple[str, int, Callable[[], Awaitable[Any]]]] = [
        ("plain.concurrent", n, lambda: in_lanes(n, lambda i: noop.delay(i, 0.0))),
        (
            "delayed.concurrent",
            n,
            lambda: in_lanes(n, lambda i: noop.apply_async(args=(i, 0.0), countdown=PARKED)),
        ),
        ("plain.awaited", awaited_n, lambda: _one_by_one(awaited_n, noop, delayed=False)),
        ("delayed.awaited", awaited_n, lambda: _one_by_one(awaited_n, noop, delayed=True)),
    ]
    if round_ % 2:  # every other round, delayed first
        variants = [variants[1], variants[0], variants[3], variants[2]]
    for key, count, publish_all in variants:
        started = time.perf_counter()
        await publish_all()
        rate = count / (time.perf_counter() - started)
        held = (
            await ladder_count(rabbit, ladder)
            if key.startswith("delayed")
            else (await rabbit.counts(queue))[0]
        )
        if held != count:
            raise BenchmarkError(f"{key}: {held} messages held, expected {count}")
        await purge_ladder(rabbit, ladder)
        await rabbit.purge(queue)
        results.throughput.setdefault(key, []).append(rate)
        print(f"  {key}: {rate:,.0f} msg/s", file=sys.stderr)


async def _one_by_one(count: int, noop: Task[Any, Any], *, delayed: bool) -> None:
    for i in range(count):
        if delayed:
            await noop.apply_async(args=(i, 0.0), countdown=PARKED)
        else:
            await noop.delay(i, 0.0)


# -- lateness ---------------------------------------------------------------------------------


async def start_worker(config: Config, app: Cuebx, collector: Collector, rabbit: Rabbit) -> Child:
    prefix = app.settings.exchange
    queue = work_queue(prefix)
    child = cuebx_worker(
        [queue], prefix=prefix, udp=collector.address, url=config.url, prefetch=PREFETCH
    )

    async def registered() -> bool:
        return (await rabbit.counts(queue))[1] >= 1

    await wait_until(registered, within=60, what="the worker's consumer", child=child)
    return child


async def lateness(
    config: Config, app: Cuebx, collector: Collector, child: Child, results: Results, beam: int
) -> None:
    """`n` countdowns over 0-spread s through one worker; lateness, RSS and CPU."""
    work: Task[Any, Any] = app.tasks["work"]
    unit_ms = app.delays.ladder.unit_ms
    rng = random.Random(10_000)
    countdowns = [rng.uniform(0, config.spread) for _ in range(config.n)]
    results.hops = [bin(math.ceil(c * 1000 / unit_ms)).count("1") for c in countdowns]
    collector.arm(range(config.n))
    beam_before, worker_before = cpu_seconds(beam), child.cpu_seconds()
    started = time.perf_counter()
    confirmed: dict[int, float] = {}

    async def publish(i: int) -> None:
        countdown = countdowns[i]
        due = time.time() + countdown
        await work.apply_async(args=(i, due), countdown=countdown)
        confirmed[i] = time.time() + countdown

    sampler = asyncio.create_task(_sample_rss(child, results))
    try:
        await in_lanes(config.n, publish)
        await wait_until(
            collector.complete,
            within=config.spread + 60 + config.n / 100,
            what=lambda: f"{config.n} delayed tasks run ({collector.seen()} seen)",
            child=child,
            interval=0.1,
        )
    finally:
        sampler.cancel()
        window = collector.disarm()
    idle = results.beam_idle_rate * (time.perf_counter() - started)
    results.beam_cpu_delayed = cpu_seconds(beam) - beam_before - idle
    results.worker_cpu_delayed = child.cpu_seconds() - worker_before
    results.lateness_ms = [(r.started - r.sent) * 1000 for r in window.records]
    results.confirmed_lateness_ms = [(r.started - confirmed[r.i]) * 1000 for r in window.records]
    if window.duplicates:
        results.notes.append(f"{window.duplicates} tasks ran twice")


async def _sample_rss(child: Child, results: Results) -> None:
    while True:
        results.rss_mb.append(child.memory_kib("VmRSS") * 1024 / 1e6)
        await asyncio.sleep(1.0)


async def idle_rate(beam: int, seconds: float = 5.0) -> float:
    """The broker's CPU per second with nothing of ours running: other clients, timers.

    Subtracted from the runs below. On a broker other programs use, it is only an estimate.
    """
    before, started = cpu_seconds(beam), time.perf_counter()
    await asyncio.sleep(seconds)
    return (cpu_seconds(beam) - before) / (time.perf_counter() - started)


async def plain_control(
    config: Config, app: Cuebx, collector: Collector, child: Child, results: Results, beam: int
) -> None:
    """The same number of plain messages through the same worker: the CPU without hops."""
    work: Task[Any, Any] = app.tasks["work"]
    collector.arm(range(config.n))
    beam_before, worker_before = cpu_seconds(beam), child.cpu_seconds()
    started = time.perf_counter()
    try:
        await in_lanes(config.n, lambda i: work.delay(i, time.time()))
        await wait_until(
            collector.complete,
            within=60 + config.n / 100,
            what=lambda: f"{config.n} plain tasks run ({collector.seen()} seen)",
            child=child,
            interval=0.05,
        )
    finally:
        collector.disarm()
    idle = results.beam_idle_rate * (time.perf_counter() - started)
    results.beam_cpu_plain = cpu_seconds(beam) - beam_before - idle
    results.worker_cpu_plain = child.cpu_seconds() - worker_before


# -- the run ----------------------------------------------------------------------------------


async def main_async(config: Config) -> Results:
    prefix = f"bench.{uuid.uuid4().hex[:12]}"
    collector = Collector()
    collector.start()
    rabbit = await Rabbit.connect(config.url, f"cuebx delay benchmark {prefix}")
    app = build_app(prefix, collector.address, url=config.url)
    results = Results()
    beam = beam_pid(config.node)
    results.unit_ms = app.delays.ladder.unit_ms
    child: Child | None = None
    try:
        await app.connect()
        await app.delays.declare(app.broker)  # declared before anything is timed
        for round_ in range(config.repeats):
            print(f"throughput, round {round_ + 1}", file=sys.stderr)
            await throughput(config, app, rabbit, results, round_)
        print(f"lateness: {config.n} countdowns over 0-{config.spread:g} s", file=sys.stderr)
        child = await start_worker(config, app, collector, rabbit)
        results.beam_idle_rate = await idle_rate(beam)
        await lateness(config, app, collector, child, results, beam)
        print(f"control: {config.n} plain tasks", file=sys.stderr)
        await plain_control(config, app, collector, child, results, beam)
    finally:
        if child is not None:
            child.stop()
        stop_all_children()
        await _clean_up(app, rabbit)
        collector.stop()
    return results


async def _clean_up(app: Cuebx, rabbit: Rabbit) -> None:
    try:
        await app.broker.connect()
        ladder = app.delays.topology()
        main = ExchangeSpec(app.settings.exchange)
        await app.broker.delete(app.topology())
        await app.broker.delete(Topology(ladder.exchange, ladder.queues, (*ladder.exchanges, main)))
    finally:
        await app.close()
        await rabbit.close()


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(share * len(ordered)) - 1)]


def report(config: Config, unit_ms: int, results: Results) -> dict[str, Any]:
    late, own = results.lateness_ms, results.confirmed_lateness_ms
    n = config.n
    median = statistics.median
    throughput = {key: median(rates) for key, rates in results.throughput.items()}
    extra_beam = results.beam_cpu_delayed - results.beam_cpu_plain
    mean_hops = statistics.fmean(results.hops)
    return {
        "unit_ms": unit_ms,
        "lateness_ms": {
            "n": len(late),
            "early": sum(1 for x in late if x < 0),
            "min": min(late),
            "p50": _percentile(late, 0.50),
            "p99": _percentile(late, 0.99),
            "max": max(late),
            "target_p99": unit_ms + 50,
            "from_confirm_p50": _percentile(own, 0.50),
            "from_confirm_p99": _percentile(own, 0.99),
        },
        "worker_rss_mb_while_waiting": {
            "first": results.rss_mb[0],
            "min": min(results.rss_mb),
            "max": max(results.rss_mb),
            "last": results.rss_mb[-1],
            "samples": len(results.rss_mb),
        },
        "throughput_msg_s": throughput,
        "throughput_samples": results.throughput,
        "delayed_vs_plain": {
            "concurrent": throughput["delayed.concurrent"] / throughput["plain.concurrent"],
            "awaited": throughput["delayed.awaited"] / throughput["plain.awaited"],
        },
        # The ratio in each round (its variants ran one right after the other).
        "delayed_vs_plain_per_round": {
            way: [
                mine / plain
                for mine, plain in zip(
                    results.throughput[f"delayed.{way}"],
                    results.throughput[f"plain.{way}"],
                    strict=True,
                )
            ]
            for way in ("concurrent", "awaited")
        },
        "broker_cpu": {
            "idle_rate": results.beam_idle_rate,
            "delayed_s": results.beam_cpu_delayed,
            "plain_s": results.beam_cpu_plain,
            "extra_us_per_message": extra_beam / n * 1e6,
            "mean_hops": mean_hops,
            "extra_us_per_hop": extra_beam / n / mean_hops * 1e6,
        },
        "worker_cpu_us_per_message": {
            "delayed": results.worker_cpu_delayed / n * 1e6,
            "plain": results.worker_cpu_plain / n * 1e6,
        },
        "notes": results.notes,
    }


def markdown(config: Config, summary: dict[str, Any]) -> str:
    late, rss = summary["lateness_ms"], summary["worker_rss_mb_while_waiting"]
    t, ratio, cpu = summary["throughput_msg_s"], summary["delayed_vs_plain"], summary["broker_cpu"]
    per_round = summary["delayed_vs_plain_per_round"]

    def spread(way: str) -> str:
        ratios = per_round[way]
        return f"({min(ratios):.2f}-{max(ratios):.2f} per round)"

    unit = summary["unit_ms"]
    awaited_n = max(100, config.publish_n // 5)
    rows = [
        (
            "lateness p50 / p99 / max",
            f"{late['p50']:.0f} / {late['p99']:.0f} / {late['max']:.0f} ms",
            f"unit {unit} ms; p99 ≤ {late['target_p99']} ms",
        ),
        (
            "lateness from the publish's confirm, p50 / p99",
            f"{late['from_confirm_p50']:.0f} / {late['from_confirm_p99']:.0f} ms",
            "",
        ),
        ("early starts", f"{late['early']} of {late['n']}", "none"),
        ("worker RSS while waiting (min-max)", f"{rss['min']:.1f}-{rss['max']:.1f} MB", "flat"),
        (
            f"100 concurrent: delayed / plain (n={config.publish_n:,})",
            f"{t['delayed.concurrent']:,.0f} / {t['plain.concurrent']:,.0f} msg/s = "
            f"{ratio['concurrent']:.2f}x {spread('concurrent')}",
            "≥ 0.9x",
        ),
        (
            f"awaited one by one: delayed / plain (n={awaited_n:,})",
            f"{t['delayed.awaited']:,.0f} / {t['plain.awaited']:,.0f} msg/s = "
            f"{ratio['awaited']:.2f}x {spread('awaited')}",
            "≥ 0.9x",
        ),
        (
            "broker CPU the ladder adds",
            f"{cpu['extra_us_per_message']:.0f} µs per message, "
            f"{cpu['extra_us_per_hop']:.0f} µs per hop ({cpu['mean_hops']:.1f} hops on average)",
            "",
        ),
    ]
    return markdown_table(("measure", "value", "goal"), rows)


def parse_config(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, help="delayed tasks in the lateness run (10000)")
    parser.add_argument("--spread", type=float, help="countdowns drawn from 0-spread s (60)")
    parser.add_argument("--publish-n", type=int, help="messages per throughput variant (5000)")
    parser.add_argument("--repeats", type=int, help="throughput rounds (3)")
    parser.add_argument("--quick", action="store_true", help="n=1000, spread 10 s, 1 round")
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument(
        "--node", help="the RabbitMQ node behind --url, for its CPU (rabbitmqctl -n); its default"
    )
    options = parser.parse_args(argv)
    quick = options.quick
    config = Config(
        url=options.url,
        n=options.n or (1000 if quick else 10_000),
        spread=options.spread or (10.0 if quick else 60.0),
        publish_n=options.publish_n or (1000 if quick else 5000),
        repeats=options.repeats or (1 if quick else 3),
        node=options.node,
    )
    if config.n < 10 or config.publish_n < 100 or config.repeats < 1 or config.spread <= 0:
        parser.error("--n >= 10, --publish-n >= 100, --repeats >= 1, --spread > 0")
    return config


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    started = time.monotonic()
    load_start = os.getloadavg()
    results: Results = run_or_exit(
        main_async(config), interrupted="interrupted: workers stopped, queues deleted"
    )
    summary = report(config, results.unit_ms, results)
    summary["config"] = {k: v for k, v in vars(config).items() if k != "url"}
    summary["loadavg"] = [load_start, os.getloadavg()]
    summary["duration_s"] = round(time.monotonic() - started, 1)
    out = BENCH_DIR / "results"
    out.mkdir(exist_ok=True)
    (out / "delays.json").write_text(json.dumps(summary, indent=2))
    print(markdown(config, summary))
    for note in results.notes:
        print(f"\nnote: {note}")
    print(
        f"\nload average {load_start[0]:.2f} → {os.getloadavg()[0]:.2f} · "
        f"{summary['duration_s']}s · written to {out / 'delays.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
