"""The header timeout: a connection whose request head (request line and headers) is not
complete within ``--header-timeout-s`` is answered 408 and closed.

uvicorn has no such bound. ``timeout_keep_alive`` only runs between requests and is
cancelled by the first byte of the next one; a fresh connection has no timer at all. So
a client that opens connections and trickles a header byte every few seconds (slowloris)
holds each connection, and its ASGI-less buffer, for as long as it likes. The bound has
to live below ASGI, where the head is parsed: a subclass of uvicorn's HTTP protocol
(h11 or httptools, whichever uvicorn picks) arms a timer when a connection opens and when
the first byte of a request arrives on an idle keep-alive connection, and disarms it when
the protocol has parsed a complete head (it then starts a new request-response cycle).
Bodies are not timed here: the body limit and ``--timeout-s`` bound them.
"""

from __future__ import annotations

import json
import logging

from .errors import error_body

logger = logging.getLogger(__name__)


def request_timeout_response(timeout_s: float) -> bytes:
    """A raw HTTP/1.1 408 with OpenAI's error body and Connection: close."""
    body = json.dumps(error_body(f"the request head was not complete within {timeout_s:g} s (--header-timeout-s)",
                                 "invalid_request_error", "request_timeout")).encode()
    head = (f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode()
    return head + body


def header_timeout_protocol(base: type, timeout_s: float) -> type:
    """``base`` (uvicorn's h11 or httptools protocol class) with the header timeout."""
    timeout_response = request_timeout_response(timeout_s)

    class HeaderTimeoutProtocol(base):
        _head_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            cycle = self.cycle
            if self._head_timer is None and (cycle is None or cycle.response_complete):
                self._arm()  # the first bytes of a request on an idle keep-alive connection
            super().data_received(data)
            if self.cycle is not cycle:  # the protocol parsed a whole head and started a cycle
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._head_timer = self.loop.call_later(timeout_s, self._expired)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _expired(self) -> None:
            self._head_timer = None
            if self.transport.is_closing():
                return
            logger.info("closing a connection from %s: no complete request head in %g s (--header-timeout-s)",
                        self.client, timeout_s)
            self.transport.write(timeout_response)
            self.transport.close()

    HeaderTimeoutProtocol.__name__ = f"HeaderTimeout{base.__name__}"
    return HeaderTimeoutProtocol


def uvicorn_protocol(timeout_s: float) -> type:
    """The protocol class for ``uvicorn.Config(http=...)``: uvicorn's own choice (httptools when installed, else
    h11) with the header timeout."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    return header_timeout_protocol(AutoHTTPProtocol, timeout_s)


__all__ = ["header_timeout_protocol", "request_timeout_response", "uvicorn_protocol"]
