"""Throwaway RabbitMQ nodes and clusters for tests that stop, restart or kill a broker.

The shared node on 5672 is never stopped: a test that needs a broker to die starts its own
node with its own name, ports and data directory, and removes it afterwards.

    node = RabbitNode.start("cuebx-restart", port=5690, base=tmp_path)
    ...                      # node.url is amqp://guest:guest@127.0.0.1:5690/
    node.restart()           # stop and start again: durable queues and persistent messages stay
    node.stop()

    cluster = RabbitCluster.start("cuebx-c", ports=(5701, 5702, 5703), base=tmp_path)
    ...                      # cluster.url: the three URLs, comma-separated (CUEBX_BROKER_URL)
    cluster.nodes[0].kill()  # SIGKILL one node: the other two keep the quorum queues
    cluster.remove()

Run as a program (``python -m tests.nodes``, or ``scripts/rabbitmq-cluster``), it starts, stops
and shows a three-node cluster for trying failover by hand; ``--help`` says how.
Only the standard library is used, so the script runs without the project's virtualenv.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RabbitCluster", "RabbitNode", "main"]


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
        node = cls.prepare(name, port=port, base=base, config=config, advanced=advanced)
        node.boot(timeout=timeout)
        return node

    @classmethod
    def prepare(
        cls, name: str, *, port: int, base: Path, config: str = "", advanced: str = "[].\n"
    ) -> RabbitNode:
        """Write a node's configuration under `base`, without starting it."""
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
        return cls(name, port, base)

    def boot(self, *, timeout: float = 60) -> None:
        """Start this node's server and wait until its AMQP port answers."""
        self.launch()
        self.wait_ready(timeout=timeout)

    def launch(self) -> None:
        """Start this node's server in the background, without waiting for it."""
        subprocess.run(
            ["rabbitmq-server", "-detached"],
            env=self.environment(),
            capture_output=True,
            check=True,
            timeout=60,
        )

    def answers(self) -> bool:
        """True when the node's AMQP port accepts a TCP connection (cheaper than a CLI call)."""
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def join_cluster(self, seed: RabbitNode) -> None:
        """Make this (fresh) node a member of `seed`'s cluster."""
        _run("rabbitmqctl", "stop_app", node=self.node)
        _run("rabbitmqctl", "join_cluster", seed.node, node=self.node)
        _run("rabbitmqctl", "start_app", node=self.node)

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


@dataclass
class RabbitCluster:
    """Nodes of one RabbitMQ cluster on this machine, each with its own name, port and data."""

    nodes: list[RabbitNode]

    @classmethod
    def start(
        cls, name: str, *, ports: Sequence[int], base: Path, timeout: float = 90
    ) -> RabbitCluster:
        """Start a node per port and join them into one cluster (the first one is the seed).

        The nodes boot at the same time, which roughly halves the wait on a small machine. A
        cluster whose data is already under `base` (stopped by `stop`) starts again as it was.

        Raises:
            RuntimeError: a port is in use already.
        """
        taken = [p for p in ports if _port_in_use(p)]
        if taken:
            raise RuntimeError(
                f"port(s) {', '.join(map(str, taken))} in use: is another cluster running "
                "(scripts/rabbitmq-cluster stop)?"
            )
        fresh = not (base / "1" / "mnesia").exists()
        nodes = [
            RabbitNode.prepare(f"{name}-{k}", port=port, base=base / str(k))
            for k, port in enumerate(ports, 1)
        ]
        for node in nodes:
            node.launch()
        cluster = cls(nodes)
        cluster.wait_ready(timeout=timeout)
        if fresh:
            for node in nodes[1:]:
                node.join_cluster(nodes[0])
        return cluster

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """Every node's URL, comma-separated: the form CUEBX_BROKER_URL takes."""
        return ",".join(self.urls)

    def wait_ready(self, *, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            while not node.answers():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"RabbitMQ node {node.node} did not answer in {timeout}s")
                time.sleep(0.2)

    def stop(self) -> None:
        """Stop every node cleanly; their data stays, so `start` brings the cluster back."""
        for node in reversed(self.nodes):
            node.stop()

    def remove(self) -> None:
        """Stop every node (a killed one too) and delete their data."""
        for node in reversed(self.nodes):
            if node.answers():
                node.stop()
            else:
                node.kill()  # killed, or half-started: nothing to stop cleanly
            shutil.rmtree(node.base, ignore_errors=True)


def _port_in_use(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


# -- the scripts/rabbitmq-cluster command ----------------------------------------------------

DEFAULT_BASE = Path(os.environ.get("TMPDIR", "/tmp")) / "cuebx-rabbitmq-cluster"
DEFAULT_PORTS = (5701, 5702, 5703)
DEFAULT_NAME = "cuebx-cluster"


def _cluster(base: Path) -> RabbitCluster:
    """The cluster whose layout `start` wrote to `base`/cluster.json."""
    try:
        layout = json.loads((base / "cluster.json").read_text())
    except FileNotFoundError:
        raise SystemExit(f"no cluster under {base}: start one with `start`") from None
    return RabbitCluster(
        [RabbitNode(n["name"], n["port"], Path(n["base"])) for n in layout["nodes"]]
    )


def _print_status(cluster: RabbitCluster) -> None:
    for k, node in enumerate(cluster.nodes, 1):
        state = "running" if node.answers() else "down"
        print(f"node {k}: {node.node} on 127.0.0.1:{node.port} ({state}), data {node.base}")
    print(f"export CUEBX_BROKER_URL={cluster.url}")


def main(argv: Sequence[str] | None = None) -> int:
    """``start [N]``, ``kill N``, ``stop`` and ``status`` of a three-node cluster."""
    parser = argparse.ArgumentParser(
        prog="rabbitmq-cluster",
        description="A three-node RabbitMQ cluster on this machine, for trying failover: its "
        "own node names, ports and data; the node on 5672 is never touched.",
    )
    parser.add_argument("command", choices=["start", "kill", "stop", "status"])
    parser.add_argument(
        "node", nargs="?", type=int, help="start N: start node N again (after kill N)"
    )
    parser.add_argument(
        "--base", type=Path, default=DEFAULT_BASE, help=f"data (default {DEFAULT_BASE})"
    )
    options = parser.parse_args(argv)
    base: Path = options.base
    if options.command == "start" and options.node is None:
        if (base / "cluster.json").exists():
            cluster = _cluster(base)
            cluster = RabbitCluster.start(
                DEFAULT_NAME, ports=[n.port for n in cluster.nodes], base=base
            )
        else:
            cluster = RabbitCluster.start(DEFAULT_NAME, ports=DEFAULT_PORTS, base=base)
            layout = [{"name": n.name, "port": n.port, "base": str(n.base)} for n in cluster.nodes]
            (base / "cluster.json").write_text(json.dumps({"nodes": layout}))
        _print_status(cluster)
        return 0
    cluster = _cluster(base)
    if options.command in ("start", "kill"):
        if options.node is None or not 1 <= options.node <= len(cluster.nodes):
            parser.error(f"{options.command} takes a node number, 1 to {len(cluster.nodes)}")
        node = cluster.nodes[options.node - 1]
        if options.command == "kill":
            node.kill()
        else:
            node.boot()
    elif options.command == "stop":
        cluster.remove()
        shutil.rmtree(base, ignore_errors=True)
        print(f"stopped; removed {base}")
        return 0
    _print_status(cluster)
    return 0


if __name__ == "__main__":
    sys.exit(main())
