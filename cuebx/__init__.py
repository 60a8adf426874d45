"""cuebx: typed, async background tasks native to RabbitMQ."""

from cuebx.app import BatchPublishError, Cuebx, Settings
from cuebx.context import TaskContext, current_context
from cuebx.errors import (
    ArgumentsError,
    BrokerError,
    BrokerUnavailableError,
    ConfigurationError,
    CuebxError,
    DuplicateTaskError,
    PublishError,
    PublishTimeoutError,
    Reject,
    Retry,
    TaskSignal,
    TopologyConflictError,
    TopologyError,
    UnroutableError,
)
from cuebx.task import Task, TaskHandle
from cuebx.worker import Worker

__version__ = "0.1.0"

__all__ = [
    "ArgumentsError",
    "BatchPublishError",
    "BrokerError",
    "BrokerUnavailableError",
    "ConfigurationError",
    "Cuebx",
    "CuebxError",
    "DuplicateTaskError",
    "PublishError",
    "PublishTimeoutError",
    "Reject",
    "Retry",
    "Settings",
    "Task",
    "TaskContext",
    "TaskHandle",
    "TaskSignal",
    "TopologyConflictError",
    "TopologyError",
    "UnroutableError",
    "Worker",
    "__version__",
    "current_context",
]
