"""Throughput of batching: N compatible requests through ``Pipeline.generate_batch`` (one UNet batch)
against the same N requests one at a time, in the same run, on the same Pipeline.

Each request has its own prompt, reference image and seed (the encoders' caches are warm after the
warm-up round, so both modes measure denoising, the VAE and the host work around them). The two modes
alternate within every round, so drift on a busy machine hits both. Reported per mode: images per
second (N / wall time of the N requests) and the p50 / p90 completion time of a request when all N
arrive together (one at a time, request k waits for the k - 1 before it; batched, all finish together).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import numpy as np

from .bench import PROMPT, BenchConfig, BenchError, machine, reference_images

MODES = ("one_at_a_time", "generate_batch")


def bench_batch(folder: Path, backend: str, config: BenchConfig, batch: int, cuda_graph: Optional[bool] = None,
                progress: bool = True, runtime_cache: Optional[Path] = None) -> dict:
    """Run ``config.warmup + config.runs`` rounds of both modes; returns samples, summaries and the ratio."""
    from tqdm import tqdm

    from kolors_trt.runtime.pipeline import GenerationRequest, Pipeline

    if batch < 1:
        raise BenchError(f"bench: --batch must be >= 1, found {batch}")
    pipe = Pipeline.load(folder, backend=backend, cuda_graph=cuda_graph, runtime_cache=runtime_cache)
    most = pipe.batch_limits(config.guidance_scale > 1)[1]
    if batch > most:
        raise BenchError(f"bench: --batch {batch} is more than one UNet batch of {pipe.folder.root} takes ({most} "
                         "images); choose a smaller --batch or rebuild the engines with a larger --batch")
    images = reference_images(batch, config.seed)
    requests = [GenerationRequest(f"{PROMPT} #{i}", images[i], height=config.height, width=config.width,
                                  num_inference_steps=config.steps, guidance_scale=config.guidance_scale,
                                  ip_adapter_scale=config.ip_adapter_scale, seed=config.seed + i, output_type="np")
                for i in range(batch)]
    samples = {mode: {"wall": [], "completion": []} for mode in MODES}
    unet_runs = {mode: 0 for mode in MODES}

    def one_at_a_time() -> list:
        start, done = time.perf_counter(), []
        for request in requests:
            pipe.generate_batch([request])
            done.append(time.perf_counter() - start)
        return done

    def batched() -> list:
        start = time.perf_counter()
        pipe.generate_batch(requests)
        return [time.perf_counter() - start] * batch

    runners = {"one_at_a_time": one_at_a_time, "generate_batch": batched}
    for round_ in tqdm(range(config.warmup + config.runs), desc=f"bench --batch {batch}", disable=not progress):
        order = MODES if round_ % 2 == 0 else MODES[::-1]
        for mode in order:
            before = pipe.stats()["engine_runs"]["unet"]
            done = runners[mode]()
            if round_ < config.warmup:
                continue
            unet_runs[mode] += pipe.stats()["engine_runs"]["unet"] - before
            samples[mode]["wall"].append(done[-1])
            samples[mode]["completion"].extend(done)
    summary = {}
    for mode in MODES:
        wall, completion = np.asarray(samples[mode]["wall"]), np.asarray(samples[mode]["completion"])
        summary[mode] = {"images_per_second": batch / float(wall.mean()),
                         "p50_completion_s": float(np.percentile(completion, 50)),
                         "p90_completion_s": float(np.percentile(completion, 90)),
                         "mean_wall_s": float(wall.mean()), "unet_runs": unet_runs[mode]}
    return {
        "config": dict(config.__dict__, batch=batch), "backend": pipe.backend, "samples": samples, "summary": summary,
        "throughput_ratio": summary["generate_batch"]["images_per_second"] / summary["one_at_a_time"]["images_per_second"],
    }


def markdown(result: dict, env: dict) -> str:
    from kolors_trt.runtime.table import markdown_table

    cfg, s = result["config"], result["summary"]
    rows = [[mode.replace("_", " "), cfg["batch"], s[mode]["images_per_second"], s[mode]["p50_completion_s"] * 1e3,
             s[mode]["p90_completion_s"] * 1e3, s[mode]["unet_runs"]] for mode in MODES]
    return "\n".join([
        f"kolors-trt bench --batch {cfg['batch']}: {cfg['height']}x{cfg['width']}, {cfg['steps']} steps, guidance "
        f"{cfg['guidance_scale']}, {cfg['runs']} rounds after {cfg['warmup']} warm-up; backend {result['backend']}; "
        f"{machine(env)}",
        "",
        markdown_table(["mode", "requests", "images/s", "p50 completion ms", "p90 completion ms", "UNet runs"], rows),
        "",
        f"throughput ratio (generate_batch / one at a time): {result['throughput_ratio']:.2f}x",
    ])


__all__ = ["MODES", "bench_batch", "markdown"]
