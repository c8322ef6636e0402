"""Pure-ASGI guards around the app (no BaseHTTPMiddleware: it hides the client's
``http.disconnect`` from handlers, and disconnects must stop GPU work).

    Gate      outermost: request metrics for every answer; then, for every route but
              /health/* and the playground page, the API key (401 before any body is read) and the drain
              (503 once SIGTERM arrived); counts the requests in flight
    BodyLimit the request body limit: 413 at once when Content-Length says so, else
              when the counted bytes pass it, whatever the app was doing with them

Both answer with OpenAI's error body.
"""

from __future__ import annotations

import json
import logging
import time

from .errors import AuthError, BodyTooLargeError, ShuttingDownError, http_error
from .playground import public

logger = logging.getLogger(__name__)

OPEN_PREFIX = "/health/"


async def send_error(send, error: BaseException, extra_headers: dict = None) -> None:
    status, body, headers = http_error(error)
    headers.update(extra_headers or {})
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


def header(scope, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return ""


class Traffic:
    """HTTP requests in flight (the drain waits for them)."""

    def __init__(self):
        self.in_flight = 0


class Gate:
    def __init__(self, app, config, worker, metrics, traffic: Traffic):
        self.app = app
        self.config = config
        self.worker = worker
        self.metrics = metrics
        self.traffic = traffic

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        started = time.perf_counter()
        status = {"code": 500}

        async def watch(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        self.traffic.in_flight += 1
        try:
            if path.startswith(OPEN_PREFIX) or (self.config.playground and public(path)):
                await self.app(scope, receive, watch)
            elif self.config.api_key is not None and not self._authorized(scope):
                await send_error(watch, AuthError("missing or wrong API key: send Authorization: Bearer <key> (the "
                                                  "server's --api-key-file or KOLORS_TRT_API_KEY)"),
                                 {"WWW-Authenticate": "Bearer"})
            elif self.worker.draining:
                await send_error(watch, ShuttingDownError("the server is shutting down; retry on another replica"))
            else:
                await self.app(scope, receive, watch)
        finally:
            self.traffic.in_flight -= 1
            # the router leaves the matched route in the scope: its template labels the request; unmatched
            # paths (scanners) share "other", so the label set stays bounded
            endpoint = getattr(scope.get("route"), "path", None) or "other"
            self.metrics.requests.labels(endpoint=endpoint, status=str(status["code"])).inc()
            self.metrics.request_seconds.labels(endpoint=endpoint).observe(time.perf_counter() - started)

    def _authorized(self, scope) -> bool:
        scheme, _, token = header(scope, b"authorization").partition(" ")
        return scheme.lower() == "bearer" and self.config.key_matches(token.strip())


class BodyLimit:
    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = int(max_bytes)

    def _error(self) -> BodyTooLargeError:
        return BodyTooLargeError(f"the request body is over {self.max_bytes} bytes (the server's body limit)")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = header(scope, b"content-length")
        if length.isdigit() and int(length) > self.max_bytes:
            await send_error(send, self._error(), {"Connection": "close"})
            return
        state = {"bytes": 0, "over": False, "answered": False}

        async def counted():
            message = await receive()
            if message["type"] == "http.request":
                state["bytes"] += len(message.get("body", b""))
                if state["bytes"] > self.max_bytes:
                    state["over"] = True
                    raise self._error()
            return message

        async def guarded(message):
            # Past the limit, whatever the app answers (its body parser turns our error into a 400) is replaced
            # by one 413.
            if state["over"]:
                if not state["answered"]:
                    state["answered"] = True
                    await send_error(send, self._error(), {"Connection": "close"})
                return
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except Exception:
            if not state["over"]:
                raise
            if not state["answered"]:
                state["answered"] = True
                await send_error(send, self._error(), {"Connection": "close"})


__all__ = ["BodyLimit", "Gate", "Traffic", "send_error"]
