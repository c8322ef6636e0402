"""The UNet graphs of a folder, one step each: what a full step and a DeepCache shallow step cost.

    kolors-trt bench --onnx out/onnx --unet-graphs [--size 256x256]
    python -m kolors_trt.bench_graphs --size 1024x1024      # FLOPs at the real Kolors sizes, every branch

Each UNet graph of the folder (``unet``, and ``unet_shallow`` when it was exported) runs on the same
random inputs of one CFG step (UNet batch 2 x images) through the runtime's own engines (ONNX Runtime
for an export folder, TensorRT for engines); after a warm-up call per graph, the graphs alternate
within every round, so drift on a busy machine hits both. Reported: milliseconds per call (mean, p50,
min, max) and the full step's mean over each graph's.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import numpy as np

from .bench import BenchConfig, machine


def bench_unet_graphs(folder: Path, backend: str, config: BenchConfig, cuda_graph: Optional[bool] = None) -> dict:
    from kolors_trt.runtime.pipeline import Pipeline
    from kolors_trt.runtime.spec import SHALLOW_UNET, sample_shapes

    pipe = Pipeline.load(folder, backend=backend, cuda_graph=cuda_graph)
    dims = pipe.folder.model_dims
    values = {"unet_batch": 2, "latent_height": config.height // dims.vae_scale,
              "latent_width": config.width // dims.vae_scale}
    names = [n for n in ("unet", SHALLOW_UNET) if n in pipe.engines]
    rng = np.random.default_rng(3)  # the cost does not depend on the values
    feeds = {n: {t.name: rng.standard_normal(sample_shapes(pipe.engines[n].spec, values)[t.name]).astype(np.float32)
                 for t in pipe.engines[n].spec.inputs} for n in names}
    times: dict = {n: [] for n in names}
    for round_ in range(config.warmup + config.runs):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            start = time.perf_counter()
            pipe.engines[name].run(feeds[name])  # returns host arrays: a sync on every backend
            if round_ >= config.warmup:
                times[name].append(time.perf_counter() - start)
    summary = {n: _ms(t) for n, t in times.items()}
    full = summary["unet"]["mean"]
    return {"config": config.__dict__, "backend": pipe.backend, "dims": values, "samples": times,
            "summary": summary, "full_over": {n: full / s["mean"] for n, s in summary.items()},
            "outputs": {n: pipe.engines[n].spec.output_names for n in names}}


def _ms(xs: list) -> dict:
    a = np.asarray(xs) * 1e3
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "min": float(a.min()), "max": float(a.max())}


def markdown(result: dict, env: dict) -> str:
    from kolors_trt.runtime.table import markdown_table

    d = result["dims"]
    rows = [[name, ", ".join(result["outputs"][name]), s["mean"], s["p50"], f"{s['min']:.4g}-{s['max']:.4g}",
             f"{result['full_over'][name]:.2f}x"] for name, s in result["summary"].items()]
    return "\n".join([
        f"kolors-trt bench, UNet graphs: one CFG step (UNet batch {d['unet_batch']}, latents {d['latent_height']}x"
        f"{d['latent_width']}), {result['config']['runs']} rounds after {result['config']['warmup']} warm-up; backend "
        f"{result['backend']}; {machine(env)}",
        "",
        markdown_table(["graph", "outputs", "ms (mean)", "ms (p50)", "ms (min-max)", "unet / graph"], rows),
    ])


def unet_flops(height: int, width: int, branches=None) -> list[dict]:
    """FLOPs (torch.utils.flop_counter: matmuls, convolutions, attention) of one CFG step (UNet batch 2) of the
    full UNet and of the shallow UNet of each DeepCache branch, at the real Kolors sizes (export/fullsize.py's
    configuration), counted on the meta device: no weights, no memory."""
    import copy

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from kolors_trt.export import deep_cache as D
    from kolors_trt.export.components import ShallowUNetGraph, UNetGraph
    from kolors_trt.export.fullsize import FULL
    from kolors_trt.export.ip_weights import cross_attention_layers
    from kolors_trt.export.tiny import build_unet
    from kolors_trt.runtime import spec as S

    text = S.ModelDims().text_hidden
    with torch.device("meta"):
        unet = build_unet(FULL, text)
        kv = [(torch.empty(h, FULL.cross_attention_dim), torch.empty(h, FULL.cross_attention_dim))
              for _, h in cross_attention_layers(unet)]
        h, w = height // 8, width // 8
        feeds = {"sample": torch.empty(2, 4, h, w), "timestep": torch.empty(1),
                 "encoder_hidden_states": torch.empty(2, S.TEXT_LENGTH, text), "text_embeds": torch.empty(2, text),
                 "time_ids": torch.empty(2, S.TIME_IDS), "ip_tokens": torch.empty(2, 16, FULL.cross_attention_dim),
                 "ip_scale": torch.empty(2)}

    def count(module, names, extra=None):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            module(*({**feeds, **(extra or {})}[n] for n in names))
        return counter.get_total_flops()

    names = list(feeds)
    rows = []
    for branch in range(D.BRANCH_LAYERS * len(unet.config.block_out_channels)) if branches is None else branches:
        split, dims = D.split(unet.config, branch), S.ModelDims(**D.feature_dims(unet.config, branch))
        shallow_names = S.engine_specs(dims)[S.SHALLOW_UNET].input_names
        with torch.device("meta"):
            full = UNetGraph(copy.deepcopy(unet), kv, split)
            shallow = ShallowUNetGraph(copy.deepcopy(unet), kv, split, shallow_names)
            stride = dims.deep_feature_stride
            feature = torch.empty(2, dims.deep_feature_channels, h // stride, w // stride)
        rows.append({"branch": branch, "feature": [2, dims.deep_feature_channels, h // stride, w // stride],
                     "full_tflop": count(full, names) / 1e12,
                     "shallow_tflop": count(shallow, shallow_names, {"deep_feature": feature}) / 1e12})
    return rows


def main(argv=None) -> int:
    import argparse

    from kolors_trt.runtime.spec import parse_size
    from kolors_trt.runtime.table import markdown_table

    p = argparse.ArgumentParser(prog="python -m kolors_trt.bench_graphs", description=unet_flops.__doc__)
    p.add_argument("--size", default="1024x1024", help="HEIGHTxWIDTH (default 1024x1024)")
    p.add_argument("--branch", type=int, action="append", help="DeepCache branches (default: every one)")
    args = p.parse_args(argv)
    height, width = parse_size(args.size)
    rows = unet_flops(height, width, args.branch)
    print(f"FLOPs of one CFG step (UNet batch 2) at {height}x{width}, the real Kolors UNet (torch flop counter, "
          "meta device)\n")
    print(markdown_table(["branch", "deep feature", "full TFLOP", "shallow TFLOP", "full / shallow"],
                         [[r["branch"], "x".join(map(str, r["feature"])), f"{r['full_tflop']:.2f}",
                           f"{r['shallow_tflop']:.3f}", f"{r['full_tflop'] / r['shallow_tflop']:.1f}x"] for r in rows]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["bench_unet_graphs", "markdown", "unet_flops"]
