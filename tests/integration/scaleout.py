"""A ``cuebx worker`` subprocess on `scaleout_app`, with its ledger and its log, for tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import wait_for

__all__ = ["ROOT", "WorkerRun"]

ROOT = Path(__file__).parents[2]
READY = re.compile(r"worker-(\d+) \(pid (\d+)\) ready")


class WorkerRun:
    """One ``cuebx worker`` subprocess on `scaleout_app`: its ledger and its log."""

    def __init__(self, tmp_path: Path, queue: str, url: str) -> None:
        self.ledger = tmp_path / "ledger.txt"
        self.log = tmp_path / "worker.log"
        self.env = {
            **os.environ,
            "CUEBX_BROKER_URL": url,
            "TEST_QUEUE": queue,
            "TEST_LEDGER": str(self.ledger),
            "PYTHONPATH": str(ROOT),
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *args: str, **env: str) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "cuebx", "worker", "-A", "tests.integration.scaleout_app"]
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [*argv, *args], cwd=ROOT, stdout=log, stderr=log, env={**self.env, **env}
            )
        return self.process

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def rows(self, event: str) -> list[list[str]]:
        if not self.ledger.exists():
            return []
        rows = [line.split() for line in self.ledger.read_text().splitlines()]
        return [row for row in rows if row and row[0] == event]

    def done(self) -> set[str]:
        return {row[2] for row in self.rows("done")}

    def ready(self) -> dict[int, list[int]]:
        """The pids each slot reported ready, in order."""
        found: dict[int, list[int]] = {}
        for slot, pid in READY.findall(self.text()):
            found.setdefault(int(slot), []).append(int(pid))
        return found

    async def wait_ready(self, processes: int) -> None:
        await wait_for(
            lambda: (
                re.search(rf"all {processes} worker process(es)? ready", self.text()) is not None
            ),
            timeout=30,
            what=f"{processes} worker processes ready:\n{self.text()}",
        )

    async def exit_code(self, timeout: float) -> int:
        process = self.process
        assert process is not None
        await wait_for(lambda: process.poll() is not None, timeout=timeout, what="worker exit")
        return process.returncode

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()  # the supervisor only: its children stop once the pipe closes
            self.process.wait(10)
