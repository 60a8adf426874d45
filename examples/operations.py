"""Dead letters from Python: list, inspect and replay them with ``app.dlq``.

Runs in process on the in-memory broker: ``python examples/operations.py``. Against
RabbitMQ, the same calls work on a real app (``cuebx dlq ...`` is the same from a shell).
"""

from __future__ import annotations

import anyio

from cuebx import Cuebx
from cuebx.ops.records import decode_body
from cuebx.testing import drain, running

app = Cuebx("memory://")
FIXED = False


@app.task(queue="emails", retries=["30s", "5m"])
async def send_welcome(email: str) -> None:
    if not FIXED:
        raise ConnectionError(f"SMTP server busy for {email}")
    print(f"sent to {email}")


async def main() -> None:
    global FIXED
    async with running(app):
        for email in ("ann@example.com", "bob@example.com"):
            await send_welcome.delay(email)
        await drain(app)  # both exhaust their retries (the memory clock skips the waits)

        # --8<-- [start:dlq]
        listing = await app.dlq.ls("emails", since="1h")
        for group in listing.groups:
            print(f"{group.count} x {group.task}: {group.reason}")
        first = listing.messages[0]
        entry = await app.dlq.show(first.message_id or "")
        arguments, _ = decode_body(entry.content_type, entry.body)
        print(f"{entry.message_id}: {entry.error_type}: {entry.error} {arguments}")

        FIXED = True  # ... the cause is fixed and deployed ...
        report = await app.dlq.replay("emails", reason="exhausted", rate=100)
        print(f"replayed {report.done} to {report.targets}")
        # --8<-- [end:dlq]
        await drain(app)


if __name__ == "__main__":
    anyio.run(main)
