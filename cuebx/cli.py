"""The ``cuebx`` command line: a thin layer over the Python API (the only click/rich user)."""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
from typing import Any

import anyio
import click

from cuebx import __version__
from cuebx.app import Cuebx
from cuebx.brokers.base import mask_url
from cuebx.delays import LadderStatus, ladder_status
from cuebx.durations import label, to_seconds
from cuebx.errors import CuebxError
from cuebx.worker import Worker

__all__ = ["load_app", "main", "one_line_error"]

logger = logging.getLogger("cuebx.cli")


def load_app(path: str) -> Cuebx:
    """Import ``module[:attribute]`` and return its `Cuebx` app.

    Without an attribute, the module must hold exactly one `Cuebx` instance.

    Raises:
        click.ClickException: one line saying what could not be found.
    """
    module_name, _, attribute = path.partition(":")
    if not module_name:
        raise click.ClickException(f"-A {path!r}: expected module or module:attribute")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise click.ClickException(f"-A {path!r}: no module named {exc.name!r}") from None
        raise
    except CuebxError as exc:
        # A task or app option refused while the module was imported: the message says
        # which task and option, so a traceback through importlib adds nothing.
        raise click.ClickException(f"-A {path!r}: {type(exc).__name__}: {exc}") from None
    if attribute:
        app = getattr(module, attribute, None)
        if app is None:
            raise click.ClickException(f"-A {path!r}: module {module_name!r} has no {attribute!r}")
        if not isinstance(app, Cuebx):
            raise click.ClickException(
                f"-A {path!r}: {attribute!r} is a {type(app).__name__}, not a Cuebx app"
            )
        return app
    apps = {n: v for n, v in vars(module).items() if isinstance(v, Cuebx)}
    if len(apps) != 1:
        found = ", ".join(sorted(apps)) or "none"
        raise click.ClickException(
            f"-A {path!r}: expected exactly one Cuebx app in {module_name!r}, found {found}; "
            "name it as module:attribute"
        )
    return next(iter(apps.values()))


_BROKER_URL_HELP = (
    "The broker URL is the app's own: Cuebx(url) in the module, or CUEBX_BROKER_URL when "
    "Cuebx() is given no URL (the command line does not read it itself)."
)

# The app to load, for every command: -A, or CUEBX_APP when -A is not given.
_app_option = click.option(
    "-A",
    "--app",
    "app_path",
    required=True,
    envvar="CUEBX_APP",
    show_envvar=True,
    help="module[:attribute] of the app.",
)


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
      cuebx delays -A myapp                       messages waiting in the delay ladder
      cuebx worker -h                             the worker's options
    """


@main.command(epilog=_BROKER_URL_HELP)
@_app_option
@click.option("-Q", "--queues", help="Comma-separated queues to consume (default: all).")
@click.option("--prefetch", type=click.IntRange(min=1), help="Prefetch for every queue.")
@click.option("--shutdown-timeout", help="How long running handlers may finish on stop: 30s.")
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
def worker(
    app_path: str,
    queues: str | None,
    prefetch: int | None,
    shutdown_timeout: str | None,
    log_level: str,
) -> None:
    """Declare the topology and run tasks until SIGINT or SIGTERM.

    \b
    Examples:
      cuebx worker -A myapp
      cuebx worker -A shop.tasks:app -Q emails,webhooks --prefetch 20
      cuebx worker -A shop.tasks -Q reports --prefetch 2 --shutdown-timeout 2m
      CUEBX_BROKER_URL=amqp://app:secret@rabbitmq:5672/prod cuebx worker -A shop.tasks
    """
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    app = load_app(app_path)
    if not app.tasks:
        raise click.ClickException(
            f"-A {app_path!r}: the app has no tasks; decorate functions with @app.task in "
            "the module (or in modules it imports)"
        )
    names = [q.strip() for q in queues.split(",") if q.strip()] if queues else None
    try:
        seconds = (
            None
            if shutdown_timeout is None
            else to_seconds(shutdown_timeout, what="--shutdown-timeout")
        )
        built = app.worker(queues=names, prefetch=prefetch, shutdown_timeout=seconds)
    except (LookupError, ValueError, BaseExceptionGroup) as exc:
        raise _click_error(exc, (LookupError, ValueError)) from None
    logger.info("cuebx worker for %s on %s", app_path, mask_url(app.settings.url))
    for queue in built.queues:
        logger.info("queue %s: tasks %s", queue.name, ", ".join(queue.tasks))
    try:
        anyio.run(_run_worker, app, built, backend_options=_backend_options())
    except (CuebxError, BaseExceptionGroup) as exc:
        # A task group wraps what failed inside it (a consumer the broker refused) in an
        # exception group, nested once per task group it went through.
        raise _click_error(exc, CuebxError) from None


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


async def _run_worker(app: Cuebx, worker: Worker) -> None:
    await app.connect()
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(_handle_signals, worker)
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


@main.command()
@_app_option
def topology(app_path: str) -> None:
    """Print the exchange, queues and arguments the app declares (no broker needed)."""
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
