"""Throwaway RabbitMQ nodes for tests that stop, restart or kill a broker.

The shared node on 5672 is never stopped: a test that needs a broker to die starts its own
node with its own name, ports and data directory, and removes it afterwards.

    node = RabbitNode.start("cuebx-restart", port=5690, base=tmp_path)
    ...                      # node.url is amqp://guest:guest@127.0.0.1:5690/
    node.restart()           # stop and start again: durable queues and persistent messages stay
    node.stop()
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RabbitNode"]


def _run(*args: str, node: str, check: bool = True, timeout: float = 60) -> str:
    result = subprocess.run(
        [*args, "-n", node],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} -n {node} failed: {result.stderr or result.stdout}")
    return result.stdout


@dataclass
class RabbitNode:
    """A RabbitMQ node of its own: ``<name>@localhost`` on `port`, data under `base`."""

    name: str
    port: int
    base: Path

    @property
    def node(self) -> str:
        return f"{self.name}@localhost"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def environment(self) -> dict[str, str]:
        base = self.base
        return {
            **os.environ,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            # Erlang distribution: a port of its own, so nodes never clash.
            "RABBITMQ_DIST_PORT": str(self.port + 20000),
            "RABBITMQ_CONFIG_FILE": str(base / "node"),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_PID_FILE": str(base / "pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "plugins"),
            # Erlang terms for settings node.conf cannot hold (channel_tick_interval).
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
        }

    @classmethod
    def start(
        cls,
        name: str,
        *,
        port: int,
        base: Path,
        timeout: float = 60,
        config: str = "",
        advanced: str = "[].\n",
    ) -> RabbitNode:
        """Start a new node (a fresh one if `base` is empty) and wait until it answers.

        `config` adds lines to its node.conf (``consumer_timeout = 2000``), `advanced` is its
        advanced.config.
        """
        base.mkdir(parents=True, exist_ok=True)
        base.chmod(0o777)  # the server runs as the rabbitmq user
        conf = base / "node.conf"
        conf.write_text(
            f"listeners.tcp.local = 127.0.0.1:{port}\n"
            "loopback_users = none\n"
            # Small disk limit: a test machine may have little free space.
            "disk_free_limit.absolute = 50MB\n" + config
        )
        conf.chmod(0o644)
        (base / "advanced.config").write_text(advanced)
        (base / "advanced.config").chmod(0o644)
        node = cls(name, port, base)
        node.boot(timeout=timeout)
        return node

    def boot(self, *, timeout: float = 60) -> None:
        """Start this node's server and wait until its AMQP port answers."""
        subprocess.run(
            ["rabbitmq-server", "-detached"],
            env=self.environment(),
            capture_output=True,
            check=True,
            timeout=60,
        )
        self.wait_ready(timeout=timeout)

    def wait_ready(self, *, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ping = subprocess.run(
                ["rabbitmq-diagnostics", "-q", "-n", self.node, "check_port_connectivity"],
                capture_output=True,
                timeout=30,
                check=False,
            )
            if ping.returncode == 0:
                return
            time.sleep(0.3)
        raise TimeoutError(f"RabbitMQ node {self.node} did not answer within {timeout}s")

    def pid(self) -> int | None:
        try:
            return int((self.base / "pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        """Stop the node cleanly (messages on disk stay for the next `boot`)."""
        _run("rabbitmqctl", "stop", node=self.node, check=False)

    def kill(self) -> None:
        """SIGKILL the node's Erlang VM, as a crashed machine would end it."""
        pid = self.pid()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def restart(self, *, timeout: float = 60) -> None:
        """Stop, then start again with the same data."""
        self.stop()
        self.boot(timeout=timeout)

    def remove(self) -> None:
        """Stop the node and delete its data."""
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)
