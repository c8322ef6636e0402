"""`kolors-trt serve`: the HTTP server in one process, under uvicorn.

    kolors-trt serve --onnx out/onnx                     # 127.0.0.1:8000, ONNX Runtime
    kolors-trt serve --engines out/engines --api-key-file key.txt --host 0.0.0.0

The process-global parts live here, never in the app: uvicorn, and the SIGTERM
drain. uvicorn's own SIGTERM handling closes the listening socket at once (new
clients see "connection refused", not 503) and re-raises the signal after shutdown
(exit status -15). DrainingServer instead: on the first SIGTERM/SIGINT the worker
stops taking work (/health/ready and new requests answer 503) while every accepted
request runs to its answer; when none is left, or at --drain-timeout-s (the rest
then get 503), uvicorn shuts down and the process exits 0. A second signal is
uvicorn's own (SIGINT twice forces).
"""

from __future__ import annotations

import argparse
import logging
import time

from kolors_trt.runtime.folder import BACKENDS

from .config import ServeConfig, read_api_key
from .errors import MissingDependencyError

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
LOOPBACK = ("127.0.0.1", "localhost", "::1")
ABORT_GRACE_S = 5.0  # after the drain timeout: time for the 503s to go out before uvicorn stops
GRACEFUL_S = 10.0  # uvicorn's own bound on open connections once it shuts down


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    d = ServeConfig
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--engines", metavar="DIR", help="engine folder (kolors-trt build), TensorRT")
    src.add_argument("--onnx", metavar="DIR", help="export folder (kolors-trt export), ONNX Runtime")
    p.add_argument("--backend", default=d.backend, choices=BACKENDS,
                   help="default: onnxruntime for --onnx, the build target for --engines")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}; 0 picks a free port")
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size,
                   help="images per UNet batch (default: the engine profile's most)")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                   help=f"how long a request waits for others to batch with (default {d.max_wait_ms:g})")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help=f"requests waiting for a batch; more get 429 (default {d.max_queue})")
    p.add_argument("--timeout-s", type=float, default=d.timeout_s,
                   help=f"per request, arrival to answer; then 504 and the request stops (default {d.timeout_s:g})")
    p.add_argument("--drain-timeout-s", type=float, default=d.drain_timeout_s,
                   help=f"after SIGTERM, how long accepted requests may still run (default {d.drain_timeout_s:g})")
    p.add_argument("--api-key-file", metavar="F",
                   help="a file holding the API key every route but /health/* then needs as 'Authorization: Bearer' "
                        "(default: $KOLORS_TRT_API_KEY; neither: no key)")
    p.add_argument("--cache-dir", metavar="DIR", help="folder keeping reference images' IP tokens across restarts")
    p.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / 2**20,
                   help=f"request body limit in MiB (default {d.max_body_bytes / 2**20:g})")
    p.add_argument("--max-prompt-chars", type=int, default=d.max_prompt_chars,
                   help=f"longest prompt taken (default {d.max_prompt_chars})")
    p.add_argument("--model-name", default=d.model_id, help=f"the model id clients see (default {d.model_id!r})")
    p.add_argument("--no-verify", action="store_true", help="skip checking the graphs/plans against the manifest")


def config_from_args(args) -> ServeConfig:
    return ServeConfig(
        folder=args.engines or args.onnx, backend=args.backend, max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms, max_queue=args.max_queue, timeout_s=args.timeout_s,
        drain_timeout_s=args.drain_timeout_s, cache_dir=args.cache_dir, api_key=read_api_key(args.api_key_file),
        max_body_bytes=int(args.max_body_mb * 2**20), max_prompt_chars=args.max_prompt_chars,
        model_id=args.model_name, verify=not args.no_verify,
    )


def draining_server(uvicorn_config, worker, traffic, drain_timeout_s: float):
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn with the drain above; announces the address and the start-up time on stdout."""

        drain_requested = None
        aborted = False
        announced = set()

        def handle_exit(self, sig, frame):
            if self.drain_requested is not None:
                return super().handle_exit(sig, frame)
            self.drain_requested = time.monotonic()  # acted on in on_tick: a signal handler takes no locks

        async def on_tick(self, counter: int) -> bool:
            self._announce()
            if worker.load_error is not None:
                self.should_exit = True
            elif self.drain_requested is not None and not self.should_exit:
                self._drain(time.monotonic() - self.drain_requested)
            return await super().on_tick(counter)

        def _drain(self, waited: float) -> None:
            if not worker.draining:
                print(f"draining: {worker.in_flight} request(s) accepted; new ones get 503", flush=True)
                worker.begin_drain()
            if worker.idle and traffic.in_flight == 0:
                self.should_exit = True
            elif waited > drain_timeout_s and not self.aborted:
                print(f"drain timeout ({drain_timeout_s:g} s): answering {worker.in_flight} request(s) with 503",
                      flush=True)
                worker.abort()
                self.aborted = True
            elif waited > drain_timeout_s + ABORT_GRACE_S:
                self.should_exit = True

        def _announce(self) -> None:
            if "address" not in self.announced and self.started and self.servers:
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                print(f"listening on http://{host}:{port}", flush=True)
                self.announced = self.announced | {"address"}
            if "ready" not in self.announced and worker.startup_seconds is not None:
                print(f"ready: model loaded and warmed up in {worker.startup_seconds:.2f} s", flush=True)
                self.announced = self.announced | {"ready"}

    return DrainingServer(uvicorn_config)


def run_serve(args) -> int:
    try:
        import uvicorn

        from .app import create_app
    except ImportError as err:
        raise MissingDependencyError(f"serve: {err.name} is not installed; pip install 'kolors-trt[serve]'") from None
    config = config_from_args(args)
    if args.host not in LOOPBACK:
        logger.warning("binding %s: reachable from other machines%s", args.host,
                       "" if config.api_key else " without an API key (--api-key-file)")
    app = create_app(config)
    worker, traffic = app.state.worker, app.state.traffic
    uv = uvicorn.Config(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning",
                        access_log=bool(args.verbose), timeout_graceful_shutdown=GRACEFUL_S, lifespan="on")
    server = draining_server(uv, worker, traffic, config.drain_timeout_s)
    print(f"serving {config.folder} as {config.model_id!r}; loading (GET /health/ready is 503 until warmed up)",
          flush=True)
    server.run()
    if worker.load_error is not None:
        raise worker.load_error
    print("stopped", flush=True)
    return 0


def add_subcommands(subparsers) -> None:
    """Register `serve` on the kolors-trt CLI."""
    p = subparsers.add_parser("serve", help="serve OpenAI's Images API over HTTP (batching, metrics, health)")
    add_serve_arguments(p)
    p.set_defaults(run=run_serve)


__all__ = ["add_serve_arguments", "add_subcommands", "config_from_args", "run_serve"]
