"""The server as a Ray Serve application: replicas of the same FastAPI app, one Pipeline each.

    kolors-trt serve --ray --replicas 2 --onnx out/onnx          # a local Ray instance (cli.py)
    serve deploy kolors.yaml                                     # a cluster: kolors-trt serve --ray --write-config

Ray adds replicas, routing, autoscaling, backpressure and restarts; the server stays one
implementation. Each replica owns a ``Worker`` (its thread, its Pipeline, its batcher) and
builds ``create_app(config, worker)`` inside the replica: ``@serve.ingress()`` without an app
calls ``__serve_build_asgi_app__`` after the constructor (Ray 2.56+), so nothing that holds a
lock or a thread is ever pickled. No other module of the package imports ray.

How the server's limits become Ray's (``deployment_options``):

- ``max_ongoing_requests`` (requests Ray hands one replica at once) = the batch ceiling (one
  batch running) + up to one more batch forming in the replica's own batcher (fewer when
  ``--max-queue`` is smaller). Everything beyond waits in Ray's queue, where whichever
  replica frees up first takes it, rather than in one replica's queue behind its batch.
- ``max_queued_requests`` (Ray's queue, per proxy) = ``--max-queue``. When it is full the
  proxy answers 503 with a plain-text body (Ray's, not OpenAI's shape); the openai client
  retries 503 like 429.
- ``graceful_shutdown_timeout_s`` = ``--drain-timeout-s``: a replica that Ray stops (scale
  down, ``serve.shutdown``, SIGTERM of ``kolors-trt serve --ray``) gets no new requests and
  answers the ones it holds for that long; then its Worker stops. On SIGTERM of
  ``kolors-trt serve --ray`` each replica first hears it at once through a small named actor
  (``DrainSignal``: every replica keeps one call to it pending), answers new requests with the
  server's own 503 while it finishes what it holds, and reports when it is done; then the
  application stops. Only when a replica cannot be told, or is not done within
  ``--drain-timeout-s``, does Ray's route move to the ``Draining`` stand-in (503 too, once
  its replica has started: seconds) while Ray stops the replicas gracefully.
- ``check_health`` is the Worker's readiness: it fails when loading failed or when the worker
  reports not-ready after repeated failed batches (it probes to recover; three failed checks
  in a row, ``HEALTH_CHECK_PERIOD_S`` apart, and Ray replaces the replica). It never fails
  while a replica loads: the constructor waits for the Worker to be loaded and warmed up (at
  most ``LOAD_TIMEOUT_S``), and Ray runs no health check before the constructor returns.
- ``ray_actor_options``: one GPU per replica for engine folders (TensorRT, TensorRT-RTX);
  for ONNX Runtime on the CPU no GPU and ``ORT_CPUS`` of a CPU, a scheduling reservation
  only (ONNX Runtime uses the cores it finds).
- ``--autoscale MIN:MAX``: ``target_ongoing_requests`` = the batch ceiling. A replica is used
  best when it runs full batches; Ray adds a replica when replicas hold more than one full
  batch on average (requests are waiting for a second batch) and removes one when they hold
  less. ``upscale_delay_s``/``downscale_delay_s`` in ``AUTOSCALE_DELAYS``: react within
  seconds to a backlog of 1-3 s requests, but keep a replica (minutes of engine load on a
  GPU host) through short lulls.
- ``--cache-dir``: each replica caches reference images' IP tokens in memory; they reach other
  replicas only through this folder, so a ``reference_id`` uploaded to one replica works on another
  only when the folder is shared (a local instance gets one in its temporary folder; on a cluster,
  a shared filesystem path, else a replica that never saw the image answers 404 and the client
  uploads it again).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import time
from typing import Optional

from ray import serve

from kolors_trt.runtime.errors import ServiceError
from kolors_trt.runtime.manifest import write_bytes_atomic
from kolors_trt.runtime.spec import DEFAULT_PROFILE

from .app import create_app
from .config import DEFAULT_REPLICAS, ConfigError, ServeConfig, add_scale_arguments, add_serve_arguments
from .config import batch_ceilings, config_from_args, read_api_key
from .errors import ShuttingDownError, http_error
from .worker import Worker

logger = logging.getLogger(__name__)

APP_NAME = "kolors"
DEPLOYMENT_NAME = "KolorsServer"
DRAINING_NAME = "KolorsDraining"
IMPORT_PATH = "kolors_trt.serve.ray_app:app_builder"
REPLICA_HEADER = "X-Kolors-Replica"
LOAD_TIMEOUT_S = 900.0  # a replica's constructor waits this long for its Worker to load and warm up
LOAD_POLL_S = 0.05
SIGNAL_NAMESPACE = "kolors-trt"  # the DrainSignal actor's, per application name
ORT_CPUS = 0.5  # the CPU reservation of an ONNX Runtime replica
GPU_CPUS = 1.0  # ... and of a TensorRT replica (tokenizer, image decode and encode, HTTP), beside its GPU
HEALTH_CHECK_PERIOD_S = 10.0
HEALTH_CHECK_TIMEOUT_S = 30.0
SHUTDOWN_WAIT_LOOP_S = 0.5  # how often a stopping replica looks whether its requests are answered
DRAIN_GRACE_S = 10.0  # past --drain-timeout-s: time for Ray to remove the stopped replicas
SIGNAL_TIMEOUT_S = 10.0  # the DrainSignal actor answers at once; a bound in case Ray does not
AUTOSCALE_DELAYS = {"upscale_delay_s": 10.0, "downscale_delay_s": 300.0}
# the command's flags that belong to the driver (where Ray runs, where the proxy listens), not to the application
DRIVER_KEYS = frozenset({"host", "port", "address", "write_config", "ray"})


class RayServeError(ServiceError):
    """Ray could not start, deploy or keep the application."""


# ---- settings: the CLI's flags as a dict (the Serve config's ``args:``) --------------------------------


class _SettingsParser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(f"serve --ray: application args: {message}")


def settings_parser() -> argparse.ArgumentParser:
    """The serve flags and the scale flags: what ``args:`` of the Serve config takes, under the flags' names."""
    p = _SettingsParser(prog="kolors-trt serve --ray", add_help=False)
    add_serve_arguments(p)
    add_scale_arguments(p)
    return p


def setting_actions() -> dict:
    """{setting name: its argparse action}: each flag's names with underscores (``no_verify``, ``max_batch`` and
    its older name ``max_batch_size``)."""
    return {option[2:].replace("-", "_"): action for action in settings_parser()._actions
            for option in action.option_strings if option.startswith("--")}


def parse_settings(settings: dict) -> argparse.Namespace:
    """A settings dict (``{"onnx": "/models/onnx", "replicas": 2, "no_verify": True}``) parsed by the same
    parser as the flags, so the YAML takes exactly the CLI's names, checks and defaults."""
    if not isinstance(settings, dict):
        raise ConfigError(f"serve --ray: application args must be a mapping of flag names to values, found "
                          f"{type(settings).__name__}")
    actions, argv = setting_actions(), []
    for key, value in settings.items():
        name = str(key).replace("-", "_")
        if name in DRIVER_KEYS:
            raise ConfigError(f"serve --ray: application args: {key!r} is not an application setting; the proxy's "
                              "address is the Serve config's http_options (host, port)")
        if name not in actions:
            raise ConfigError(f"serve --ray: application args: unknown setting {key!r}; known: "
                              f"{', '.join(sorted(actions))}")
        if value is None or value is False:
            continue
        flag = f"--{name.replace('_', '-')}"
        argv += [flag] if actions[name].nargs == 0 else [flag, str(value)]
    return settings_parser().parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> dict:
    """The application's settings from parsed flags, each under its flag's name (paths made absolute: replicas do
    not share the driver's working directory); unset values and switches left out."""
    settings = {}
    for name, action in setting_actions().items():
        value = getattr(args, action.dest, None)
        if f"--{name.replace('_', '-')}" != action.option_strings[0] or value is None:
            continue  # an alias, or unset
        if action.nargs == 0 and value == action.default:
            continue  # a switch not given
        if name in ("engines", "onnx", "cache_dir", "api_key_file", "runtime_cache"):
            value = os.path.abspath(value)
        settings[name] = True if action.nargs == 0 else value
    return settings


def parse_autoscale(text: str) -> tuple[int, int]:
    """``MIN:MAX`` replicas, 0 <= MIN <= MAX, MAX >= 1."""
    lo, sep, hi = str(text).partition(":")
    try:
        low, high = int(lo), int(hi)
    except ValueError:
        low = high = None
    if not sep or low is None:
        raise ConfigError(f"serve --ray: --autoscale takes MIN:MAX replicas (e.g. 1:4), found {text!r}")
    if low < 0 or high < 1 or low > high:
        raise ConfigError(f"serve --ray: --autoscale {text}: need 0 <= MIN <= MAX and MAX >= 1")
    return low, high


# ---- deployment options: the server's limits as Ray's -------------------------------------------------


def batch_ceiling(config: ServeConfig) -> int:
    """The most images one batch takes (config.batch_ceilings), read from the folder's manifest when the folder is
    here; else the default build profile's under --max-batch (a config written for a cluster whose folders are
    elsewhere)."""
    from kolors_trt.runtime.folder import read_folder

    try:
        folder = read_folder(config.folder, verify=False, limits=config.limits)
    except (OSError, ValueError) as err:
        logger.info("%s cannot be read here (%s): taking the default profile's batch ceiling", config.folder, err)
        return min(DEFAULT_PROFILE.batch.max, config.max_batch or DEFAULT_PROFILE.batch.max)
    return max(batch_ceilings(folder, config.max_batch).values())


def deployment_options(config: ServeConfig, replicas: int, autoscale: Optional[tuple[int, int]], gpu: bool,
                       ceiling: int) -> dict:
    """Ray Serve deployment options from the server's settings and batch ceiling (the module docstring says why
    each)."""
    if replicas < 1:
        raise ConfigError(f"serve --ray: --replicas must be >= 1, found {replicas}")
    options = {
        "max_ongoing_requests": ceiling + min(ceiling, config.max_queue),
        "max_queued_requests": config.max_queue,
        "graceful_shutdown_timeout_s": config.drain_timeout_s,
        "graceful_shutdown_wait_loop_s": SHUTDOWN_WAIT_LOOP_S,
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "health_check_timeout_s": HEALTH_CHECK_TIMEOUT_S,
        "ray_actor_options": {"num_cpus": GPU_CPUS, "num_gpus": 1} if gpu else {"num_cpus": ORT_CPUS, "num_gpus": 0},
    }
    if autoscale is None:
        options["num_replicas"] = replicas
    else:
        low, high = autoscale
        options["autoscaling_config"] = {"min_replicas": low, "initial_replicas": max(low, 1), "max_replicas": high,
                                         "target_ongoing_requests": ceiling, **AUTOSCALE_DELAYS}
    return options


# ---- the deployment --------------------------------------------------------------------------------------


class ReplicaHeader:
    """Pure-ASGI: ``X-Kolors-Replica: <replica name>/<pid>`` on every response of the app."""

    def __init__(self, app, value: str):
        self.app = app
        self.header = (REPLICA_HEADER.lower().encode(), value.encode("latin-1"))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def labelled(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), self.header]}
            await send(message)

        await self.app(scope, receive, labelled)


async def wait_loaded(worker: Worker, timeout_s: float) -> None:
    """Until the worker is loaded and warmed up; raises its load error, or RayServeError past ``timeout_s``."""
    end = time.monotonic() + timeout_s
    while worker.state in ("starting", "loading", "warming"):
        if time.monotonic() > end:
            worker.stop()
            raise RayServeError(f"serve --ray: the replica's model did not load in {timeout_s:g} s "
                                f"({worker.config.folder}, state {worker.state})")
        await asyncio.sleep(LOAD_POLL_S)
    if worker.load_error is not None:
        raise worker.load_error


class DrainSignal:
    """The driver's word to every replica: each keeps one ``wait`` pending; ``drain`` (SIGTERM) answers them all.
    Each replica then reports when it has answered everything it held (``idle``)."""

    def __init__(self):
        self.event = asyncio.Event()
        self.idle_replicas: set = set()

    async def wait(self) -> bool:
        await self.event.wait()
        return True

    async def drain(self) -> None:
        self.event.set()

    async def idle(self, replica: str) -> None:
        self.idle_replicas.add(replica)

    async def idle_count(self) -> int:
        return len(self.idle_replicas)


def drain_signal():
    """The application's DrainSignal actor, made by the command that runs it (``serve deploy`` has none)."""
    import ray

    return ray.remote(num_cpus=0)(DrainSignal).options(name=APP_NAME, namespace=SIGNAL_NAMESPACE,
                                                      get_if_exists=True).remote()


async def watch_drain(worker: Worker, replica: str) -> None:
    """In a replica: begin the worker's drain when the command that runs the application is told to stop, and
    report when everything accepted is answered."""
    import ray
    from ray.exceptions import RayError

    try:
        signal_actor = ray.get_actor(APP_NAME, namespace=SIGNAL_NAMESPACE)
    except ValueError:
        return  # deployed without `kolors-trt serve --ray`: Ray's own graceful shutdown only
    try:
        await signal_actor.wait.remote()
        worker.begin_drain()
        while not worker.idle:
            await asyncio.sleep(SHUTDOWN_WAIT_LOOP_S)
        await signal_actor.idle.remote(replica)
    except RayError:
        return  # the command ended


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class KolorsServer:
    """One replica: a Worker (loaded and warmed up before the replica counts as started) and the server's app."""

    async def __init__(self, config: ServeConfig, api_key_file: Optional[str] = None):
        # The key is read here, on the replica's node, so that it never travels inside the deployment.
        self.config = dataclasses.replace(config, api_key=read_api_key(api_key_file))
        self.worker = Worker(self.config).start()
        await wait_loaded(self.worker, LOAD_TIMEOUT_S)
        if self.config.access_log:
            logging.getLogger("kolors_trt.serve.access").setLevel(logging.INFO)
        context = serve.get_replica_context()
        self.name = f"{context.deployment}#{context.replica_id.unique_id}"
        self.drain_watch = asyncio.ensure_future(watch_drain(self.worker, self.name))
        logger.info("replica %s (pid %d) ready in %.2f s", self.name, os.getpid(), self.worker.startup_seconds)

    async def __serve_build_asgi_app__(self):
        app = create_app(self.config, self.worker)
        app.add_middleware(ReplicaHeader, value=f"{self.name}/{os.getpid()}")
        return app

    def check_health(self) -> None:
        worker = self.worker
        if worker.load_error is not None or worker.state in ("failed", "stopped"):
            raise RayServeError(f"replica {self.name}: the worker is {worker.state} ({worker.load_error})")
        if not worker.alive:
            raise RayServeError(f"replica {self.name}: the worker thread has ended ({worker.state})")
        if worker.state == "failing":
            raise RayServeError(f"replica {self.name}: {worker.status()['consecutive_failures']} batches failed in a "
                                "row and the probe has not recovered")

    def __del__(self):
        # Ray calls this once the replica's requests are answered or --drain-timeout-s passed.
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.stop()


def app_builder(args: dict):
    """The application from settings named like the CLI flags: ``import_path:
    kolors_trt.serve.ray_app:app_builder`` with ``args: {engines: /models/engines, replicas: 2}`` in a Serve
    config, or ``serve run kolors_trt.serve.ray_app:app_builder onnx=/models/onnx``."""
    ns = parse_settings(dict(args))
    config = config_from_args(ns, read_key=False)
    autoscale = parse_autoscale(ns.autoscale) if ns.autoscale is not None else None
    options = deployment_options(config, ns.replicas or DEFAULT_REPLICAS, autoscale, gpu=ns.engines is not None,
                                 ceiling=batch_ceiling(config))
    return KolorsServer.options(**options).bind(config, ns.api_key_file)


# ---- running it (cli.py owns the process: signals, the local instance's folder) ---------------------------


def start_ray(address: Optional[str], temp_dir: Optional[str], verbose: bool) -> None:
    """Join the cluster at ``address``, or start a local instance (no dashboard) whose state is in ``temp_dir``."""
    import ray

    level = logging.INFO if verbose else logging.WARNING
    logging.getLogger("ray.serve").setLevel(level)  # Serve's driver-side INFO lines otherwise
    if address is None:
        # address="local": never an instance that a stale <temp>/ray_current_cluster points at
        ray.init(address="local", include_dashboard=False, _temp_dir=temp_dir, logging_level=level,
                 log_to_driver=True)
    else:
        ray.init(address=address, logging_level=level, log_to_driver=True)


def serve_logging(verbose: bool):
    """Replica logs at WARNING without access lines (INFO and access lines with -v)."""
    from ray.serve.schema import LoggingConfig

    return LoggingConfig(log_level="INFO" if verbose else "WARNING", enable_access_log=verbose)


def run_application(application, host: str, port: int, verbose: bool) -> None:
    """Start Serve's proxy on host:port and deploy; returns once every replica is loaded and warmed up."""
    from ray.exceptions import RayError
    from ray.serve.config import HTTPOptions
    from ray.serve.exceptions import RayServeException

    logging_config = serve_logging(verbose)
    try:
        serve.start(http_options=HTTPOptions(host=host, port=port), logging_config=logging_config)
        serve.run(application, name=APP_NAME, route_prefix="/", blocking=False, logging_config=logging_config)
    except (RayError, RayServeException, RuntimeError) as err:
        raise RayServeError(f"serve --ray: the application did not start: {err}") from None


def replica_actors() -> list:
    """Names of this application's KolorsServer replica actors still alive (Ray names them
    ``SERVE_REPLICA::<app>#<deployment>#<id>`` in the "serve" namespace)."""
    import ray

    prefix = f"SERVE_REPLICA::{APP_NAME}#{DEPLOYMENT_NAME}#"
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]


class Draining:
    """Stands in for the application while its replicas drain, so new requests get the server's own 503
    (the proxy would answer 404 for a deleted application, which clients do not retry)."""

    async def __call__(self, request):
        from fastapi.responses import JSONResponse

        status, body, headers = http_error(ShuttingDownError("the server is shutting down; retry shortly or on "
                                                             "another endpoint"))
        return JSONResponse(body, status_code=status, headers={**headers, "Connection": "close"})


def drain_replicas(signal_actor) -> bool:
    """Tell every replica to drain (``drain_signal()``'s actor): from then on they answer new requests with 503 and
    finish what they hold. False when Ray did not deliver it."""
    import ray
    from ray.exceptions import RayError

    try:
        ray.get(signal_actor.drain.remote(), timeout=SIGNAL_TIMEOUT_S)
    except RayError as err:
        logger.warning("could not tell the replicas to drain (%s); Ray's stand-in answers 503 once it runs", err)
        return False
    return True


def wait_drained(signal_actor, timeout_s: float) -> bool:
    """Until every replica told by drain_replicas() has answered what it held; False past ``timeout_s``."""
    import ray
    from ray.exceptions import RayError

    replicas, end = len(replica_actors()), time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            if ray.get(signal_actor.idle_count.remote(), timeout=SIGNAL_TIMEOUT_S) >= replicas:
                return True
        except RayError as err:
            logger.warning("could not hear from the replicas (%s)", err)
            return False
        time.sleep(SHUTDOWN_WAIT_LOOP_S)
    return False


def stop_application(started_ray: bool, drain_timeout_s: float, drained: bool = False, verbose: bool = False) -> None:
    """Stop the application: all of Serve on an instance we started, only our application on a cluster we joined.
    ``drained`` (wait_drained()): the replicas answered everything already and went on answering 503, so they stop
    at once. Otherwise each answers what it holds first (at most ``drain_timeout_s``) while the Draining stand-in
    answers new requests with 503."""
    if drained:
        if started_ray:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
        return
    # serve.shutdown() alone stops the proxies at once, cutting the connections of requests still running.
    # Redeploying the application as Draining makes Ray stop the old replicas gracefully while it routes new
    # requests to the 503 answer (once its replica runs: seconds).
    from ray.exceptions import RayError
    from ray.serve.exceptions import RayServeException

    draining = serve.deployment(Draining, name=DRAINING_NAME, ray_actor_options={"num_cpus": 0},
                                max_ongoing_requests=1000)
    try:
        serve.run(draining.bind(), name=APP_NAME, route_prefix="/", blocking=False,
                  logging_config=serve_logging(verbose))
    except (RayError, RayServeException, RuntimeError) as err:  # stop all the same, without the 503 stand-in
        logger.warning("could not put the 503 stand-in in place (%s); stopping the replicas", err)
    end = time.monotonic() + drain_timeout_s + DRAIN_GRACE_S
    while replica_actors() and time.monotonic() < end:  # Serve's status drops them before they have stopped
        time.sleep(SHUTDOWN_WAIT_LOOP_S)
    if started_ray:
        serve.shutdown()
    else:
        serve.delete(APP_NAME)


def stop_ray() -> None:
    """Leave Ray: stops a local instance this process started; a joined cluster goes on."""
    import ray

    ray.shutdown()


# ---- the Serve config for `serve deploy` -----------------------------------------------------------------


def serve_config(settings: dict, host: str, port: int) -> dict:
    """A Ray Serve config: the proxy's address and one application built by ``app_builder(settings)``."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": port},
        "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": IMPORT_PATH,
                          "args": dict(settings)}],
    }


def write_serve_config(path: str, settings: dict, host: str, port: int) -> None:
    import yaml

    header = ("# Ray Serve config for kolors-trt (kolors-trt serve --ray --write-config): `serve deploy` this file.\n"
              "# args: are kolors-trt serve's flags (underscores for dashes); the folders and the API key file\n"
              "# must be at these paths on every node that runs a replica.\n")
    text = header + yaml.safe_dump(serve_config(settings, host, port), sort_keys=False)
    write_bytes_atomic(path, text.encode())


__all__ = ["APP_NAME", "DrainSignal", "KolorsServer", "drain_replicas", "drain_signal", "wait_drained", "RayServeError", "ReplicaHeader", "app_builder", "deployment_options",
           "parse_autoscale", "parse_settings", "run_application", "serve_config", "settings_from_args", "start_ray",
           "stop_application", "stop_ray", "write_serve_config"]
