"""The app the periodic-task tests run in ``cuebx worker`` subprocesses, configured by env.

Its job ``tick`` fires every second into ``<prefix>.ticks``, a queue the workers do not
consume (they consume ``<prefix>.idle``): the test reads the fired messages there.
"""

from __future__ import annotations

import os

from cuebx import Cuebx

PREFIX = os.environ.get("TEST_PREFIX", "t.periodic")

app = Cuebx(exchange=PREFIX, connection_name=os.environ.get("TEST_CONNECTION", "periodic"))


@app.periodic(every="1s", queue=f"{PREFIX}.ticks")
async def tick() -> None:
    """Never runs here: the workers consume the idle queue only."""


@app.task(queue=f"{PREFIX}.idle")
async def idle() -> None:
    """Gives the workers a queue to consume."""
