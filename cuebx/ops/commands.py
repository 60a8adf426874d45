"""The operations commands: ``cuebx dlq ...``, ``cuebx status``, ``cuebx topology diff``.

Each command reads its options, calls one function of `cuebx.ops` and shows the result:
a rich table on a terminal, plain text when piped, or one JSON document with ``--json``
(on stdout; progress bars go to stderr). No command decides anything a Python caller of
``app.dlq`` or `cuebx.ops` could not. `cuebx.cli` adds them to the ``cuebx`` command; like
it, this module imports click and rich (rich only when a command runs).
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import click

from cuebx import loader
from cuebx.errors import AppNotFoundError, CuebxError
from cuebx.ops.diff import TopologyDiff, diff_topology, migration
from cuebx.ops.dlq import Listing, Report
from cuebx.ops.records import DeadLetterEntry, decode_body, encode_json, entry_record
from cuebx.ops.status import MANAGEMENT_URL_ENV, Status, app_status, unacked_source
from cuebx.ops.sweep import Progress

if TYPE_CHECKING:
    from rich.console import Console

    from cuebx.app import Cuebx

__all__ = ["diff", "dlq", "status_command"]

T = TypeVar("T")

# The app to load, for every command (the worker's too): -A, or CUEBX_APP.
app_option = click.option(
    "-A",
    "--app",
    "app_path",
    required=True,
    envvar="CUEBX_APP",
    show_envvar=True,
    help="module[:attribute] of the app.",
)
_json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")


def _filters(command: Callable[..., Any]) -> Callable[..., Any]:
    """The message filters every dlq command takes."""
    for option in reversed(
        [
            click.option("--id", "ids", multiple=True, metavar="ID", help="A message id (repeat)."),
            click.option("--task", help="Only this task's messages."),
            click.option("--reason", help="Only this reason: exhausted, rejected, ..."),
            click.option(
                "--since", help="Dead-lettered since: a duration back (1h, 30m) or an ISO time."
            ),
        ]
    ):
        command = option(command)
    return command


def load_app(path: str) -> Cuebx:
    """`cuebx.loader.load_app`, with its errors as one-line click errors."""
    try:
        return loader.load_app(path)
    except AppNotFoundError as exc:
        raise click.ClickException(str(exc)) from None


def _run(app: Cuebx, operation: Callable[[], Awaitable[T]]) -> T:
    """Run one operation against the app's broker, then close it; errors as one line."""

    async def run() -> T:
        try:
            return await operation()
        finally:
            with anyio.CancelScope(shield=True):
                await app.close()

    try:
        return anyio.run(run)
    except (CuebxError, LookupError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None


def _console(*, stderr: bool = False) -> Console:
    from rich.console import Console

    console = Console(stderr=stderr)
    return console if console.is_terminal else Console(stderr=stderr, width=200)


def _print_json(value: Any) -> None:
    sys.stdout.buffer.write(encode_json(value) + b"\n")
    sys.stdout.flush()


@contextmanager
def _progress(what: str, *, quiet: bool) -> Iterator[Progress | None]:
    """A progress bar on stderr while messages are swept, when stderr is a terminal."""
    console = _console(stderr=True)
    if quiet or not console.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress(
        "{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task(what, total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield advance


def _when(value: datetime | None) -> str:
    """A moment for a table: UTC, with how long ago."""
    if value is None:
        return "-"
    seconds = max(0, int((datetime.now(UTC) - value).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            ago = f"{seconds // size}{unit}"
            break
    else:
        ago = f"{seconds}s"
    return f"{value.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC ({ago} ago)"


# -- cuebx dlq ------------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def dlq() -> None:
    """List, inspect, replay, purge and export dead letters.

    QUEUE is a task queue (its dead-letter queue is meant), a dead-letter queue, or any
    queue by name; without it, every dead-letter queue of the app. Reading never drops or
    reorders a message, on quorum queues too.

    \b
    Examples:
      cuebx dlq ls -A shop.tasks                        what is dead, by task and reason
      cuebx dlq ls -A shop.tasks emails --messages      one line per message
      cuebx dlq show -A shop.tasks 3f2a...              headers, arguments, error
      cuebx dlq replay -A shop.tasks --reason exhausted --dry-run
      cuebx dlq replay -A shop.tasks --task send_welcome --rate 50
      cuebx dlq export -A shop.tasks dead.jsonl && cuebx dlq purge -A shop.tasks --all --yes
    """


@dlq.command("ls")
@app_option
@click.argument("queue", required=False)
@_filters
@click.option("--limit", default=50, show_default=True, help="Messages listed with --messages.")
@click.option("--messages", "per_message", is_flag=True, help="Also list the messages.")
@_json_option
def dlq_ls(
    app_path: str,
    queue: str | None,
    ids: tuple[str, ...],
    task: str | None,
    reason: str | None,
    since: str | None,
    limit: int,
    per_message: bool,
    as_json: bool,
) -> None:
    """Count dead letters by task and reason: how many, oldest, newest."""
    app = load_app(app_path)
    with _progress("reading", quiet=as_json) as progress:
        listing = _run(
            app,
            lambda: app.dlq.ls(
                queue,
                ids=ids,
                task=task,
                reason=reason,
                since=since,
                limit=limit,
                progress=progress,
            ),
        )
    if as_json:
        _print_json(listing.to_dict())
        return
    _show_listing(listing, per_message=per_message)


def _show_listing(listing: Listing, *, per_message: bool) -> None:
    from rich.table import Table

    console = _console()
    title = f"{listing.matched} dead letters of {listing.looked_at} read in " + ", ".join(
        q for q in listing.queues if q not in listing.missing
    )
    table = Table(title=title)
    for column in ("queue", "task", "reason", "count", "oldest", "newest"):
        table.add_column(column, justify="right" if column == "count" else "left")
    for g in listing.groups:
        table.add_row(
            g.queue, g.task or "-", g.reason, str(g.count), _when(g.oldest), _when(g.newest)
        )
    console.print(table)
    if per_message and listing.messages:
        rows = Table(title=f"first {len(listing.messages)} messages")
        for column in ("id", "task", "reason", "failed", "attempt", "error"):
            rows.add_column(column, overflow="fold")
        for m in listing.messages:
            error = f"{m.error_type}: {m.error}" if m.error_type else m.error
            rows.add_row(
                m.message_id or "-",
                m.task or "-",
                m.reason,
                _when(m.failed_at),
                str(m.attempt),
                error[:120],
            )
        console.print(rows)
    for name in listing.missing:
        console.print(f"[yellow]{name} does not exist on the broker (not declared yet?)[/]")


@dlq.command("show")
@app_option
@click.argument("message_id", metavar="ID")
@click.argument("queue", required=False)
@_json_option
def dlq_show(app_path: str, message_id: str, queue: str | None, as_json: bool) -> None:
    """Show one dead letter: headers, decoded arguments, error."""
    app = load_app(app_path)
    entry = _run(app, lambda: app.dlq.show(message_id, queue))
    arguments, problem = decode_body(entry.content_type, entry.body)
    if as_json:
        _print_json({**entry_record(entry), "arguments": arguments, "decode_error": problem})
        return
    _show_entry(entry, arguments, problem)


def _show_entry(entry: DeadLetterEntry, arguments: Any, problem: str | None) -> None:
    from rich.pretty import Pretty
    from rich.table import Table

    console = _console()
    facts = Table(show_header=False, title=f"dead letter {entry.message_id}")
    facts.add_column(style="bold")
    facts.add_column(overflow="fold")
    for name, value in (
        ("queue", entry.queue),
        ("task", entry.task or "-"),
        ("reason", entry.reason),
        ("error", f"{entry.error_type}: {entry.error}" if entry.error_type else entry.error),
        ("failed", _when(entry.failed_at)),
        ("origin queue", entry.origin_queue or "-"),
        ("attempt", str(entry.attempt)),
        ("replayed", str(entry.replayed)),
        ("published", _when(entry.published_at)),
        ("correlation id", entry.correlation_id or "-"),
        ("content type", entry.content_type or "-"),
    ):
        facts.add_row(name, value)
    console.print(facts)
    console.print("[bold]arguments[/]")
    console.print(Pretty(arguments) if problem is None else f"[red]{problem}[/]: {entry.body!r}")
    headers = Table(title="headers")
    headers.add_column("header")
    headers.add_column("value", overflow="fold")
    for key, value in sorted(entry.headers.items()):
        headers.add_row(key, repr(value))
    console.print(headers)


@dlq.command("replay")
@app_option
@click.argument("queue", required=False)
@_filters
@click.option("--all", "everything", is_flag=True, help="Replay every message.")
@click.option("--to", help="Send them to this queue instead of their origin.")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), help="Messages per second.")
@click.option("--dry-run", is_flag=True, help="Only say what would be replayed where.")
@_json_option
def dlq_replay(
    app_path: str,
    queue: str | None,
    ids: tuple[str, ...],
    task: str | None,
    reason: str | None,
    since: str | None,
    everything: bool,
    to: str | None,
    rate: float | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Send dead letters back to run again (a confirmed copy first, then removal).

    Attempts start at 0 again; the message id and headers (traceparent) are kept;
    x-cuebx-replayed counts the replays. Exits 1 if selected messages were left (their
    queue does not exist, or no origin queue is known).
    """
    app = load_app(app_path)
    with _progress("replaying", quiet=as_json) as progress:
        report = _run(
            app,
            lambda: app.dlq.replay(
                queue,
                ids=ids,
                task=task,
                reason=reason,
                since=since,
                all=everything,
                to=to,
                rate=rate,
                dry_run=dry_run,
                progress=progress,
            ),
        )
    _show_report(report, as_json=as_json)
    if report.skipped:
        sys.exit(1)


@dlq.command("purge")
@app_option
@click.argument("queue", required=False)
@_filters
@click.option("--all", "everything", is_flag=True, help="Purge every message.")
@click.option("--dry-run", is_flag=True, help="Only count what would be purged.")
@click.option("--yes", is_flag=True, help="Really delete them (required without --dry-run).")
@_json_option
def dlq_purge(
    app_path: str,
    queue: str | None,
    ids: tuple[str, ...],
    task: str | None,
    reason: str | None,
    since: str | None,
    everything: bool,
    dry_run: bool,
    yes: bool,
    as_json: bool,
) -> None:
    """Delete dead letters for good; the others stay, in order."""
    if not (yes or dry_run):
        raise click.UsageError(
            "purge deletes dead letters for good: see what it would delete with --dry-run "
            "(export them with `cuebx dlq export`), then run it with --yes"
        )
    app = load_app(app_path)
    with _progress("purging", quiet=as_json) as progress:
        report = _run(
            app,
            lambda: app.dlq.purge(
                queue,
                ids=ids,
                task=task,
                reason=reason,
                since=since,
                all=everything,
                dry_run=dry_run,
                progress=progress,
            ),
        )
    _show_report(report, as_json=as_json)


@dlq.command("export")
@app_option
@click.argument("file", type=click.Path(dir_okay=False, writable=True))
@click.argument("queue", required=False)
@_filters
@_json_option
def dlq_export(
    app_path: str,
    file: str,
    queue: str | None,
    ids: tuple[str, ...],
    task: str | None,
    reason: str | None,
    since: str | None,
    as_json: bool,
) -> None:
    """Write dead letters to FILE as JSON lines (bodies kept, base64 if not UTF-8)."""
    app = load_app(app_path)
    with _progress("exporting", quiet=as_json) as progress:
        report = _run(
            app,
            lambda: app.dlq.export(
                file, queue, ids=ids, task=task, reason=reason, since=since, progress=progress
            ),
        )
    _show_report(report, as_json=as_json, file=file)


def _show_report(report: Report, *, as_json: bool, file: str | None = None) -> None:
    if as_json:
        _print_json(report.to_dict())
        return
    console = _console()
    verb = {"replay": "replayed", "purge": "purged", "export": "exported"}[report.action]
    if report.dry_run:
        verb = f"would have {verb}"
    where = f" to {file}" if file else ""
    console.print(
        f"{verb} {report.done} of {report.matched} selected ({report.looked_at} read in "
        f"{', '.join(report.queues)}){where}"
    )
    for target, count in sorted(report.targets.items()):
        console.print(f"  {count} to {target}")
    for why, count in sorted(report.skipped.items()):
        console.print(f"[yellow]  {count} left in place: {why}[/]")


# -- cuebx status ---------------------------------------------------------------------------


@click.command("status", context_settings={"help_option_names": ["-h", "--help"]})
@app_option
@click.option("--watch", is_flag=True, help="Refresh until Ctrl-C.")
@click.option("--interval", default=2.0, show_default=True, help="Seconds between refreshes.")
@click.option(
    "--management-url",
    envvar=MANAGEMENT_URL_ENV,
    show_envvar=True,
    help="Management API for unacked counts: http://user:pass@host:15672.",
)
@_json_option
def status_command(
    app_path: str, watch: bool, interval: float, management_url: str | None, as_json: bool
) -> None:
    """Show each queue: ready, unacked, consumers, with its retry tiers and dead letters.

    Needs no management plugin. Unacked counts come from the management API (with
    --management-url), else rabbitmqctl when the broker is on this machine, else n/a.
    """
    app = load_app(app_path)
    source = unacked_source(app.settings.url, management_url)

    async def read() -> Status:
        return await app_status(app, unacked=source)

    if not watch:
        found = _run(app, read)
        if as_json:
            _print_json(found.to_dict())
        else:
            _console().print(_status_table(found))
        return
    _run(app, lambda: _watch(read, interval))


async def _watch(read: Callable[[], Awaitable[Status]], interval: float) -> None:
    from rich.live import Live

    with Live(_status_table(await read()), console=_console(), auto_refresh=False) as live:
        while True:
            await anyio.sleep(interval)
            live.update(_status_table(await read()), refresh=True)


def _status_table(found: Status) -> Any:
    from rich.table import Table

    def number(value: int | None) -> str:
        return "n/a" if value is None else str(value)

    table = Table(
        title=f"exchange {found.exchange!r} at {found.taken_at:%H:%M:%S} UTC",
        caption=f"unacked from: {found.unacked_source}",
    )
    for column in ("queue", "role", "ready", "unacked", "consumers"):
        table.add_column(column, justify="left" if column in ("queue", "role") else "right")
    rows = [(g.queues, True) for g in found.groups]
    rows += [(s.queues, False) for s in found.sections]
    for queues, grouped in rows:
        for index, q in enumerate(queues):
            name = q.name if index == 0 or not grouped else f"  {q.name}"
            if not q.exists:
                table.add_row(f"[red]{name}[/]", q.role, "[red]missing[/]", "", "")
                continue
            ready = number(q.ready)
            if q.role == "dead-letter" and q.ready:
                ready = f"[bold red]{ready}[/]"
            table.add_row(name, q.role, ready, number(q.unacked), number(q.consumers))
        table.add_section()
    return table


# -- cuebx topology diff --------------------------------------------------------------------


@click.command("diff", context_settings={"help_option_names": ["-h", "--help"]})
@app_option
@_json_option
def diff(app_path: str, as_json: bool) -> None:
    """Compare the broker with what the app declares; exit 1 on any difference.

    Creates and changes nothing. A queue whose arguments differ is never recreated: the
    command prints the migration to run instead. Bindings are not compared (AMQP cannot
    list them; the worker binds at start).
    """
    app = load_app(app_path)
    found = _run(app, lambda: diff_topology(app.broker, app.topology()))
    if as_json:
        _print_json(found.to_dict())
    else:
        _show_diff(found)
    if not found.matches:
        sys.exit(1)


def _show_diff(found: TopologyDiff) -> None:
    from rich.table import Table

    console = _console()
    if found.matches:
        console.print(
            f"the broker matches the plan: exchange {found.exchange.name!r} and "
            f"{len(found.queues)} queues"
        )
        return
    table = Table(title="the broker differs from the plan")
    for column in ("name", "role", "state", "detail"):
        table.add_column(column, overflow="fold")
    if found.exchange.state != "ok":
        table.add_row(
            found.exchange.name, "exchange", found.exchange.state, found.exchange.describe()
        )
    for q in found.problems:
        table.add_row(q.name, q.role, q.state, q.describe())
    console.print(table)
    for q in found.problems:
        steps = migration(q)
        if steps:
            console.print(f"\n[bold]to migrate {q.name}:[/]")
            for step in steps:
                console.print(f"  {step}", soft_wrap=True)
