"""Worker processes: ``cuebx worker --processes 2`` against one process, on the local RabbitMQ.

    .venv/bin/python benchmarks/processes.py                    # 5 rounds: about 4 minutes
    .venv/bin/python benchmarks/processes.py --n 2000 --cpu-n 200 --repeats 1   # a smoke run
    .venv/bin/python benchmarks/processes.py --processes 4 --url amqp://user:pass@host:5672/

Two benchmarks, each run once per side in every round, the side that goes first alternating:

- **drain**: n preloaded no-op tasks; msg/s once every worker process has its consumer.
- **CPU-bound**: n preloaded tasks whose sync handler computes for about 5 ms; msg/s the same way.

The sides are ``cuebx worker`` (one process, no supervisor: the default) and ``cuebx worker
--processes 2``. The table gives medians with min-max ranges and the ratio of the medians with
the range of the per-round ratios; benchmarks/results/processes.json keeps every sample. See
"Worker processes" in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import (
    BENCH_DIR,
    DEFAULT_URL,
    VENV_BIN,
    BenchmarkError,
    Child,
    Collector,
    FloorPublisher,
    Rabbit,
    preload,
    quiet_disk,
    run_loop,
    stop_all_children,
    wait_until,
)
from processes_app import DEFAULT_SPIN, ENV_SPIN, build_app, spin_queue, work_queue
from wire import ENV_PREFIX, ENV_UDP

GOALS = {"drain": 1.6, "cpu": 1.8}
TITLES = {"drain": "drain, no-op handler", "cpu": "CPU-bound sync handler"}


@dataclass
class Config:
    url: str
    n: int
    cpu_n: int
    repeats: int
    processes: int
    prefetch: int
    cpu_prefetch: int
    spin: int


@dataclass
class Run:
    """What one benchmark run shares: names, connections, the collector and the samples."""

    config: Config
    prefix: str
    rabbit: Rabbit
    floor: FloorPublisher
    collector: Collector
    samples: dict[str, dict[int, list[float]]] = field(default_factory=dict)

    def worker(self, processes: int, queue: str, prefetch: int) -> Child:
        """``cuebx worker`` on one queue with `processes` processes (1: no supervisor)."""
        argv = [str(VENV_BIN / "cuebx"), "worker", "-A", "processes_app:app", "-Q", queue]
        argv += ["--prefetch", str(prefetch), "--log-level", "WARNING"]
        if processes > 1:
            argv += ["--processes", str(processes)]
        env = dict(os.environ)
        env.update(
            {
                ENV_PREFIX: self.prefix,
                ENV_UDP: self.collector.address,
                ENV_SPIN: str(self.config.spin),
                "CUEBX_BROKER_URL": self.config.url,
                "PYTHONPATH": os.pathsep.join(
                    p for p in (str(BENCH_DIR), env.get("PYTHONPATH", "")) if p
                ),
            }
        )
        return Child(f"cuebx worker --processes {processes}", argv, env)


async def measure(run: Run, benchmark: str, processes: int) -> float:
    """Preload, start the worker, and return msg/s from the moment every consumer is there.

    Worker processes start a few hundred milliseconds apart; counting only what was handled
    after the last one registered its consumer measures the processes working together.
    """
    config = run.config
    cpu = benchmark == "cpu"
    queue = spin_queue(run.prefix) if cpu else work_queue(run.prefix)
    n = config.cpu_n if cpu else config.n
    await preload(run.rabbit, run.floor, queue, "spin" if cpu else "work", n)
    await quiet_disk()
    run.collector.arm(range(n))
    child = run.worker(processes, queue, config.cpu_prefetch if cpu else config.prefetch)
    try:

        async def consuming() -> bool:
            _, consumers = await run.rabbit.counts(queue)
            return consumers >= processes

        await wait_until(consuming, within=60, what="consumers", child=child, interval=0.02)
        all_in = time.perf_counter()
        await wait_until(
            run.collector.complete,
            within=120 + n / 50,
            what=lambda: f"{n} handled ({run.collector.seen()} seen) by {child.name}",
            child=child,
            interval=0.02,
        )
    finally:
        window = run.collector.disarm()
        code = child.stop(within=60)
    if code != 0:
        print(f"    warning: {child.name} exited with code {code}", file=sys.stderr)
    after = [r.received for r in window.records if r.received >= all_in]
    if len(after) < n // 2:
        raise BenchmarkError(
            f"{benchmark}: only {len(after)} of {n} messages were handled after every consumer "
            "was registered; raise --n"
        )
    rate = len(after) / (after[-1] - all_in)
    run.samples.setdefault(benchmark, {}).setdefault(processes, []).append(rate)
    print(
        f"    {benchmark:<6} {processes} process(es) {rate:>10,.0f} msg/s",
        file=sys.stderr,
        flush=True,
    )
    return rate


async def main_async(config: Config) -> Run:
    prefix = f"bench.{uuid.uuid4().hex[:12]}"
    rabbit = await Rabbit.connect(config.url, f"cuebx processes benchmark runner {prefix}")
    collector = Collector()
    collector.start()
    app = build_app(prefix, collector.address, url=config.url, iterations=config.spin)
    floor: FloorPublisher | None = None
    print(f"run {prefix}: queues {prefix}.*", file=sys.stderr, flush=True)
    try:
        async with asyncio.timeout(30):
            await app.connect()
        floor = await FloorPublisher.connect(config.url, prefix)
        run = Run(config, prefix, rabbit, floor, collector)
        sides = (1, config.processes)
        for repeat in range(config.repeats):
            order = sides if repeat % 2 == 0 else sides[::-1]
            print(f"round {repeat + 1}: {order}", file=sys.stderr, flush=True)
            for benchmark in ("drain", "cpu"):
                for processes in order:
                    await measure(run, benchmark, processes)
        return run
    finally:
        stop_all_children()
        await app.close()
        if floor is not None:
            await floor.close()
        queues = [q.name for q in app.topology().queues]
        failed = await rabbit.delete(queues, prefix)
        await rabbit.close()
        collector.stop()
        if failed:
            print("could not delete: " + "; ".join(failed), file=sys.stderr)


def summarise(run: Run) -> list[dict[str, Any]]:
    rows = []
    many = run.config.processes
    for benchmark, by_side in run.samples.items():
        one, several = by_side[1], by_side[many]
        ratios = [b / a for a, b in zip(one, several, strict=True)]
        ratio = statistics.median(several) / statistics.median(one)
        rows.append(
            {
                "benchmark": benchmark,
                "one": _summary(one),
                "several": _summary(several),
                "ratio": ratio,
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "goal": GOALS[benchmark],
                "met": ratio >= GOALS[benchmark] if many == 2 else None,
            }
        )
    return rows


def _summary(values: list[float]) -> dict[str, Any]:
    return {
        "samples": values,
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def _cell(summary: dict[str, Any]) -> str:
    return f"{summary['median']:,.0f} ({summary['min']:,.0f}-{summary['max']:,.0f})"


def markdown(rows: list[dict[str, Any]], config: Config) -> str:
    many = config.processes
    lines = [
        f"| msg/s, median (min-max) of {config.repeats} | 1 process | {many} processes | "
        f"{many} vs 1 (per round) | goal (2 vs 1) | met |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        met = {True: "yes", False: "no", None: "-"}[row["met"]]
        lines.append(
            f"| {TITLES[row['benchmark']]} | {_cell(row['one'])} | {_cell(row['several'])} | "
            f"{row['ratio']:.2f}x ({row['ratio_min']:.2f}-{row['ratio_max']:.2f}) | "
            f"≥ {row['goal']}x | {met} |"
        )
    return "\n".join(lines)


def parse_config(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=20_000, help="drain messages per sample")
    parser.add_argument("--cpu-n", type=int, default=1_000, help="CPU-bound messages per sample")
    parser.add_argument("--repeats", type=int, default=5, help="rounds (each side once per round)")
    parser.add_argument("--processes", type=int, default=2, help="processes of the other side")
    parser.add_argument("--prefetch", type=int, default=100, help="drain prefetch per process")
    parser.add_argument("--cpu-prefetch", type=int, default=4, help="CPU-bound prefetch")
    parser.add_argument(
        "--spin", type=int, default=DEFAULT_SPIN, help="loop iterations per CPU task"
    )
    parser.add_argument("--url", default=DEFAULT_URL)
    options = parser.parse_args(argv)
    return Config(
        url=options.url,
        n=options.n,
        cpu_n=options.cpu_n,
        repeats=options.repeats,
        processes=options.processes,
        prefetch=options.prefetch,
        cpu_prefetch=options.cpu_prefetch,
        spin=options.spin,
    )


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    try:
        run = run_loop(main_async(config))
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    rows = summarise(run)
    print(markdown(rows, config))
    out = BENCH_DIR / "results" / "processes.json"
    out.parent.mkdir(exist_ok=True)
    document = {
        "config": vars(config) | {"url": "(masked)"},
        "nproc": os.cpu_count(),
        "loadavg_end": os.getloadavg(),
        "rows": rows,
    }
    Path(out).write_text(json.dumps(document, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
