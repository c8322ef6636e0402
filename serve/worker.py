"""Worker: the one thread that owns the Pipeline (and the GPU) and runs what the
scheduler hands it.

The front end (routes.py) checks a request and decodes its image first, then
``submit``s it with two callbacks: ``done(result, error)`` when it ends (called
once, from this thread) and, for streams, ``progress(step, steps, latents_fn)``
after each denoising step. Nothing here is async and nothing in a handler touches
an engine; a Ray Serve replica owns one Worker the same way the single-process
server does.

Life cycle: ``start()`` loads the folder, runs one warm-up request and becomes
ready; ``begin_drain()`` (SIGTERM) refuses new work and runs what was accepted
without waiting for company; ``abort()`` answers whatever is left with 503 (the
drain timeout); ``stop()`` ends the thread. A batch that fails answers each of its
requests with the error and counts toward ``failure_threshold``: past it the
worker reports not-ready and, when idle, re-runs the warm-up request every
``probe_interval_s`` until one succeeds. A request that fails alone in a batch
that went on (its rows not finite: ``Generation.error``) gets its own error and
counts toward nothing: the engines work. If the thread itself ends unexpectedly,
every request it held gets 503 and the worker reports not-ready from then on.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from kolors_trt.runtime.errors import InputError
from kolors_trt.runtime.request import GenerationRequest

from .config import ConfigError, ServeConfig, batch_ceilings
from .errors import DeadlineError, QueueFullError, ShuttingDownError, UnavailableError
from .metrics import Metrics
from .scheduler import DEADLINE, SHUTDOWN, Job, Scheduler

logger = logging.getLogger(__name__)

GENERATE, ENCODE = "generate", "encode"
ENCODE_KEY = (ENCODE,)
# done(result, error): exactly one of them is set; progress(step, steps, latents_fn) after each denoising step
Done = Callable[[object, Optional[BaseException]], None]
Progress = Callable[[int, int, Callable], None]


@dataclass
class Work:
    kind: str  # GENERATE: request is a CheckedRequest (Pipeline.check) | ENCODE: the reference's pixel_values
    request: object
    done: Optional[Done] = None  # set by the front end before submit
    progress: Optional[Progress] = None
    request_id: str = ""  # the HTTP request's x-request-id, for the log


class StoppedError(UnavailableError):
    """A job stopped because its client went away: nobody reads this answer."""


def stop_error(job: Job) -> BaseException:
    if job.stop_reason == DEADLINE:
        return DeadlineError(f"the request passed its deadline ({job.deadline - job.arrival:g} s, --timeout-s)"
                             + (" between denoising steps" if job.started is not None else " in the queue"))
    if job.stop_reason == SHUTDOWN:
        return ShuttingDownError("the server is shutting down and its drain timeout passed before this request ran")
    return StoppedError(f"the request stopped: {job.stop_reason}")


class Worker:
    def __init__(self, config: ServeConfig, metrics: Optional[Metrics] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.clock = clock
        self.pipe = None
        self.state = "starting"  # starting | loading | warming | ready | failing | failed | stopped
        self.load_error: Optional[BaseException] = None
        self.startup_seconds: Optional[float] = None
        self.draining = False
        self.in_flight = 0  # accepted and not yet answered: queued + running
        self.running: list = []  # jobs of the batch that runs now
        self.ceilings: dict = {}  # {do_cfg: most images per batch} (config.batch_ceilings), set at load
        self._failures = 0
        self._last_probe = 0.0
        self._batch_seconds = 1.0  # moving average, for Retry-After
        self._stopping = False
        self._cond = threading.Condition()
        self._scheduler = Scheduler(config.max_queue, config.max_wait_ms / 1000, self._most, self._no_swap)
        self._thread: Optional[threading.Thread] = None
        self.metrics = metrics or Metrics()
        self.metrics.bind(self)

    # ---- state -----------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.state == "ready" and not self.draining and self.alive

    @property
    def alive(self) -> bool:
        """The worker thread runs (false before start() and after it ended, e.g. on an unexpected error)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        return len(self._scheduler)

    @property
    def state_now(self) -> str:
        """The state as health checks report it: "worker_ended" when the thread is gone but no stop was asked."""
        if self.draining:
            return "draining"
        if self.state in ("loading", "warming", "ready", "failing") and not self.alive:
            return "worker_ended"
        return self.state

    def status(self) -> dict:
        return {"ready": self.ready, "state": self.state_now, "queue_depth": self.queue_depth,
                "in_flight": self.in_flight, "consecutive_failures": self._failures,
                "startup_seconds": self.startup_seconds}

    def _most(self, key) -> int:
        return 1 if key == ENCODE_KEY else self.ceilings[key[3]]

    def _no_swap(self, key) -> bool:
        """A batch of ``key`` runs with the UNet's LoRA weights as they are (the last item of a generation key)."""
        return key == ENCODE_KEY or self.pipe is None or key[-1] == self.pipe.lora.applied("unet")

    # ---- life cycle ------------------------------------------------------------------------

    def start(self) -> "Worker":
        self._thread = threading.Thread(target=self._main, name="kolors-trt-worker", daemon=True)
        self._thread.start()
        return self

    def begin_drain(self) -> None:
        with self._cond:
            if not self.draining:
                logger.info("draining: %d request(s) accepted, %d queued", self.in_flight, self.queue_depth)
            self.draining = True
            self._cond.notify()

    @property
    def idle(self) -> bool:
        return self.in_flight == 0

    def abort(self) -> None:
        """Answer everything still queued with 503 and stop the running batch between steps."""
        with self._cond:
            left = self._scheduler.take_all()
            for job in left + self.running:
                job.stop(SHUTDOWN)
        self._finish_stopped(left)

    def stop(self, timeout: float = 10.0) -> None:
        self.begin_drain()
        self.abort()
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        self.state = "stopped" if self.state != "failed" else self.state

    # ---- submission (any thread) -------------------------------------------------------------

    def submit(self, work: Work, key, images: int) -> Job:
        """Queue one request; raises ShuttingDownError, UnavailableError or QueueFullError (answered at once)."""
        now = self.clock()
        job = Job(key, images, now, now + self.config.timeout_s, work)
        with self._cond:
            if self.draining:
                raise ShuttingDownError("the server is shutting down; send the request to another replica")
            if self.state not in ("ready", "failing") or not self.alive:
                raise UnavailableError(f"the model cannot take requests ({self.state_now}); retry when /health/ready "
                                       "is 200")
            if not self._scheduler.push(job):
                batches = self.queue_depth / max(1, self._most(key)) + 1
                raise QueueFullError(f"the queue is full ({self.config.max_queue} requests waiting, --max-queue); "
                                     "retry after the Retry-After seconds", retry_after=self._batch_seconds * batches)
            self.in_flight += 1
            self._cond.notify()
        return job

    # ---- the thread ------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self._load()
        except BaseException as err:  # noqa: BLE001 - reported through load_error; the CLI exits 1
            self.load_error = err
            self.state = "failed"
            logger.error("cannot load %s: %s", self.config.folder, err)
            return
        try:
            self._loop()
        except BaseException as err:  # noqa: BLE001 - a bug or an interpreter error; answer and report it
            logger.critical("the worker thread ended: %s: %s; every request it held gets 503 and /health/ready "
                            "stays 503 (restart the server)", type(err).__name__, err, exc_info=err)
            with self._cond:
                held = self.running + self._scheduler.take_all()
                self.running = []
            for job in held:
                self._answer(job, error=UnavailableError(f"the worker thread ended ({type(err).__name__}); "
                                                         "the server must be restarted"))

    def _loop(self) -> None:
        while True:
            probe = False
            with self._cond:
                if self._stopping:
                    return
                now = self.clock()
                decision = self._scheduler.poll(now, hurry=self.draining)
                if not (decision.batch or decision.dropped):
                    wait = decision.wait_s
                    if wait is None and self.state == "failing":  # idle while failing: time to probe?
                        wait = max(0.0, self._last_probe + self.config.probe_interval_s - now)
                        probe = wait == 0.0
                    if not probe:
                        self._cond.wait(wait)
                        continue
                self.running = decision.batch
            if probe:
                self._probe()
                continue
            self._finish_stopped(decision.dropped)
            if decision.batch:
                self._run(decision.batch)
            with self._cond:
                self.running = []

    def _load(self) -> None:
        from kolors_trt.runtime.pipeline import Pipeline

        started = time.perf_counter()
        self.state = "loading"
        self.pipe = Pipeline.load(self.config.folder, backend=self.config.backend, cache_dir=self.config.cache_dir,
                                  verify=self.config.verify, limits=self.config.limits,
                                  runtime_cache=self.config.runtime_cache, cache_max_bytes=self.config.cache_max_bytes,
                                  lora_dir=self.config.lora_dir)
        self.pipe.lora.on_swap = self.metrics.lora_swap
        self.ceilings = batch_ceilings(self.pipe.folder, self.config.max_batch)
        self._check_defaults()
        self.state = "warming"
        self._warm_up()
        self.startup_seconds = time.perf_counter() - started
        self.state = "ready"
        logger.info("ready in %.2f s (%s on %s)", self.startup_seconds, self.config.folder, self.pipe.backend)

    def _check_defaults(self) -> None:
        """--default-size and --default-steps pass the folder's checks, or the server does not start; a manifest
        default size outside the folder's limits is worth a warning."""
        height, width = self.config.default_hw
        profile = self.pipe.folder.profile
        try:
            self.pipe.check(GenerationRequest("", height=height or profile.height.opt, width=width or profile.width.opt,
                                              num_inference_steps=self.config.default_steps or 1,
                                              ip_adapter_scale=0.0, seed=0))
        except InputError as err:
            raise ConfigError(f"serve: --default-size / --default-steps: {err}") from None
        if height is None:
            try:
                self.pipe.check(GenerationRequest("", num_inference_steps=1, ip_adapter_scale=0.0, seed=0))
            except InputError as err:
                logger.warning("requests without size will be refused (%s); set --default-size", err)

    def _warm_up(self) -> None:
        """One small request: the first run of every engine (allocation, kernel selection) happens here."""
        profile = self.pipe.folder.profile
        self.pipe.generate_batch([GenerationRequest("", height=profile.height.opt, width=profile.width.opt,
                                                    num_inference_steps=1, ip_adapter_scale=0.0, seed=0)])

    def _probe(self) -> None:
        self._last_probe = self.clock()
        try:
            self._warm_up()
        except Exception as err:  # noqa: BLE001 - the engines still fail: stay not-ready
            logger.warning("probe failed, still not ready: %s", err)
            return
        logger.info("probe succeeded: ready again after %d failed batch(es)", self._failures)
        self._failures = 0
        self.state = "ready"

    def _answer(self, job: Job, result=None, error: Optional[BaseException] = None) -> None:
        try:
            job.payload.done(result, error)
        except Exception:  # noqa: BLE001 - a broken callback must not take the worker down
            logger.exception("answering a request failed")
        with self._cond:
            self.in_flight -= 1

    def _finish_stopped(self, jobs: list) -> None:
        for job in jobs:
            self.metrics.stopped.labels(reason=job.stop_reason, where="queue").inc()
            self._answer(job, error=stop_error(job))

    def _run(self, jobs: list) -> None:
        started = self.clock()
        for job in jobs:
            job.started = started
            self.metrics.queue_wait.observe(started - job.arrival)
        try:
            if jobs[0].key == ENCODE_KEY:
                results = [self.pipe.encode_pixels(job.payload.request) for job in jobs]
            else:
                self.metrics.batch_size.observe(sum(job.images for job in jobs))
                results = self._generate(jobs)
        except Exception as err:  # noqa: BLE001 - every request of the batch gets the error; the server goes on
            self._failed(jobs, err)
            return
        seconds = self.clock() - started
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
        self.metrics.batch_seconds.observe(seconds)
        if self.state == "failing":
            logger.info("a batch succeeded: ready again")
            self.state = "ready"
        self._failures = 0
        for job, result in zip(jobs, results):
            if getattr(result, "cancelled", False):
                self.metrics.stopped.labels(reason=job.stop_reason, where="running").inc()
                self._answer(job, error=stop_error(job))
            elif getattr(result, "error", None) is not None:  # failed alone; the engines work
                self.metrics.request_failures.labels(error=type(result.error).__name__).inc()
                logger.warning("request %s failed alone in its batch of %d: %s", job.payload.request_id or "-",
                               len(jobs), result.error)
                self._answer(job, error=result.error)
            else:
                self._answer(job, result)

    def _generate(self, jobs: list) -> list:
        last = {"step": None, "t": self.clock()}

        def on_step(index: int, step: int, steps: int, latents_fn) -> None:
            if step != last["step"]:  # the first live request of this step: one UNet batch has run
                now = self.clock()
                if step > 0:  # step 0's time includes the encoders
                    self.metrics.step_seconds.observe(now - last["t"])
                last.update(step=step, t=now)
            progress = jobs[index].payload.progress
            if progress is not None:
                progress(step, steps, latents_fn)

        def cancelled(index: int) -> bool:
            return jobs[index].should_stop(self.clock())

        return self.pipe.generate_batch([job.payload.request for job in jobs], on_step=on_step, cancelled=cancelled)

    def _failed(self, jobs: list, err: Exception) -> None:
        name = type(err).__name__
        self.metrics.batch_failures.labels(error=name).inc()
        ids = ", ".join(job.payload.request_id or "-" for job in jobs)
        if isinstance(err, InputError):  # checked before queueing, so not expected; not the engines' fault
            logger.warning("a batch of %d request(s) (%s) was refused: %s", len(jobs), ids, err)
        else:
            self._failures += 1
            logger.error("a batch of %d request(s) (%s) failed (%d in a row): %s: %s", len(jobs), ids, self._failures,
                         name, err)
            if self._failures >= self.config.failure_threshold and self.state == "ready":
                logger.error("%d batches failed in a row: reporting not-ready", self._failures)
                self.state = "failing"
                self._last_probe = self.clock()
        for job in jobs:
            self._answer(job, error=err)


__all__ = ["ENCODE", "ENCODE_KEY", "GENERATE", "StoppedError", "Work", "Worker", "stop_error"]
