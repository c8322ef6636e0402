"""Latency benchmark: the runtime per stage and end to end, optionally against
diffusers' KolorsPipeline + load_ip_adapter in the same run.

Stages (each request has a new prompt and a new reference image, so the encoders
really run; the model's constants are warm):

    text_encoder     tokenize + text encoder engine, one new prompt
    image_encoder    image encoder engine, one new image (its preprocessing counts as host)
    image_cached     the same image again: preprocessing + content hash + cache hit
    denoise_step     one denoising step: UNet (CFG batch) + guidance + Euler update
    vae_decoder      latents -> image
    host             end to end minus the stages above (tokenizer, postprocess, glue)
    end_to_end       one whole request

On a GPU backend device work is timed with CUDA events on the runtime's stream and
host work with perf_counter; on the CPU everything is perf_counter. The output says
which. Warm-up requests are run first and excluded.

This module lives in the top-level package, not in the runtime: the diffusers
baseline imports diffusers, which the runtime never does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from kolors_trt.runtime.errors import InputError
from kolors_trt.runtime.manifest import atomic_path, write_bytes_atomic
from kolors_trt.runtime.spec import SAMPLING_DEFAULTS

logger = logging.getLogger(__name__)

STAGES = ("text_encoder", "image_encoder", "image_cached", "denoise_step", "vae_decoder", "host", "end_to_end")
LEGEND = {
    "text_encoder": "new prompt: tokenizer + text encoder (diffusers encodes the negative too)",
    "image_encoder": "new reference image: image encoder (diffusers: CLIP on the image and the zero image)",
    "image_cached": "seen reference image: preprocessing + content hash + cache hit",
    "denoise_step": "one step: UNet on the CFG batch + guidance + Euler (diffusers: UNet incl. resampler)",
    "vae_decoder": "latents -> image",
    "host": "end to end minus the stages above",
    "end_to_end": "one request, new prompt and new image",
}
PLOT_STAGES = ("text_encoder", "image_encoder", "denoise", "vae_decoder", "host")
PROMPT = "一只可爱的小狗在奔跑，高画质，高细节"


class BenchError(InputError):
    """A benchmark setting is invalid or its baseline cannot be loaded."""


@dataclass(frozen=True)
class BenchConfig:
    height: int
    width: int
    steps: int
    warmup: int
    runs: int
    guidance_scale: float = SAMPLING_DEFAULTS["guidance_scale"]
    ip_adapter_scale: float = SAMPLING_DEFAULTS["ip_adapter_scale"]
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.runs < 1 or self.warmup < 0:
            raise BenchError(f"bench: need steps >= 1, runs >= 1, warmup >= 0; got {self.steps}, {self.runs}, "
                             f"{self.warmup}")


@dataclass
class Samples:
    """Seconds per stage, one list entry per measured request."""

    clock: str
    values: dict = field(default_factory=lambda: {s: [] for s in STAGES})

    def add(self, stage: str, seconds: float) -> None:
        self.values[stage].append(float(seconds))

    def summary(self, images_per_request: int) -> dict:
        out = {}
        for stage, xs in self.values.items():
            if xs:
                a = np.asarray(xs)
                out[stage] = {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
                              "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)), "n": len(xs)}
        e2e = out.get("end_to_end")
        if e2e:
            out["images_per_second"] = images_per_request / e2e["mean"]
        return out


class Clock:
    """perf_counter, or CUDA events on a stream for device work (GPU only)."""

    def __init__(self, stream=None):
        self.stream = stream
        self.name = "cuda_events" if stream is not None else "perf_counter"

    @contextlib.contextmanager
    def measure(self, sink: list):
        if self.stream is None:
            start = time.perf_counter()
            yield
            sink.append(time.perf_counter() - start)
            return
        import torch  # GPU path only

        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record(self.stream)
        yield
        end.record(self.stream)
        end.synchronize()
        sink.append(begin.elapsed_time(end) / 1000.0)


def reference_images(count: int, seed: int = 0):
    """Distinct RGB reference images (different content -> different cache keys)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(360, 480, 3), dtype=np.uint8)
    return [Image.fromarray(np.roll(base, 7 * i, axis=1) ^ np.uint8(i)) for i in range(count)]


def bench_runtime(folder: Path, backend: str, config: BenchConfig, cuda_graph: Optional[bool] = None,
                  progress: bool = True, runtime_cache: Optional[Path] = None) -> tuple[Samples, dict]:
    """Measure the runtime; returns (samples, facts such as engine bytes and memory).
    cuda_graph (TensorRT backends): None = when the engine profile is static. runtime_cache: TensorRT-RTX's
    kernel cache file (the warm-up requests fill it)."""
    from tqdm import tqdm

    from kolors_trt.runtime.pipeline import Pipeline

    started = time.perf_counter()
    pipe = Pipeline.load(folder, backend=backend, cuda_graph=cuda_graph, runtime_cache=runtime_cache)
    load_seconds = time.perf_counter() - started
    unet = pipe.engines["unet"]
    clock = Clock(getattr(unet, "stream", None) if pipe.backend != "onnxruntime" else None)
    samples = Samples(clock.name)
    images = reference_images(config.warmup + config.runs + 1, config.seed)
    stage_seconds: dict = {}

    def timer(stage: str):
        return clock.measure(stage_seconds.setdefault(stage, []))

    pipe.stage_timer = timer
    total = config.warmup + config.runs
    for i in tqdm(range(total), desc=f"bench {pipe.backend}", disable=not progress):
        stage_seconds.clear()
        start = time.perf_counter()
        pipe.generate(f"{PROMPT} #{i}", images[i], height=config.height, width=config.width,
                      num_inference_steps=config.steps, guidance_scale=config.guidance_scale,
                      ip_adapter_scale=config.ip_adapter_scale, seed=config.seed + i, output_type="np")
        e2e = time.perf_counter() - start
        cached: list = []
        with clock.measure(cached):
            pipe.encode_image(images[i])
        if i < config.warmup:
            continue
        stages = {k: sum(v) for k, v in stage_seconds.items()}
        samples.add("end_to_end", e2e)
        samples.add("text_encoder", stages.get("text_encoder", 0.0))
        samples.add("image_encoder", stages.get("image_encoder", 0.0))
        samples.add("image_cached", cached[0])
        samples.add("denoise_step", stages.get("denoise", 0.0) / config.steps)
        samples.add("vae_decoder", stages.get("vae_decoder", 0.0))
        samples.add("host", e2e - sum(stages.get(s, 0.0) for s in ("text_encoder", "image_encoder", "denoise",
                                                                        "vae_decoder")))
    pipe.stage_timer = None
    facts = {
        "backend": pipe.backend,
        "unet_precision": str(pipe.folder.entries["unet"].get("precision", "")),
        "cuda_graph": bool(getattr(unet, "cuda_graph", False)),
        "engine_bytes": {name: Path(path).stat().st_size for name, path in pipe.folder.files.items()},
        "load_seconds": load_seconds,  # plans read, contexts made, constants computed
        # TensorRT: each engine's weights and activation need (device_memory_size_v2); they share the largest
        "engine_memory": {name: {"weights": getattr(e, "weight_bytes", None),
                                 "activations": getattr(e, "activation_bytes", None)}
                          for name, e in pipe.engines.items()} if pipe.backend != "onnxruntime" else None,
        "stats": pipe.stats(),
        "device_memory_mb": _device_memory_mb() if clock.stream is not None else None,
        "peak_rss_mb": _peak_rss_mb(),  # before a baseline loads its models into this process
    }
    return samples, facts


def bench_diffusers(weights: Path, ip_adapter: Path, config: BenchConfig, device: str, dtype: str,
                    progress: bool = True) -> Samples:
    """The same requests through diffusers' KolorsPipeline + load_ip_adapter, timed by stage
    with forward hooks. In diffusers the resampler runs inside the UNet on every step."""
    from tqdm import tqdm

    from .baseline import load_diffusers

    pipe, torch = load_diffusers(weights, ip_adapter, device, dtype)
    pipe.set_ip_adapter_scale(config.ip_adapter_scale)
    stream = torch.cuda.current_stream() if device.startswith("cuda") else None
    clock = Clock(stream)
    samples = Samples(clock.name)
    images = reference_images(config.warmup + config.runs + 1, config.seed)
    calls: dict = {}
    open_timers: dict = {}

    def hook(module, stage):
        def pre(*_):
            open_timers[stage] = clock.measure(calls.setdefault(stage, []))
            open_timers[stage].__enter__()

        def post(*_):
            open_timers.pop(stage).__exit__(None, None, None)

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    hook(pipe.text_encoder, "text_encoder")
    hook(pipe.image_encoder, "image_encoder")
    hook(pipe.unet, "unet")
    hook(pipe.vae.post_quant_conv, "vae_post_quant")
    hook(pipe.vae.decoder, "vae_decoder")
    total = config.warmup + config.runs
    for i in tqdm(range(total), desc="bench diffusers", disable=not progress):
        calls.clear()
        generator = torch.Generator("cpu").manual_seed(config.seed + i)
        start = time.perf_counter()
        with torch.no_grad():
            pipe(prompt=f"{PROMPT} #{i}", ip_adapter_image=images[i], height=config.height, width=config.width,
                 num_inference_steps=config.steps, guidance_scale=config.guidance_scale, generator=generator,
                 output_type="np")
        e2e = time.perf_counter() - start
        if i < config.warmup:
            continue
        stages = {k: sum(v) for k, v in calls.items()}
        vae = stages.get("vae_post_quant", 0.0) + stages.get("vae_decoder", 0.0)
        samples.add("end_to_end", e2e)
        samples.add("text_encoder", stages.get("text_encoder", 0.0))  # prompt and negative: diffusers encodes both
        samples.add("image_encoder", stages.get("image_encoder", 0.0))  # image and zero image, CLIP only
        samples.add("denoise_step", stages.get("unet", 0.0) / config.steps)  # UNet (with the resampler) only
        samples.add("vae_decoder", vae)
        samples.add("host", e2e - stages.get("text_encoder", 0.0) - stages.get("image_encoder", 0.0)
                    - stages.get("unet", 0.0) - vae)
    return samples


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def _device_memory_mb() -> Optional[float]:
    try:
        import torch

        free, total = torch.cuda.mem_get_info()
        return (total - free) / 2**20
    except Exception:  # no CUDA: nothing to report
        return None


def machine(env: dict) -> str:
    """The GPU (or CPU) and CPU count every bench report names, from ``environment()``."""
    return f"{env.get('gpu') or env['cpu']} ({env['cpu_count']} CPUs)"


def environment(backend: str) -> dict:
    env = {"python": platform.python_version(), "machine": platform.machine(), "cpu": _cpu_name(),
           "cpu_count": __import__("os").cpu_count()}
    for module in ("onnxruntime", "tensorrt", "tensorrt_rtx", "torch", "diffusers"):
        try:
            env[module] = __import__(module).__version__
        except Exception:  # not installed, or fails to import without a GPU
            env[module] = None
    try:
        import torch

        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            env["cuda"] = torch.version.cuda
            env["driver"] = _nvidia_driver()
    except ImportError:
        pass
    env["backend"] = backend
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _nvidia_driver() -> Optional[str]:
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def report(config: BenchConfig, ours: Samples, facts: dict, baseline: Optional[Samples], env: dict,
           images_per_request: int = 1) -> dict:
    """Everything the JSON holds: configuration, environment, raw samples, summaries, ratios."""
    result = {
        "config": config.__dict__,
        "environment": env,
        "clock": {"kolors-trt": ours.clock, "diffusers": baseline.clock if baseline else None,
                  "note": "device work timed with CUDA events, host work with perf_counter"
                  if ours.clock == "cuda_events" else "all stages timed with time.perf_counter on the host"},
        "kolors-trt": {"samples": ours.values, "summary": ours.summary(images_per_request)},
        **facts,
    }
    if baseline is not None:
        base = baseline.summary(images_per_request)
        result["diffusers"] = {"samples": baseline.values, "summary": base}
        mine = result["kolors-trt"]["summary"]
        result["speedup_vs_diffusers"] = {
            s: base[s]["mean"] / mine[s]["mean"] for s in STAGES
            if s in base and s in mine and mine[s]["mean"] > 0 and base[s]["mean"] > 0
        }
    return result


def markdown(result: dict) -> str:
    from kolors_trt.runtime.table import markdown_table

    mine = result["kolors-trt"]["summary"]
    base = result.get("diffusers", {}).get("summary", {})
    ratio = result.get("speedup_vs_diffusers", {})
    rows = []
    for s in STAGES:
        if s not in mine:
            continue
        row = [s, mine[s]["mean"] * 1e3, mine[s]["p50"] * 1e3, mine[s]["p90"] * 1e3, mine[s]["p99"] * 1e3]
        if base:
            row += [base[s]["mean"] * 1e3 if s in base else None, f"{ratio[s]:.2f}x" if s in ratio else None]
        rows.append(row)
    headers = ["stage", "mean ms", "p50 ms", "p90 ms", "p99 ms"] + (["diffusers mean ms", "speed-up"] if base else [])
    env, cfg = result["environment"], result["config"]
    lines = [
        f"kolors-trt bench: {cfg['height']}x{cfg['width']}, {cfg['steps']} steps, guidance {cfg['guidance_scale']}, "
        f"{cfg['runs']} runs after {cfg['warmup']} warm-up; backend {env['backend']}; {machine(env)}",
        f"clock: {result['clock']['note']}",
        "",
        markdown_table(headers, rows),
        "",
        *(f"- {s}: {LEGEND[s]}" for s in STAGES),
        "",
        f"images/s: {mine['images_per_second']:.3g}"
        + (f" (diffusers {base['images_per_second']:.3g})" if base else "")
        + f"; peak RSS {result['peak_rss_mb']:.0f} MB"
        + (f"; device memory {result['device_memory_mb']:.0f} MB" if result.get("device_memory_mb") else "")
        + "; engines " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in result["engine_bytes"].items()),
    ]
    unet = result.get("unet_precision")
    if unet in QDQ_PRECISIONS and env["backend"] == "onnxruntime":
        lines += ["", QDQ_ON_ORT.format(unet=unet)]
    compare = result.get("compare")
    if compare:
        a, b = mine["denoise_step"]["mean"], compare["summary"]["denoise_step"]["mean"]
        lines += ["", f"UNet step: {unet} {a * 1e3:.2f} ms, {compare['unet_precision']} ({compare['folder']}) "
                      f"{b * 1e3:.2f} ms: {b / a:.2f}x" + (f" ({QDQ_ON_ORT.format(unet=unet)})"
                                                          if env["backend"] == "onnxruntime" else "")]
    return "\n".join(lines)


# ONNX Runtime's CPU provider has no int8 kernels for an fp16 body and emulates FP8, so a Q/DQ
# graph runs slower there than the fp16 graph; its time says nothing about TensorRT on a GPU.
QDQ_PRECISIONS = ("int8", "fp8")
QDQ_ON_ORT = ("the UNet is {unet} (Q/DQ): ONNX Runtime's timings of Q/DQ graphs are not indicative of GPU speed; "
              "compare on TensorRT engines on a GPU (bench --engines ... --compare FP16_ENGINES)")


def compare_unet(folder: Path, backend: str, config: BenchConfig, cuda_graph: Optional[bool]) -> dict:
    """The same benchmark on a second folder (e.g. the fp16 engines beside int8 ones): its UNet step."""
    samples, facts = bench_runtime(folder, backend, config, cuda_graph)
    return {"folder": str(folder), "unet_precision": facts["unet_precision"], "samples": samples.values,
            "summary": samples.summary(1)}


def plot(result: dict, path: Path) -> None:
    """Stacked bar per configuration: where one request's time goes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = result["config"]["steps"]
    configs = [("kolors-trt\n" + result["environment"]["backend"], result["kolors-trt"]["summary"])]
    if "diffusers" in result:
        configs.append(("diffusers", result["diffusers"]["summary"]))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for x, (label, summary) in enumerate(configs):
        bottom = 0.0
        for stage, color in zip(PLOT_STAGES, ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3")):
            key = "denoise_step" if stage == "denoise" else stage
            value = summary.get(key, {}).get("mean", 0.0) * (steps if stage == "denoise" else 1)
            ax.bar(x, value, bottom=bottom, color=color, label=stage if x == 0 else None, width=0.6)
            bottom += value
    ax.set_xticks(range(len(configs)), [c[0] for c in configs])
    ax.set_ylabel("seconds per request (mean)")
    cfg = result["config"]
    ax.set_title(f"{cfg['height']}x{cfg['width']}, {steps} steps")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)


def write_outputs(result: dict, json_path: Optional[Path], plot_path: Optional[Path]) -> None:
    if json_path:
        write_bytes_atomic(json_path, json.dumps(result, indent=2, default=str).encode())
    if plot_path:
        plot(result, Path(plot_path))
