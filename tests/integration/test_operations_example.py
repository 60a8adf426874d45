"""examples/operations.py, which docs/operations.md shows, runs as the docs say."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).parents[2] / "examples"


def test_the_operations_example_lists_shows_and_replays_dead_letters() -> None:
    result = subprocess.run(
        [sys.executable, "operations.py"], cwd=EXAMPLES, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "2 x send_welcome: exhausted"
    assert "builtins.ConnectionError: SMTP server busy for ann@example.com" in lines[1]
    assert "replayed 2 to {'emails': 2}" in lines
    assert {"sent to ann@example.com", "sent to bob@example.com"} <= set(lines)
