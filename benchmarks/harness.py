"""The pieces the benchmark runner and the profiler share.

- `Collector`: a UDP socket read by a thread; handlers send one datagram per handled message.
- `Child`: a worker subprocess (``cuebx worker``, with or without the no-op plug-in, or the
  floor consumer) with its CPU time and memory read from ``/proc``, stopped by SIGTERM then
  SIGKILL, never left behind.
- `Rabbit`: a bare aio-pika connection for the runner's own broker chores (counts, purges,
  deletes).
- `FloorPublisher`: what a hand-written aio-pika publisher does: a channel with publisher
  confirms, a persistent `aio_pika.Message` with the bytes and headers cuebx sends.

Every wait has a deadline and ends with a `BenchmarkError` that says what did not happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import aio_pika
import msgspec
from aio_pika.abc import AbstractExchange, AbstractRobustChannel, AbstractRobustConnection
from wire import DATAGRAM, ENV_PLUGIN, ENV_PREFIX, ENV_UDP

from cuebx.brokers.base import mask_url

__all__ = [
    "BENCH_DIR",
    "BenchmarkError",
    "Child",
    "Collector",
    "FloorPublisher",
    "Rabbit",
    "Record",
    "VENV_BIN",
    "cuebx_worker",
    "floor_consumer",
    "io_wait_us",
    "iter_lanes",
    "quiet_disk",
    "run_loop",
    "stop_all_children",
    "wait_until",
]

BENCH_DIR = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: The collector's receive buffer: the kernel caps it at net.core.rmem_max (root may force it).
RECEIVE_BUFFER = 16 * 1024 * 1024


class BenchmarkError(RuntimeError):
    """A benchmark could not run to the end: what did not happen, and within what time."""


async def wait_until(
    condition: Callable[[], bool | Awaitable[bool]],
    *,
    within: float,
    what: str | Callable[[], str],
    interval: float = 0.05,
    child: Child | None = None,
) -> None:
    """Poll `condition` until it holds; fail after `within` seconds naming `what`.

    A `child` is checked on each poll too: if it died, the error says so with its log's tail.
    """
    deadline = time.monotonic() + within
    for _ in range(int(within / interval) + 2):
        if child is not None:
            child.check_alive()
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(interval)
    described = what if isinstance(what, str) else what()
    raise BenchmarkError(f"timed out after {within:g}s waiting for {described}")


def io_wait_us() -> int | None:
    """Microseconds some task waited on the disk since boot (/proc/pressure/io), if known."""
    try:
        text = Path("/proc/pressure/io").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("some") and "total=" in line:
            return int(line.rsplit("total=", 1)[1])
    return None


async def quiet_disk(*, longest: float = 15.0, window: float = 1.0, share: float = 0.02) -> bool:
    """Wait until tasks waited on the disk for less than `share` of a `window`.

    RabbitMQ writes persistent messages to disk, and keeps writing for a while after a burst
    (an enqueue variant, a preload); a benchmark started meanwhile meets its stalls. Returns
    False when the disk did not quiet down within `longest` seconds (the run goes on).
    """
    for _ in range(int(longest / window)):
        before = io_wait_us()
        if before is None:
            return True
        await asyncio.sleep(window)
        after = io_wait_us() or before
        if after - before < share * window * 1e6:
            return True
    return False


# -- the UDP collector ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Record:
    """One handled message as reported by its handler's datagram."""

    received: float  # time.perf_counter() in the runner when the datagram arrived
    i: int
    sent: float  # the `sent` argument: time.time() at publish for the latency benchmark
    started: float  # time.time() in the handler when it started


@dataclass
class _Window:
    expected: set[int]
    on_first: Callable[[], None] | None
    records: list[Record] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)
    duplicates: int = 0
    strays: int = 0


class Collector:
    """Receive handler datagrams on a thread, so the count never waits for the runner's loop.

    `arm` opens a window expecting a set of message numbers; `complete` says when all of them
    were seen. Datagrams outside the window (late or from a previous variant) are counted as
    strays, never as handled messages.
    """

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for option in (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF):
            if option is None:
                continue
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, option, RECEIVE_BUFFER)
                break
            except OSError:
                continue
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.1)
        self._lock = threading.Lock()
        self._window: _Window | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="udp-collector", daemon=True)

    @property
    def address(self) -> str:
        host, port = self._sock.getsockname()
        return f"{host}:{port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=2)
        self._sock.close()

    def arm(self, expected: range, on_first: Callable[[], None] | None = None) -> None:
        """Start counting datagrams for message numbers in `expected`."""
        with self._lock:
            self._window = _Window(set(expected), on_first)

    def disarm(self) -> _Window:
        """Stop counting and return what the window saw."""
        with self._lock:
            window, self._window = self._window, None
        if window is None:
            raise BenchmarkError("the collector was not armed")
        return window

    def seen(self) -> int:
        with self._lock:
            return 0 if self._window is None else len(self._window.seen)

    def complete(self) -> bool:
        with self._lock:
            return self._window is not None and len(self._window.seen) == len(self._window.expected)

    def _run(self) -> None:
        unpack = DATAGRAM.unpack
        clock = time.perf_counter
        for _ in iter(self._stopped.is_set, True):
            try:
                data = self._sock.recv(64)
            except TimeoutError:
                continue
            except OSError:
                return
            received = clock()
            i, sent, started = unpack(data)
            self._record(Record(received, i, sent, started))

    def _record(self, record: Record) -> None:
        with self._lock:
            window = self._window
            if window is None or record.i not in window.expected:
                if window is not None:
                    window.strays += 1
                return
            if record.i in window.seen:
                window.duplicates += 1
                return
            window.seen.add(record.i)
            window.records.append(record)
            first = len(window.records) == 1
        if first and window.on_first is not None:
            window.on_first()


# -- worker subprocesses --------------------------------------------------------------------

_children: set[Child] = set()


class Child:
    """A worker subprocess in its own session (a Ctrl-C reaches the runner, which stops it)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.name = name
        self._log: IO[bytes] = tempfile.TemporaryFile(prefix="cuebx-bench-")
        self.spawned = time.perf_counter()
        self.process = subprocess.Popen(
            argv,
            env=env,
            cwd=BENCH_DIR,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _children.add(self)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 15) -> str:
        self._log.seek(0)
        text = self._log.read().decode(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise BenchmarkError(
                f"{self.name} (pid {self.pid}) exited with code {code}:\n{self.log_tail()}"
            )

    def cpu_seconds(self) -> float:
        """User + system CPU time so far, from /proc/<pid>/stat."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def memory_kib(self, key: str) -> int:
        """A /proc/<pid>/status memory field in KiB: ``VmRSS`` (now) or ``VmHWM`` (peak)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
        raise BenchmarkError(f"{self.name}: no {key} in /proc/{self.pid}/status")

    def stop(self, within: float = 15.0) -> int:
        """SIGTERM, wait up to `within` seconds, then SIGKILL; return the exit code."""
        _children.discard(self)
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    return self.process.wait(within)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    return self.process.wait(5)
            return self.process.returncode
        finally:
            self._log.close()


def stop_all_children() -> None:
    """Stop every child still running (on errors and Ctrl-C)."""
    for child in list(_children):
        child.stop(within=5.0)


def _child_env(prefix: str, udp: str, url: str, *, plugin: bool = False) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            ENV_PREFIX: prefix,
            ENV_UDP: udp,
            # Always set, so a CUEBX_BENCH_PLUGIN left in the shell cannot change a side.
            ENV_PLUGIN: "1" if plugin else "0",
            "CUEBX_BROKER_URL": url,
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(BENCH_DIR), env.get("PYTHONPATH", "")) if p
            ),
        }
    )
    return env


def cuebx_worker(
    queues: list[str],
    *,
    prefix: str,
    udp: str,
    url: str,
    prefetch: int | None,
    plugin: bool = False,
) -> Child:
    """Start ``cuebx worker -A bench_app:app -Q <queues> [--prefetch N]``.

    With `plugin`, the worker's app has ``bench_app.NoOpPlugin`` installed.
    """
    argv = [str(VENV_BIN / "cuebx"), "worker", "-A", "bench_app:app", "-Q", ",".join(queues)]
    if prefetch is not None:
        argv += ["--prefetch", str(prefetch)]
    argv += ["--log-level", "WARNING"]
    name = "cuebx worker with the no-op plug-in" if plugin else "cuebx worker"
    return Child(name, argv, _child_env(prefix, udp, url, plugin=plugin))


def floor_consumer(
    queues: list[str], *, prefix: str, udp: str, url: str, prefetch: int | None
) -> Child:
    """Start the bare aio-pika consumer (benchmarks/floor_consumer.py)."""
    argv = [sys.executable, str(BENCH_DIR / "floor_consumer.py"), "--queues", ",".join(queues)]
    argv += ["--prefetch", str(prefetch or 10)]
    return Child("floor consumer", argv, _child_env(prefix, udp, url))


# -- the broker, bare -----------------------------------------------------------------------


class Rabbit:
    """The runner's own connection for counting, purging and deleting."""

    def __init__(
        self, connection: AbstractRobustConnection, channel: AbstractRobustChannel
    ) -> None:
        self.connection = connection
        self.channel = channel

    @classmethod
    async def connect(cls, url: str, name: str) -> Rabbit:
        try:
            async with asyncio.timeout(10):
                connection = await aio_pika.connect_robust(
                    url, client_properties={"connection_name": name}
                )
                channel = await connection.channel(publisher_confirms=False)
        except (TimeoutError, OSError) as exc:
            raise BenchmarkError(f"cannot reach RabbitMQ at {mask_url(url)}: {exc}") from exc
        return cls(connection, channel)

    async def counts(self, queue: str) -> tuple[int, int]:
        """(ready messages, consumers) of an existing queue, asked of the broker now."""
        # Straight to aiormq: aio-pika's robust channel answers a passive declaration of a
        # queue it declared before from its cache, with the counts of that time.
        async with asyncio.timeout(10):
            underlay = await self.channel.get_underlay_channel()
            ok = await underlay.queue_declare(queue, passive=True)
        return int(ok.message_count or 0), int(ok.consumer_count or 0)

    async def purge(self, queue: str) -> None:
        async with asyncio.timeout(30):
            underlay = await self.channel.get_underlay_channel()
            await underlay.queue_purge(queue)

    async def delete(self, queues: list[str], exchange: str | None) -> list[str]:
        """Delete queues and an exchange; return what could not be deleted."""
        failed = []
        for name in queues:
            try:
                async with asyncio.timeout(10):
                    await self.channel.queue_delete(name)
            except Exception as exc:
                failed.append(f"queue {name}: {exc!r}")
        if exchange is not None:
            try:
                async with asyncio.timeout(10):
                    await self.channel.exchange_delete(exchange)
            except Exception as exc:
                failed.append(f"exchange {exchange}: {exc!r}")
        return failed

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(10):
                await self.connection.close()


# -- the floor publisher ---------------------------------------------------------------------


class _Arguments(msgspec.Struct):
    i: int
    sent: float


_encode = msgspec.json.Encoder().encode


class FloorPublisher:
    """Publish as a hand-written aio-pika producer would, with the bytes cuebx sends.

    Per message: encode the arguments with msgspec, a new uuid4 id, a persistent
    `aio_pika.Message` with the cuebx headers and properties, `Exchange.publish(mandatory=True)`
    on a channel with publisher confirms, awaited.
    """

    def __init__(self, connection: AbstractRobustConnection, exchange: AbstractExchange) -> None:
        self.connection = connection
        self.exchange = exchange

    @classmethod
    async def connect(cls, url: str, exchange: str) -> FloorPublisher:
        async with asyncio.timeout(10):
            connection = await aio_pika.connect_robust(
                url, client_properties={"connection_name": "cuebx benchmark floor publisher"}
            )
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            declared = await channel.get_exchange(exchange, ensure=False)
        return cls(connection, declared)

    @staticmethod
    def message(task: str, i: int, sent: float) -> aio_pika.Message:
        message_id = uuid.uuid4().hex
        return aio_pika.Message(
            _encode(_Arguments(i, sent)),
            headers={"x-cuebx-task": task, "x-retry-attempt": 0},
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message_id,
            correlation_id=message_id,
            timestamp=datetime.now(UTC),
        )

    async def publish(self, queue: str, task: str, i: int, sent: float) -> None:
        await self.exchange.publish(self.message(task, i, sent), routing_key=queue, mandatory=True)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(10):
                await self.connection.close()


#: The broker every benchmark uses unless told otherwise (``--url``).
DEFAULT_URL = os.environ.get("CUEBX_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")
#: Concurrent publishers, by default: the "100 concurrent callers" of the reports.
LANES = 100


async def in_lanes(
    count: int, publish: Callable[[int], Awaitable[Any]], lanes: int = LANES
) -> None:
    """Call ``publish(i)`` for every i in ``range(count)`` from `lanes` concurrent loops."""

    async def lane(numbers: range) -> None:
        for i in numbers:
            await publish(i)

    async with asyncio.TaskGroup() as group:
        for numbers in iter_lanes(count, lanes):
            group.create_task(lane(numbers))


async def within(seconds: float, what: str, work: Awaitable[Any]) -> Any:
    """Await `work`, failing after `seconds` with a message naming `what`."""
    try:
        async with asyncio.timeout(seconds):
            return await work
    except TimeoutError:
        raise BenchmarkError(f"timed out after {seconds:g}s: {what}") from None


def publish_budget(n: int) -> float:
    """Seconds allowed for publishing `n` messages: generous, assumes at least 50 msg/s."""
    return 60.0 + n / 50.0


async def preload(rabbit: Rabbit, floor: FloorPublisher, queue: str, task: str, n: int) -> None:
    """Fill `queue` with `n` messages of `task` (the bytes cuebx sends), and wait for them."""
    await rabbit.purge(queue)
    await within(
        publish_budget(n),
        f"preloading {n} messages into {queue}",
        in_lanes(n, lambda i: floor.publish(queue, task, i, 0.0)),
    )

    async def loaded() -> bool:
        ready, _ = await rabbit.counts(queue)
        return ready == n

    await wait_until(loaded, within=60, what=f"{n} ready messages in {queue}")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Render a report's rows as a Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def iter_lanes(count: int, lanes: int) -> Iterator[range]:
    """Split ``range(count)`` into `lanes` contiguous parts (the first ones one longer)."""
    size, extra = divmod(count, lanes)
    start = 0
    for lane in range(lanes):
        stop = start + size + (lane < extra)
        yield range(start, stop)
        start = stop


def run_or_exit(main: Awaitable[Any], *, interrupted: str) -> Any:
    """Run a benchmark's `main` (`run_loop`); end the process on Ctrl-C or a failure.

    Ctrl-C says `interrupted` (what was cleaned up) and exits 130; a `BenchmarkError` says
    what did not happen and exits 1.
    """
    try:
        return run_loop(main)
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(interrupted, file=sys.stderr)
        raise SystemExit(130) from None
    except BenchmarkError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def run_loop(main: Awaitable[Any]) -> Any:
    """Run `main` on uvloop when it is installed (as ``cuebx worker`` does), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)  # type: ignore[arg-type]
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)  # type: ignore[arg-type]
