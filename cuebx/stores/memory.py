"""`MemoryStore`: the store protocol in process, for tests and single-process apps.

Everything lives in dictionaries of this one object and is gone with the process: two
processes (a publisher and a ``cuebx worker``) do not share it. Expiry follows
`time.monotonic`, checked when a record or key is read.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from anyio.lowlevel import checkpoint

from cuebx.stores.base import KeyState, StatusWrite

__all__ = ["MemoryStore"]

_DONE = ""


class MemoryStore:
    """A `cuebx.stores.Store` held in memory.

    Args:
        url: ``memory://`` (a name after it only shows in messages).
        clock: seconds, monotonic; a test may pass its own to move time by hand.
        **options: accepted and ignored (``timeout``), so an app configured for a real
            store runs unchanged on ``memory://``.
    """

    def __init__(
        self, url: str = "memory://", *, clock: Callable[[], float] = time.monotonic, **options: Any
    ) -> None:
        self.url = url
        self._clock = clock
        # task id -> (generation, rank, data, expires at)
        self._status: dict[str, tuple[int, int, bytes, float]] = {}
        # key -> (owner, or _DONE once done; expires at)
        self._keys: dict[str, tuple[str, float]] = {}
        self.writes = 0

    async def connect(self) -> None:
        await checkpoint()

    async def close(self) -> None:
        await checkpoint()

    def _expires(self, ms: int) -> float:
        return self._clock() + ms / 1000

    async def put_status(self, writes: Sequence[StatusWrite]) -> None:
        now = self._clock()
        for write in writes:
            current = self._status.get(write.task_id)
            if current is None or current[3] <= now or write.position > current[:2]:
                self._status[write.task_id] = (
                    write.generation,
                    write.rank,
                    write.data,
                    self._expires(write.ttl_ms),
                )
                self.writes += 1
        await checkpoint()

    async def get_status(self, task_id: str) -> bytes | None:
        await checkpoint()
        current = self._status.get(task_id)
        if current is None or current[3] <= self._clock():
            self._status.pop(task_id, None)
            return None
        return current[2]

    def _live(self, key: str) -> tuple[str, float] | None:
        entry = self._keys.get(key)
        if entry is not None and entry[1] <= self._clock():
            del self._keys[key]
            return None
        return entry

    def _left_ms(self, expires: float) -> int:
        return max(1, round((expires - self._clock()) * 1000))

    async def acquire(self, key: str, owner: str, lease_ms: int) -> tuple[KeyState, int]:
        await checkpoint()
        entry = self._live(key)
        if entry is None or entry[0] == owner:
            self._keys[key] = (owner, self._expires(lease_ms))
            return "acquired", lease_ms
        return ("done" if entry[0] == _DONE else "held"), self._left_ms(entry[1])

    async def renew(self, key: str, owner: str, lease_ms: int) -> bool:
        await checkpoint()
        entry = self._live(key)
        if entry is None or entry[0] != owner:
            return False
        self._keys[key] = (owner, self._expires(lease_ms))
        return True

    async def release(self, key: str, owner: str) -> None:
        await checkpoint()
        entry = self._live(key)
        if entry is not None and entry[0] == owner:
            del self._keys[key]

    async def complete(self, key: str, owner: str, ttl_ms: int) -> None:
        await checkpoint()
        self._keys[key] = (_DONE, self._expires(ttl_ms))
