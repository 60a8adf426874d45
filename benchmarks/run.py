"""Benchmark cuebx against a bare aio-pika floor on the local RabbitMQ.

    .venv/bin/python benchmarks/run.py [--n 20000] [--repeats 3] [--only enqueue,drain,...]
                                       [--sides cuebx,plugin,floor] [--quick] [--url amqp://...]

Three sides: cuebx, cuebx with one no-op plug-in installed ("plugin"), and the floor (bare
aio-pika). Each repeat runs every benchmark once for each side, one right after the other,
with the order rotated between repeats, so all of them see the same machine. The table gives
medians with min-max ranges, and ratios between the sides from this run only; the JSON in
benchmarks/results/latest.json keeps every sample. See benchmarks/README.md for what each
number means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, get_args

from bench_app import build_app
from harness import (
    BENCH_DIR,
    DEFAULT_URL,
    LANES,
    BenchmarkError,
    Child,
    Collector,
    FloorPublisher,
    Rabbit,
    cuebx_worker,
    floor_consumer,
    in_lanes,
    io_wait_us,
    preload,
    publish_budget,
    quiet_disk,
    run_or_exit,
    stop_all_children,
    wait_until,
    within,
)
from wire import enqueue_queue, idle_queues, work_queue

from cuebx import Cuebx, Task

BENCHMARKS = ("enqueue", "drain", "latency", "idle")
#: cuebx as it is; cuebx with `bench_app.NoOpPlugin` installed; bare aio-pika.
Side = Literal["cuebx", "plugin", "floor"]
SIDES: tuple[Side, ...] = get_args(Side)

CONCURRENCY = LANES  # concurrent delay() callers / floor publishers
MAP_WINDOW = 256  # Task.map's default window
PREFETCH = 100  # drain and latency workers
LATENCY_RATE = 500  # messages per second
WARM_UP_SECONDS = 1.0  # latency: published first at the same rate, not counted
IDLE_SETTLE_SECONDS = 2.0  # idle: RSS is read this long after the consumers are registered
MB = 1_000_000


@dataclass(frozen=True)
class Metric:
    """One row of the table."""

    key: str
    title: str
    unit: str
    floor: str  # what the floor side is
    compare: Literal["ratio", "diff"] = "ratio"
    target: str = ""
    check: Callable[[float, float], bool] | None = None  # (a cuebx side's median, floor median)
    digits: int = 0


def _metrics(n: int, awaited_n: int, latency_seconds: float) -> list[Metric]:
    return [
        Metric(
            "enqueue.awaited",
            f"enqueue: `delay()` awaited one by one (n={awaited_n:,})",
            "msg/s",
            "aio-pika `publish()` awaited one by one",
            target="≥ 0.9x",
            check=lambda c, f: c >= 0.9 * f,
        ),
        Metric(
            "enqueue.concurrent",
            f"enqueue: {CONCURRENCY} concurrent `delay()` callers (n={n:,})",
            "msg/s",
            f"aio-pika, {CONCURRENCY} concurrent publishers",
            target="≥ 0.9x",
            check=lambda c, f: c >= 0.9 * f,
        ),
        Metric(
            "enqueue.map",
            f"enqueue: `task.map()` window {MAP_WINDOW} (n={n:,})",
            "msg/s",
            f"aio-pika, {CONCURRENCY} concurrent publishers",
            target="≥ 1.0x",
            check=lambda c, f: c >= f,
        ),
        Metric(
            "enqueue.awaited.cpu",
            "enqueue: publisher CPU per message, `delay()` awaited",
            "µs",
            "same",
            digits=1,
        ),
        Metric(
            "enqueue.concurrent.cpu",
            f"enqueue: publisher CPU per message, {CONCURRENCY} concurrent `delay()`",
            "µs",
            "same",
            digits=1,
        ),
        Metric(
            "enqueue.map.cpu",
            "enqueue: publisher CPU per message, `task.map()`",
            "µs",
            "same",
            digits=1,
        ),
        Metric(
            "drain.rate",
            f"drain: {n:,} preloaded, first→last handled, prefetch {PREFETCH}",
            "msg/s",
            "aio-pika consumer, manual ack",
            target="≥ 1.0x",
            check=lambda c, f: c >= f,
        ),
        Metric("drain.wall", "drain: process start → last handled", "s", "same", digits=2),
        Metric("drain.cpu", "drain: worker CPU, first→last handled", "s", "same", digits=2),
        Metric("drain.cpu_per_msg", "drain: worker CPU per message", "µs", "same", digits=1),
        Metric("drain.hwm", "drain: worker peak RSS (VmHWM)", "MB", "same", digits=1),
        Metric(
            "latency.p50",
            f"latency p50, {LATENCY_RATE} msg/s for {latency_seconds:g}s",
            "ms",
            "aio-pika publish → aio-pika consumer",
            compare="diff",
            digits=2,
        ),
        Metric(
            "latency.p99",
            f"latency p99, {LATENCY_RATE} msg/s for {latency_seconds:g}s",
            "ms",
            "same",
            compare="diff",
            target="≤ floor + 2 ms",
            check=lambda c, f: c <= f + 2.0,
            digits=2,
        ),
        Metric(
            "latency.max",
            f"latency max, {LATENCY_RATE} msg/s for {latency_seconds:g}s",
            "ms",
            "same",
            compare="diff",
            digits=2,
        ),
        Metric(
            "latency.io_wait",
            "latency run: time tasks waited on the disk (/proc/pressure/io)",
            "ms",
            "same",
            digits=0,
        ),
        Metric(
            "idle.rss",
            "idle worker RSS, 10 tasks on 10 queues (prefetch 10)",
            "MB",
            "aio-pika consumer on the same 10 queues",
            target="cuebx < 60 MB",
            check=lambda c, f: c < 60.0,
            digits=1,
        ),
    ]


@dataclass
class Config:
    url: str
    n: int
    awaited_n: int
    repeats: int
    only: tuple[str, ...]
    sides: tuple[Side, ...]
    latency_seconds: float


def side_order(sides: tuple[Side, ...], repeat: int) -> tuple[Side, ...]:
    """The order the sides run in during `repeat` (1-based).

    Each side goes first in turn (A B C, B C A, C A B), and every other cycle runs the other
    way round (A C B, C B A, B A C), so over 2 * len(sides) repeats every side follows every
    other one equally often: no side always gets another's leftovers (a busier broker, a disk
    still flushing). With two sides this is A B, B A, A B, ...
    """
    count = len(sides)
    cycle, turn = divmod(repeat - 1, count)
    base = sides if cycle % 2 == 0 else (*sides[:1], *reversed(sides[1:]))
    return (*base[turn:], *base[:turn])


@dataclass
class Bench:
    """Everything one run shares: its names, connections and collector."""

    config: Config
    prefix: str
    apps: dict[Side, Cuebx]  # the runner's publishing app of each cuebx side
    rabbit: Rabbit
    floor: FloorPublisher
    collector: Collector
    samples: dict[str, dict[Side, list[float]]] = field(default_factory=dict)
    orders: list[tuple[Side, ...]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    async def settle(self, what: str) -> None:
        """Let the broker's disk writes from the previous step finish before measuring."""
        if not await quiet_disk():
            note = f"{what}: the disk was still busy after 15s (started anyway)"
            self.notes.append(note)
            print(f"    note: {note}", file=sys.stderr, flush=True)

    def record(self, key: str, side: Side, value: float, unit: str) -> None:
        self.samples.setdefault(key, {s: [] for s in self.config.sides})[side].append(value)
        print(f"    {key:<20} {side:<6} {value:>12,.2f} {unit}", file=sys.stderr, flush=True)

    def worker(self, side: Side, queues: list[str], prefetch: int | None) -> Child:
        where = {"prefix": self.prefix, "udp": self.collector.address, "url": self.config.url}
        if side == "floor":
            return floor_consumer(queues, prefetch=prefetch, **where)
        return cuebx_worker(queues, prefetch=prefetch, plugin=side == "plugin", **where)


# -- enqueue ----------------------------------------------------------------------------------


async def _enqueue_variant(
    bench: Bench, key: str, side: Side, n: int, publish_all: Callable[[], Awaitable[Any]]
) -> None:
    queue = enqueue_queue(bench.prefix)
    await bench.rabbit.purge(queue)
    await bench.settle(f"{key} ({side})")
    started, cpu_started = time.perf_counter(), time.process_time()
    await within(publish_budget(n), f"{key} ({side}) publishing {n} messages", publish_all())
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    ready, _ = await bench.rabbit.counts(queue)
    if ready != n:
        raise BenchmarkError(f"{key} ({side}): {ready} messages in {queue}, expected {n}")
    await bench.rabbit.purge(queue)
    bench.record(key, side, n / elapsed, "msg/s")
    bench.record(f"{key}.cpu", side, cpu / n * 1e6, "µs")


Publishers = dict[str, Callable[[], Awaitable[Any]]]  # enqueue variant -> publish all


def _cuebx_publishers(noop: Task[Any, Any], n: int, awaited_n: int) -> Publishers:
    items = [(i, 0.0) for i in range(n)]  # built before the clock starts

    async def awaited() -> None:
        for i in range(awaited_n):
            await noop.delay(i, 0.0)

    return {
        "enqueue.awaited": awaited,
        "enqueue.concurrent": lambda: in_lanes(n, lambda i: noop.delay(i, 0.0)),
        "enqueue.map": lambda: noop.map(items),
    }


def _floor_publishers(floor: FloorPublisher, queue: str, n: int, awaited_n: int) -> Publishers:
    async def awaited() -> None:
        for i in range(awaited_n):
            await floor.publish(queue, "noop", i, 0.0)

    def pipelined() -> Awaitable[None]:
        return in_lanes(n, lambda i: floor.publish(queue, "noop", i, 0.0))

    return {"enqueue.awaited": awaited, "enqueue.concurrent": pipelined, "enqueue.map": pipelined}


async def bench_enqueue(bench: Bench, order: tuple[Side, ...]) -> None:
    """delay() awaited / 100 concurrent delay() / map(), each next to its floor."""
    n, awaited_n = bench.config.n, bench.config.awaited_n
    queue = enqueue_queue(bench.prefix)
    publishers: dict[Side, Publishers] = {
        side: (
            _floor_publishers(bench.floor, queue, n, awaited_n)
            if side == "floor"
            else _cuebx_publishers(bench.apps[side].tasks["noop"], n, awaited_n)
        )
        for side in order
    }
    for key, count in (
        ("enqueue.awaited", awaited_n),
        ("enqueue.concurrent", n),
        ("enqueue.map", n),
    ):
        for side in order:
            await _enqueue_variant(bench, key, side, count, publishers[side][key])


# -- drain ------------------------------------------------------------------------------------


async def drain_once(bench: Bench, side: Side) -> None:
    """Start a worker on a preloaded queue; time it until every message was handled."""
    n = bench.config.n
    queue = work_queue(bench.prefix)
    await preload(bench.rabbit, bench.floor, queue, "work", n)
    await bench.settle(f"drain ({side})")
    holder: list[Child] = []
    cpu_at_first: list[float] = []

    def on_first() -> None:
        if holder:
            cpu_at_first.append(holder[0].cpu_seconds())

    bench.collector.arm(range(n), on_first)
    child = bench.worker(side, [queue], PREFETCH)
    holder.append(child)
    try:
        await wait_until(
            bench.collector.complete,
            within=60 + n / 100,
            what=lambda: f"{n} handled messages ({bench.collector.seen()} seen) from the {side}",
            child=child,
            interval=0.02,
        )
        cpu_end = child.cpu_seconds()
        hwm_kib = child.memory_kib("VmHWM")
    finally:
        window = bench.collector.disarm()
        code = child.stop()
    if code != 0:
        print(f"    warning: {child.name} exited with code {code}", file=sys.stderr)
    first, last = window.records[0], window.records[-1]
    bench.record("drain.rate", side, (n - 1) / (last.received - first.received), "msg/s")
    bench.record("drain.wall", side, last.received - child.spawned, "s")
    cpu = cpu_end - (cpu_at_first[0] if cpu_at_first else 0.0)
    bench.record("drain.cpu", side, cpu, "s")
    bench.record("drain.cpu_per_msg", side, cpu / n * 1e6, "µs")
    bench.record("drain.hwm", side, hwm_kib * 1024 / MB, "MB")
    ready, _ = await bench.rabbit.counts(queue)
    if ready or window.duplicates:
        print(
            f"    warning: {ready} messages left in {queue}, {window.duplicates} duplicates",
            file=sys.stderr,
        )


# -- latency ----------------------------------------------------------------------------------


async def wait_for_consumers(bench: Bench, queues: list[str], child: Child) -> None:
    async def registered() -> bool:
        for queue in queues:
            _, consumers = await bench.rabbit.counts(queue)
            if consumers < 1:
                return False
        return True

    await wait_until(
        registered,
        within=60,
        what=f"{child.name} to register consumers on {len(queues)} queue(s)",
        child=child,
        interval=0.1,
    )


async def paced(
    publish: Callable[[int], Coroutine[Any, Any, None]], numbers: range, rate: float
) -> None:
    """Start one publish per number at `rate` per second, on a fixed schedule."""
    pending: set[asyncio.Task[None]] = set()
    errors: list[BaseException] = []

    def done(task: asyncio.Task[None]) -> None:
        pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            errors.append(task.exception())  # type: ignore[arg-type]

    start = time.perf_counter()
    for k, i in enumerate(numbers):
        delay = start + k / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.get_running_loop().create_task(publish(i))
        pending.add(task)
        task.add_done_callback(done)
        if errors or len(pending) > rate * 10:
            break
    if pending:
        await within(60, "publisher confirms of the latency run", asyncio.wait(pending))
    if errors:
        raise BenchmarkError(f"latency publish failed: {errors[0]!r}")
    if len(pending) > rate * 10:
        raise BenchmarkError(f"the latency publisher fell behind by {len(pending)} messages")


def _percentile(ordered: list[float], q: float) -> float:
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


async def latency_once(bench: Bench, side: Side) -> None:
    """Steady `LATENCY_RATE` msg/s into an idle worker; publish → handler-start latency."""
    queue = work_queue(bench.prefix)
    await bench.rabbit.purge(queue)
    warm = int(LATENCY_RATE * WARM_UP_SECONDS)
    n = int(LATENCY_RATE * bench.config.latency_seconds)
    work = None if side == "floor" else bench.apps[side].tasks["work"]

    async def publish(i: int) -> None:
        if work is not None:
            await work.delay(i, time.time())
        else:
            await bench.floor.publish(queue, "work", i, time.time())

    child = bench.worker(side, [queue], PREFETCH)
    try:
        await wait_for_consumers(bench, [queue], child)
        await bench.settle(f"latency ({side})")
        bench.collector.arm(range(-warm, n))
        io_before = io_wait_us()
        await paced(publish, range(-warm, n), LATENCY_RATE)
        await wait_until(
            bench.collector.complete,
            within=30,
            what=lambda: f"{warm + n} handled messages ({bench.collector.seen()} seen)",
            child=child,
        )
        io_after = io_wait_us()
    finally:
        window = bench.collector.disarm()
        child.stop()
    ms = sorted((r.started - r.sent) * 1000 for r in window.records if r.i >= 0)
    bench.record("latency.p50", side, _percentile(ms, 0.50), "ms")
    bench.record("latency.p99", side, _percentile(ms, 0.99), "ms")
    bench.record("latency.max", side, ms[-1], "ms")
    if io_before is not None and io_after is not None:
        bench.record("latency.io_wait", side, (io_after - io_before) / 1000, "ms")


# -- idle RSS ---------------------------------------------------------------------------------


async def idle_once(bench: Bench, side: Side) -> None:
    """RSS of an idle worker consuming 10 queues, once its consumers are registered."""
    queues = idle_queues(bench.prefix)
    child = bench.worker(side, queues, None)
    try:
        await wait_for_consumers(bench, queues, child)
        readings = []
        for _ in range(int(IDLE_SETTLE_SECONDS / 0.25)):
            await asyncio.sleep(0.25)
            child.check_alive()
            readings.append(child.memory_kib("VmRSS"))
    finally:
        child.stop()
    bench.record("idle.rss", side, readings[-1] * 1024 / MB, "MB")


# -- the run ----------------------------------------------------------------------------------


async def run_benchmarks(bench: Bench) -> None:
    config = bench.config
    for repeat in range(1, config.repeats + 1):
        order = side_order(config.sides, repeat)
        bench.orders.append(order)
        print(f"repeat {repeat}/{config.repeats}: {' then '.join(order)}", file=sys.stderr)
        if "enqueue" in config.only:
            await bench_enqueue(bench, order)
        for name, once in (("drain", drain_once), ("latency", latency_once), ("idle", idle_once)):
            if name in config.only:
                for side in order:
                    await once(bench, side)


async def main_async(config: Config) -> Bench:
    prefix = f"bench.{uuid.uuid4().hex[:12]}"
    rabbit = await Rabbit.connect(config.url, f"cuebx benchmark runner {prefix}")
    collector = Collector()
    collector.start()
    # One publishing app per cuebx side, on the same exchange and queues; "cuebx" is always
    # there and its topology names what to delete at the end.
    apps: dict[Side, Cuebx] = {
        side: build_app(prefix, collector.address, url=config.url, plugin=side == "plugin")
        for side in config.sides
        if side != "floor"
    }
    floor: FloorPublisher | None = None
    print(f"run {prefix}: queues {prefix}.*", file=sys.stderr, flush=True)
    # SIGTERM cleans up like Ctrl-C does (asyncio.Runner turns SIGINT into a cancellation).
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    try:
        for side, app in apps.items():
            await within(30, f"connecting the {side} app and declaring its topology", app.connect())
        floor = await FloorPublisher.connect(config.url, prefix)
        bench = Bench(config, prefix, apps, rabbit, floor, collector)
        await run_benchmarks(bench)
        return bench
    finally:
        stop_all_children()
        for side, app in apps.items():
            with contextlib.suppress(Exception):
                await within(30, f"closing the {side} app", app.close())
        if floor is not None:
            await floor.close()
        cuebx = apps["cuebx"]
        queues = [q.name for q in (*cuebx.topology().queues, *cuebx.scheduler.topology().queues)]
        failed = await rabbit.delete(queues, prefix)
        await rabbit.close()
        collector.stop()
        if failed:
            print("could not delete: " + "; ".join(failed), file=sys.stderr)
        else:
            print(f"deleted {len(queues)} queues and exchange {prefix}", file=sys.stderr)


# -- report -----------------------------------------------------------------------------------


def _command(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    return done.stdout.strip() or "unknown"


def machine() -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    versions = {}
    for package in ("aio-pika", "aiormq", "pamqp", "msgspec", "anyio", "uvloop"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    root = BENCH_DIR.parent
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "rabbitmq": _command(["rabbitmqctl", "version"]),
        "packages": versions,
        "event_loop": "uvloop" if versions["uvloop"] != "not installed" else "asyncio",
        "git": _command(["git", "-C", str(root), "rev-parse", "--short", "HEAD"]),
        "git_dirty": bool(
            _command(["git", "-C", str(root), "status", "--porcelain", "cuebx"]).replace(
                "unknown", ""
            )
        ),
        "loadavg_start": os.getloadavg(),
        "io_pressure_start": io_pressure(),
    }


def io_pressure() -> str:
    """/proc/pressure/io's "full" line: the share of time every task waited on the disk."""
    try:
        lines = Path("/proc/pressure/io").read_text().splitlines()
    except OSError:
        return "unknown"
    return next((line for line in lines if line.startswith("full")), "unknown")


def _summary(values: list[float]) -> dict[str, Any]:
    return {
        "samples": values,
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def _compare(metric: Metric, side: float, other: float) -> float:
    return side - other if metric.compare == "diff" else side / other


def _versus(metric: Metric, side: list[float], other: list[float]) -> dict[str, Any]:
    """`side` against `other`: of the medians, and repeat by repeat (the same round's samples)."""
    return {
        "of_medians": _compare(metric, statistics.median(side), statistics.median(other)),
        "paired": [_compare(metric, s, o) for s, o in zip(side, other, strict=False)],
    }


def _judge(metric: Metric, side: list[float], floor: list[float]) -> bool | None:
    if metric.check is None:
        return None
    return metric.check(statistics.median(side), statistics.median(floor))


def summarise(
    metrics: list[Metric], samples: dict[str, dict[Side, list[float]]]
) -> list[dict[str, Any]]:
    """One row per metric with samples: each side's summary and the comparisons between them.

    ``of_medians``, ``paired`` and ``met`` compare cuebx with the floor; ``plugin_vs_cuebx``,
    ``plugin_vs_floor`` and ``plugin_met`` the side with the no-op plug-in.
    """
    rows = []
    for metric in metrics:
        sides = {side: values for side, values in samples.get(metric.key, {}).items() if values}
        if "cuebx" not in sides:
            continue
        row: dict[str, Any] = {
            "key": metric.key,
            "title": metric.title,
            "unit": metric.unit,
            "floor_is": metric.floor,
            "comparison": metric.compare,
            "target": metric.target,
        }
        row.update({side: _summary(values) for side, values in sides.items()})
        cuebx, plugin, floor = sides["cuebx"], sides.get("plugin"), sides.get("floor")
        if floor:
            row.update(_versus(metric, cuebx, floor), met=_judge(metric, cuebx, floor))
        if plugin:
            row["plugin_vs_cuebx"] = _versus(metric, plugin, cuebx)
        if plugin and floor:
            row["plugin_vs_floor"] = _versus(metric, plugin, floor)
            row["plugin_met"] = _judge(metric, plugin, floor)
        rows.append(row)
    return rows


def _number(value: float, digits: int) -> str:
    return f"{value:,.{digits}f}"


def _cell(summary: dict[str, Any], digits: int, repeats: int) -> str:
    median = _number(summary["median"], digits)
    if repeats < 2:
        return median
    return f"{median} ({_number(summary['min'], digits)}-{_number(summary['max'], digits)})"


def _versus_cell(versus: dict[str, Any], comparison: str) -> str:
    paired, of_medians = versus["paired"], versus["of_medians"]
    low, high = min(paired), max(paired)
    if comparison == "diff":
        text = f"{of_medians:+.2f} ms"
        return text if len(paired) < 2 else f"{text} ({low:+.2f}…{high:+.2f})"
    text = f"{of_medians:.2f}x"
    return text if len(paired) < 2 else f"{text} ({low:.2f}-{high:.2f})"


def _met_cell(met: bool | None) -> str:
    return {True: "yes", False: "**no**", None: ""}[met]


Cell = Callable[[dict[str, Any], int], str]  # (row, digits) -> text


def _columns(sides: tuple[Side, ...], repeats: int) -> list[tuple[str, str, Cell]]:
    """The table's columns for the sides that ran: (header, alignment, cell)."""
    columns: list[tuple[str, str, Cell]] = [
        ("benchmark", "---", lambda row, d: row["title"]),
        ("unit", "---", lambda row, d: row["unit"]),
        ("cuebx", "---:", lambda row, d: _cell(row["cuebx"], d, repeats)),
    ]
    plugin, floor = "plugin" in sides, "floor" in sides
    if floor:
        columns += [
            ("floor", "---:", lambda row, d: _cell(row["floor"], d, repeats)),
            ("cuebx vs floor", "---:", lambda row, d: _versus_cell(row, row["comparison"])),
        ]
    if plugin:
        columns += [
            ("with no-op plug-in", "---:", lambda row, d: _cell(row["plugin"], d, repeats)),
            (
                "plug-in vs cuebx",
                "---:",
                lambda row, d: _versus_cell(row["plugin_vs_cuebx"], row["comparison"]),
            ),
        ]
    if plugin and floor:
        columns.append(
            (
                "plug-in vs floor",
                "---:",
                lambda row, d: (
                    _versus_cell(row["plugin_vs_floor"], row["comparison"]) if row["target"] else ""
                ),
            )
        )
    if floor:
        columns += [
            ("target", "---", lambda row, d: row["target"]),
            ("met", "---", lambda row, d: _met_cell(row["met"])),
        ]
    if plugin and floor:
        columns.append(("met with plug-in", "---", lambda row, d: _met_cell(row["plugin_met"])))
    return columns


def markdown(rows: list[dict[str, Any]], metrics: list[Metric], config: Config) -> str:
    digits = {m.key: m.digits for m in metrics}
    columns = _columns(config.sides, config.repeats)
    lines = [
        "| " + " | ".join(header for header, _, _ in columns) + " |",
        "| " + " | ".join(align for _, align, _ in columns) + " |",
    ]
    for row in rows:
        d = digits[row["key"]]
        lines.append("| " + " | ".join(cell(row, d) for _, _, cell in columns) + " |")
    return "\n".join(lines)


# -- command line -----------------------------------------------------------------------------


def parse_config(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, help="messages per enqueue/drain variant (20000)")
    parser.add_argument(
        "--repeats", type=int, help="rounds per benchmark, each side once per round (3)"
    )
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=",".join(BENCHMARKS))
    parser.add_argument(
        "--sides",
        default=",".join(SIDES),
        help="cuebx (always), plugin (cuebx with one no-op plug-in), floor (bare aio-pika)",
    )
    parser.add_argument("--quick", action="store_true", help="n=2000, 1 repeat, 3 s latency")
    parser.add_argument(
        "--url",
        default=DEFAULT_URL,
    )
    options = parser.parse_args(argv)
    only = tuple(name.strip() for name in options.only.split(",") if name.strip())
    unknown = sorted(set(only) - set(BENCHMARKS))
    if unknown:
        parser.error(f"--only: unknown benchmark(s) {', '.join(unknown)}; use {BENCHMARKS}")
    chosen = {name.strip() for name in options.sides.split(",") if name.strip()}
    if chosen - set(SIDES) or "cuebx" not in chosen:
        parser.error(f"--sides: cuebx and any of plugin, floor; got {options.sides!r}")
    sides = tuple(side for side in SIDES if side in chosen)  # always in SIDES's order
    n = options.n or (2000 if options.quick else 20_000)
    repeats = options.repeats or (1 if options.quick else 3)
    if n < 100 or repeats < 1:
        parser.error("--n must be >= 100 and --repeats >= 1")
    return Config(
        url=options.url,
        n=n,
        awaited_n=max(100, n // 5),
        repeats=repeats,
        only=only,
        sides=sides,
        latency_seconds=3.0 if options.quick else 10.0,
    )


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    meta = machine()
    started = time.monotonic()
    bench: Bench = run_or_exit(
        main_async(config), interrupted="interrupted: workers stopped, queues deleted"
    )
    meta["loadavg_end"] = os.getloadavg()
    meta["io_pressure_end"] = io_pressure()
    meta["duration_s"] = round(time.monotonic() - started, 1)
    metrics = _metrics(config.n, config.awaited_n, config.latency_seconds)
    rows = summarise(metrics, bench.samples)
    table = markdown(rows, metrics, config)
    results = BENCH_DIR / "results"
    results.mkdir(exist_ok=True)
    out = results / "latest.json"
    config_json = {k: v for k, v in vars(config).items() if k != "url"}
    report = {
        "machine": meta,
        "config": config_json,
        "orders": bench.orders,  # the sides' order in each repeat
        "rows": rows,
        "notes": bench.notes,
    }
    out.write_text(json.dumps(report, indent=2))
    print(table)
    for note in bench.notes:
        print(f"\nnote: {note}")
    print(
        f"\nmedians of {config.repeats} interleaved round(s) of {', '.join(config.sides)}; "
        + " / ".join(" ".join(order) for order in bench.orders)
    )
    print(
        f"{meta['date']} · {meta['nproc']} CPUs, {meta['cpu']} · Python {meta['python']} · "
        f"RabbitMQ {meta['rabbitmq']} · "
        + " · ".join(f"{k} {v}" for k, v in meta["packages"].items())
        + f" · {meta['event_loop']} · load average {meta['loadavg_start'][0]:.2f} → "
        f"{meta['loadavg_end'][0]:.2f} · {meta['duration_s']}s · written to {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
