"""Log format by setting: `text` (the default) or `json` (one JSON object per line, for log collectors). The access
log (logger `bloom_server.access`) carries the request's fields; in JSON they are top-level keys."""

from __future__ import annotations

import json
import logging
import time


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "request", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def apply_log_format(fmt: str) -> None:
    """Called once at app start. JSON: every handler of the root logger formats JSON. Our access log replaces
    uvicorn's, so there is one line per request."""
    logging.getLogger("uvicorn.access").disabled = True
    if fmt == "json":
        for handler in logging.getLogger().handlers + logging.getLogger("uvicorn").handlers:
            handler.setFormatter(JsonFormatter())
