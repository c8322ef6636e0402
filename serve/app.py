"""create_app(config): the FastAPI app of one server, built by a factory.

The app holds no process-global state: its Worker, metrics registry and traffic
counter live on ``app.state`` and are made per call. The single-process server
(cli.py) runs it under uvicorn with its own SIGTERM drain; a Ray Serve deployment
can use the same app as its ingress (Ray then owns signals, replicas and restarts)
and either let the app's lifespan start and stop the Worker, or pass a Worker the
replica owns (``create_app(config, worker)``; the caller starts and stops it).

Routes:
    GET  /health/live, /health/ready      no API key; ready is 503 until loaded and warmed up,
                                          while draining, after repeated failed batches, and
                                          if the worker thread ended (then live is 503 too)
    GET  /metrics                         Prometheus text
    GET  /v1/models, /v1/models/{id}      the loaded model, its profile, defaults, the sizes it offers (sizes.py),
                                          batch ceilings and its samplers
    GET  /, /playground                   the playground page, no API key (playground.py; --no-playground: off)
    POST /v1/images/generations, /v1/images/edits, /v1/references   (routes.py)
    GET  /openapi.json, /docs             the OpenAPI document (openapi.py) and its viewer
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from kolors_trt import __version__
from kolors_trt.runtime.errors import KolorsTrtError
from kolors_trt.runtime.spec import SHALLOW_UNET

from . import routes
from .config import ServeConfig
from .errors import NotFoundError, ServeInputError, error_body, http_error
from .metrics import CONTENT_TYPE
from .middleware import BodyLimit, Gate, Traffic
from .openapi import openapi
from .playground import add_playground
from .protocol import validation_error
from .sizes import offered_sizes
from .worker import Worker

logger = logging.getLogger(__name__)


def error_response(error: BaseException) -> JSONResponse:
    status, body, headers = http_error(error)
    return JSONResponse(body, status_code=status, headers=headers)


def model_card(config: ServeConfig, worker: Worker, created: int) -> dict:
    pipe = worker.pipe
    folder = pipe.folder
    profile = {name: {"min": r.min, "opt": r.opt, "max": r.max}
               for name, r in (("batch", folder.profile.batch), ("height", folder.profile.height),
                               ("width", folder.profile.width))}
    height, width = config.default_hw
    defaults = {**pipe.defaults, **({"height": height, "width": width} if height is not None else {}),
                **({"num_inference_steps": config.default_steps} if config.default_steps is not None else {})}
    return {"id": config.model_id, "object": "model", "created": created, "owned_by": "kolors-trt",
            "backend": pipe.backend, "folder_kind": folder.kind, "profile": profile,
            "size_multiple": folder.size_multiple, "defaults": defaults, "max_steps": config.max_steps,
            "sizes": offered_sizes(folder, defaults),
            "max_images_per_batch": {"cfg": worker.ceilings[True], "no_cfg": worker.ceilings[False]},
            "samplers": list(pipe.samplers.names),
            "deep_cache": SHALLOW_UNET in folder.files,  # deep_cache_interval > 1 runs (DeepCache's shallow UNet)
            "startup_seconds": worker.startup_seconds}


def create_app(config: ServeConfig, worker: Optional[Worker] = None) -> FastAPI:
    """The server's app. Without ``worker`` the app's lifespan makes, starts and stops its own."""
    owned = worker is None
    worker = worker if worker is not None else Worker(config)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if owned:
            worker.start()
        yield
        if owned:
            await run_in_threadpool(worker.stop)

    app = FastAPI(title="kolors-trt", version=__version__, lifespan=lifespan,
                  description="Kolors + IP-Adapter-Plus behind OpenAI's Images API")
    app.state.config = config
    app.state.worker = worker
    app.state.traffic = Traffic()
    app.include_router(routes.router)
    add_playground(app, config.playground)

    @app.get("/health/live")
    async def live():
        ended = worker.state_now == "worker_ended"  # nothing but a restart brings it back: tell the supervisor
        return JSONResponse({"live": not ended, "state": worker.state_now}, status_code=503 if ended else 200)

    @app.get("/health/ready")
    async def ready():
        status = worker.status()
        return JSONResponse(status, status_code=200 if status["ready"] else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(worker.metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        routes.loaded_pipe(worker)
        return {"object": "list", "data": [model_card(config, worker, created)]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        routes.loaded_pipe(worker)
        if model_id != config.model_id:
            raise NotFoundError(f"model {model_id!r}: not served here; this server serves {config.model_id!r}",
                                "model")
        return model_card(config, worker, created)

    @app.exception_handler(KolorsTrtError)
    async def typed(request: Request, error: KolorsTrtError):
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        return error_response(validation_error(error.errors()))

    @app.exception_handler(HTTPException)
    async def http(request: Request, error: HTTPException):
        if error.status_code == 404:
            return error_response(NotFoundError(f"{request.url.path}: no such route (GET /docs lists them)"))
        if error.status_code == 400:
            return error_response(ServeInputError(f"the request body cannot be read: {error.detail}"))
        body = error_body(str(error.detail), "invalid_request_error", f"http_{error.status_code}")
        return JSONResponse(body, status_code=error.status_code, headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        return error_response(error)

    app.openapi = openapi(app, config, worker)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(Gate, config=config, worker=worker, metrics=worker.metrics, traffic=app.state.traffic,
                       routes=app.router.routes)
    return app


__all__ = ["create_app", "error_response"]
