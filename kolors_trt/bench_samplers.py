"""Fewer UNet evaluations: a sampler, a guidance interval and DeepCache against the Euler default, in the
same run.

    kolors-trt bench --onnx out/onnx --scheduler dpmpp_2m_karras --steps 25 --guidance-interval 0.28:5.42
    kolors-trt bench --onnx out/onnx --deep-cache-interval 2 3 5

Configurations on one Pipeline: the default (euler at the manifest's step count, guidance at every step,
no DeepCache), the chosen sampler at --steps, the same with the guidance interval (when given; with
--guidance-interval alone the sampler is euler), and the last of those at each DeepCache interval. They alternate within every round, in a rotating order,
so drift on a busy machine hits all of them. Every request uses the same prompt and reference image (the
encoders' caches are warm after the warm-up round) and the same seed per round, so a request's wall time
is the denoising loop, the VAE and the host work around them: what a sampler changes. Reported per
configuration: UNet rows per image per graph (the pipeline's counter: full and shallow UNet), the wall time of a request and of its
denoising loop (mean, p50, p90, min, max), and the speed-up: the default's mean wall time over its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .bench import PROMPT, BenchConfig, Clock, machine, reference_images


@dataclass(frozen=True)
class Variant:
    scheduler: str
    steps: int
    interval: Optional[tuple] = None
    deep_cache: int = 1

    @property
    def label(self) -> str:
        where = "" if self.interval is None else f", guidance in ({self.interval[0]:g}, {self.interval[1]:g}]"
        cache = "" if self.deep_cache == 1 else f", DeepCache {self.deep_cache}"
        return f"{self.scheduler} {self.steps}{where}{cache}"


def variants(default_steps: int, scheduler: Optional[str], steps: int, interval: Optional[tuple],
             deep_cache: Optional[list] = None) -> list[Variant]:
    """The default, the sampler without an interval, with it, and the last of these at each DeepCache interval
    (each only once)."""
    chosen = scheduler or "euler"
    out = [Variant("euler", default_steps), Variant(chosen, steps)]
    if interval is not None:
        out.append(Variant(chosen, steps, tuple(interval)))
    out += [Variant(chosen, steps, out[-1].interval, n) for n in deep_cache or []]
    return list(dict.fromkeys(out))


def bench_samplers(folder: Path, backend: str, config: BenchConfig, configurations: list[Variant],
                   cuda_graph: Optional[bool] = None, progress: bool = True) -> dict:
    """Run ``config.warmup + config.runs`` rounds of every configuration; samples, summaries, speed-ups."""
    from tqdm import tqdm

    from kolors_trt.runtime.pipeline import Pipeline

    pipe = Pipeline.load(folder, backend=backend, cuda_graph=cuda_graph)
    image = reference_images(1, config.seed)[0]
    graphs = list(pipe.stats()["unet_rows"])  # unet, and unet_shallow where the folder has it
    samples = {v.label: {"wall": [], "denoise": [], "unet_rows": dict.fromkeys(graphs, 0)} for v in configurations}
    loop_seconds: list = []
    clock = Clock()  # host time: a request's end and its loop's end are host syncs on every backend
    pipe.stage_timer = lambda stage: clock.measure(loop_seconds if stage == "denoise" else [])
    for round_ in tqdm(range(config.warmup + config.runs), desc="bench samplers", disable=not progress):
        shift = round_ % len(configurations)
        for v in configurations[shift:] + configurations[:shift]:
            rows = dict(pipe.stats()["unet_rows"])
            loop_seconds.clear()
            start = time.perf_counter()
            pipe.generate(PROMPT, image, height=config.height, width=config.width, num_inference_steps=v.steps,
                          guidance_scale=config.guidance_scale, ip_adapter_scale=config.ip_adapter_scale,
                          seed=config.seed + round_, output_type="np", scheduler=v.scheduler,
                          guidance_interval=v.interval, deep_cache_interval=v.deep_cache)
            wall = time.perf_counter() - start
            if round_ < config.warmup:
                continue
            samples[v.label]["wall"].append(wall)
            samples[v.label]["denoise"].append(sum(loop_seconds))
            for graph, count in pipe.stats()["unet_rows"].items():
                samples[v.label]["unet_rows"][graph] += count - rows[graph]
    pipe.stage_timer = None
    summary = {}
    for v in configurations:
        s = samples[v.label]
        sigmas = pipe.samplers.tables(v.scheduler, v.steps).sigmas[: v.steps].astype(np.float64)
        guided = v.steps if v.interval is None else int(((v.interval[0] < sigmas) & (sigmas <= v.interval[1])).sum())
        summary[v.label] = {"scheduler": v.scheduler, "steps": v.steps,
                            "guidance_interval": None if v.interval is None else list(v.interval),
                            "deep_cache_interval": v.deep_cache, "guided_steps": guided,
                            "unet_rows_per_image": sum(s["unet_rows"].values()) / config.runs,
                            "unet_rows_per_graph": {g: c / config.runs for g, c in s["unet_rows"].items()},
                            "wall_s": _spread(s["wall"]), "denoise_s": _spread(s["denoise"])}
    default = summary[configurations[0].label]["wall_s"]["mean"]
    return {"config": config.__dict__, "backend": pipe.backend, "samples": samples, "summary": summary,
            "speedup_vs_default": {label: default / s["wall_s"]["mean"] for label, s in summary.items()}}


def _spread(xs: list) -> dict:
    a = np.asarray(xs)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "min": float(a.min()), "max": float(a.max())}


def markdown(result: dict, env: dict) -> str:
    from kolors_trt.runtime.table import markdown_table

    cfg = result["config"]
    graphs = list(next(iter(result["summary"].values()))["unet_rows_per_graph"])
    rows = [[label, " + ".join(f"{c:g}" for c in s["unet_rows_per_graph"].values()), s["wall_s"]["mean"] * 1e3,
             f"{s['wall_s']['min'] * 1e3:.4g}-{s['wall_s']['max'] * 1e3:.4g}", s["denoise_s"]["mean"] * 1e3,
             f"{result['speedup_vs_default'][label]:.2f}x"] for label, s in result["summary"].items()]
    return "\n".join([
        f"kolors-trt bench, samplers and DeepCache: {cfg['height']}x{cfg['width']}, guidance {cfg['guidance_scale']}, {cfg['runs']} "
        f"rounds after {cfg['warmup']} warm-up; backend {result['backend']}; {machine(env)}; all stages timed with "
        "time.perf_counter",
        "",
        markdown_table(["configuration", "UNet rows / image (" + " + ".join(graphs) + ")", "wall ms (mean)",
                        "wall ms (min-max)",
                        "denoise ms (mean)", "speed-up"], rows),
        "",
        "speed-up: the first row's mean wall time over each row's, measured in this run",
    ])


__all__ = ["Variant", "bench_samplers", "markdown", "variants"]
