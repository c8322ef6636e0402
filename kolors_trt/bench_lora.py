"""LoRA swap time on ONNX Runtime, measured on an export folder and projected to Kolors' real UNet.

    python -m kolors_trt.bench_lora --onnx out/onnx --lora a.safetensors --lora b.safetensors [--project]

Measured on the folder, per component the adapters touch: a cold swap (the LRU holds nothing: fused
weights computed from the base bytes, then a session opened with them) split into those two parts, and
a warm switch to a set the LRU holds. With ``--project``: the runtime's own ``fuse`` timed at every
attention, feed-forward and projection linear of the real Kolors UNet (shapes from diffusers' model on
the meta device, random fp16 base, a rank ``--rank`` LoRA), and ONNX Runtime's session-open time per GB
measured on a synthetic fp16 graph of ``--probe-gb`` GB, scaled to the real fp16 UNet graph's size. The
projection is arithmetic on measured rates, not a measurement of the real UNet.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

REAL_UNET_GRAPH_GB = 5.85  # the fp16 UNet + IP graph at Kolors' sizes (README, "Requirements")


def swap_times(folder: Path, loras: Sequence[str], runs: int) -> dict:
    """{component: {"fuse_s", "open_s", "cold_s", "warm_s"}: lists of seconds} for the set of all ``loras``."""
    from kolors_trt.runtime.pipeline import Pipeline

    pipe = Pipeline.load(folder)
    chosen = {pipe.load_lora_weights(path, adapter_name=f"l{i}"): 0.8 for i, path in enumerate(loras)}
    lora_set = pipe.lora.resolve(chosen)
    out = {}
    for component in ("unet", "text_encoder"):
        if pipe.lora.key(lora_set, component) is None:
            continue
        engine = pipe.engines[component]
        samples: dict = {"fuse_s": [], "open_s": [], "cold_s": [], "warm_s": []}
        for _ in range(runs):
            engine.fused_sessions = 0  # cold: nothing kept
            engine.drop_weights(lambda key: True)
            pipe.lora.apply(component, ())
            start = time.perf_counter()
            arrays = pipe.lora._fused(component, lora_set, None)
            samples["fuse_s"].append(time.perf_counter() - start)
            start = time.perf_counter()
            engine._open(arrays)
            samples["open_s"].append(time.perf_counter() - start)
            start = time.perf_counter()
            pipe.lora.apply(component, lora_set)
            samples["cold_s"].append(time.perf_counter() - start)
            engine.fused_sessions = 2  # warm: the set is in the LRU
            pipe.lora.apply(component, ())
            pipe.lora.apply(component, lora_set)
            pipe.lora.apply(component, ())
            start = time.perf_counter()
            pipe.lora.apply(component, lora_set)
            samples["warm_s"].append(time.perf_counter() - start)
        out[component] = samples
    return out


def fuse_projection(rank: int) -> dict:
    """The runtime's ``fuse`` at every attention / FF / proj linear of the real UNet (fp16, rank ``rank``)."""
    import torch

    from kolors_trt.export.fullsize import FULL
    from kolors_trt.export.tiny import build_unet
    from kolors_trt.runtime.lora import fuse
    from kolors_trt.runtime.lora_files import LoraLayer
    from kolors_trt.runtime.lora_map import Target

    with torch.device("meta"):
        unet = build_unet(FULL, 4096)
    shapes = [tuple(m.weight.shape) for n, m in unet.named_modules()
              if isinstance(m, torch.nn.Linear) and ".attentions." in n]
    rng = np.random.default_rng(0)
    seconds, params = 0.0, 0
    for shape in shapes:
        base = rng.standard_normal(shape[::-1], dtype=np.float32).astype(np.float16)  # stored W^T, as MatMul holds it
        layer = LoraLayer("unet", "m", rng.standard_normal((rank, shape[1]), dtype=np.float32),
                          rng.standard_normal((shape[0], rank), dtype=np.float32), 1.0, "k")
        target = Target("m", "linear", shape, "w", True, 1.0, "float16", shape[::-1], Path(), 0)
        start = time.perf_counter()
        fuse(base, target, [(layer, 0.8)])
        seconds += time.perf_counter() - start
        params += int(np.prod(shape))
    return {"modules": len(shapes), "params": params, "rank": rank, "fuse_s": seconds}


def open_rate(gb: float) -> dict:
    """Seconds per GB for ONNX Runtime (CPU) to open a graph of ``gb`` GB (a chain of 4096x4096 MatMuls), fp16
    and fp32, its weights read from the graph's file ("file") or handed over with add_initializer as a fused
    session's replaced weights are ("replaced")."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from kolors_trt.runtime.backend_ort import IGNORE_USER_INITIALIZERS

    out = {}
    for dtype, proto in (("float16", TensorProto.FLOAT16), ("float32", TensorProto.FLOAT)):
        size = np.dtype(dtype).itemsize * 4096 * 4096
        n = max(1, int(gb * 1e9 / size))
        rng = np.random.default_rng(0)
        weights = [(rng.standard_normal((4096, 4096), dtype=np.float32) * 0.01).astype(dtype) for _ in range(n)]
        nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i}", f"w{i}"],
                                  [f"h{i + 1}" if i < n - 1 else "y"]) for i in range(n)]
        graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", proto, [1, 4096])],
                                  [helper.make_tensor_value_info("y", proto, [1, 4096])],
                                  [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)])
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "probe.onnx"
            onnx.save_model(helper.make_model(graph), str(path), save_as_external_data=True,
                            location="probe.onnx.data")
            for how in ("file", "replaced"):
                times = []
                for _ in range(3):
                    options = ort.SessionOptions()
                    kept = [ort.OrtValue.ortvalue_from_numpy(w) for w in weights] if how == "replaced" else []
                    for i, value in enumerate(kept):
                        options.add_initializer(f"w{i}", value)
                    start = time.perf_counter()
                    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                         disabled_optimizers=list(IGNORE_USER_INITIALIZERS) if kept else None)
                    times.append(time.perf_counter() - start)
                out[f"{dtype} {how}"] = {"gb": n * size / 1e9, "open_s": times,
                                         "s_per_gb": statistics.median(times) / (n * size / 1e9)}
        del weights
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kolors_trt.bench_lora", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--onnx", required=True, type=Path, help="export folder (ONNX Runtime)")
    p.add_argument("--lora", action="append", required=True, help="a LoRA file; all of them form the measured set")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--project", action="store_true", help="also project the swap to the real fp16 UNet")
    p.add_argument("--rank", type=int, default=32, help="LoRA rank of the projection (default 32)")
    p.add_argument("--probe-gb", type=float, default=1.0, help="size of the session-open probe graph (default 1)")
    p.add_argument("--json", type=Path, help="write the samples here")
    args = p.parse_args(argv)
    result = {"measured": swap_times(args.onnx, args.lora, args.runs)}
    for component, s in result["measured"].items():
        print(f"{component}: " + ", ".join(f"{k} median {statistics.median(v) * 1000:.3f} ms "
                                           f"(min {min(v) * 1000:.3f}, max {max(v) * 1000:.1f})" for k, v in s.items()))
    if args.project:
        fuse_p, rates = fuse_projection(args.rank), open_rate(args.probe_gb)
        replaced_gb = fuse_p["params"] * 2 / 1e9  # the fused fp16 weights, handed over
        from_file_gb = max(0.0, REAL_UNET_GRAPH_GB - replaced_gb)  # the rest, read from the graph's file
        open_s = rates["float16 replaced"]["s_per_gb"] * replaced_gb + rates["float16 file"]["s_per_gb"] * from_file_gb
        result["projection"] = {"fuse": fuse_p, "open_rates": rates, "unet_open_s": open_s,
                                "unet_cold_swap_s": fuse_p["fuse_s"] + open_s}
        print(f"projection (real fp16 UNet, rank {args.rank}, every attention/FF/proj linear): fuse "
              f"{fuse_p['fuse_s']:.1f} s over {fuse_p['modules']} linears ({fuse_p['params'] / 1e9:.2f} B weights); "
              f"session open {open_s:.1f} s ({replaced_gb:.1f} GB replaced at "
              f"{rates['float16 replaced']['s_per_gb']:.2f} s/GB, {from_file_gb:.1f} GB from the file at "
              f"{rates['float16 file']['s_per_gb']:.2f} s/GB); cold swap ~{fuse_p['fuse_s'] + open_s:.0f} s")
        for name, r in rates.items():
            print(f"  probe {name}: {r['s_per_gb']:.3f} s/GB on {r['gb']:.2f} GB")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
