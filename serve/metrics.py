"""Prometheus metrics of one server (or Ray replica), on a registry of its own: no
process-global state, so two apps in one process (tests, Ray) never collide.

Request metrics are recorded by the request middleware, batch metrics by the worker;
gauges and the pipeline's counters (engine runs, cache hits and misses, device
memory on a GPU) are read at scrape time.
"""

from __future__ import annotations

import logging
import sys

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
WAIT_SECONDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
STEP_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
BATCH_IMAGES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


class PipelineCollector:
    """The Pipeline's own counters, read when Prometheus scrapes."""

    def __init__(self, worker):
        self.worker = worker

    def collect(self):
        pipe = self.worker.pipe
        if pipe is None:
            return
        stats = pipe.stats()
        runs = CounterMetricFamily("kolors_trt_engine_runs", "Engine runs per component", labels=["component"])
        for component, count in stats["engine_runs"].items():
            runs.add_metric([component], count)
        yield runs
        rows = CounterMetricFamily("kolors_trt_unet_rows", "UNet batch rows evaluated per UNet graph", labels=["graph"])
        for graph, count in stats["unet_rows"].items():
            rows.add_metric([graph], count)
        yield rows
        hits = CounterMetricFamily("kolors_trt_cache_hits", "Cache hits (memory or disk)", labels=["cache", "tier"])
        misses = CounterMetricFamily("kolors_trt_cache_misses", "Cache misses", labels=["cache"])
        for cache in ("prompt", "ip"):
            counts = stats[f"{cache}_cache"]
            hits.add_metric([cache, "memory"], counts["hits"])
            hits.add_metric([cache, "disk"], counts["disk_hits"])
            misses.add_metric([cache], counts["misses"])
        yield hits
        yield misses
        yield from self._device_memory(pipe, stats.get("device_memory") or {})

    @staticmethod
    def _device_memory(pipe, plan: dict):
        """The backend's own bytes by kind (weights, shared activations, I/O buffers) and the device's use."""
        torch = sys.modules.get("torch")  # imported by the TensorRT backends only; never imported here
        cuda = torch is not None and pipe.backend != "onnxruntime" and torch.cuda.is_available()
        if not plan and not cuda:
            return
        family = GaugeMetricFamily("kolors_trt_device_memory_bytes", "GPU memory: the engines' weights, their shared "
                                   "activations and I/O buffers, and the device's use", labels=["kind"])
        for kind, size in plan.items():
            family.add_metric([kind], size)
        if cuda:
            free, total = torch.cuda.mem_get_info()
            family.add_metric(["used"], total - free)
            family.add_metric(["total"], total)
            family.add_metric(["torch_allocated"], torch.cuda.memory_allocated())
        yield family


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("kolors_trt_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.request_seconds = Histogram("kolors_trt_request_seconds", "HTTP request time, arrival to last byte",
                                         ["endpoint"], buckets=SECONDS, registry=r)
        self.queue_wait = Histogram("kolors_trt_queue_wait_seconds", "Time from acceptance to the start of the batch",
                                    buckets=WAIT_SECONDS, registry=r)
        self.batch_size = Histogram("kolors_trt_batch_size", "Images per UNet batch", buckets=BATCH_IMAGES,
                                    registry=r)
        self.batch_seconds = Histogram("kolors_trt_batch_seconds", "Time of one generate_batch call",
                                       buckets=SECONDS, registry=r)
        self.step_seconds = Histogram("kolors_trt_denoise_step_seconds", "One denoising step of a UNet batch",
                                      buckets=STEP_SECONDS, registry=r)
        self.stopped = Counter("kolors_trt_requests_stopped", "Requests stopped before their end "
                               "(deadline, disconnected, shutdown) in the queue or between steps",
                               ["reason", "where"], registry=r)
        self.batch_failures = Counter("kolors_trt_batch_failures", "Batches that failed, by error type", ["error"],
                                      registry=r)
        self.request_failures = Counter("kolors_trt_request_failures", "Requests that failed alone in a batch that "
                                        "went on (rows not finite), by error type", ["error"], registry=r)
        self.queue_depth = Gauge("kolors_trt_queue_depth", "Requests waiting for a batch", registry=r)
        self.in_flight = Gauge("kolors_trt_in_flight", "Requests accepted and not yet answered", registry=r)
        self.ready = Gauge("kolors_trt_ready", "1 when /health/ready answers 200", registry=r)
        self.startup = Gauge("kolors_trt_startup_seconds", "Load and warm-up time of the model", registry=r)
        self.lora_swaps = Counter("kolors_trt_lora_swaps", "Changes of the LoRA weights a component runs with",
                                  ["component"], registry=r)
        self.lora_swap_seconds = Histogram("kolors_trt_lora_swap_seconds", "Time of one LoRA weight change "
                                           "(fused weights computed, session opened or plan refitted)",
                                           ["component"], buckets=SECONDS, registry=r)

    def lora_swap(self, component: str, seconds: float) -> None:
        """Pipeline.lora's on_swap (the worker thread)."""
        self.lora_swaps.labels(component=component).inc()
        self.lora_swap_seconds.labels(component=component).observe(seconds)

    def bind(self, worker) -> None:
        """Read the worker's gauges and its pipeline's counters at scrape time."""
        self.queue_depth.set_function(lambda: worker.queue_depth)
        self.in_flight.set_function(lambda: worker.in_flight)
        self.ready.set_function(lambda: 1.0 if worker.ready else 0.0)
        self.startup.set_function(lambda: worker.startup_seconds or 0.0)
        self.registry.register(PipelineCollector(worker))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["CONTENT_TYPE", "Metrics", "PipelineCollector"]
