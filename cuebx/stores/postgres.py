"""`PostgresStore`: the store protocol on PostgreSQL, through psycopg 3 and its pool.

Install with ``pip install 'cuebx[postgres]'``. Why psycopg 3 rather than asyncpg: it ships
its own type annotations (cuebx is checked with ``mypy --strict``; asyncpg needs third-party
stubs), it is the driver SQLAlchemy, Django and most FastAPI apps already use, so the handler
can share its connection and transaction (see `complete_in`), and its pool checks
connections on return. asyncpg is faster per query; the store's writes are batched
(one statement per batch), so the difference is small where it counts.

The tables, created on `connect` when missing (`migrate`; idempotent, under an advisory
lock so that workers starting together do not race), in the URL's ``?schema=name`` (else the
connection's ``search_path``, normally ``public``)::

    CREATE TABLE IF NOT EXISTS cuebx_status (
        task_id    text PRIMARY KEY,
        generation bigint NOT NULL,
        rank       bigint NOT NULL,
        data       bytea NOT NULL,
        expires_at timestamptz NOT NULL
    );
    CREATE INDEX IF NOT EXISTS cuebx_status_expires_at ON cuebx_status (expires_at);
    CREATE TABLE IF NOT EXISTS cuebx_keys (
        key        text PRIMARY KEY,
        owner      text NOT NULL,          -- '' once the key is done
        expires_at timestamptz NOT NULL    -- the lease, or how long a done key is kept
    );

A status write is one ``INSERT ... ON CONFLICT DO UPDATE ... WHERE (generation, rank) <
(new generation, new rank)``: the comparison and the write are one statement, so concurrent
writers can never move a record backwards. Expired rows read as absent and are deleted a
thousand at a time, at most once a minute, by whoever writes.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import anyio
import msgspec
import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from cuebx.brokers.base import mask_url
from cuebx.errors import ConfigurationError, StoreError, StoreUnavailableError
from cuebx.stores.base import KeyState, StatusWrite, latest_writes

__all__ = ["PostgresStore"]


class _Row(msgspec.Struct):
    task_id: str
    generation: int
    rank: int
    data: str
    ttl_ms: int


_encode_batch = msgspec.json.Encoder().encode
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_PURGE_EVERY = 60.0

_MIGRATION = """
CREATE TABLE IF NOT EXISTS {status} (
    task_id    text PRIMARY KEY,
    generation bigint NOT NULL,
    rank       bigint NOT NULL,
    data       bytea NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS cuebx_status_expires_at ON {status} (expires_at);
CREATE TABLE IF NOT EXISTS {keys} (
    key        text PRIMARY KEY,
    owner      text NOT NULL,
    expires_at timestamptz NOT NULL
);
"""

# The batch is one JSON parameter: psycopg adapts every element of an array parameter in
# Python, which cost more than the statement itself.
_PUT_STATUS = """
INSERT INTO {status} AS s (task_id, generation, rank, data, expires_at)
SELECT w.task_id, w.generation, w.rank, convert_to(w.data, 'UTF8'),
       now() + w.ttl_ms * interval '1 millisecond'
FROM json_to_recordset(%s::json)
    AS w(task_id text, generation bigint, rank bigint, data text, ttl_ms bigint)
ON CONFLICT (task_id) DO UPDATE
SET generation = excluded.generation, rank = excluded.rank, data = excluded.data,
    expires_at = excluded.expires_at
WHERE (s.generation, s.rank) < (excluded.generation, excluded.rank) OR s.expires_at <= now()
"""

# One round trip: the INSERT takes a free, expired or own key; the outer SELECT sees the row
# as it was before (same snapshot), which names the holder when the INSERT did nothing.
_ACQUIRE = """
WITH taken AS (
    INSERT INTO {keys} AS k (key, owner, expires_at)
    VALUES (%(key)s, %(owner)s, now() + %(ms)s * interval '1 millisecond')
    ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at
    WHERE k.expires_at <= now() OR k.owner = excluded.owner
    RETURNING 1
)
SELECT (SELECT count(*) FROM taken),
       (SELECT owner FROM {keys} WHERE key = %(key)s),
       (SELECT ceil(extract(epoch FROM expires_at - now()) * 1000)::bigint
        FROM {keys} WHERE key = %(key)s)
"""


def _split_schema(url: str) -> tuple[str, str | None]:
    """Take cuebx's own ``schema`` parameter out of the URL psycopg is given."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    schema = query.pop("schema", [None])[-1]
    rest = urlencode({k: v[-1] for k, v in query.items()})
    if schema is not None and not _IDENTIFIER.match(schema):
        raise ConfigurationError(
            f"store URL {mask_url(url)!r}: schema must be a plain identifier "
            f"(letters, digits, _), got {schema!r}"
        )
    return urlunsplit(parts._replace(query=rest)), schema


class PostgresStore:
    """A `cuebx.stores.Store` on PostgreSQL (11 or later).

    Args:
        url: ``postgresql://user:password@host:port/database``; ``?schema=name`` keeps
            cuebx's tables in that schema (created if missing).
        timeout: seconds any one operation may take, waiting for a pooled connection
            included; past it the operation fails with `StoreUnavailableError`.
        pool_size: the most connections the store opens.
        migrate: create the tables on `connect` when they are missing; with False, run
            `migrate` (or the SQL in this module's docstring) yourself.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 2.0,
        pool_size: int = 4,
        migrate: bool = True,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.pool_size = pool_size
        self.auto_migrate = migrate
        self._conninfo, self.schema = _split_schema(url)
        qualify = (lambda t: sql.Identifier(self.schema, t)) if self.schema else sql.Identifier
        self.status_table = qualify("cuebx_status")
        self.keys_table = qualify("cuebx_keys")
        tables = {"status": self.status_table, "keys": self.keys_table}
        self._put_sql = sql.SQL(_PUT_STATUS).format(**tables)
        self._acquire_sql = sql.SQL(_ACQUIRE).format(**tables)
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[tuple[Any, ...]]] | None = None
        self._last_purge = time.monotonic()
        self._migrated = False
        self._migrating = False

    def __repr__(self) -> str:
        return f"<PostgresStore {mask_url(self.url)} schema={self.schema!r}>"

    async def connect(self) -> None:
        """Open the pool and, unless told not to, create the tables when missing.

        Raises:
            StoreUnavailableError: PostgreSQL does not answer within the timeout; the pool
                stays open and keeps trying, so later operations work once it is back.
        """
        await self._open()
        if self.auto_migrate and not self._migrated:
            await self.migrate()

    async def _open(self) -> AsyncConnectionPool[psycopg.AsyncConnection[tuple[Any, ...]]]:
        if self._pool is not None:
            return self._pool
        pool: AsyncConnectionPool[psycopg.AsyncConnection[tuple[Any, ...]]] = AsyncConnectionPool(
            self._conninfo,
            min_size=1,
            max_size=self.pool_size,
            kwargs={"autocommit": True},
            open=False,
            timeout=self.timeout,
            name="cuebx",
        )
        # Not waiting: the pool connects in the background and keeps retrying, so a
        # store that is down now is used as soon as it is back.
        await pool.open(wait=False)
        self._pool = pool
        return pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[tuple[Any, ...]]]:
        """A pooled connection for one operation, within the timeout, errors translated."""
        pool = await self._open()
        if self.auto_migrate and not self._migrated and not self._migrating:
            await self.migrate()
        try:
            with anyio.fail_after(self.timeout):
                async with pool.connection() as conn:
                    yield conn
        except (TimeoutError, PoolTimeout, psycopg.OperationalError, OSError) as exc:
            raise StoreUnavailableError(
                f"PostgreSQL at {mask_url(self.url)} did not answer: {exc or type(exc).__name__}"
            ) from exc
        except psycopg.Error as exc:
            raise StoreError(f"PostgreSQL at {mask_url(self.url)} failed: {exc}") from exc

    async def migrate(self) -> None:
        """Create the schema, tables and index when missing (safe to run any number of times)."""
        statements: list[sql.Composed] = []
        if self.schema:
            statements.append(
                sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema))
            )
        statements.append(
            sql.SQL(_MIGRATION).format(status=self.status_table, keys=self.keys_table)
        )
        self._migrating = True
        try:
            async with self._connection() as conn, conn.transaction():
                # Concurrent CREATE ... IF NOT EXISTS can still collide in the catalog.
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext('cuebx migrate'))")
                for statement in statements:
                    await conn.execute(statement)
        finally:
            self._migrating = False
        self._migrated = True

    async def put_status(self, writes: Sequence[StatusWrite]) -> None:
        batch = _encode_batch(
            [
                _Row(w.task_id, w.generation, w.rank, w.data.decode(), w.ttl_ms)
                for w in latest_writes(writes)
            ]
        ).decode()
        params = (batch,)
        async with self._connection() as conn:
            await conn.execute(self._put_sql, params)
            await self._maybe_purge(conn)

    async def _maybe_purge(self, conn: psycopg.AsyncConnection[tuple[Any, ...]]) -> None:
        now = time.monotonic()
        if now - self._last_purge < _PURGE_EVERY:
            return
        self._last_purge = now
        for table in (self.status_table, self.keys_table):
            await conn.execute(
                sql.SQL(
                    "DELETE FROM {t} WHERE ctid IN "
                    "(SELECT ctid FROM {t} WHERE expires_at < now() LIMIT 1000)"
                ).format(t=table)
            )

    async def get_status(self, task_id: str) -> bytes | None:
        query = sql.SQL("SELECT data FROM {} WHERE task_id = %s AND expires_at > now()")
        async with self._connection() as conn:
            cursor = await conn.execute(query.format(self.status_table), (task_id,))
            row = await cursor.fetchone()
        return None if row is None else bytes(row[0])

    async def acquire(self, key: str, owner: str, lease_ms: int) -> tuple[KeyState, int]:
        async with self._connection() as conn:
            cursor = await conn.execute(
                self._acquire_sql, {"key": key, "owner": owner, "ms": lease_ms}
            )
            row = await cursor.fetchone()
        assert row is not None
        taken, holder, left = row
        if taken:
            return "acquired", lease_ms
        state: KeyState = "done" if holder == "" else "held"
        return state, max(1, int(left or 1))

    async def renew(self, key: str, owner: str, lease_ms: int) -> bool:
        query = sql.SQL(
            "UPDATE {} SET expires_at = now() + %s * interval '1 millisecond' "
            "WHERE key = %s AND owner = %s AND expires_at > now()"
        ).format(self.keys_table)
        async with self._connection() as conn:
            cursor = await conn.execute(query, (lease_ms, key, owner))
            return cursor.rowcount > 0

    async def release(self, key: str, owner: str) -> None:
        query = sql.SQL("DELETE FROM {} WHERE key = %s AND owner = %s").format(self.keys_table)
        async with self._connection() as conn:
            await conn.execute(query, (key, owner))

    async def complete(self, key: str, owner: str, ttl_ms: int) -> None:
        async with self._connection() as conn:
            await self.complete_in(conn, key, ttl_ms)

    async def complete_in(self, conn: psycopg.AsyncConnection[Any], key: str, ttl_ms: int) -> None:
        """Mark `key` done on the caller's connection, inside the caller's transaction.

        For effects exactly once: a handler that writes its own rows and marks its key done
        in one transaction either commits both or neither, so a second run of the same key
        (after a crash between the commit and the ack) finds the key done and is skipped.
        See the idempotency docs.
        """
        query = sql.SQL(
            "INSERT INTO {} AS k (key, owner, expires_at) "
            "VALUES (%s, '', now() + %s * interval '1 millisecond') "
            "ON CONFLICT (key) DO UPDATE SET owner = '', expires_at = excluded.expires_at"
        ).format(self.keys_table)
        await conn.execute(query, (key, ttl_ms))
