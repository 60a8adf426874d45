"""cuebx: typed, async background tasks native to RabbitMQ."""

from cuebx.app import Cuebx
from cuebx.context import TaskContext, current_context
from cuebx.errors import (
    AppNotFoundError,
    ArgumentsError,
    BatchPublishError,
    BrokerError,
    BrokerUnavailableError,
    CallInterruptedError,
    CallTimeoutError,
    ConfigurationError,
    CuebxError,
    DelayError,
    DuplicateTaskError,
    PublishError,
    PublishTimeoutError,
    Reject,
    ResultTimeoutError,
    Retry,
    StoreError,
    StoreUnavailableError,
    TaskFailed,
    TaskSignal,
    TopologyConflictError,
    TopologyError,
    UnroutableError,
)
from cuebx.events import Emitted
from cuebx.idempotency import Idempotency
from cuebx.limits import Limiter
from cuebx.middleware import Middleware, Outcome, Postpone, Publish, Received, Skip
from cuebx.settings import Settings
from cuebx.status import TaskState, TaskStatus
from cuebx.stores import Store
from cuebx.task import Task, TaskHandle
from cuebx.worker import Worker

__version__ = "0.1.0"

__all__ = [
    "AppNotFoundError",
    "ArgumentsError",
    "BatchPublishError",
    "BrokerError",
    "BrokerUnavailableError",
    "CallInterruptedError",
    "CallTimeoutError",
    "ConfigurationError",
    "Cuebx",
    "CuebxError",
    "DelayError",
    "DuplicateTaskError",
    "Emitted",
    "Idempotency",
    "Limiter",
    "Middleware",
    "Outcome",
    "Postpone",
    "Publish",
    "PublishError",
    "PublishTimeoutError",
    "Received",
    "Reject",
    "ResultTimeoutError",
    "Retry",
    "Settings",
    "Skip",
    "Store",
    "StoreError",
    "StoreUnavailableError",
    "Task",
    "TaskContext",
    "TaskFailed",
    "TaskHandle",
    "TaskSignal",
    "TaskState",
    "TaskStatus",
    "TopologyConflictError",
    "TopologyError",
    "UnroutableError",
    "Worker",
    "__version__",
    "current_context",
]
