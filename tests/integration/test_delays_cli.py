"""``cuebx delays``: the ladder's levels as a user sees them, in a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cuebx.topology import ExchangeSpec, Topology
from tests.conftest import AppFactory

pytestmark = [pytest.mark.anyio, pytest.mark.rabbitmq]

APP_MODULE = textwrap.dedent(
    """
    import os

    from cuebx import Cuebx

    app = Cuebx(exchange=os.environ["TEST_EXCHANGE"], delay_levels=16)


    @app.task(queue=os.environ["TEST_QUEUE"])
    async def remind(n: int) -> None: ...
    """
)


def _delays(tmp_path: Path, rabbitmq_url: str, exchange: str, queue: str) -> str:
    (tmp_path / "delaysapp.py").write_text(APP_MODULE)
    env = {
        **{k: v for k, v in os.environ.items() if k != "CUEBX_APP"},
        "CUEBX_BROKER_URL": rabbitmq_url,
        "TEST_EXCHANGE": exchange,
        "TEST_QUEUE": queue,
        "PYTHONPATH": str(Path.cwd()),
    }
    result = subprocess.run(
        [sys.executable, "-m", "cuebx", "delays", "-A", "delaysapp"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


async def test_cuebx_delays_shows_the_levels_that_hold_messages_and_when_the_next_is_due(
    make_rabbit_app: AppFactory, rabbitmq_url: str, prefix: str, tmp_path: Path
) -> None:
    exchange, queue = f"{prefix}.x", f"{prefix}.reminders"
    app = make_rabbit_app(exchange=exchange, delay_levels=16)

    @app.task(queue=queue)
    async def remind(n: int) -> None: ...

    try:
        await remind.apply_async(args=(1,), countdown="1m")  # 600 units: levels 9, 6, 4, 3
        await remind.apply_async(args=(2,), countdown="102.4s")  # 1024 units: level 10
        out = _delays(tmp_path, rabbitmq_url, exchange, queue)
    finally:
        ladder = app.delays.topology()
        await app.broker.delete(
            Topology(ladder.exchange, ladder.queues, (*ladder.exchanges, ExchangeSpec(exchange)))
        )
    assert f"delay ladder of exchange '{exchange}': 16 levels of 100ms" in out
    assert f"{exchange}.delay.9" in out
    assert f"{exchange}.delay.10" in out
    assert f"{exchange}.delay.3" not in out  # the 1-minute message reaches it later
    assert "51s200ms" in out  # level 9's TTL
    assert queue in out
    assert "2 waiting; unroutable: 0" in out


async def test_cuebx_delays_says_when_nothing_was_delayed_and_declares_nothing(
    rabbitmq_url: str, prefix: str, tmp_path: Path
) -> None:
    out = _delays(tmp_path, rabbitmq_url, f"{prefix}.x", f"{prefix}.q")
    assert f"The delay ladder of exchange '{prefix}.x' is not declared" in out
