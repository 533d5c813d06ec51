"""Hilum's logs: text lines (the default) or JSON lines (``[log] format = "json"``), on stderr.

Each line names what it is about: the HTTP request (``request_id``), the DIMSE association
(``association``, and the ``peer`` address) or the AI job (``job_id``). The edge of each transport
sets those fields once, for the thread that serves it (:func:`log_context`: the HTTP request-id
middleware in ``server/app.py``, the association's thread in ``server/dimse/ae.py``, the worker's
job in ``inference/worker.py``); every line logged meanwhile, by Hilum or a library, carries them.
A JSON line also carries the time (UTC), level, logger, message, the command (``serve``,
``dimse``, ``web``, ``worker``) and the process id (several processes log to one stream), and an
exception's traceback as one string.

Under ``hilum web``, gunicorn logs through its own loggers; :func:`gunicorn_logconfig` gives
them the same JSON lines, its access log's request id taken from the response's
``X-Request-Id`` header (gunicorn's ``{x-request-id}o`` atom).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import warnings
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"

_FIELDS: ContextVar[Mapping[str, str | int] | None] = ContextVar("hilum_log_fields", default=None)


@contextlib.contextmanager
def log_context(**fields: str | int) -> Iterator[None]:
    """Every line logged in this thread (or task) until the block ends carries ``fields``, on
    top of those of an enclosing block."""
    token = _FIELDS.set({**log_fields(), **fields})
    try:
        yield
    finally:
        _FIELDS.reset(token)


def log_fields() -> Mapping[str, str | int]:
    """The fields of the enclosing :func:`log_context` blocks."""
    return _FIELDS.get() or {}


class JsonFormatter(logging.Formatter):
    """One JSON object per line (no newline inside: a traceback is one escaped string)."""

    def __init__(self, command: str = "") -> None:
        super().__init__()
        self.command = command

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "command": self.command,
            "pid": record.process,
        }
        entry.update(log_fields())
        if record.name == "gunicorn.access" and isinstance(record.args, Mapping):
            # gunicorn's access-log atoms: the response headers as "{name}o", lower-cased.
            request_id = record.args.get("{x-request-id}o")
            if request_id and request_id != "-":
                entry["request_id"] = request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(verbose: bool, log_format: LogFormat = "text", command: str = "") -> None:
    """The process's logging, once at start-up (``hilum`` commands)."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(command))
        # Python's warnings are log lines too, not free text among the JSON lines.
        logging.captureWarnings(True)
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    # pynetdicom logs every PDU at INFO; its warnings are what an administrator needs.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # Odd values in received headers are stored as they are; pydicom's per-value complaints
    # would drown the log of a migration.
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", module="pydicom")


def gunicorn_logconfig(command: str) -> dict[str, Any]:
    """gunicorn's ``logconfig_dict`` (a :func:`logging.config.dictConfig` schema) for JSON
    lines: its error log, its access log and every other logger, on stderr, at the level
    :func:`configure_logging` gave the process."""
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter, "command": command}},
        "handlers": {"json": handler},
        "root": {"level": level, "handlers": ["json"]},
        "loggers": {
            "gunicorn.error": {"level": "INFO", "handlers": ["json"], "propagate": False},
            "gunicorn.access": {"level": "INFO", "handlers": ["json"], "propagate": False},
        },
    }
