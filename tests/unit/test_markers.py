"""The ``rabbitmq`` mark that tests/conftest.py adds: ``-m "not rabbitmq"`` needs no broker."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def _collected(*args: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return [line for line in result.stdout.splitlines() if "::" in line]


def test_not_rabbitmq_leaves_out_the_broker_suite_s_rabbitmq_cases_and_rabbitmq_fixtures() -> None:
    files = ["tests/integration/test_worker.py", "tests/integration/test_cli.py"]
    kept = _collected("-m", "not rabbitmq", *files)
    every = _collected(*files)
    assert [t for t in every if "[rabbitmq" in t], "the broker suite lost its rabbitmq cases"
    assert [t for t in kept if "[memory" in t], "the memory cases must stay"
    assert not [t for t in kept if "[rabbitmq" in t]
    # Through fixtures: make_rabbit_app and broker_env ask for rabbitmq_url.
    assert not [t for t in kept if "exits_zero_on_sigterm" in t or "refuses_to_consume" in t]
    assert [t for t in kept if "test_cuebx_topology_prints_the_declarations_without_a_broker" in t]
