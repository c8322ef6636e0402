"""The playground: one static page (GET / and /playground) that drives the server's own public API.

The page is three files shipped in the package (static/playground.{html,css,js}): no
build step, no CDN, nothing fetched from elsewhere, so it works on a host without
internet. It calls only what any client may call (/v1/models, /v1/loras,
/v1/references, /v1/images/generations with ``stream=true``), with the API key the
user types (kept in the page's memory; every call sends it). The page itself needs no
key: it holds nothing but code, and the Gate lets ``public(path)`` through.

A Content-Security-Policy of 'self' keeps the page to this server: no other origin
can be loaded or called from it, and no inline script runs.
"""

from __future__ import annotations

import functools
import logging
from importlib import resources

from fastapi import APIRouter, FastAPI
from fastapi.responses import Response

logger = logging.getLogger(__name__)

PAGE_PATHS = ("/", "/playground")
ASSET_PREFIX = "/playground/"
ASSETS = {"playground.css": "text/css; charset=utf-8", "playground.js": "text/javascript; charset=utf-8"}
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
                               "base-uri 'none'; frame-ancestors 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # a new version of the server serves its new page at once
}

router = APIRouter(include_in_schema=False)


def public(path: str) -> bool:
    """The page and its assets: served without the API key (the API calls it makes need it)."""
    return path in PAGE_PATHS or (path.startswith(ASSET_PREFIX) and path[len(ASSET_PREFIX):] in ASSETS)


@functools.lru_cache(maxsize=None)
def asset(name: str) -> bytes:
    """A file of static/ read from the installed package (package data; works from a wheel too)."""
    return (resources.files(__package__) / "static" / name).read_bytes()


def page() -> Response:
    return Response(asset("playground.html"), media_type="text/html; charset=utf-8", headers=HEADERS)


@router.api_route("/", methods=["GET", "HEAD"])
async def root():
    return page()


@router.api_route("/playground", methods=["GET", "HEAD"])
async def playground():
    return page()


@router.api_route("/playground/playground.css", methods=["GET", "HEAD"])
async def stylesheet():
    return Response(asset("playground.css"), media_type=ASSETS["playground.css"], headers=HEADERS)


@router.api_route("/playground/playground.js", methods=["GET", "HEAD"])
async def script():
    return Response(asset("playground.js"), media_type=ASSETS["playground.js"], headers=HEADERS)


def add_playground(app: FastAPI, enabled: bool) -> None:
    """Serve the page on ``app`` unless ``--no-playground`` turned it off (then / and /playground are 404s)."""
    if enabled:
        app.include_router(router)


__all__ = ["add_playground", "public"]
