"""Pure-ASGI guards around the app (no BaseHTTPMiddleware: it hides the client's
``http.disconnect`` from handlers, and disconnects must stop GPU work).

    Gate      outermost: the request's id (``x-request-id`` echoed when the client sent a
              usable one, else made) on every answer; request metrics, labelled by the
              route template even for answers given before routing (a 413), and 499 for
              a stream whose client went away; the access log (--access-log); then, for
              every route but /health/* and the playground page, the API key (401 before
              any body is read) and the drain (503 once SIGTERM arrived); counts the
              requests in flight
    BodyLimit the request body limit: 413 at once when Content-Length says so, else
              when the counted bytes pass it, whatever the app was doing with them

Both answer with OpenAI's error body.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from starlette.routing import Match

from .errors import AuthError, BodyTooLargeError, ShuttingDownError, http_error
from .playground import public

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("kolors_trt.serve.access")

OPEN_PREFIX = "/health/"
CLIENT_GONE = 499  # nginx's "client closed request": only the metrics and the access log ever see it
SCOPE_KEY = "kolors_trt"
REQUEST_ID_HEADER = b"x-request-id"
REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}\Z")  # what is echoed; anything else gets a new id


def request_note(scope) -> dict:
    """This server's notes on one request, kept in its ASGI scope: ``request_id``, and ``client_gone`` (set by a
    stream whose client went away)."""
    return scope.setdefault(SCOPE_KEY, {"request_id": "", "client_gone": False})


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


def flat_routes(routes):
    """The routes that answer, routers included by FastAPI (``original_router``) or mounted (``routes``) opened."""
    for route in routes:
        inner = getattr(route, "routes", None) or getattr(getattr(route, "original_router", None), "routes", None)
        if inner:
            yield from flat_routes(inner)
        else:
            yield route


class Traffic:
    """HTTP requests in flight (the drain waits for them)."""

    def __init__(self):
        self.in_flight = 0


class Gate:
    def __init__(self, app, config, worker, metrics, traffic: Traffic, routes: list):
        self.app = app
        self.config = config
        self.worker = worker
        self.metrics = metrics
        self.traffic = traffic
        self.routes = routes  # the app's routes (the list itself: routes added later count too)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        started = time.perf_counter()
        status = {"code": 500}
        note = request_note(scope)
        given = header(scope, REQUEST_ID_HEADER)
        note["request_id"] = given if REQUEST_ID.match(given) else uuid.uuid4().hex
        labelled = (REQUEST_ID_HEADER, note["request_id"].encode())

        async def watch(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), labelled]}
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
            code = CLIENT_GONE if note["client_gone"] else status["code"]
            seconds = time.perf_counter() - started
            endpoint = self._endpoint(scope)
            self.metrics.requests.labels(endpoint=endpoint, status=str(code)).inc()
            self.metrics.request_seconds.labels(endpoint=endpoint).observe(seconds)
            if self.config.access_log:
                client = scope.get("client") or ("-", 0)
                access_logger.info('%s:%s "%s %s" %d %.3fs request_id=%s', client[0], client[1], scope["method"],
                                   path, code, seconds, note["request_id"])

    def _endpoint(self, scope) -> str:
        """The route template that labels the request: the router's match, else the first route whose path
        matches (an answer given before routing, e.g. a 413); unmatched paths (scanners) share "other", so the
        label set stays bounded."""
        route = scope.get("route")
        if route is None:
            route = next((r for r in flat_routes(self.routes) if r.matches(scope)[0] is not Match.NONE), None)
        return getattr(route, "path", None) or "other"

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


__all__ = ["BodyLimit", "CLIENT_GONE", "Gate", "Traffic", "request_note", "send_error"]
