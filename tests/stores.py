"""The real stores for tests: URLs, a per-test namespace, and cleanup afterwards."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import psycopg
import pytest
import redis.asyncio as aioredis

REDIS_URL = os.environ.get("CUEBX_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get(
    "CUEBX_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)

STORE_KINDS = ("memory", "redis", "postgres")


def answers(url: str, default_port: int) -> None:
    """Fail (never skip) with one line when the server of `url` does not answer."""
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname, parts.port or default_port), timeout=3).close()
    except OSError as exc:
        pytest.fail(
            f"{parts.scheme} does not answer at {parts.hostname}:{parts.port or default_port} "
            f"({exc}): run scripts/ensure-redis and scripts/ensure-postgres",
            pytrace=False,
        )


def namespace(prefix: str) -> str:
    """A store namespace for one test: letters, digits and underscores only."""
    return "t_" + "".join(c if c.isalnum() else "_" for c in prefix.split(".", 1)[-1]).lower()


async def store_url(kind: str, prefix: str) -> AsyncIterator[str]:
    """Yield a store URL of `kind` private to this test; delete what it wrote afterwards."""
    name = namespace(prefix)
    if kind == "memory":
        yield "memory://"
    elif kind == "redis":
        answers(REDIS_URL, 6379)
        yield f"{REDIS_URL}?prefix={name}"
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            keys = [k async for k in client.scan_iter(match=f"{name}:*", count=1000)]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()
    else:
        answers(POSTGRES_URL, 5432)
        yield f"{POSTGRES_URL}?schema={name}"
        async with await psycopg.AsyncConnection.connect(POSTGRES_URL, autocommit=True) as conn:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def forget_redis_prefix(name: str) -> None:
    """Delete every Redis key under `name:` (for tests that cannot await their cleanup)."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{name}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
