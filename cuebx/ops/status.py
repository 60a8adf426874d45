"""`status`: the depth of every queue of an app, without the management plugin.

AMQP itself tells little: a passive ``queue.declare`` answers with the messages ready and the
consumers of a queue, nothing about messages delivered and not yet acked. Unacked counts
come from the first source that answers, said in `Status.unacked_source`:

1. the broker itself, when it knows (``memory://``);
2. the management HTTP API, when a URL for it is given (``management_url``, or
   ``CUEBX_MANAGEMENT_URL``; for example ``http://guest:guest@rabbitmq:15672``);
3. ``rabbitmqctl list_queues``, when the broker runs on this machine (the URL's host is
   local) and ``rabbitmqctl`` is on the path (it needs the node's Erlang cookie, i.e. the
   rabbitmq user or root);
4. none: unacked shows as unknown (``None``, "n/a" in tables).

Queues are grouped as an operator reads them: each task queue with its retry tiers and its
dead-letter queue, then `Section` groups for queues of other roles (the delay ladder, when
the topology has one), each titled by its role.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import quote, unquote, urlsplit

import anyio

from cuebx.brokers.base import Broker, QueueState
from cuebx.delays import Delays, ladder_status
from cuebx.topology import QueueSpec, Topology

__all__ = [
    "MANAGEMENT_URL_ENV",
    "ManagementApi",
    "QueueGroup",
    "QueueStatus",
    "Rabbitmqctl",
    "Section",
    "Status",
    "UnackedCounts",
    "app_status",
    "status",
    "unacked_source",
]

MANAGEMENT_URL_ENV = "CUEBX_MANAGEMENT_URL"
_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", ""})


@dataclass(frozen=True, slots=True)
class QueueStatus:
    """One queue: whether it exists and how many messages it holds.

    `ready`, `unacked` and `consumers` are None when unknown (the queue is missing, or no
    source of unacked counts answered).
    """

    name: str
    role: str
    exists: bool
    ready: int | None = None
    unacked: int | None = None
    consumers: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for ``--json``."""
        return {
            "name": self.name,
            "role": self.role,
            "exists": self.exists,
            "ready": self.ready,
            "unacked": self.unacked,
            "consumers": self.consumers,
        }


@dataclass(frozen=True, slots=True)
class QueueGroup:
    """A task queue with its retry tiers and dead-letter queue."""

    main: QueueStatus
    tiers: tuple[QueueStatus, ...]
    dead_letter: QueueStatus | None

    @property
    def queues(self) -> tuple[QueueStatus, ...]:
        """Every queue of the group, main first."""
        rest = () if self.dead_letter is None else (self.dead_letter,)
        return (self.main, *self.tiers, *rest)

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for ``--json``."""
        return {
            "main": self.main.to_dict(),
            "tiers": [t.to_dict() for t in self.tiers],
            "dead_letter": None if self.dead_letter is None else self.dead_letter.to_dict(),
        }


@dataclass(frozen=True, slots=True)
class Section:
    """Queues of one other role (the delay ladder, say), shown after the task queues."""

    title: str
    queues: tuple[QueueStatus, ...]

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for ``--json``."""
        return {"title": self.title, "queues": [q.to_dict() for q in self.queues]}


@dataclass(frozen=True, slots=True)
class Status:
    """The state of an app's queues at one moment.

    Attributes:
        exchange: the app's exchange.
        groups: each task queue with its tiers and dead-letter queue.
        sections: queues of other roles, grouped by role.
        unacked_source: where unacked counts came from, or ``"n/a"``.
        taken_at: when it was read.
    """

    exchange: str
    groups: tuple[QueueGroup, ...]
    sections: tuple[Section, ...]
    unacked_source: str
    taken_at: datetime

    @property
    def queues(self) -> tuple[QueueStatus, ...]:
        """Every queue, in the order shown."""
        found = [q for g in self.groups for q in g.queues]
        found += [q for s in self.sections for q in s.queues]
        return tuple(dict.fromkeys(found))

    @property
    def missing(self) -> tuple[str, ...]:
        """Queues of the app that do not exist on the broker."""
        return tuple(q.name for q in self.queues if not q.exists)

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for ``--json``."""
        return {
            "exchange": self.exchange,
            "taken_at": self.taken_at.isoformat(timespec="seconds"),
            "unacked_source": self.unacked_source,
            "groups": [g.to_dict() for g in self.groups],
            "sections": [s.to_dict() for s in self.sections],
            "missing": list(self.missing),
        }


class UnackedCounts(Protocol):
    """A source of unacked counts, which AMQP does not give."""

    name: str

    async def counts(self, queues: Sequence[str]) -> Mapping[str, int] | None:
        """Unacked messages per queue, or None when the source cannot answer now."""
        ...


class Rabbitmqctl:
    """``rabbitmqctl list_queues`` on this machine, for the vhost of the broker URL."""

    name = "rabbitmqctl"

    def __init__(self, vhost: str = "/", *, timeout: float = 30.0) -> None:
        self.vhost = vhost
        self.timeout = timeout

    async def counts(self, queues: Sequence[str]) -> Mapping[str, int] | None:
        command = [
            "rabbitmqctl",
            "list_queues",
            "-q",
            "-p",
            self.vhost,
            "--formatter",
            "json",
            "name",
            "messages_unacknowledged",
        ]
        try:
            with anyio.fail_after(self.timeout):
                result = await anyio.run_process(command, check=False)
        except (OSError, TimeoutError):
            return None
        if result.returncode != 0:
            return None
        try:
            rows = json.loads(result.stdout or b"[]")
        except ValueError:
            return None
        wanted = set(queues)
        return {
            r["name"]: int(r["messages_unacknowledged"]) for r in rows if r.get("name") in wanted
        }


class ManagementApi:
    """The management plugin's HTTP API: ``GET /api/queues/<vhost>``.

    Args:
        url: the API's base URL with credentials, ``http://user:password@host:15672``.
        vhost: the vhost to read.
    """

    name = "management API"

    def __init__(self, url: str, vhost: str = "/", *, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.vhost = vhost
        self.timeout = timeout

    async def counts(self, queues: Sequence[str]) -> Mapping[str, int] | None:
        try:
            rows = await anyio.to_thread.run_sync(self._fetch)
        except (OSError, ValueError):
            return None
        wanted = set(queues)
        return {
            r["name"]: int(r.get("messages_unacknowledged", 0))
            for r in rows
            if r.get("name") in wanted
        }

    def _fetch(self) -> list[dict[str, Any]]:
        # Imported here: http.client and email cost a worker's start-up ~40 ms otherwise.
        import urllib.error
        import urllib.request

        parts = urlsplit(self.url)
        netloc = parts.hostname or ""
        if parts.port is not None:
            netloc = f"{netloc}:{parts.port}"
        address = parts._replace(netloc=netloc).geturl()
        query = "columns=name,messages_unacknowledged"
        request = urllib.request.Request(
            f"{address}/api/queues/{quote(self.vhost, safe='')}?{query}"
        )
        if parts.username is not None:
            secret = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            request.add_header(
                "Authorization", f"Basic {base64.b64encode(secret.encode()).decode()}"
            )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                rows = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            exc.close()  # it holds the response open
            raise

        if not isinstance(rows, list):
            raise ValueError("the management API did not answer with a list of queues")
        return rows


def unacked_source(broker_url: str, management_url: str | None = None) -> UnackedCounts | None:
    """Pick where unacked counts come from for a broker URL (see the module docstring)."""
    parts = urlsplit(broker_url)
    if parts.scheme not in ("amqp", "amqps"):
        return None
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    management_url = management_url or os.environ.get(MANAGEMENT_URL_ENV)
    if management_url:
        return ManagementApi(management_url, vhost)
    if (parts.hostname or "") in _LOCAL_HOSTS and shutil.which("rabbitmqctl"):
        return Rabbitmqctl(vhost)
    return None


async def status(
    broker: Broker,
    topology: Topology,
    *,
    unacked: UnackedCounts | None = None,
    now: datetime | None = None,
) -> Status:
    """Read the state of every queue of `topology` (nothing is declared or changed).

    Args:
        broker: the app's broker; connected here if it is not.
        topology: the app's topology.
        unacked: where to read unacked counts when the broker does not say (see
            `unacked_source`); None for none.
    """
    await broker.connect()
    states: dict[str, QueueState | None] = {}
    for spec in topology.queues:
        states[spec.name] = await broker.queue_state(spec.name)
    counts, source = await _unacked(states, unacked)

    def read(spec: QueueSpec) -> QueueStatus:
        state = states[spec.name]
        if state is None:
            return QueueStatus(spec.name, spec.role, exists=False)
        return QueueStatus(
            spec.name, spec.role, True, state.ready, counts.get(spec.name), state.consumers
        )

    groups = []
    grouped: set[str] = set()
    for main in topology.main_queues:
        tiers = tuple(read(topology.queue(t)) for t in main.retry_tiers)
        dead = main.dead_letter_queue
        groups.append(
            QueueGroup(read(main), tiers, None if dead is None else read(topology.queue(dead)))
        )
        grouped.update((main.name, *main.retry_tiers, *(() if dead is None else (dead,))))
    sections: dict[str, list[QueueStatus]] = {}
    for spec in topology.queues:
        if spec.name not in grouped:
            sections.setdefault(spec.role, []).append(read(spec))
    return Status(
        topology.exchange,
        tuple(groups),
        tuple(Section(role, tuple(found)) for role, found in sections.items()),
        source,
        now or datetime.now(UTC),
    )


class _App(Protocol):
    """What `app_status` reads of an app (a `cuebx.Cuebx`)."""

    @property
    def broker(self) -> Broker: ...
    @property
    def delays(self) -> Delays: ...
    def topology(self) -> Topology: ...


async def app_status(app: _App, *, unacked: UnackedCounts | None = None) -> Status:
    """`status` of an app's queues, with a ``delay`` section for its delay ladder.

    The ladder is declared on first use, so a ladder that does not exist yet is left out;
    of one that does, the levels holding messages and the unroutable queue are shown.
    """
    found = await status(app.broker, app.topology(), unacked=unacked)
    ladder = await ladder_status(app)
    if not ladder.declared:
        return found
    levels = [level for level in ladder.levels if level.messages]
    queues = tuple(
        QueueStatus(level.queue, "delay", True, level.messages, None, 0)
        for level in (*levels, ladder.unroutable)
        if level.messages is not None
    )
    return replace(found, sections=(*found.sections, Section("delay", queues)))


async def _unacked(
    states: Mapping[str, QueueState | None], source: UnackedCounts | None
) -> tuple[Mapping[str, int], str]:
    known = {name: s.unacked for name, s in states.items() if s is not None}
    if known and all(v is not None for v in known.values()):
        return {k: v for k, v in known.items() if v is not None}, "broker"
    if source is not None:
        counts = await source.counts(list(known))
        if counts is not None:
            return counts, source.name
    return {}, "n/a"
