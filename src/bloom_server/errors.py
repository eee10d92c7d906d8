"""Domain errors. Each maps to one HTTP status in api/errors.py (the only table); nothing here knows about HTTP."""

from __future__ import annotations

from typing import Any


class BloomServerError(Exception):
    """Base of the project's errors."""


class InvalidRequest(BloomServerError):
    """The client sent something the server will not run. `field` names it; `limit` is the bound it broke, if any."""

    def __init__(self, message: str, field: str | None = None, limit: Any = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.limit = limit


class Overloaded(BloomServerError):
    """The queue is full; try again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class NotReady(BloomServerError):
    """The model is still loading (or the server is draining)."""


class EngineDead(BloomServerError):
    """A step failed on some rank: the process is going down so the pod restarts."""


class ModelDirError(BloomServerError):
    """The model directory cannot be served (missing files, incomplete download, unknown layout)."""


class ConfigError(BloomServerError):
    """A setting combination that cannot work (e.g. bf16 with DeepSpeed kernel injection)."""
