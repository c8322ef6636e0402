"""`kolors-trt serve`: the HTTP server in one process, under uvicorn.

    kolors-trt serve --onnx out/onnx                     # 127.0.0.1:8000, ONNX Runtime
    kolors-trt serve --engines out/engines --api-key-file key.txt --host 0.0.0.0
    kolors-trt serve --ray --replicas 2 --onnx out/onnx  # replicas on a local Ray instance (ray_app.py)
    kolors-trt serve --ray --autoscale 1:4 --engines /models/engines --address auto
    kolors-trt serve --ray --engines /models/engines --write-config kolors.yaml   # for `serve deploy`

The process-global parts live here, never in the app: uvicorn (with the header
timeout of transport.py and the app's own access log), and the SIGTERM drain; the
settings and their flags live in config.py. uvicorn's own SIGTERM handling closes the
listening socket at once (new clients see "connection refused", not 503) and re-raises
the signal after shutdown (exit status -15). DrainingServer instead: on the first SIGTERM/SIGINT the worker
stops taking work (/health/ready and new requests answer 503) while every accepted
request runs to its answer; when none is left, or at --drain-timeout-s (the rest
then get 503), uvicorn shuts down and the process exits 0. A second signal is
uvicorn's own (SIGINT twice forces).

With --ray the same app runs as Ray Serve replicas (ray_app.py). Without --address the
command starts a local Ray instance whose whole state (session, sockets, logs, its auth
token, and the replicas' shared IP-token cache unless --cache-dir is given) lives in a
fresh temporary folder; with --address it joins that cluster. On the
first SIGTERM/SIGINT the application stops (each replica answers what it holds, at most
--drain-timeout-s), then the local instance, its processes and its folder go, and the
process exits 0; joined clusters keep running without the application. A signal during
start-up, or a second one, stops at once (exit 130), still removing what the command
started.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import threading
import time

from .config import DEFAULT_HOST, DEFAULT_PORT, DEFAULT_REPLICAS, ConfigError, add_scale_arguments
from .config import add_serve_arguments, config_from_args, read_api_key
from .errors import MissingDependencyError
from .ray_local import RAY_EXIT_WAIT_S, core_processes, end_processes, free_port, ray_environment, ray_temp_dir
from .ray_local import watch_core

logger = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
ABORT_GRACE_S = 5.0  # after the drain timeout: time for the 503s to go out before uvicorn stops
GRACEFUL_S = 10.0  # uvicorn's own bound on open connections once it shuts down
ACCESS_LOGGER = "kolors_trt.serve.access"


def add_driver_arguments(p: argparse.ArgumentParser) -> None:
    """Where the server listens and whether it runs on Ray: the process's flags, not the application's."""
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}; 0 picks a free port")
    p.add_argument("--ray", action="store_true",
                   help="serve on Ray Serve: replicas (one per GPU), routing, autoscaling, restarts; "
                        "pip install 'kolors-trt[ray]'")
    add_scale_arguments(p)
    p.add_argument("--address", metavar="ADDR",
                   help="with --ray: join this Ray cluster (auto, or the head's HOST:6379) and leave it running on "
                        "exit (default: start a local Ray instance and stop it on exit)")
    p.add_argument("--write-config", metavar="FILE",
                   help="with --ray: write a Ray Serve config for `serve deploy FILE` with these flags, and exit")


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
    if args.ray:
        return run_serve_ray(args)
    given = [flag for flag, value in (("--replicas", args.replicas), ("--autoscale", args.autoscale),
                                      ("--address", args.address), ("--write-config", args.write_config)) if value]
    if given:
        raise ConfigError(f"serve: {', '.join(given)}: only with --ray")
    try:
        import uvicorn

        from .app import create_app
        from .transport import uvicorn_protocol
    except ImportError as err:
        raise MissingDependencyError(f"serve: {err.name} is not installed; pip install 'kolors-trt[serve]'") from None
    config = config_from_args(args)
    if args.host not in LOOPBACK:
        logger.warning("binding %s: reachable from other machines%s", args.host,
                       "" if config.api_key else " without an API key (--api-key-file)")
    if config.access_log:
        logging.getLogger(ACCESS_LOGGER).setLevel(logging.INFO)
    app = create_app(config)
    worker, traffic = app.state.worker, app.state.traffic
    # uvicorn's access log knows no request id: --access-log is the app's own (middleware.Gate)
    uv = uvicorn.Config(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning",
                        access_log=False, timeout_graceful_shutdown=GRACEFUL_S, lifespan="on",
                        http=uvicorn_protocol(config.header_timeout_s))
    server = draining_server(uv, worker, traffic, config.drain_timeout_s)
    print(f"serving {config.folder} as {config.model_id!r}; loading (GET /health/ready is 503 until warmed up)",
          flush=True)
    server.run()
    if worker.load_error is not None:
        raise worker.load_error
    print("stopped", flush=True)
    return 0


# ---- --ray: the process-global parts (Ray's local instance, its folder, signals) ----------------------


class Stop:
    """SIGTERM/SIGINT while --ray serves: the first asks for a clean stop; during start-up, or a second
    one, raises KeyboardInterrupt (the caller's finally still removes what was started)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = threading.Event()
        self.serving = False
        self.previous = {}

    def install(self) -> None:
        for sig in self.SIGNALS:  # after ray.init(): it replaces the SIGTERM handler with its own
            self.previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        again = self.requested.is_set()
        self.requested.set()
        if again or not self.serving:
            raise KeyboardInterrupt()


def run_serve_ray(args) -> int:
    started = time.perf_counter()
    local = args.address is None and not args.write_config
    folder = ray_temp_dir() if local else None
    saved_env = dict(os.environ)
    try:
        if folder is not None:
            os.environ.update(ray_environment(folder))
        else:
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        try:
            from . import ray_app
        except ImportError as err:
            raise MissingDependencyError(f"serve --ray: {err.name} is not installed; pip install "
                                         "'kolors-trt[ray]'") from None
        settings = ray_app.settings_from_args(args)
        if folder is not None and "cache_dir" not in settings:
            # replicas share reference images' IP tokens through it: a reference_id uploaded to one replica works
            # on all (each replica's memory cache is its own)
            settings["cache_dir"] = str(folder / "ip-cache")
        application = ray_app.app_builder(settings)  # every setting checked before Ray starts
        if args.write_config:
            ray_app.write_serve_config(args.write_config, settings, args.host, args.port)
            print(f"wrote {args.write_config}: deploy it with `serve deploy {args.write_config}` on the Ray cluster",
                  flush=True)
            return 0
        if local:
            from kolors_trt.runtime.folder import read_folder

            read_folder(settings.get("engines") or settings["onnx"], verify=False)  # a wrong folder: exit 1 now
            read_api_key(args.api_key_file)
        if args.host not in LOOPBACK:
            logger.warning("binding %s: reachable from other machines%s", args.host,
                           "" if read_api_key(args.api_key_file) else " without an API key (--api-key-file)")
        return _serve_on_ray(args, ray_app, application, folder, started)
    finally:
        if folder is not None:
            left = end_processes(folder, RAY_EXIT_WAIT_S)
            if left:
                logger.warning("ended %d process(es) of the local Ray instance that outlived it: %s", len(left), left)
            shutil.rmtree(folder, ignore_errors=True)
        os.environ.clear()
        os.environ.update(saved_env)


def _serve_on_ray(args, ray_app, application, folder, started: float) -> int:
    stop = Stop()
    port = args.port or free_port(args.host)
    where = f"a local Ray instance in {folder}" if folder is not None else f"the Ray cluster at {args.address}"
    print(f"serving {args.engines or args.onnx} on {where}; starting replicas (GET /health/ready answers once they "
          "are loaded and warmed up)", flush=True)
    watch = threading.Event()
    try:
        try:
            ray_app.start_ray(args.address, str(folder) if folder is not None else None, verbose=bool(args.verbose))
        except SystemExit as exc:
            if exc.code != signal.SIGTERM:
                raise
            from kolors_trt.cli import Terminated  # ray.init() turns SIGTERM into sys.exit(15): stop like any command

            raise Terminated() from None
        if folder is not None:
            threading.Thread(target=watch_core, args=(folder, core_processes(folder), watch), daemon=True,
                             name="ray-core-watch").start()
        stop.install()
        signal_actor = ray_app.drain_signal()  # before the replicas start: each waits on it
        ray_app.run_application(application, args.host, port, verbose=bool(args.verbose))
        stop.serving = True
        print(f"listening on http://{args.host}:{port}", flush=True)
        scale = f"{args.autoscale} replicas, autoscaled" if args.autoscale else \
            f"{args.replicas or DEFAULT_REPLICAS} replica(s)"
        print(f"ready: model loaded and warmed up in {time.perf_counter() - started:.2f} s ({scale} on Ray, "
              "Ray's start included)", flush=True)
        while not stop.requested.wait(1.0):
            pass
        told = ray_app.drain_replicas(signal_actor)
        print(f"draining: {'new requests get 503; ' if told else ''}the replicas answer what they hold (at most "
              "--drain-timeout-s), then stop", flush=True)
        drained = told and ray_app.wait_drained(signal_actor, args.drain_timeout_s)
        ray_app.stop_application(folder is not None, 0.0 if told else args.drain_timeout_s, drained,
                                 verbose=bool(args.verbose))
    finally:
        watch.set()  # ray.shutdown() ends gcs_server and raylet on purpose
        ray_app.stop_ray()
        stop.restore()
    print("stopped", flush=True)
    return 0


def add_subcommands(subparsers) -> None:
    """Register `serve` on the kolors-trt CLI."""
    p = subparsers.add_parser("serve", help="serve OpenAI's Images API over HTTP (batching, metrics, health); "
                                            "--ray: replicas on Ray Serve")
    add_serve_arguments(p)
    add_driver_arguments(p)
    p.set_defaults(run=run_serve)


__all__ = ["add_driver_arguments", "add_subcommands", "run_serve", "run_serve_ray"]
