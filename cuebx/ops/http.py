"""A very small HTTP server for probes and scrapes: ``/metrics``, ``/healthz``, ``/readyz``.

Why not prometheus_client's own server: it runs a WSGI server in a thread of its own,
outside the worker's event loop, where it can read neither the worker's state safely nor
the broker (queue depths are read at scrape time, with an ``await``). This one is an anyio
TCP listener in the worker's task group: it starts and stops with the worker, needs no
thread and no dependency, and answers a handful of GET routes, one request per connection
(``Connection: close``), which is what probes and Prometheus send. It is not a web
framework: anything but GET or HEAD of a known path gets 404 or 405.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping

import anyio
from anyio.abc import SocketStream, TaskStatus

from cuebx.ops.health import Health
from cuebx.ops.records import encode_json

__all__ = ["Response", "Route", "health_routes", "serve"]

logger = logging.getLogger("cuebx.http")

Response = tuple[int, str, bytes]
"""Status code, content type, body."""
Route = Callable[[], Awaitable[Response]]

_REASONS = {
    200: "OK",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
    400: "Bad Request",
}
_MAX_HEAD = 8192
#: A client that sends nothing (or a byte a second) is dropped after this long.
_READ_TIMEOUT = 5.0


def health_routes(read: Callable[[], Health]) -> dict[str, Route]:
    """``/healthz`` and ``/readyz``: 200 or 503, with the `Health` as JSON."""

    def probe(check: Callable[[Health], bool]) -> Route:
        async def answer() -> Response:
            health = read()
            code = 200 if check(health) else 503
            return code, "application/json", encode_json(health.to_dict())

        return answer

    return {"/healthz": probe(lambda h: h.alive), "/readyz": probe(lambda h: h.ready)}


async def serve(
    routes: Mapping[str, Route],
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `routes` on ``host:port`` until cancelled; ``task_status.started(port)``.

    Port 0 picks a free port, which `task_status` reports.

    Raises:
        OSError: the address is in use or cannot be bound.
    """
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    async with listener:
        bound = listener.extra(anyio.abc.SocketAttribute.local_port)
        logger.info("serving %s on http://%s:%d", ", ".join(sorted(routes)), host, bound)
        task_status.started(bound)

        async def handle(client: SocketStream) -> None:
            async with client:
                try:
                    await _answer(client, routes)
                except (anyio.BrokenResourceError, anyio.EndOfStream, OSError, TimeoutError):
                    pass  # the client went away or was too slow: nothing to answer

        await listener.serve(handle)


async def _answer(client: SocketStream, routes: Mapping[str, Route]) -> None:
    head = b""
    with anyio.fail_after(_READ_TIMEOUT):
        while b"\r\n\r\n" not in head and len(head) < _MAX_HEAD:
            head += await client.receive(4096)
    method, _, rest = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
    path = rest.split(" ", 1)[0].split("?", 1)[0]
    route = routes.get(path)
    if route is None:
        code, kind, body = 404, "text/plain; charset=utf-8", f"no route {path!r}\n".encode()
    elif method not in ("GET", "HEAD"):
        code, kind, body = 405, "text/plain; charset=utf-8", b"GET or HEAD only\n"
    else:
        try:
            code, kind, body = await route()
        except Exception:
            logger.exception("the route %s failed", path)
            code, kind, body = 500, "text/plain; charset=utf-8", b"internal error\n"
    status = f"HTTP/1.1 {code} {_REASONS.get(code, 'Unknown')}\r\n"
    headers = f"Content-Type: {kind}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    await client.send((status + headers).encode("latin-1") + (b"" if method == "HEAD" else body))
