"""Idempotency: run a task at most once per key while its key is remembered.

`Idempotency` is a plug-in over a store's leased keys (`cuebx.stores.base`). For a task
with ``idempotent=True`` (key: the message id, the same on every retry, redelivery, periodic
fire and dead-letter replay) or ``idempotency_key=fn`` (key: ``fn`` of the task's
arguments, such as ``lambda order_id, **_: f"order:{order_id}"``), before the handler runs:

- a key that completed is skipped: the message is acked without running the handler,
  logged and counted (`skipped`), and its status says ``skipped``;
- a key another handler holds puts the message back on the broker (`Postpone`, through the
  delay ladder) for up to a second, without spending a retry, until that handler completes
  it (then this message is skipped), fails (then this one runs) or its lease ends;
- a free key is taken with a *lease* (``lease``, 30 s by default), renewed every third of
  it while the handler runs, so a worker that dies mid-task frees its keys once the lease
  ends, and never holds one forever.

After the handler: a success marks the key done for ``ttl`` (7 days by default); a failure,
a timeout or a stop releases it, so the retry (or the redelivery) can take it.

At-least-once still shows through in three places, told in the docs: a worker that dies
after the handler's effects but before the key is marked done (the redelivery runs the
handler again once the lease ends), a handler that runs longer than its lease without the
worker renewing it (a blocked event loop), and a store that is down (the handler runs
without the check). Effects exactly once need the key marked done in the same transaction
as the effects: `cuebx.stores.postgres.PostgresStore.complete_in`.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import anyio
import msgspec

from cuebx.durations import Duration
from cuebx.errors import StoreError
from cuebx.message import new_message_id
from cuebx.middleware import Middleware, Outcome, Postpone, Received, Skip, WorkerView
from cuebx.settings import check_seconds
from cuebx.stores.base import Store
from cuebx.task import Task

__all__ = ["Idempotency", "key_for"]

logger = logging.getLogger("cuebx.idempotency")

_STATE = "cuebx.idempotency"
#: Longest a message whose key another handler holds waits before it is tried again.
_RECHECK_MS = 1000


def key_for(task: Task[Any, Any], message_id: str, received: Received) -> str | None:
    """The idempotency key of one message of `task`, or None when the task has none.

    A key function is called with the task's arguments by name (never the `TaskContext`).

    Raises:
        Exception: whatever the task's key function raised.
    """
    options = task.options
    if not options.idempotent:
        return None
    if options.idempotency_key is None:
        return f"{task.name}:{message_id}"
    # By name, as the design's ``lambda order_id, **_: ...`` expects: the function takes
    # the arguments it needs and ignores the rest.
    arguments = {} if received.arguments is None else msgspec.structs.asdict(received.arguments)
    key = options.idempotency_key(**arguments)
    if not isinstance(key, str) or not key:
        raise TypeError(f"the idempotency_key of task {task.name!r} returned {key!r}, not a string")
    return key


class Idempotency(Middleware):
    """Skip messages whose idempotency key already completed; hold a lease while running.

    Installed by ``Cuebx(store=...)``; pass your own in ``middleware=[...]`` to change
    the lease or the TTL.

    Args:
        lease: how long a running handler's hold on its key lasts without renewal: how long
            a key stays locked after its worker died.
        ttl: how long a completed key is remembered (duplicates within it are skipped).
        store: the store; the app's when None.
    """

    def __init__(
        self, *, lease: Duration = "30s", ttl: Duration = "7d", store: Store | None = None
    ) -> None:
        self.lease_ms = round(check_seconds(lease, "Idempotency", "lease", positive=True) * 1000)
        self.ttl_ms = round(check_seconds(ttl, "Idempotency", "ttl", positive=True) * 1000)
        self.store = store
        #: Messages skipped because their key had completed.
        self.skipped = 0
        #: Times a message was put back for later because another handler held its key.
        self.postponed = 0
        self._owner_prefix = f"{socket.gethostname()}:{os.getpid()}"
        #: Keys held by running handlers: key -> owner, renewed by `serve`.
        self.held: dict[str, str] = {}

    def bind(self, store: Store) -> None:
        """Use `store` unless one was given (the app calls this)."""
        if self.store is None:
            self.store = store

    def _store(self) -> Store:
        assert self.store is not None, "Idempotency was not bound to a store"
        return self.store

    async def before_handler(self, received: Received) -> None:
        task = received.task
        if task is None or not task.options.idempotent:
            return
        context = received.context
        try:
            key = key_for(task, context.message_id, received)
        except Exception:
            logger.exception(
                "task %s message %s: its idempotency key could not be computed; running "
                "it without the check",
                context.task_name,
                context.message_id,
            )
            return
        if key is None:
            return
        owner = f"{self._owner_prefix}:{new_message_id()}"
        try:
            await self._take(key, owner, context.task_name, context.message_id)
        except StoreError as exc:
            logger.warning(
                "task %s message %s: the store did not answer (%s), so idempotency key %r "
                "cannot be checked: running the handler anyway",
                context.task_name,
                context.message_id,
                exc,
                key,
            )
            return
        received.state[_STATE] = (key, owner)
        self.held[key] = owner

    async def _take(self, key: str, owner: str, task: str, message_id: str) -> None:
        """Take `key`; raise `Skip` if it is done, `Postpone` while another handler holds it.

        A held key puts the message back on the broker (the delay ladder) for a moment, with
        its attempt unchanged: no worker sleeps on it, and no retry is spent.
        """
        state, left_ms = await self._store().acquire(key, owner, self.lease_ms)
        if state == "acquired":
            return
        if state == "done":
            self.skipped += 1
            raise Skip(f"idempotency key {key!r} already completed")
        self.postponed += 1
        again_ms = max(1, min(left_ms, _RECHECK_MS))
        logger.info(
            "task %s message %s: idempotency key %r is held by another running handler "
            "(%d ms of its lease left); trying again in %d ms",
            task,
            message_id,
            key,
            left_ms,
            again_ms,
        )
        raise Postpone(again_ms / 1000, f"idempotency key {key!r} is held by another handler")

    async def after_handler(self, received: Received, outcome: Outcome) -> None:
        held = received.state.pop(_STATE, None)
        if held is None:
            return
        key, owner = held
        self.held.pop(key, None)
        store = self._store()
        try:
            if outcome.error is None:
                await store.complete(key, owner, self.ttl_ms)
            else:
                await store.release(key, owner)
        except StoreError as exc:
            # The lease ends by itself: at worst the key is free (or locked) until then.
            logger.warning("could not settle idempotency key %r: %s", key, exc)

    async def serve(self, worker: WorkerView) -> None:
        """Renew the leases of running handlers, every third of a lease."""
        while True:
            await anyio.sleep(self.lease_ms / 3000)
            await self.renew_all()

    async def renew_all(self) -> None:
        """Renew every lease held now; say so when one was lost."""
        store = self._store()
        for key, owner in list(self.held.items()):
            try:
                kept = await store.renew(key, owner, self.lease_ms)
            except StoreError as exc:
                logger.warning("could not renew the lease on idempotency key %r: %s", key, exc)
                continue
            if not kept and self.held.get(key) == owner:
                logger.warning(
                    "the lease on idempotency key %r ended before its handler did: another "
                    "worker may run the same key now (raise the lease above the handler's "
                    "longest run without the event loop turning)",
                    key,
                )
