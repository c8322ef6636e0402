"""`kolors-trt bench --server URL`: a load generator for a running `kolors-trt serve`.

    kolors-trt bench --onnx out/onnx --server http://127.0.0.1:8000 --concurrency 8 --requests 64 \\
        --size 64x64 --steps 4

N text-to-image requests (each its own prompt and seed, all of one size, so the
server may batch them) go out from C client threads over HTTP; each request has a
timeout and the run stops issuing requests past ``max_seconds``, so the run is
bounded in count and time. Reported: status counts (0 = no HTTP answer), p50 / p90 /
p99 latency of the 200s, images/s, the mean queue wait and the batch sizes the server
ran (the deltas of its /metrics histograms over the run), and requests never answered
("lost"). Then the same N requests run through a local Pipeline on the folder given,
one at a time, in the same process: the ratio of the two images/s says what serving
(batching, HTTP, encoding) costs or gains on this machine.

The API key, if the server wants one, comes from $KOLORS_TRT_API_KEY.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from kolors_trt.runtime.errors import InputError

logger = logging.getLogger(__name__)

PROMPTS = ("一只可爱的小狗在奔跑", "a lighthouse at dusk", "穿着黑色T恤衫的男人", "a red fox in the snow")
NO_ANSWER = 0  # the status of a request that got no HTTP answer (connection error, client timeout)


class LoadError(InputError):
    """A load setting is invalid or the server cannot be used."""


@dataclass(frozen=True)
class LoadConfig:
    url: str
    concurrency: int
    requests: int
    height: int
    width: int
    steps: int
    guidance_scale: float
    warmup: int = 1
    timeout_s: float = 300.0  # per request
    max_seconds: float = 3600.0  # no new request after this long
    api_key: Optional[str] = None

    def __post_init__(self):
        if self.concurrency < 1 or self.requests < 1 or self.warmup < 0:
            raise LoadError(f"bench --server: need --concurrency >= 1, --requests >= 1 and --warmup >= 0; got "
                            f"{self.concurrency}, {self.requests}, {self.warmup}")
        if not self.url.startswith(("http://", "https://")):
            raise LoadError(f"bench --server: {self.url!r} is no http(s) URL, e.g. http://127.0.0.1:8000")

    def body(self, i: int) -> dict:
        """Request i, in OpenAI's shape (size is WIDTHxHEIGHT) with diffusers' extras."""
        return {"prompt": f"{PROMPTS[i % len(PROMPTS)]} #{i}", "size": f"{self.width}x{self.height}", "n": 1,
                "seed": i, "num_inference_steps": self.steps, "guidance_scale": self.guidance_scale}


def scrape(client) -> dict:
    """{(sample name, labels): value} of the server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = client.get("/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def histogram_delta(before: dict, after: dict, name: str) -> dict:
    """count, sum and per-bucket counts (not cumulative, by upper bound) of a histogram over the run."""
    def grab(m, suffix):
        return {dict(k[1]).get("le"): v for k, v in m.items() if k[0] == f"{name}_{suffix}"}

    count = sum(grab(after, "count").values()) - sum(grab(before, "count").values())
    total = sum(grab(after, "sum").values()) - sum(grab(before, "sum").values())
    cumulative_b, cumulative_a = grab(before, "bucket"), grab(after, "bucket")
    buckets, previous = {}, 0.0
    for le in sorted(cumulative_a, key=float):
        now = cumulative_a[le] - cumulative_b.get(le, 0.0)
        if now - previous:
            buckets[le] = int(now - previous)
        previous = now
    return {"count": int(count), "sum": total, "buckets": buckets}


def run_load(config: LoadConfig, progress: bool = True) -> dict:
    """Send the requests; the server's answers and metrics over the run."""
    import httpx
    from tqdm import tqdm

    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    limits = httpx.Limits(max_connections=config.concurrency + 2)
    with httpx.Client(base_url=config.url, headers=headers, timeout=config.timeout_s, limits=limits) as client:
        try:
            ready = client.get("/health/ready", timeout=10)
        except httpx.HTTPError as err:
            raise LoadError(f"bench --server: {config.url} does not answer ({err}); start it with kolors-trt serve") \
                from None
        if ready.status_code != 200:
            raise LoadError(f"bench --server: {config.url}/health/ready says {ready.status_code}: not ready")
        for i in range(config.warmup):
            client.post("/v1/images/generations", json=config.body(config.requests + i))
        before = scrape(client)
        outcomes: list = [None] * config.requests
        order, lock = itertools.count(), threading.Lock()
        stop_at = time.monotonic() + config.max_seconds
        bar = tqdm(total=config.requests, desc=f"server, concurrency {config.concurrency}", unit="req",
                   disable=not progress)

        def user():
            while time.monotonic() < stop_at:
                with lock:
                    i = next(order)
                if i >= config.requests:
                    return
                started = time.perf_counter()
                try:
                    status = client.post("/v1/images/generations", json=config.body(i)).status_code
                except httpx.HTTPError as err:
                    logger.warning("request %d: no answer (%s)", i, err)
                    status = NO_ANSWER
                outcomes[i] = (status, time.perf_counter() - started)
                bar.update()

        started = time.perf_counter()
        users = [threading.Thread(target=user, name=f"load-{k}") for k in range(config.concurrency)]
        for t in users:
            t.start()
        for t in users:
            t.join()
        wall = time.perf_counter() - started
        bar.close()
        after = scrape(client)
    return summarize(config, outcomes, wall, before, after)


def summarize(config: LoadConfig, outcomes: list, wall: float, before: dict, after: dict) -> dict:
    answered = [o for o in outcomes if o is not None]
    ok = np.array([s for status, s in answered if status == 200]) if answered else np.zeros(0)
    statuses = Counter(status for status, _ in answered)
    pct = {f"p{q}": float(np.percentile(ok, q)) if len(ok) else None for q in (50, 90, 99)}
    wait = histogram_delta(before, after, "kolors_trt_queue_wait_seconds")
    batches = histogram_delta(before, after, "kolors_trt_batch_size")
    return {
        "config": asdict(config) | {"api_key": None},
        "wall_seconds": wall,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "lost": config.requests - len(answered),
        "latency_seconds": pct,
        "images_per_second": len(ok) / wall if wall > 0 else None,
        "queue_wait_mean_seconds": wait["sum"] / wait["count"] if wait["count"] else None,
        "batches": {"count": batches["count"], "mean_images": batches["sum"] / batches["count"]
                    if batches["count"] else None, "by_upper_bound": batches["buckets"]},
    }


def run_local(folder: str, backend: str, config: LoadConfig, progress: bool = True) -> dict:
    """The same requests through a local Pipeline, one at a time."""
    from tqdm import tqdm

    from kolors_trt.runtime.pipeline import Pipeline

    pipe = Pipeline.load(folder, backend=backend)
    for i in range(config.warmup):
        local(pipe, config.body(config.requests + i), config)
    started = time.perf_counter()
    for i in tqdm(range(config.requests), desc="local, one at a time", unit="req", disable=not progress):
        local(pipe, config.body(i), config)
    wall = time.perf_counter() - started
    return {"wall_seconds": wall, "images_per_second": config.requests / wall, "backend": pipe.backend}


def local(pipe, body: dict, config: LoadConfig):
    return pipe.generate(body["prompt"], height=config.height, width=config.width, num_inference_steps=config.steps,
                         guidance_scale=config.guidance_scale, ip_adapter_scale=0.0, seed=body["seed"])


def markdown(result: dict) -> str:
    from kolors_trt.runtime.table import markdown_table

    s, c, loc = result["server"], result["server"]["config"], result.get("local")
    statuses = ", ".join(f"{k}: {v}" for k, v in s["statuses"].items())
    sizes = ", ".join(f"<={float(k):g}: {v}" for k, v in s["batches"]["by_upper_bound"].items())
    lat = s["latency_seconds"]
    row = [c["concurrency"], c["requests"], statuses, s["lost"], lat["p50"], lat["p90"], lat["p99"],
           s["images_per_second"], s["queue_wait_mean_seconds"], s["batches"]["mean_images"], sizes]
    headers = ["concurrency", "requests", "statuses", "lost", "p50 s", "p90 s", "p99 s", "images/s",
               "queue wait s", "mean batch", "batch sizes"]
    if loc:
        row += [loc["images_per_second"], f"{s['images_per_second'] / loc['images_per_second']:.2f}x"]
        headers += ["local 1-at-a-time images/s", "ratio"]
    return markdown_table(headers, [row])


def run_cli(args, folder: str, height: int, width: int, steps: int, guidance_scale: float) -> int:
    """`kolors-trt bench --server URL ...`: print the table; exit 1 when a request was lost or answered 5xx."""
    config = LoadConfig(args.server, args.concurrency, args.requests, height, width, steps, guidance_scale,
                        warmup=args.warmup, api_key=os.environ.get("KOLORS_TRT_API_KEY"))
    result = {"server": run_load(config)}
    result["local"] = run_local(folder, args.backend, config)
    print(markdown(result))
    if args.json:
        from kolors_trt.runtime.manifest import write_json_atomic

        write_json_atomic(args.json, result)
    failed = result["server"]["lost"] + sum(v for k, v in result["server"]["statuses"].items()
                                            if int(k) >= 500 or int(k) == NO_ANSWER)
    if failed:
        print(f"kolors-trt bench: {failed} request(s) lost or answered 5xx", file=sys.stderr)
    return 1 if failed else 0


__all__ = ["LoadConfig", "LoadError", "histogram_delta", "markdown", "run_cli", "run_load", "run_local"]
