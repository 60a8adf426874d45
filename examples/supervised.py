"""Worker processes run by a program of your own instead of ``cuebx worker --processes``.

``python supervised.py`` starts two worker processes for the app below (against
``CUEBX_BROKER_URL``) and supervises them until SIGTERM or Ctrl-C, as docs/deployment.md
shows; mypy checks the file with the rest of the examples.
"""

from __future__ import annotations

import logging
import os

import anyio

from cuebx import Cuebx
from cuebx.supervisor import Supervisor

app = Cuebx(connection_name="cuebx supervised example")


@app.task(queue=os.environ.get("EXAMPLE_QUEUE", "thumbnails"), prefetch=2)
def make_thumbnail(image_id: int) -> None:
    """CPU-bound work: the reason to run more than one process."""


# --8<-- [start:supervise]
def make_app() -> Cuebx:
    """The app, for each worker process: a module-level function, imported there by name."""
    return app


def main() -> int:
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    supervisor = Supervisor(make_app, processes=2, max_memory_per_child="512MiB")
    # Until SIGTERM or SIGINT; 0 once every worker process stopped cleanly.
    return anyio.run(supervisor.run)


if __name__ == "__main__":
    raise SystemExit(main())
# --8<-- [end:supervise]
