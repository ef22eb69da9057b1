"""One logging set-up for every process of a server: the main process, LitServe's API servers
(through uvicorn's `log_config`) and the inference workers.

`text` is for people: a time, level, logger and message, then the record's fields as key=value.
`json` is for log pipelines: one JSON object per line with the same fields. Access lines come
from `timmserve.access` (uvicorn's own access log is turned off) and carry the request id that
the response's `X-Request-ID` header also returns.
"""

from __future__ import annotations

import json
import logging
import logging.config
import time
from typing import Any, Literal

LogFormat = Literal["text", "json"]
# Attributes every LogRecord has; anything else on a record came from `extra=` and is a field.
_STANDARD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "color_message",  # uvicorn's ANSI-coloured copy of the message
}


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {key: value for key, value in vars(record).items() if key not in _STANDARD_ATTRIBUTES}


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = " ".join(f"{key}={value}" for key, value in record_fields(record).items())
        return f"{line} {fields}" if fields else line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **record_fields(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def logging_config(level: str, log_format: str) -> dict[str, Any]:
    """A `logging.config.dictConfig` dict for timmserve's and uvicorn's loggers."""
    formatter = {"()": JsonFormatter if log_format == "json" else TextFormatter}
    handler = {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stderr"}
    logger = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {"default": handler},
        "loggers": {
            "timmserve": logger,
            "litserve": logger,
            "uvicorn": logger,
            "uvicorn.error": {"level": level.upper()},
        },
    }


def configure_logging(level: str, log_format: str) -> dict[str, Any]:
    """Apply the set-up in this process; returns it for uvicorn's `log_config`."""
    config = logging_config(level, log_format)
    logging.config.dictConfig(config)
    return config
