"""`RedisStore`: the store protocol on Redis, through the ``redis`` package's asyncio client.

Install with ``pip install 'cuebx[redis]'``. Keys, under a prefix (``cuebx`` unless the URL
says ``?prefix=...``):

- ``<prefix>:status:<task id>``: a hash ``{g: generation, r: rank, d: record}`` with a TTL;
- ``<prefix>:key:<idempotency key>``: a string, ``run:<owner>`` while held (its TTL is the
  lease) or ``done`` (its TTL is how long the key is remembered).

Every conditional step is a Lua script, so it is atomic on the server: the status write
compares positions and writes in one step, for a whole batch of writes (sent as one JSON
argument) in one round trip. Records are UTF-8 text (cuebx's are JSON).
Scripts run through EVALSHA, loaded again by redis-py if the server forgot them. Multi-key
scripts mean one Redis (or a primary with replicas / Sentinel), not Redis Cluster.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import anyio
import msgspec
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cuebx.brokers.base import mask_url
from cuebx.errors import StoreError, StoreUnavailableError
from cuebx.stores.base import KeyState, StatusWrite, latest_writes

__all__ = ["RedisStore"]

_encode_batch = msgspec.json.Encoder().encode

# ARGV[1]: the key prefix of status records; ARGV[2]: the batch as JSON, one
# [task id, generation, rank, ttl (ms), record] per write (generation and rank as strings,
# compared as numbers). One argument for the whole batch: redis-py packs each argument in
# Python, which cost more than the rest of a status write together.
_PUT_STATUS = """
local batch = cjson.decode(ARGV[2])
for _, w in ipairs(batch) do
  local key = ARGV[1] .. w[1]
  local g = tonumber(w[2])
  local r = tonumber(w[3])
  local cur = redis.call('HMGET', key, 'g', 'r')
  local cg = tonumber(cur[1])
  if cg == nil or g > cg or (g == cg and r > tonumber(cur[2])) then
    redis.call('HSET', key, 'g', w[2], 'r', w[3], 'd', w[5])
    redis.call('PEXPIRE', key, w[4])
  end
end
return #batch
"""

# KEYS[1]: the key; ARGV: owner, lease (ms). Returns {state, ms left}.
_ACQUIRE = """
local v = redis.call('GET', KEYS[1])
local mine = 'run:' .. ARGV[1]
if v == false or v == mine then
  redis.call('SET', KEYS[1], mine, 'PX', ARGV[2])
  return {'acquired', tonumber(ARGV[2])}
end
local left = redis.call('PTTL', KEYS[1])
if v == 'done' then return {'done', left} end
return {'held', left}
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == 'run:' .. ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == 'run:' .. ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def _split_prefix(url: str) -> tuple[str, str]:
    """Take cuebx's own ``prefix`` parameter out of the URL redis-py is given."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    prefix = query.pop("prefix", ["cuebx"])[-1]
    rest = urlencode({k: v[-1] for k, v in query.items()})
    return urlunsplit(parts._replace(query=rest)), prefix


class RedisStore:
    """A `cuebx.stores.Store` on Redis.

    Args:
        url: ``redis://[:password@]host:port/db`` (or ``rediss://``, ``unix://``); a
            ``?prefix=name`` parameter puts cuebx's keys under ``name:`` instead of
            ``cuebx:``.
        timeout: seconds any one operation may take, connecting included; past it the
            operation fails with `StoreUnavailableError` (the plug-ins then go on without
            the store, see the docs' "When the store is down").
        prefix: the key prefix, instead of the URL's.
    """

    def __init__(self, url: str, *, timeout: float = 2.0, prefix: str | None = None) -> None:
        self.url = url
        self.timeout = timeout
        self._client_url, url_prefix = _split_prefix(url)
        self.prefix = prefix or url_prefix
        self._client: aioredis.Redis | None = None

    def __repr__(self) -> str:
        return f"<RedisStore {mask_url(self.url)} prefix={self.prefix!r}>"

    async def connect(self) -> None:
        """Create the client and check that Redis answers (a PING).

        Raises:
            StoreUnavailableError: Redis does not answer; the client stays, and later
                operations connect again by themselves.
        """
        await self._call(self._require().ping)

    def _require(self) -> aioredis.Redis:
        """The client, created on first use: redis-py connects (and reconnects) per command."""
        if self._client is not None:
            return self._client
        client = aioredis.Redis.from_url(
            self._client_url,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            # One quick retry covers a connection the server closed meanwhile (a restart);
            # more would multiply the wait of every task while Redis is down.
            retry=Retry(NoBackoff(), 1),
        )
        self._put = client.register_script(_PUT_STATUS)
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._client = client
        return client

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def _call(self, operation: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one redis-py call within the timeout, with its errors translated to ours."""
        try:
            with anyio.fail_after(self.timeout):
                return await operation(*args, **kwargs)
        except (TimeoutError, RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StoreUnavailableError(
                f"Redis at {mask_url(self.url)} did not answer: {exc or type(exc).__name__}"
            ) from exc
        except RedisError as exc:
            raise StoreError(f"Redis at {mask_url(self.url)} failed: {exc}") from exc

    def _status_key(self, task_id: str) -> str:
        return f"{self.prefix}:status:{task_id}"

    def _key(self, key: str) -> str:
        return f"{self.prefix}:key:{key}"

    async def put_status(self, writes: Sequence[StatusWrite]) -> None:
        self._require()
        batch = _encode_batch(
            [
                (w.task_id, str(w.generation), str(w.rank), w.ttl_ms, w.data.decode())
                for w in latest_writes(writes)
            ]
        )
        await self._call(self._put, keys=[], args=[f"{self.prefix}:status:", batch])

    async def get_status(self, task_id: str) -> bytes | None:
        client = self._require()
        data: bytes | None = await self._call(client.hget, self._status_key(task_id), "d")
        return data

    async def acquire(self, key: str, owner: str, lease_ms: int) -> tuple[KeyState, int]:
        self._require()
        state, left = await self._call(self._acquire, keys=[self._key(key)], args=[owner, lease_ms])
        name = state.decode() if isinstance(state, bytes) else str(state)
        assert name in ("acquired", "held", "done")
        return name, max(1, int(left))  # type: ignore[return-value]

    async def renew(self, key: str, owner: str, lease_ms: int) -> bool:
        self._require()
        return bool(await self._call(self._renew, keys=[self._key(key)], args=[owner, lease_ms]))

    async def release(self, key: str, owner: str) -> None:
        self._require()
        await self._call(self._release, keys=[self._key(key)], args=[owner])

    async def complete(self, key: str, owner: str, ttl_ms: int) -> None:
        client = self._require()
        await self._call(client.set, self._key(key), "done", px=ttl_ms)
