"""Log records as JSON lines, for log collectors: ``cuebx worker --log-format json``.

One object per record, encoded by msgspec: ``time`` (UTC, ISO 8601 with milliseconds),
``level``, ``logger``, ``message``, and the ``task``, ``message_id`` and ``attempt`` extras
that every record about a message carries, when the record has them; ``exception`` holds
the formatted traceback of a record logged with one. Other extras are left out: a collector
indexes fields, and a fixed set keeps its index small.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec

__all__ = ["JsonFormatter", "LogFormat", "configure_logging"]

LogFormat = Literal["text", "json"]

#: The text format of ``cuebx worker`` without ``--log-format json``.
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
_MESSAGE_FIELDS = ("task", "message_id", "attempt")


def _plain(value: Any) -> Any:
    return repr(value)


class JsonFormatter(logging.Formatter):
    """Format each record as one JSON object on one line."""

    _encoder = msgspec.json.Encoder(enc_hook=_plain)

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in _MESSAGE_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return self._encoder.encode(line).decode()


def configure_logging(level: str, log_format: LogFormat = "text") -> None:
    """Send the root logger's records to stderr at `level`, as text or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    logging.basicConfig(level=level.upper(), handlers=[handler])
