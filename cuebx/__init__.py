"""cuebx: typed, async background tasks native to RabbitMQ."""

from cuebx.app import Cuebx
from cuebx.context import TaskContext, current_context
from cuebx.errors import (
    ArgumentsError,
    BatchPublishError,
    BrokerError,
    BrokerUnavailableError,
    ConfigurationError,
    CuebxError,
    DelayError,
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
from cuebx.middleware import Middleware, Outcome, Postpone, Publish, Received, Skip
from cuebx.settings import Settings
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
    "DelayError",
    "DuplicateTaskError",
    "Middleware",
    "Outcome",
    "Postpone",
    "Publish",
    "PublishError",
    "PublishTimeoutError",
    "Received",
    "Reject",
    "Retry",
    "Settings",
    "Skip",
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
