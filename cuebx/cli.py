"""The ``cuebx`` command line: a thin layer over the Python API.

The operations commands (``cuebx dlq``, ``cuebx status``, ``cuebx topology diff``) live in
`cuebx.ops.commands`, the only other module that imports click and rich.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import click

from cuebx import __version__
from cuebx.app import Cuebx
from cuebx.brokers.base import mask_url
from cuebx.delays import LadderStatus, ladder_status
from cuebx.durations import label, to_seconds
from cuebx.errors import CuebxError
from cuebx.ops import commands
from cuebx.ops.http import serve
from cuebx.ops.logs import LogFormat, configure_logging
from cuebx.scheduling import JobReport
from cuebx.scheduling.schedules import slot_text
from cuebx.supervisor import Supervisor, parse_processes, parse_size
from cuebx.worker import Worker

if TYPE_CHECKING:
    from cuebx.metrics import PrometheusMetrics

__all__ = ["load_app", "main", "one_line_error"]

logger = logging.getLogger("cuebx.cli")

T = TypeVar("T")


# -A's app, with its errors as one-line click errors.
load_app = commands.load_app


_BROKER_URL_HELP = (
    "The broker URL is the app's own: Cuebx(url) in the module, or CUEBX_BROKER_URL when "
    "Cuebx() is given no URL (the command line does not read it itself)."
)

# The app to load, for every command: -A, or CUEBX_APP when -A is not given.
_app_option = commands.app_option


@click.group(
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=f"Environment: CUEBX_APP stands for -A. {_BROKER_URL_HELP}",
)
@click.version_option(__version__, prog_name="cuebx")
def main() -> None:
    """cuebx: background tasks native to RabbitMQ.

    \b
    Examples:
      cuebx worker -A myapp                       run the tasks of ./myapp.py
      cuebx worker -A shop.tasks:app -Q emails    consume one queue only
      CUEBX_APP=shop.tasks cuebx worker -l debug  the app from the environment
      cuebx topology -A myapp                     print what the app declares
      cuebx topology diff -A myapp                compare it with the broker
      cuebx status -A myapp                       queue depths, tiers, dead letters
      cuebx delays -A myapp                       messages waiting in the delay ladder
      cuebx dlq ls -A myapp                       dead letters by task and reason
      cuebx schedule -A myapp                     list periodic jobs and their scheduler
      cuebx worker -h                             the worker's options
    """


@main.command(epilog=_BROKER_URL_HELP)
@_app_option
@click.option("-Q", "--queues", help="Comma-separated queues to consume (default: all).")
@click.option("--prefetch", type=click.IntRange(min=1), help="Prefetch for every queue.")
@click.option("--shutdown-timeout", help="How long running handlers may finish on stop: 30s.")
@click.option(
    "--processes",
    default="1",
    show_default=True,
    metavar="N|auto",
    help="Worker processes, each with its own connection; auto: one per CPU.",
)
@click.option(
    "--max-tasks-per-child",
    type=click.IntRange(min=1),
    metavar="N",
    help="Replace a worker process after it ran N tasks.",
)
@click.option(
    "--max-memory-per-child",
    metavar="SIZE",
    help="Replace a worker process whose memory is above SIZE: 512MiB, 2GB.",
)
@click.option(
    "-l",
    "--log-level",
    "--loglevel",
    "log_level",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    metavar="LEVEL",
    help="DEBUG, INFO, WARNING or ERROR (any case); logs go to stderr.",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="json: one JSON object per record (with task, message_id, attempt).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    help="Serve /metrics, /healthz and /readyz on this port (needs cuebx[prometheus]).",
)
@click.option(
    "--metrics-host", default="127.0.0.1", show_default=True, help="Address to serve them on."
)
@click.option(
    "--no-scheduler",
    is_flag=True,
    help="Do not take part in firing periodic jobs (their tasks still run here).",
)
def worker(
    app_path: str,
    queues: str | None,
    prefetch: int | None,
    shutdown_timeout: str | None,
    processes: str,
    max_tasks_per_child: int | None,
    max_memory_per_child: str | None,
    log_level: str,
    log_format: LogFormat,
    metrics_port: int | None,
    metrics_host: str,
    no_scheduler: bool,
) -> None:
    """Declare the topology and run tasks until SIGINT or SIGTERM.

    \b
    Examples:
      cuebx worker -A myapp
      cuebx worker -A shop.tasks:app -Q emails,webhooks --prefetch 20
      cuebx worker -A shop.tasks -Q reports --prefetch 2 --shutdown-timeout 2m
      cuebx worker -A shop.tasks --no-scheduler   run tasks, never fire periodic jobs
      cuebx worker -A shop.tasks --processes auto --max-tasks-per-child 1000
      CUEBX_BROKER_URL=amqp://app:secret@rabbitmq:5672/prod cuebx worker -A shop.tasks
      cuebx worker -A shop.tasks --metrics-port 9100 --log-format json
    """
    configure_logging(log_level, log_format)
    try:
        supervised = _supervised(processes, max_tasks_per_child, max_memory_per_child)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    if supervised and metrics_port is not None:
        _share_metrics_between_processes()
    app = _worker_app(app_path, scheduler=not no_scheduler)
    metrics = None if metrics_port is None else _metrics(app)
    names = [q.strip() for q in queues.split(",") if q.strip()] if queues else None
    try:
        seconds = (
            None
            if shutdown_timeout is None
            else to_seconds(shutdown_timeout, what="--shutdown-timeout")
        )
        built = app.worker(queues=names, prefetch=prefetch, shutdown_timeout=seconds)
        supervisor = _supervisor(
            app_path,
            built,
            processes=processes,
            max_tasks_per_child=max_tasks_per_child,
            max_memory_per_child=max_memory_per_child,
            log_level=log_level.upper(),
            prefetch=prefetch,
            publish_timeout=app.settings.publish_timeout,
            scheduler=not no_scheduler,
            metrics=metrics,
        )
    except (LookupError, ValueError, BaseExceptionGroup) as exc:
        raise _click_error(exc, (LookupError, ValueError)) from None
    _log_start(app_path, app, built, no_scheduler)
    endpoints = None
    if metrics is not None and metrics_port is not None:
        from cuebx.metrics import supervisor_routes, worker_routes

        routes = (
            worker_routes(built, metrics, app.topology())
            if supervisor is None
            else supervisor_routes(supervisor, metrics, app.broker, app.topology())
        )
        endpoints = functools.partial(serve, routes, metrics_host, metrics_port)
    if supervisor is None:
        _run_or_exit(_run_worker, app, built, endpoints)
    else:
        raise SystemExit(_run_or_exit(_run_supervised, app, supervisor, endpoints))


def _supervised(
    processes: str, max_tasks_per_child: int | None, max_memory_per_child: str | None
) -> bool:
    """True when the worker runs in supervised worker processes (see `_supervisor`)."""
    count = parse_processes(processes, "--processes")
    return count > 1 or max_tasks_per_child is not None or max_memory_per_child is not None


def _supervisor(
    app_path: str,
    worker: Worker,
    *,
    processes: str,
    max_tasks_per_child: int | None,
    max_memory_per_child: str | None,
    log_level: str,
    prefetch: int | None,
    publish_timeout: float,
    scheduler: bool = True,
    metrics: PrometheusMetrics | None = None,
) -> Supervisor | None:
    """The supervisor of ``--processes N``, or None for today's single process.

    One process without a per-child limit runs in this process, as before; anything else runs
    in supervised worker processes (a limit needs a supervisor to start the replacement).
    Each worker process loads the app as this command does, with its metrics middleware.
    """
    if not _supervised(processes, max_tasks_per_child, max_memory_per_child):
        return None
    memory = (
        None
        if max_memory_per_child is None
        else parse_size(max_memory_per_child, "--max-memory-per-child")
    )
    return Supervisor(
        functools.partial(_worker_app, app_path, scheduler=scheduler),
        processes=parse_processes(processes, "--processes"),
        queues=worker.queue_names,
        prefetch=prefetch,
        shutdown_timeout=worker.shutdown_timeout,
        # Time for the last retry and dead-letter copies to be confirmed, and to close.
        stop_grace=publish_timeout + 10,
        max_tasks_per_child=max_tasks_per_child,
        max_memory_per_child=memory,
        log_level=log_level,
        backend_options=_backend_options(),
        middleware=() if metrics is None else (type(metrics),),
        on_child_exit=None if metrics is None else _mark_dead,
    )


def _worker_app(app_path: str, *, scheduler: bool = True) -> Cuebx:
    """Load the app a worker runs (in this process or a worker process), checked."""
    app = load_app(app_path)
    if not app.tasks:
        raise click.ClickException(
            f"-A {app_path!r}: the app has no tasks; decorate functions with @app.task in "
            "the module (or in modules it imports)"
        )
    if not scheduler:
        app.scheduler.configure(enabled=False)
    return app


def _log_start(app_path: str, app: Cuebx, worker: Worker, no_scheduler: bool) -> None:
    urls = ", ".join(mask_url(url) for url in app.settings.urls)
    logger.info("cuebx worker for %s on %s", app_path, urls)
    for queue in worker.queues:
        logger.info("queue %s: tasks %s", queue.name, ", ".join(queue.tasks))
    if no_scheduler:
        logger.info("scheduler: off (--no-scheduler)")


def _run_or_exit(run: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
    """Run `run(*args)` in an event loop; what the broker or the OS refused as one line."""
    try:
        return anyio.run(run, *args, backend_options=_backend_options())
    except (CuebxError, OSError, BaseExceptionGroup) as exc:
        # A task group wraps what failed inside it (a consumer the broker refused, a port in
        # use) in an exception group, nested once per task group it went through.
        raise _click_error(exc, (CuebxError, OSError)) from None


def _share_metrics_between_processes() -> None:
    """Put prometheus_client in multiprocess mode, before anything imports it.

    Every worker process inherits the directory and writes its numbers there; the
    supervisor's ``/metrics`` adds them up.
    """
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        path = tempfile.mkdtemp(prefix="cuebx-metrics-")
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path


def _mark_dead(pid: int) -> None:
    from cuebx.metrics import mark_dead

    mark_dead(pid)


def _metrics(app: Cuebx) -> PrometheusMetrics:
    """The app's metrics middleware, added first if it has none."""
    try:
        from cuebx.metrics import PrometheusMetrics
    except ImportError as exc:
        raise click.ClickException(f"--metrics-port: {exc}") from None
    metrics = app.middleware.find(PrometheusMetrics)
    if metrics is None:
        metrics = PrometheusMetrics()
        app.add_middleware(metrics)
    return metrics


async def _run_supervised(
    app: Cuebx,
    supervisor: Supervisor,
    endpoints: Callable[..., Coroutine[Any, Any, None]] | None,
) -> int:
    """Supervise the worker processes; serve their health and metrics beside them."""
    if endpoints is None:
        return await supervisor.run()
    try:
        # The parent's own connection reads queue depths for /metrics; it is optional.
        await app.broker.connect()
    except CuebxError as exc:
        logger.warning("no queue depths in /metrics for now: %s", exc)
    try:
        async with anyio.create_task_group() as group:
            await group.start(endpoints)
            code = await supervisor.run()
            group.cancel_scope.cancel()
        return code
    finally:
        with anyio.CancelScope(shield=True):
            await app.broker.close()


def _click_error(
    exc: BaseException, expected: type[BaseException] | tuple[type[BaseException], ...]
) -> click.ClickException:
    """The one ``Error:`` line for `exc`; re-raise `exc` itself if it holds anything unexpected."""
    message = one_line_error(exc, expected)
    if message is None:
        raise exc
    return click.ClickException(message)


def one_line_error(
    exc: BaseException, expected: type[BaseException] | tuple[type[BaseException], ...]
) -> str | None:
    """Say in one line what went wrong, if every error in `exc` is one of `expected`.

    Exception groups, however nested, are looked through: the messages of their errors are
    joined with "; " (each once). Anything unexpected gives None, so that the caller lets it
    reach the user with its traceback.
    """
    if not isinstance(exc, BaseExceptionGroup):
        return str(exc) if isinstance(exc, expected) else None
    messages = [one_line_error(inner, expected) for inner in exc.exceptions]
    if None in messages:
        return None
    return "; ".join(dict.fromkeys(m for m in messages if m is not None))


async def _run_worker(
    app: Cuebx, worker: Worker, endpoints: Callable[..., Coroutine[Any, Any, None]] | None = None
) -> None:
    await app.connect()
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(_handle_signals, worker)
            if endpoints is not None:
                await group.start(endpoints)  # /healthz answers 503 until consumers run
            await worker.run()
            group.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await app.close()


async def _handle_signals(worker: Worker) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if worker.stopping:
                logger.warning("%s again: stopping now, requeueing running tasks", name)
                worker.request_stop(immediate=True)
            else:
                logger.info("%s: finishing running tasks (send it again to stop now)", name)
                worker.request_stop()


def _backend_options() -> dict[str, Any]:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}


@main.group(invoke_without_command=True)
@click.option(
    "-A",
    "--app",
    "app_path",
    envvar="CUEBX_APP",
    # Required for the plan itself; `diff` takes its own -A.
    help="module[:attribute] of the app.  [env var: CUEBX_APP; required]",
)
@click.pass_context
def topology(context: click.Context, app_path: str | None) -> None:
    """Print the exchange, queues and arguments the app declares (no broker needed).

    `cuebx topology diff -A app` compares them with the broker instead.
    """
    if context.invoked_subcommand is not None:
        return
    if app_path is None:
        raise click.UsageError("Missing option '-A' / '--app'.")
    # Imported here: a worker process never needs rich (2 MB and ~25 ms of start-up).
    from rich.console import Console
    from rich.table import Table

    app = load_app(app_path)
    plan = app.topology()
    table = Table(title=f"exchange {plan.exchange!r} (direct, durable)")
    longest = max((len(q.name) for q in plan.queues), default=5)
    table.add_column("queue", no_wrap=True, min_width=longest)
    for column in ("role", "arguments", "routing keys", "tasks"):
        table.add_column(column, overflow="fold")
    for queue in plan.queues:
        arguments = "\n".join(f"{k}: {v!r}" for k, v in queue.arguments.items())
        table.add_row(
            queue.name,
            queue.role,
            arguments or "-",
            ", ".join(queue.routing_keys) or "-",
            ", ".join(queue.tasks) or "-",
        )
    console = Console()
    if not console.is_terminal:
        console = Console(width=240)
    console.print(table)
    if plan.bindings:  # other exchanges' bindings: the subscribers' patterns, say
        bindings = Table(title="other exchanges and their bindings")
        for column in ("exchange", "type", "routing key", "to"):
            bindings.add_column(column, overflow="fold")
        kinds = {e.name: e.type for e in plan.exchanges}
        for b in plan.bindings:
            to = b.destination if b.destination_type == "queue" else f"exchange {b.destination}"
            bindings.add_row(b.source, kinds.get(b.source, "?"), b.routing_key or "-", to)
        console.print(bindings)


main.add_command(commands.dlq)
main.add_command(commands.status_command)
topology.add_command(commands.diff)


@main.command()
@_app_option
def schedule(app_path: str) -> None:
    """List the periodic jobs: schedule, last and next fire, the active scheduler.

    Reads what the active scheduler last published on the broker, without taking part in
    the election or touching the state it holds.
    """
    from rich.console import Console
    from rich.table import Table

    app = load_app(app_path)
    if not app.scheduler.jobs:
        click.echo(f"{app_path}: no periodic jobs (use @app.periodic or app.schedule)")
        return
    try:
        reports = anyio.run(_report, app, backend_options=_backend_options())
    except CuebxError as exc:
        raise click.ClickException(str(exc)) from None
    table = Table(title=f"periodic jobs on exchange {app.settings.exchange!r}")
    for column in ("job", "task (queue)", "schedule", "last fire", "next fire", "scheduler"):
        table.add_column(column, overflow="fold")
    for r in reports:
        table.add_row(
            r.job,
            f"{r.task} ({r.queue})",
            r.schedule,
            _when(r.last),
            _when(r.next),
            _who(r),
        )
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    console.print(table)


async def _report(app: Cuebx) -> list[JobReport]:
    try:
        return await app.scheduler.report()
    finally:
        await app.close()


def _when(slot: int | None) -> str:
    return "-" if slot is None else slot_text(slot)


def _who(report: JobReport) -> str:
    if report.leader is not None:
        return f"{report.leader} ({report.reported:.0f}s ago)"
    if report.previous_leader:
        return f"none active (last: {report.previous_leader}, {report.reported:.0f}s ago)"
    return "none yet"


@main.command(epilog=_BROKER_URL_HELP)
@_app_option
def delays(app_path: str) -> None:
    """Show the delay ladder: messages waiting in each level and when the next is due.

    Declares nothing: a ladder nobody delayed into yet is reported as not declared.
    """
    from rich.console import Console
    from rich.table import Table

    app = load_app(app_path)
    try:
        status = anyio.run(_ladder_status, app, backend_options=_backend_options())
    except (CuebxError, BaseExceptionGroup) as exc:
        raise _click_error(exc, CuebxError) from None
    console = Console()
    if not console.is_terminal:
        console = Console(width=240)
    if not status.declared:
        console.print(
            f"The delay ladder of exchange {status.exchange!r} is not declared: nothing was "
            "delayed on it yet."
        )
        return
    levels = f"{len(status.levels)} levels of {label(status.unit_ms)}"
    table = Table(
        title=f"delay ladder of exchange {status.exchange!r}: {levels}",
        caption=f"{status.waiting} waiting; unroutable: {status.unroutable.messages}",
    )
    for column in ("level", "queue", "TTL", "messages", "next due (UTC)", "to queue"):
        table.add_column(column, overflow="fold")
    for level in _rows(status):
        table.add_row(*level)
    console.print(table)


async def _ladder_status(app: Cuebx) -> LadderStatus:
    try:
        return await ladder_status(app)
    finally:
        await app.close()


def _rows(status: LadderStatus) -> list[tuple[str, ...]]:
    """One row per level that holds messages, then the unroutable queue if it holds any."""
    rows: list[tuple[str, ...]] = []
    for k, level in enumerate(status.levels):
        if level.messages:
            due = "-" if level.head_eta is None else f"{level.head_eta:%Y-%m-%d %H:%M:%S.%f}"[:-3]
            ttl = label(level.ttl_ms or 0)
            rows.append(
                (str(k), level.queue, ttl, str(level.messages), due, level.head_destination or "-")
            )
    unroutable = status.unroutable
    if unroutable.messages:
        rows.append(
            (
                "-",
                unroutable.queue,
                "-",
                str(unroutable.messages),
                "-",
                unroutable.head_destination or "-",
            )
        )
    return rows
