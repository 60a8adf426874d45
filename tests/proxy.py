"""A TCP proxy in front of RabbitMQ whose connections a test can cut, to test reconnection."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import anyio
from anyio.abc import SocketStream, TaskGroup


class Proxy:
    """Forward 127.0.0.1:<port> to a target; `cut()` drops every open connection."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.accepting = True
        self.connections = 0
        self._scopes: set[anyio.CancelScope] = set()
        self._group: TaskGroup | None = None

    def cut(self) -> None:
        """Close every proxied connection, as a broker restart or network fault would."""
        for scope in list(self._scopes):
            scope.cancel()

    async def _pipe(self, source: SocketStream, sink: SocketStream) -> None:
        with contextlib.suppress(
            anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError
        ):
            async for chunk in source:
                await sink.send(chunk)
        with contextlib.suppress(Exception):
            await sink.send_eof()

    async def _handle(self, client: SocketStream) -> None:
        if not self.accepting:
            await client.aclose()
            return
        self.connections += 1
        with anyio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                async with client, await anyio.connect_tcp(*self.target) as upstream:
                    async with anyio.create_task_group() as group:
                        group.start_soon(self._pipe, client, upstream)
                        group.start_soon(self._pipe, upstream, client)
            except OSError:
                pass
            finally:
                self._scopes.discard(scope)


@contextlib.asynccontextmanager
async def running_proxy(target_host: str, target_port: int) -> AsyncIterator[Proxy]:
    proxy = Proxy(target_host, target_port)
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    proxy.port = listener.extra(anyio.abc.SocketAttribute.local_port)
    # The listener is closed on the way out, not left to the garbage collector (a
    # ResourceWarning, which the test settings turn into an error).
    async with listener, anyio.create_task_group() as group:
        group.start_soon(listener.serve, proxy._handle)
        try:
            yield proxy
        finally:
            proxy.cut()
            group.cancel_scope.cancel()
