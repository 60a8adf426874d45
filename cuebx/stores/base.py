"""The store protocol: task states and idempotency keys, as bytes and numbers.

A store keeps two things for the plug-ins above it (`cuebx.results`, `cuebx.idempotency`),
and knows nothing of tasks:

- **status records**: one opaque record per task id, with a *position* ``(generation,
  rank)``. A write lands only when its position is higher than the stored one (or the stored
  one expired), checked inside the store in one step (a Lua script on Redis, a ``WHERE`` on
  the upsert in PostgreSQL). So writes can arrive late, twice or out of order, from any
  number of processes, and the record never moves backwards: a worker's ``started`` that
  beats the publisher's ``pending`` (the worker was faster than the publisher's confirm)
  stays, and so does a ``succeeded`` that a redelivered duplicate's ``started`` follows.
- **keys with leases**: an idempotency key is free, held by one owner until its lease ends,
  or done until its TTL ends. Taking, renewing, releasing and completing are each one
  atomic step in the store, and a lease is a TTL in the store itself, so a key held by a
  worker that died frees itself.

Implementations: `cuebx.stores.memory` (``memory://``), `cuebx.stores.redis` (``redis://``,
``rediss://``, with ``cuebx[redis]``), `cuebx.stores.postgres` (``postgresql://``, with
``cuebx[postgres]``). They are chosen by URL scheme and imported lazily, so an app without a
store never imports a database driver.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable
from urllib.parse import urlsplit

from cuebx.brokers.base import mask_url
from cuebx.errors import ConfigurationError

__all__ = [
    "STORE_SCHEMES",
    "KeyState",
    "StatusWrite",
    "Store",
    "latest_writes",
    "store_for_url",
]

KeyState = Literal["acquired", "held", "done"]


@dataclass(frozen=True, slots=True)
class StatusWrite:
    """One conditional write of a task's status record.

    Attributes:
        task_id: the task's id (its message id).
        generation: the run of the message: 0, or higher for each dead-letter replay, so a
            replayed task can start over from ``dead-lettered``.
        rank: the record's position within its generation (`cuebx.results.rank`).
        data: the record itself, opaque to the store.
        ttl_ms: how long the record lives, in milliseconds.
    """

    task_id: str
    generation: int
    rank: int
    data: bytes
    ttl_ms: int

    @property
    def position(self) -> tuple[int, int]:
        return (self.generation, self.rank)


def latest_writes(writes: Iterable[StatusWrite]) -> list[StatusWrite]:
    """Keep, per task id, only the write with the highest position (the first of equals).

    A batch may hold a fast task's ``started`` and ``succeeded``; a store writing them in one
    statement must not touch the row twice (PostgreSQL refuses that), and the lower one
    would not land anyway.
    """
    kept: dict[str, StatusWrite] = {}
    for write in writes:
        current = kept.get(write.task_id)
        if current is None or write.position > current.position:
            kept[write.task_id] = write
    return list(kept.values())


@runtime_checkable
class Store(Protocol):
    """What the results and idempotency plug-ins need of a store."""

    url: str

    async def connect(self) -> None:
        """Connect (idempotent); PostgreSQL also creates its tables if they are missing.

        Raises:
            StoreUnavailableError: the store cannot be reached.
        """

    async def close(self) -> None:
        """Close every connection (idempotent)."""

    async def put_status(self, writes: Sequence[StatusWrite]) -> None:
        """Apply each write whose position is above the stored record's (or none is stored).

        Raises:
            StoreError: the store refused or failed; none, some or all writes may have landed
                (landing twice changes nothing, so the caller may simply write them again).
        """

    async def get_status(self, task_id: str) -> bytes | None:
        """Return the task's record, or None when there is none (never written, or expired)."""

    async def acquire(self, key: str, owner: str, lease_ms: int) -> tuple[KeyState, int]:
        """Take `key` for `owner` for `lease_ms`, unless it is done or another owner holds it.

        Returns:
            ``("acquired", lease_ms)``, ``("held", ms left of the holder's lease)`` or
            ``("done", ms left of the key's TTL)``. Taking a key one already holds renews it.
        """

    async def renew(self, key: str, owner: str, lease_ms: int) -> bool:
        """Extend `owner`'s lease on `key`; False when it does not hold it any more."""

    async def release(self, key: str, owner: str) -> None:
        """Free `key` if `owner` holds it (a failed run: the next delivery may take it)."""

    async def complete(self, key: str, owner: str, ttl_ms: int) -> None:
        """Mark `key` done for `ttl_ms`: later messages with the key are skipped."""


STORE_SCHEMES = {
    "memory": ("cuebx.stores.memory:MemoryStore", None),
    "redis": ("cuebx.stores.redis:RedisStore", "redis"),
    "rediss": ("cuebx.stores.redis:RedisStore", "redis"),
    "unix": ("cuebx.stores.redis:RedisStore", "redis"),
    "postgresql": ("cuebx.stores.postgres:PostgresStore", "postgres"),
    "postgres": ("cuebx.stores.postgres:PostgresStore", "postgres"),
}


def store_for_url(url: str, **options: Any) -> Store:
    """Build the store for a URL by its scheme, importing its module (and driver) only now.

    Raises:
        ConfigurationError: an unknown scheme, or the extra that the scheme needs is not
            installed (the message names it: ``pip install 'cuebx[redis]'``).
    """
    scheme = urlsplit(url).scheme
    try:
        target, extra = STORE_SCHEMES[scheme]
    except KeyError:
        raise ConfigurationError(
            f"store URL {mask_url(url)!r} has scheme {scheme!r}; use one of: "
            f"{', '.join(sorted(STORE_SCHEMES))}"
        ) from None
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(
            f"store URL {mask_url(url)!r} needs the {extra!r} extra, which is not installed "
            f"({exc}): pip install 'cuebx[{extra}]'"
        ) from None
    store: Store = getattr(module, attr)(url, **options)
    return store
