"""The server's errors and the one table that maps error types to HTTP answers.

Every error hangs under the product root (``KolorsTrtError``): the caller's faults
under ``InputError`` (4xx), ours under ``ServiceError`` (5xx; a full queue is ours
too, answered 429). ``http_error`` looks the type up in ``TABLE``, most specific
first, never the message text, and gives OpenAI's error body::

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

from kolors_trt.runtime.errors import InputError, KolorsTrtError, ServiceError
from kolors_trt.runtime.preprocess import ImageInputError

logger = logging.getLogger(__name__)


class ServeInputError(InputError):
    """A request field is invalid; ``param`` names it (OpenAI's ``error.param``)."""

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.param = param


class AuthError(ServeInputError):
    """The Authorization header is missing or holds the wrong key."""


class NotFoundError(ServeInputError):
    """A reference_id, model or route that this server does not know."""


class BodyTooLargeError(ServeInputError):
    """The request body is over the server's limit."""


class QueueFullError(ServiceError):
    """The queue is full; ``retry_after`` is the server's estimate, in seconds, of when to come back."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class UnavailableError(ServiceError):
    """The server cannot take the request now: still loading, failing, or shutting down."""


class ShuttingDownError(UnavailableError):
    """SIGTERM arrived: new requests are refused; queued ones left at the drain timeout get this."""


class MissingDependencyError(ServiceError):
    """The server's packages are not installed."""


class DeadlineError(ServiceError):
    """The request passed its deadline (--timeout-s) in the queue or between denoising steps."""


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    type: str
    code: str


# Most specific first: the first row whose class the error is an instance of answers.
TABLE = (
    (AuthError, HttpAnswer(401, "invalid_request_error", "invalid_api_key")),
    (NotFoundError, HttpAnswer(404, "invalid_request_error", "not_found")),
    (BodyTooLargeError, HttpAnswer(413, "invalid_request_error", "request_too_large")),
    (ImageInputError, HttpAnswer(422, "invalid_request_error", "invalid_image")),
    (InputError, HttpAnswer(400, "invalid_request_error", "invalid_value")),
    (QueueFullError, HttpAnswer(429, "rate_limit_error", "queue_full")),
    (ShuttingDownError, HttpAnswer(503, "server_error", "shutting_down")),
    (UnavailableError, HttpAnswer(503, "server_error", "not_ready")),
    (DeadlineError, HttpAnswer(504, "server_error", "deadline_exceeded")),
    (ServiceError, HttpAnswer(500, "server_error", "engine_error")),
    (KolorsTrtError, HttpAnswer(500, "server_error", "internal_error")),
)
UNEXPECTED = HttpAnswer(500, "server_error", "internal_error")


def mapping(error: BaseException) -> HttpAnswer:
    for cls, row in TABLE:
        if isinstance(error, cls):
            return row
    return UNEXPECTED


def error_body(message: str, type_: str, code: str, param: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def http_error(error: BaseException) -> tuple[int, dict, dict]:
    """(status, OpenAI error body, extra headers) for any exception. Unexpected ones are logged with their
    traceback and answered without their text (it may hold host details)."""
    row = mapping(error)
    if row is UNEXPECTED:
        logger.error("unexpected error", exc_info=error)
        message = f"internal error ({type(error).__name__}); the server log has the details"
    else:
        message = str(error)
    headers = {}
    if isinstance(error, QueueFullError):
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
    elif isinstance(error, UnavailableError):
        headers["Retry-After"] = "1"
    if isinstance(error, ShuttingDownError):
        headers["Connection"] = "close"
    return row.status, error_body(message, row.type, row.code, getattr(error, "param", None)), headers


__all__ = [
    "AuthError",
    "BodyTooLargeError",
    "DeadlineError",
    "MissingDependencyError",
    "NotFoundError",
    "QueueFullError",
    "ServeInputError",
    "ShuttingDownError",
    "TABLE",
    "UnavailableError",
    "error_body",
    "http_error",
    "mapping",
]
