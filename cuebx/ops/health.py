"""`Health`: whether a worker is alive and ready, as a value to serve, send and combine.

A health probe must not need the broker to answer it, so `worker_health` reads only what
the worker process knows: whether its broker connection is up, whether its consumers are
registered, whether it is stopping. The value is plain data (`to_dict` / `from_dict`), so a
supervisor of several worker processes can collect one per child over a pipe and serve
`Health.combine` of them.

- alive (``/healthz``, the liveness probe): connected with consumers registered, or
  draining after SIGTERM (a probe must never kill a worker that is finishing its tasks);
- ready (``/readyz``, the readiness probe): connected, consumers registered, not stopping.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cuebx.worker import Worker

__all__ = ["Health", "worker_health"]


@dataclass(frozen=True, slots=True)
class Health:
    """A worker's health at one moment.

    Attributes:
        connected: the broker connection is up.
        consuming: every consumer is registered.
        stopping: a stop began (SIGTERM): running handlers are finishing.
        queues: the queues it consumes.
        workers: how many workers this describes (more than one once combined).
    """

    connected: bool
    consuming: bool
    stopping: bool = False
    queues: tuple[str, ...] = ()
    workers: int = 1

    @property
    def alive(self) -> bool:
        """For ``/healthz``: working, or draining."""
        return self.stopping or (self.connected and self.consuming)

    @property
    def ready(self) -> bool:
        """For ``/readyz``: taking new messages."""
        return self.connected and self.consuming and not self.stopping

    def to_dict(self) -> dict[str, Any]:
        """Plain data: what the probes answer with, and what a child process sends."""
        return {
            "alive": self.alive,
            "ready": self.ready,
            "connected": self.connected,
            "consuming": self.consuming,
            "stopping": self.stopping,
            "queues": list(self.queues),
            "workers": self.workers,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Health:
        """Read what `to_dict` wrote."""
        return cls(
            bool(data["connected"]),
            bool(data["consuming"]),
            bool(data.get("stopping", False)),
            tuple(data.get("queues", ())),
            int(data.get("workers", 1)),
        )

    @classmethod
    def combine(cls, healths: Iterable[Health]) -> Health:
        """The health of several workers (a supervisor's children), as one.

        Alive when each is alive; ready when each worker that is not draining is ready
        and at least one is not draining (a child being recycled does not make the whole
        unready). No worker at all is neither alive nor ready.
        """
        found = list(healths)
        if not found:
            return cls(connected=False, consuming=False, workers=0)
        working = [h for h in found if not h.stopping]
        return cls(
            connected=all(h.connected for h in working),
            consuming=all(h.consuming for h in working),
            stopping=not working,
            queues=tuple(dict.fromkeys(q for h in found for q in h.queues)),
            workers=sum(h.workers for h in found),
        )


def worker_health(worker: Worker) -> Health:
    """Read `worker`'s health (no I/O: safe to call from a probe at any rate)."""
    return Health(
        connected=worker.broker.connected,
        consuming=worker.consuming,
        stopping=worker.stopping,
        queues=worker.queue_names,
    )
