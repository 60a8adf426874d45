"""Profile cuebx's hot paths with py-spy: the worker draining a queue, and 100 concurrent delay().

    .venv/bin/pip install py-spy          # into the venv only, not a project dependency
    .venv/bin/python benchmarks/profiling.py [--what drain,enqueue] [--n 50000] [--rate 500]

py-spy attaches to the process once it is doing the work (the first message handled, or the
publisher told to start), so start-up is not in the profile, and it samples without pausing
the process (``--nonblocking``). Idle samples (the event loop waiting in epoll) are left out
by py-spy, so percentages are shares of the time the process was on a CPU. The raw stacks
are written to benchmarks/results/profile-<what>.txt (flamegraph.pl or speedscope read them);
the summary printed is what benchmarks/README.md quotes.

Time spent in C (uvloop's loop, msgspec, socket calls) is charged to the Python function that
called into it; samples whose innermost Python frame is the loop's entry point are uvloop
itself: its C loop and callbacks, the socket reads and writes.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import re
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from bench_app import build_app
from harness import (
    BENCH_DIR,
    DEFAULT_URL,
    VENV_BIN,
    BenchmarkError,
    Collector,
    FloorPublisher,
    Rabbit,
    cuebx_worker,
    floor_consumer,
    in_lanes,
    preload,
    publish_budget,
    run_loop,
    stop_all_children,
    wait_until,
    within,
)
from wire import enqueue_queue, work_queue

from cuebx import Cuebx

RESULTS = BENCH_DIR / "results"
URL = DEFAULT_URL
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^():]*)(?::\d+)?\)$")

# -- py-spy -----------------------------------------------------------------------------------


def start_py_spy(pid: int, out: Path, rate: int) -> subprocess.Popen[bytes]:
    py_spy = VENV_BIN / "py-spy"
    if not py_spy.exists():
        raise BenchmarkError(f"py-spy is not installed: {VENV_BIN / 'pip'} install py-spy")
    argv = [str(py_spy), "record", "--pid", str(pid), "--format", "raw", "-o", str(out)]
    argv += ["--rate", str(rate), "--nonblocking"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stop_py_spy(spy: subprocess.Popen[bytes]) -> None:
    """Ctrl-C py-spy, which then writes what it sampled."""
    spy.send_signal(signal.SIGINT)
    try:
        _, err = spy.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        spy.kill()
        raise BenchmarkError("py-spy did not write its profile within 30s") from None
    if spy.returncode not in (0, -signal.SIGINT):
        raise BenchmarkError(f"py-spy failed ({spy.returncode}): {err.decode()[-500:]}")


# -- reading the stacks ---------------------------------------------------------------------


def category(file: str) -> str:
    top = file.split("/", 1)[0]
    if top == "cuebx":
        return "cuebx"
    if top in ("aio_pika", "aiormq", "pamqp"):
        return "aio-pika/aiormq/pamqp"
    if top == "anyio":
        return "anyio"
    if top in ("asyncio", "uvloop") or file in ("runners.py", "base_events.py", "events.py"):
        return "event loop (uvloop, asyncio)"
    if file.split("/")[0] in ("bench_app.py", "harness.py", "profiling.py", "floor_consumer.py"):
        return "benchmark code"
    return "other (stdlib: uuid, datetime, contextvars, logging …)"


@dataclass
class Profile:
    total: int
    self_by_function: collections.Counter[tuple[str, str]]
    inclusive_by_function: collections.Counter[tuple[str, str]]
    self_by_category: collections.Counter[str]


def _frame(text: str) -> tuple[str, str]:
    match = _FRAME.match(text.strip())
    if match is None:
        return text.strip(), ""
    return match["function"], match["file"]


def read_profile(path: Path) -> Profile:
    total = 0
    own: collections.Counter[tuple[str, str]] = collections.Counter()
    inclusive: collections.Counter[tuple[str, str]] = collections.Counter()
    categories: collections.Counter[str] = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack.split(";")]
        total += count
        leaf = frames[-1]
        own[leaf] += count
        categories[category(leaf[1])] += count
        for frame in set(frames):
            inclusive[frame] += count
    return Profile(total, own, inclusive, categories)


def summary(title: str, profile: Profile, *, rate: int, messages: int, top: int = 15) -> str:
    """Markdown tables: self time by owner (with CPU µs per message), top functions."""
    if not profile.total:
        return f"### {title}\n\nno samples\n"
    pct = 100 / profile.total
    per_message = 1e6 / rate / messages  # µs of CPU per message that one sample stands for
    lines = [f"### {title}", ""]
    lines.append(
        f"{profile.total} samples on CPU at {rate}/s: "
        f"{profile.total * per_message:.0f} µs of CPU per message (py-spy slows it down)."
    )
    lines += ["", "| self time by owner | % | µs/msg |", "| --- | ---: | ---: |"]
    for name, count in profile.self_by_category.most_common():
        lines.append(f"| {name} | {count * pct:.1f} | {count * per_message:.1f} |")
    lines += ["", "| function (self time) | file | % |", "| --- | --- | ---: |"]
    for (function, file), count in profile.self_by_function.most_common(top):
        lines.append(f"| `{function}` | {file} | {count * pct:.1f} |")
    lines += ["", "| cuebx function (inclusive) | file | % |", "| --- | --- | ---: |"]
    # cli.py's frames are the root of every stack in the worker: not informative.
    ours = [
        (f, c)
        for f, c in profile.inclusive_by_function.items()
        if f[1].startswith("cuebx/") and f[1] != "cuebx/cli.py"
    ]
    for (function, file), count in sorted(ours, key=lambda fc: -fc[1])[:top]:
        lines.append(f"| `{function}` | {file} | {count * pct:.1f} |")
    return "\n".join(lines) + "\n"


# -- drain --------------------------------------------------------------------------------------


async def profile_drain(n: int, rate: int, *, floor_side: bool) -> Path:
    """A worker draining `n` preloaded messages, sampled from its first handled one."""
    prefix = f"bench.{uuid.uuid4().hex[:12]}"
    collector = Collector()
    collector.start()
    app = build_app(prefix, collector.address, url=URL)
    rabbit = await Rabbit.connect(URL, f"cuebx profiler {prefix}")
    floor: FloorPublisher | None = None
    out = RESULTS / ("profile-drain-floor.txt" if floor_side else "profile-drain.txt")
    try:
        await app.connect()
        floor = await FloorPublisher.connect(URL, prefix)
        queue = work_queue(prefix)
        await preload(rabbit, floor, queue, "work", n)
        collector.arm(range(n))
        start = floor_consumer if floor_side else cuebx_worker
        child = start([queue], prefix=prefix, udp=collector.address, url=URL, prefetch=100)
        await wait_until(
            lambda: collector.seen() > 0, within=60, what="a first message", child=child
        )
        spy = start_py_spy(child.pid, out, rate)
        try:
            await wait_until(
                collector.complete,
                within=60 + n / 100,
                what=lambda: f"{n} handled messages ({collector.seen()} seen)",
                child=child,
            )
        finally:
            stop_py_spy(spy)
            collector.disarm()
            child.stop()
    finally:
        await _clean_up(app, rabbit, floor, prefix)
        collector.stop()
    return out


# -- enqueue ------------------------------------------------------------------------------------


async def profile_enqueue(n: int, rate: int, *, floor_side: bool) -> Path:
    """A child process publishing from 100 coroutines, sampled once it starts."""
    prefix = f"bench.{uuid.uuid4().hex[:12]}"
    app = build_app(prefix, "127.0.0.1:9", url=URL)
    rabbit = await Rabbit.connect(URL, f"cuebx profiler {prefix}")
    out = RESULTS / ("profile-enqueue-floor.txt" if floor_side else "profile-enqueue.txt")
    try:
        await app.connect()
        argv = [sys.executable, __file__, "--child-enqueue", prefix, "--n", str(n)]
        argv += ["--floor"] if floor_side else []
        child = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        assert child.stdin is not None
        assert child.stdout is not None
        try:
            async with asyncio.timeout(30):
                ready = await child.stdout.readline()
            if ready.strip() != b"ready":
                raise BenchmarkError(f"the enqueue child said {ready!r} instead of ready")
            spy = start_py_spy(child.pid, out, rate)
            await asyncio.sleep(1.0)  # let py-spy attach before the work starts
            child.stdin.write(b"go\n")
            await child.stdin.drain()
            try:
                async with asyncio.timeout(60 + n / 50):
                    done = await child.stdout.readline()
            finally:
                stop_py_spy(spy)
            if done.strip() != b"done":
                raise BenchmarkError(f"the enqueue child said {done!r} instead of done")
        finally:
            with contextlib.suppress(ProcessLookupError):
                child.terminate()
            async with asyncio.timeout(15):
                await child.wait()
    finally:
        await _clean_up(app, rabbit, None, prefix)
    return out


async def child_enqueue(prefix: str, n: int, *, floor_side: bool) -> None:
    app = build_app(prefix, "127.0.0.1:9", url=URL)
    noop = app.tasks["noop"]
    queue = enqueue_queue(prefix)
    floor = await FloorPublisher.connect(URL, prefix) if floor_side else None
    if floor is None:
        await app.connect()
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(30):
        await loop.run_in_executor(None, sys.stdin.readline)
    started = time.perf_counter()

    async def publish(i: int) -> None:
        if floor is not None:
            await floor.publish(queue, "noop", i, 0.0)
        else:
            await noop.delay(i, 0.0)

    await within(publish_budget(n), f"publishing {n} messages", in_lanes(n, publish))
    elapsed = time.perf_counter() - started
    print(f"{n / elapsed:.0f} msg/s under py-spy", file=sys.stderr)
    print("done", flush=True)
    await (app.close() if floor is None else floor.close())


async def _clean_up(app: Cuebx, rabbit: Rabbit, floor: FloorPublisher | None, prefix: str) -> None:
    stop_all_children()
    with contextlib.suppress(Exception):
        async with asyncio.timeout(30):
            await app.close()
    if floor is not None:
        await floor.close()
    failed = await rabbit.delete([q.name for q in app.topology().queues], prefix)
    await rabbit.close()
    if failed:
        print("could not delete: " + "; ".join(failed), file=sys.stderr)


# -- command line -------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--what", default="drain,drain-floor,enqueue,enqueue-floor")
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    parser.add_argument("--child-enqueue", metavar="PREFIX", help=argparse.SUPPRESS)
    parser.add_argument("--floor", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child_enqueue:
        run_loop(child_enqueue(options.child_enqueue, options.n, floor_side=options.floor))
        return 0
    RESULTS.mkdir(exist_ok=True)
    titles = {
        "drain": f"cuebx worker draining {options.n:,} messages (prefetch 100)",
        "drain-floor": f"floor consumer draining {options.n:,} messages (prefetch 100)",
        "enqueue": f"100 concurrent delay() callers, {options.n:,} messages",
        "enqueue-floor": f"floor: 100 concurrent aio-pika publishers, {options.n:,} messages",
    }
    runs = {"drain": profile_drain, "enqueue": profile_enqueue}
    try:
        for what in options.what.split(","):
            if what not in titles:
                parser.error(f"--what: unknown {what!r}; use {', '.join(titles)}")
            kind, _, side = what.partition("-")
            path = run_loop(runs[kind](options.n, options.rate, floor_side=side == "floor"))
            profile = read_profile(path)
            print(summary(titles[what], profile, rate=options.rate, messages=options.n))
            print(f"raw stacks: {path}\n")
    except BenchmarkError as exc:
        print(f"profiling failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
