"""Events and rate limits on the local RabbitMQ: emit throughput, the rate a limit achieves.

    .venv/bin/python benchmarks/events.py [--n 5000] [--repeats 3] [--rate 1000]
                                          [--backlog 5000] [--workers 2] [--quick]
                                          [--url amqp://...]

- **emit throughput**: `n` messages through ``delay()`` (one queue), through ``emit()`` to a
  key one subscriber is bound for, and to a key five subscribers are bound for, by 100
  concurrent callers; nothing consumes them (each variant's queues are counted, then
  purged). Interleaved rounds, median of `repeats`; the ratio of each emit to ``delay()``.
- **rate limit**: `backlog` messages of a task with ``rate_limit="<rate>/s"`` are published,
  then drained by `workers` apps in this process (each its own connection, prefetch 100).
  The achieved rate is the starts per second over the run's whole seconds (its last,
  partial second left out), next to how long the drain took against the least it can take.
  The most permits the broker surely granted in any second (a permit whose send and
  confirm both fall in a window was counted in it) must not pass the limit; the most
  handler starts seen in a second can, by the spread of confirm lags. Also the denials per
  start (what the held-back messages cost), and no start on an attempt other than 0.
- **permit cost**: `n` messages of a no-op task drained by one worker without a limit, then
  with a limit they never reach (10^6/s): the difference per message is what asking for a
  permit adds to a start, on top of the drain rate.

Everything is declared under ``bench.<12 hex>`` and deleted at the end, also after a failure
or Ctrl-C. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from harness import (
    BENCH_DIR,
    DEFAULT_URL,
    BenchmarkError,
    Rabbit,
    in_lanes,
    markdown_table,
    run_or_exit,
    wait_until,
)

from cuebx import Cuebx, Task, TaskContext
from cuebx.topology import ExchangeSpec, Topology

PREFETCH = 100
SUBSCRIBERS = 5


@dataclass
class Config:
    url: str
    n: int
    repeats: int
    rate: int
    backlog: int
    workers: int


@dataclass
class Results:
    throughput: dict[str, list[float]] = field(default_factory=dict)
    starts: list[float] = field(default_factory=list)
    #: (sent, confirmed) of every permit granted: the broker counted it in between.
    permits: list[tuple[float, float]] = field(default_factory=list)
    attempts: set[int] = field(default_factory=set)
    denied: int = 0
    drained_s: float = 0.0
    drain: dict[str, float] = field(default_factory=dict)


# -- the apps -----------------------------------------------------------------------------------


def emit_app(prefix: str, url: str) -> Cuebx:
    """A task queue, one subscriber of ``one.happened``, five of ``five.happened``."""
    app = Cuebx(url, exchange=prefix, connection_name=f"cuebx events benchmark {prefix}")

    @app.task(queue=f"{prefix}.tasks")
    async def noop(i: int) -> None: ...

    @app.on("one.happened", queue=f"{prefix}.one", name="one")
    async def one(i: int) -> None: ...

    for k in range(SUBSCRIBERS):

        async def handler(i: int) -> None: ...

        app.on("five.happened", queue=f"{prefix}.five.{k}", name=f"five{k}")(handler)
    return app


def limit_app(prefix: str, url: str, rate: str, results: Results) -> Cuebx:
    """A worker app with one no-op task limited to `rate` (``"none"``: no limit)."""
    app = Cuebx(url, exchange=prefix, delay_levels=16, connection_name=f"cuebx bench {prefix}")
    limit = None if rate == "none" else rate

    @app.task(queue=f"{prefix}.limited", name="limited", rate_limit=limit)
    async def limited(ctx: TaskContext, i: int) -> None:
        results.starts.append(time.time())
        results.attempts.add(ctx.attempt)

    _time_permits(app.broker, results)
    return app


def _time_permits(broker: Any, results: Results) -> None:
    """Wrap the broker's `offer` to note when each granted permit was sent and confirmed."""
    offer = broker.offer

    async def timed(queue: str, message: Any) -> bool:
        sent = time.time()
        granted: bool = await offer(queue, message)
        if granted:
            results.permits.append((sent, time.time()))
        return granted

    broker.offer = timed


# -- emit throughput ----------------------------------------------------------------------------


async def throughput(
    config: Config, app: Cuebx, rabbit: Rabbit, results: Results, round_: int
) -> None:
    """One round of the three variants, in an order that rotates between rounds."""
    prefix, n = app.settings.exchange, config.n
    noop: Task[Any, Any] = app.tasks["noop"]
    variants: list[tuple[str, list[str], Callable[[], Awaitable[Any]]]] = [
        ("delay", [f"{prefix}.tasks"], lambda: in_lanes(n, noop.delay)),
        ("emit.1", [f"{prefix}.one"], lambda: in_lanes(n, lambda i: app.emit("one.happened", i))),
        (
            f"emit.{SUBSCRIBERS}",
            [f"{prefix}.five.{k}" for k in range(SUBSCRIBERS)],
            lambda: in_lanes(n, lambda i: app.emit("five.happened", i)),
        ),
    ]
    shift = round_ % len(variants)
    for key, queues, publish_all in variants[shift:] + variants[:shift]:
        started = time.perf_counter()
        await publish_all()
        rate = n / (time.perf_counter() - started)
        for queue in queues:
            held = (await rabbit.counts(queue))[0]
            if held != n:
                raise BenchmarkError(f"{key}: {queue} holds {held} messages, expected {n}")
            await rabbit.purge(queue)
        results.throughput.setdefault(key, []).append(rate)
        print(f"  {key}: {rate:,.0f} msg/s", file=sys.stderr)


# -- rate limit and permit cost -----------------------------------------------------------------


async def drain(
    config: Config, prefix: str, rate: str, count: int, workers: int, results: Results
) -> tuple[float, list[Cuebx]]:
    """Publish `count` messages, then drain them with `workers` apps; seconds it took."""
    apps = [limit_app(prefix, config.url, rate, results) for _ in range(workers)]
    task: Task[Any, Any] = apps[0].tasks["limited"]
    await apps[0].connect()
    await apps[0].delays.declare(apps[0].broker)  # before anything is timed
    await in_lanes(count, task.delay)
    results.starts.clear()
    results.permits.clear()
    started = time.perf_counter()
    for app in apps:
        await app.start_consumers(prefetch=PREFETCH)
    await wait_until(
        lambda: len(results.starts) >= count,
        within=60 + 3 * count / min(config.rate, 10_000),
        what=lambda: f"{count} starts ({len(results.starts)} seen)",
        interval=0.01,
    )
    elapsed = time.perf_counter() - started
    for app in apps:
        for worker in app.workers:
            await worker.stop()
    return elapsed, apps


async def rate_limit(config: Config, prefix: str, results: Results) -> list[Cuebx]:
    rate = f"{config.rate}/s"
    print(
        f"rate limit {rate}: {config.backlog} messages, {config.workers} workers", file=sys.stderr
    )
    elapsed, apps = await drain(config, prefix, rate, config.backlog, config.workers, results)
    results.drained_s = elapsed
    results.denied = sum(app.limits.counts["limited"].denied for app in apps if app.limits)
    return apps


async def permit_cost(config: Config, prefix: str, results: Results) -> list[Cuebx]:
    """The same drain without a limit and with one it never reaches."""
    made: list[Cuebx] = []
    for rate in ("none", "1000000/s", "none", "1000000/s")[: 2 * config.repeats]:
        elapsed, apps = await drain(config, f"{prefix}.{len(made)}", rate, config.n, 1, results)
        made += apps
        results.drain.setdefault(rate, 0.0)
        results.drain[rate] = max(results.drain[rate], config.n / elapsed)
        print(f"  drain, rate limit {rate}: {config.n / elapsed:,.0f} msg/s", file=sys.stderr)
    return made


# -- the run ------------------------------------------------------------------------------------


async def main_async(config: Config) -> Results:
    prefix = f"bench.{uuid.uuid4().hex[:12]}"
    rabbit = await Rabbit.connect(config.url, f"cuebx events benchmark {prefix}")
    results = Results()
    emitting = emit_app(prefix, config.url)
    made: list[Cuebx] = [emitting]
    try:
        await emitting.connect()
        await emitting.events.declare(emitting.broker)
        for round_ in range(config.repeats):
            print(f"emit throughput, round {round_ + 1}", file=sys.stderr)
            await throughput(config, emitting, rabbit, results, round_)
        made += await rate_limit(config, f"{prefix}.limit", results)
        kept = list(results.starts), list(results.permits), set(results.attempts)
        print("permit cost", file=sys.stderr)
        made += await permit_cost(config, f"{prefix}.cost", results)
        results.starts, results.permits, results.attempts = kept
    finally:
        await _clean_up(made)
        await rabbit.close()
    return results


async def _clean_up(apps: list[Cuebx]) -> None:
    for app in apps:
        try:
            await app.broker.connect()
            await app.broker.delete(app.topology())
            ladder = app.delays.topology()
            main = ExchangeSpec(app.settings.exchange)
            events = app.events.topology()
            await app.broker.delete(
                Topology(
                    ladder.exchange,
                    (*ladder.queues, *events.queues),
                    (*ladder.exchanges, *events.exchanges, main),
                )
            )
        except Exception as exc:
            print(f"clean-up of {app.settings.exchange} failed: {exc!r}", file=sys.stderr)
        finally:
            await app.close()


def most_in_a_window(times: list[float], window: float) -> int:
    ordered = sorted(times)
    most, first = 0, 0
    for last, at in enumerate(ordered):
        while ordered[first] <= at - window:
            first += 1
        most = max(most, last - first + 1)
    return most


def most_surely_in_a_window(permits: list[tuple[float, float]], window: float) -> int:
    """The most permits the broker surely granted within one window.

    A permit was counted by the broker between its send and its confirm: those whose whole
    interval lies in a window were surely counted in it. Client clocks and confirm lags do
    not blur this count, so it must never exceed the limit.
    """
    ordered = sorted(permits)
    most = 0
    for i, (opens, _) in enumerate(ordered):
        closes = opens + window
        inside = 0
        for sent, confirmed in ordered[i:]:
            if sent >= closes:
                break
            inside += confirmed < closes
        most = max(most, inside)
    return most


def steady_rate(starts: list[float]) -> float:
    """Starts per second over the whole seconds of a run (its last, partial one left out)."""
    whole = int(starts[-1] - starts[0])
    if whole < 1:
        return float("nan")
    return sum(1 for at in starts if at < starts[0] + whole) / whole


def report(config: Config, results: Results) -> dict[str, Any]:
    throughput = {key: statistics.median(rates) for key, rates in results.throughput.items()}
    starts = sorted(results.starts)
    plain, limited = results.drain.get("none"), results.drain.get("1000000/s")
    rounds = results.throughput
    return {
        "throughput_msg_s": throughput,
        "throughput_samples": rounds,
        "emit_vs_delay": {
            key: throughput[key] / throughput["delay"] for key in throughput if key != "delay"
        },
        # The ratio in each round (the variants of a round ran one right after the other).
        "emit_vs_delay_per_round": {
            key: [mine / plain for mine, plain in zip(rates, rounds["delay"], strict=True)]
            for key, rates in rounds.items()
            if key != "delay"
        },
        "rate_limit": {
            "limit_per_s": config.rate,
            "backlog": config.backlog,
            "workers": config.workers,
            "achieved_per_s": steady_rate(starts),
            "most_in_one_second": most_in_a_window(starts, 1.0),
            "most_surely_granted_in_one_second": most_surely_in_a_window(results.permits, 1.0),
            "drained_s": results.drained_s,
            "ideal_drain_s": (config.backlog - 1) // config.rate,
            "denials_per_start": results.denied / max(1, len(starts)),
            "attempts": sorted(results.attempts),
        },
        "permit": {
            "drain_plain_msg_s": plain,
            "drain_with_permit_msg_s": limited,
            "us_per_start": (1 / limited - 1 / plain) * 1e6 if plain and limited else None,
        },
    }


def markdown(config: Config, summary: dict[str, Any]) -> str:
    t, ratio = summary["throughput_msg_s"], summary["emit_vs_delay"]
    samples, per_round = summary["throughput_samples"], summary["emit_vs_delay_per_round"]
    limit, permit = summary["rate_limit"], summary["permit"]
    five = f"emit.{SUBSCRIBERS}"

    def spread(values: list[float], form: str) -> str:
        return f"({min(values):{form}}-{max(values):{form}})"

    def emitted(key: str) -> str:
        return (
            f"{t[key]:,.0f} {spread(samples[key], ',.0f')} msg/s = "
            f"{ratio[key]:.2f}x {spread(per_round[key], '.2f')}"
        )

    rows = [
        (
            f"delay(), 100 concurrent (n={config.n:,})",
            f"{t['delay']:,.0f} {spread(samples['delay'], ',.0f')} msg/s",
            "median (min-max) of the rounds",
        ),
        ("emit() to 1 subscriber", emitted("emit.1"), "ratio: median (per-round range)"),
        (
            f"emit() to {SUBSCRIBERS} subscribers",
            f"{emitted(five)} ({t[five] * SUBSCRIBERS:,.0f} copies/s)",
            "",
        ),
        (
            f"rate_limit={limit['limit_per_s']}/s, backlog {limit['backlog']:,}, "
            f"{limit['workers']} workers",
            f"{limit['achieved_per_s']:,.0f} starts/s; drained in {limit['drained_s']:.1f} s "
            f"(at best {limit['ideal_drain_s']} s and a burst); "
            f"{limit['denials_per_start']:.1f} denials per start",
            f"attempts {limit['attempts']}",
        ),
        (
            "most in any second: permits surely granted by the broker / starts seen",
            f"{limit['most_surely_granted_in_one_second']} / {limit['most_in_one_second']}",
            f"≤ {limit['limit_per_s']} / confirm lags blur the second",
        ),
        (
            f"drain, no limit / a limit never reached (n={config.n:,}, 1 worker)",
            f"{permit['drain_plain_msg_s']:,.0f} / {permit['drain_with_permit_msg_s']:,.0f} msg/s",
            f"a permit adds {permit['us_per_start']:.0f} µs per start"
            if permit["us_per_start"] is not None
            else "",
        ),
    ]
    return markdown_table(("measure", "value", "note"), rows)


def parse_config(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, help="messages per throughput variant and drain (5000)")
    parser.add_argument("--repeats", type=int, help="throughput rounds (3)")
    parser.add_argument("--rate", type=int, help="the rate limit, per second (1000)")
    parser.add_argument("--backlog", type=int, help="messages the rate limit drains (5000)")
    parser.add_argument("--workers", type=int, help="worker apps draining the backlog (2)")
    parser.add_argument("--quick", action="store_true", help="n=1000, backlog 2000, 1 round")
    parser.add_argument("--url", default=DEFAULT_URL)
    options = parser.parse_args(argv)
    quick = options.quick
    config = Config(
        url=options.url,
        n=options.n or (1000 if quick else 5000),
        repeats=options.repeats or (1 if quick else 3),
        rate=options.rate or 1000,
        backlog=options.backlog or (2000 if quick else 5000),
        workers=options.workers or 2,
    )
    if config.n < 100 or config.repeats < 1 or config.rate < 1 or config.backlog < 10:
        parser.error("--n >= 100, --repeats >= 1, --rate >= 1, --backlog >= 10")
    return config


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    started = time.monotonic()
    load_start = os.getloadavg()
    results: Results = run_or_exit(main_async(config), interrupted="interrupted: queues deleted")
    summary = report(config, results)
    summary["config"] = {k: v for k, v in vars(config).items() if k != "url"}
    summary["loadavg"] = [load_start, os.getloadavg()]
    summary["duration_s"] = round(time.monotonic() - started, 1)
    out = BENCH_DIR / "results"
    out.mkdir(exist_ok=True)
    (out / "events.json").write_text(json.dumps(summary, indent=2))
    print(markdown(config, summary))
    print(
        f"\nload average {load_start[0]:.2f} → {os.getloadavg()[0]:.2f} · "
        f"{summary['duration_s']}s · written to {out / 'events.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
