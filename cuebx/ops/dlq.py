"""`DeadLetters`: list, show, replay, purge and export what lies in dead-letter queues.

``app.dlq`` returns one for the app's broker and topology; ``cuebx dlq ...`` calls it. Every
operation is one `cuebx.ops.sweep.sweep` per dead-letter queue: messages are taken and put
back as confirmed copies, so browsing never returns a message to its queue (a quorum
queue would count that towards its delivery limit) and a crash at any point loses
nothing. A replay publishes a confirmed copy to the target before it removes the
dead-lettered message.

The operations connect the broker if needed, but never declare anything: a queue that is
missing stays missing and is reported.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio

from cuebx.brokers.base import Broker, Delivery
from cuebx.message import replay_copy
from cuebx.ops.records import (
    DeadLetterEntry,
    Group,
    Selection,
    Summary,
    encode_json,
    entry_record,
    group_record,
    read_since,
)
from cuebx.ops.sweep import Decide, Keep, Move, Plan, Progress, Remove, kept_copy, sweep
from cuebx.topology import Topology

__all__ = ["DeadLetters", "Listing", "Report"]

Since = datetime | timedelta | str | float | None


@dataclass(frozen=True, slots=True)
class Listing:
    """What `DeadLetters.ls` found.

    Attributes:
        queues: the dead-letter queues looked at.
        missing: those of them that do not exist on the broker.
        looked_at: messages read.
        matched: messages the filters selected.
        groups: the selected messages by queue, task and reason.
        messages: the first `limit` selected messages, in queue order.
    """

    queues: tuple[str, ...]
    missing: tuple[str, ...]
    looked_at: int
    matched: int
    groups: tuple[Group, ...]
    messages: tuple[DeadLetterEntry, ...]

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for ``--json``."""
        return {
            "queues": list(self.queues),
            "missing": list(self.missing),
            "looked_at": self.looked_at,
            "matched": self.matched,
            "groups": [group_record(g) for g in self.groups],
            "messages": [entry_record(m, body=False) for m in self.messages],
        }


@dataclass(slots=True)
class Report:
    """What a replay, purge or export did (or, with ``dry_run``, would do).

    Attributes:
        action: ``replay``, ``purge`` or ``export``.
        queues: the dead-letter queues swept.
        looked_at: messages read.
        matched: messages the selection picked.
        done: messages replayed, purged or exported.
        targets: for a replay, messages per target queue.
        skipped: selected messages left in place, counted by why.
        dry_run: nothing was changed.
    """

    action: str
    queues: tuple[str, ...]
    dry_run: bool = False
    looked_at: int = 0
    matched: int = 0
    done: int = 0
    targets: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for ``--json``."""
        return {
            "action": self.action,
            "queues": list(self.queues),
            "dry_run": self.dry_run,
            "looked_at": self.looked_at,
            "matched": self.matched,
            "done": self.done,
            "targets": dict(self.targets),
            "skipped": dict(self.skipped),
        }


class DeadLetters:
    """Operations on the dead-letter queues of one app (``app.dlq``).

    Every method takes an optional `queue`: a task queue (``"emails"``, meaning its
    dead-letter queue), a dead-letter queue by name (``"emails.dlq"``), or any other queue
    by name; None means every dead-letter queue of the app. Filters: `ids` (message ids),
    `task`, `reason` and `since` (a moment, or a duration back from now: ``"1h"``).

    Args:
        broker: the app's broker (connected on first use, never declared on).
        topology: the app's topology, to find its dead-letter queues.
        window: messages taken from a queue at once.
    """

    def __init__(self, broker: Broker, topology: Topology, *, window: int = 64) -> None:
        self.broker = broker
        self.topology = topology
        self.window = window

    # -- which queues -------------------------------------------------------------------

    def dead_letter_queues(self, queue: str | None = None) -> list[str]:
        """The dead-letter queues `queue` stands for (see the class docstring).

        Raises:
            LookupError: `queue` is a task queue without a dead-letter queue, or the app
                has none at all.
        """
        topology = self.topology
        if queue is None:
            names = [q.name for q in topology.queues if q.role == "dead-letter"]
            if not names:
                raise LookupError(
                    "the app has no dead-letter queue (no tasks, or dead_letter=False on all)"
                )
            return list(dict.fromkeys(names))
        try:
            spec = topology.queue(queue)
        except KeyError:
            return [queue]  # any queue by name: another app's, or one renamed since
        if spec.role != "main":
            return [queue]
        if spec.dead_letter_queue is None:
            raise LookupError(f"queue {queue!r} has no dead-letter queue (dead_letter=False)")
        return [spec.dead_letter_queue]

    # -- reading ------------------------------------------------------------------------

    async def ls(
        self,
        queue: str | None = None,
        *,
        ids: Iterable[str] = (),
        task: str | None = None,
        reason: str | None = None,
        since: Since = None,
        limit: int = 50,
        progress: Progress | None = None,
    ) -> Listing:
        """Count dead letters by queue, task and reason, and list the first `limit`.

        Reads every message once and leaves each in place (see `cuebx.ops.sweep`), so
        listing as often as you like drops nothing, on quorum queues too. A dead-letter
        queue of the app that does not exist yet is reported in `Listing.missing`.

        Raises:
            LookupError: a `queue` named explicitly does not exist.
            ValueError: `since` cannot be read.
        """
        selection = self._selection(ids, task, reason, since)
        names = self.dead_letter_queues(queue)
        summary = Summary()
        shown: list[DeadLetterEntry] = []
        missing: list[str] = []
        looked = matched = 0
        for name in names:

            async def look(delivery: Delivery, name: str = name) -> Plan:
                nonlocal matched
                entry = DeadLetterEntry.from_delivery(name, delivery)
                if selection.matches(entry):
                    matched += 1
                    summary.add(entry)
                    if len(shown) < limit:
                        shown.append(entry)
                return Keep()

            found = await self._sweep(name, look, explicit=queue is not None, progress=progress)
            if found is None:
                missing.append(name)
            else:
                looked += found
        return Listing(
            tuple(names), tuple(missing), looked, matched, tuple(summary.groups()), tuple(shown)
        )

    async def show(self, message_id: str, queue: str | None = None) -> DeadLetterEntry:
        """Find one dead letter by its message id (the first, if it lies there twice).

        Raises:
            LookupError: no dead letter has that id; the message names the queues searched.
        """
        listing = await self.ls(queue, ids=[message_id], limit=1)
        if not listing.messages:
            raise LookupError(
                f"no message {message_id!r} in {', '.join(map(repr, listing.queues))}"
            )
        return listing.messages[0]

    async def export(
        self,
        path: str | os.PathLike[str],
        queue: str | None = None,
        *,
        ids: Iterable[str] = (),
        task: str | None = None,
        reason: str | None = None,
        since: Since = None,
        progress: Progress | None = None,
    ) -> Report:
        """Write the selected dead letters to the file `path` as JSON lines; they stay.

        One object per message with its queue, ids, task, reason, error, times, attempt,
        properties, headers and body (as text when it is UTF-8, else base64, which
        ``body_encoding`` says), so nothing of it is lost. The file is written anew.
        """
        selection = self._selection(ids, task, reason, since)
        report = Report("export", tuple(self.dead_letter_queues(queue)))
        async with await anyio.open_file(path, "wb") as out:
            for name in report.queues:

                async def write(delivery: Delivery, name: str = name) -> Plan:
                    entry = DeadLetterEntry.from_delivery(name, delivery)
                    if selection.matches(entry):
                        report.matched += 1
                        await out.write(encode_json(entry_record(entry)) + b"\n")
                        report.done += 1
                    return Keep()

                found = await self._sweep(
                    name, write, explicit=queue is not None, progress=progress
                )
                report.looked_at += found or 0
        return report

    # -- changing -----------------------------------------------------------------------

    async def replay(
        self,
        queue: str | None = None,
        *,
        ids: Iterable[str] = (),
        task: str | None = None,
        reason: str | None = None,
        since: Since = None,
        all: bool = False,
        to: str | None = None,
        rate: float | None = None,
        dry_run: bool = False,
        progress: Progress | None = None,
    ) -> Report:
        """Send the selected dead letters back to run again, and remove them.

        Each goes to its origin queue (``x-cuebx-origin-queue``, or RabbitMQ's
        ``x-first-death-queue``; else the one task queue of its dead-letter queue), or to
        `to`. The copy is confirmed before the dead letter is removed, so a crash between
        the two duplicates a message and never loses one. The copy keeps the message id,
        body, properties and other headers (a W3C ``traceparent``: the run joins the
        original trace); its attempt is 0 again, the dead-letter stamps are removed and
        ``x-cuebx-replayed`` counts the replays (see `cuebx.message.replay_copy`). A
        message whose target queue does not exist stays, counted in `Report.skipped`.

        Args:
            all: replay every message; without it, give at least one filter.
            to: the queue to send them to instead of their origin.
            rate: at most this many messages per second.
            dry_run: only count what would be replayed where.

        Raises:
            ValueError: no filter and not `all`, or `to` is a queue being swept.
            LookupError: a `queue` named explicitly does not exist.
            PublishError: copies were not confirmed; their dead letters stayed, and the
                replay stopped.
        """
        selection = self._changing("replay", ids, task, reason, since, all)
        report = Report("replay", tuple(self.dead_letter_queues(queue)), dry_run)
        if to is not None and to in report.queues:
            raise ValueError(f"replay: --to {to!r} is a queue being replayed from")
        exists: dict[str, bool] = {}
        for name in report.queues:
            owners = [q.name for q in self.topology.main_queues if q.dead_letter_queue == name]
            default = owners[0] if len(owners) == 1 else None

            async def send(
                delivery: Delivery, name: str = name, default: str | None = default
            ) -> Plan:
                entry = DeadLetterEntry.from_delivery(name, delivery)
                if not selection.matches(entry):
                    return Keep()
                report.matched += 1
                target = to or entry.origin_queue or default
                why = await self._unreachable(target, exists)
                if why is not None:
                    report.skipped[why] = report.skipped.get(why, 0) + 1
                    return Keep()
                assert target is not None
                report.targets[target] = report.targets.get(target, 0) + 1
                report.done += 1
                if dry_run:
                    return Keep()
                return Move(target, replay_copy(kept_copy(delivery)))

            found = await self._sweep(
                name,
                send,
                explicit=queue is not None,
                progress=progress,
                rate=None if dry_run else rate,
            )
            report.looked_at += found or 0
        return report

    async def _unreachable(self, target: str | None, exists: dict[str, bool]) -> str | None:
        """Why a replay cannot go to `target`, or None when it can."""
        if target is None:
            return "no origin queue known (give a target queue)"
        if target.startswith(f"{self.topology.exchange}.delay."):
            # A message put into a level from outside carries no way cuebx wrote for it (or
            # a stale one): it would leave that level for the unroutable queue, or go astray.
            return f"{target!r} is a delay level (give a target queue)"
        if target not in exists:
            exists[target] = await self.broker.queue_state(target) is not None
        return None if exists[target] else f"queue {target!r} does not exist"

    async def purge(
        self,
        queue: str | None = None,
        *,
        ids: Iterable[str] = (),
        task: str | None = None,
        reason: str | None = None,
        since: Since = None,
        all: bool = False,
        dry_run: bool = False,
        progress: Progress | None = None,
    ) -> Report:
        """Remove the selected dead letters for good; the others stay, in their order.

        Export them first if they may be needed again (`export`).

        Raises:
            ValueError: no filter and not `all`.
            LookupError: a `queue` named explicitly does not exist.
        """
        selection = self._changing("purge", ids, task, reason, since, all)
        report = Report("purge", tuple(self.dead_letter_queues(queue)), dry_run)
        for name in report.queues:

            async def drop(delivery: Delivery, name: str = name) -> Plan:
                if not selection.matches(DeadLetterEntry.from_delivery(name, delivery)):
                    return Keep()
                report.matched += 1
                report.done += 1
                return Keep() if dry_run else Remove()

            found = await self._sweep(name, drop, explicit=queue is not None, progress=progress)
            report.looked_at += found or 0
        return report

    # -- helpers ------------------------------------------------------------------------

    def _selection(
        self, ids: Iterable[str], task: str | None, reason: str | None, since: Since
    ) -> Selection:
        when = read_since(since, now=datetime.now(UTC))
        return Selection(frozenset(ids), task, reason, when)

    def _changing(
        self,
        action: str,
        ids: Iterable[str],
        task: str | None,
        reason: str | None,
        since: Since,
        everything: bool,
    ) -> Selection:
        selection = self._selection(ids, task, reason, since)
        if selection.everything and not everything:
            raise ValueError(
                f"{action}: say which messages: message ids, a task, a reason or a since "
                "filter, or all=True (--all) for every one"
            )
        return selection

    async def _sweep(
        self,
        queue: str,
        decide: Decide,
        *,
        explicit: bool,
        progress: Progress | None,
        rate: float | None = None,
    ) -> int | None:
        """Sweep one queue; a missing one is None, or an error when it was asked for by name."""
        await self.broker.connect()
        try:
            return await sweep(
                self.broker, queue, decide, window=self.window, rate=rate, progress=progress
            )
        except LookupError:
            if explicit:
                raise
            return None
