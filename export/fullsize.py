"""Random weights at the real Kolors sizes, written without ever holding a model.

`write_fullsize(out)` writes the same two folders as `tiny.write_tiny`, with the
real configurations (KOLORS.md): ChatGLM3-6B (28 layers, hidden 4096, vocab 65024),
the Kolors UNet (70 transformer blocks, text_proj 4096 -> 2048), the SDXL VAE,
CLIP ViT-L/14-336 and the IP-Adapter-Plus resampler (hidden 2048, 12 heads of 64).
Weights are fp16 on disk, in the layouts Kolors-diffusers ships: fp16-variant
files, the text encoder sharded with an index json.

The models are built on the meta device (no storage), so only their configs and
the names and shapes of their tensors exist. Each tensor is then drawn, cast to
fp16 and streamed into its safetensors file one at a time: peak memory is the
largest tensor (the 65024 x 4096 embedding, 1 GB in fp32), not the 19 GB of
weights. Random weights at the real sizes cost what the real ones cost to export
and build, which is what `make fullsize-check` measures (see `check_fullsize`).
"""

from __future__ import annotations

import json
import logging
import math
import struct
from pathlib import Path

from .tiny import (
    IP_WEIGHT_NAME,
    KOLORS_SCHEDULER,
    MODEL_INDEX,
    TinyConfig,
    build_image_encoder,
    build_text_encoder,
    build_unet,
    build_vae,
    train_tokenizer,
)

logger = logging.getLogger(__name__)

# The real sizes (KOLORS.md). `attention_head_dim` [5, 10, 20] is diffusers' name for
# the head counts of the SDXL layout (head dim 64).
FULL = TinyConfig(
    seed=0,
    text_layers=28, text_hidden=4096, text_heads=32, text_kv_channels=128, text_groups=2, text_ffn=13696,
    vocab_pieces=600,  # the small trained tokenizer: its ids stay below the real vocab
    unet_channels=(320, 640, 1280), unet_layers=2, unet_transformer_layers=(1, 2, 10), unet_heads=(5, 10, 20),
    cross_attention_dim=2048, time_embed_dim=256,
    vae_channels=(128, 256, 512, 512), vae_layers=2,
    clip_hidden=1024, clip_layers=24, clip_heads=16, clip_ffn=4096, resampler_heads=12,
)
FULL_VOCAB = 65024
FULL_RESAMPLER_HIDDEN = 2048  # wider than the 12 x 64 attention (to_q rows 768)
SHARD_BYTES = 2 * 10**9  # the published ChatGLM3 text encoder comes in ~2 GB shards

_ST_DTYPE = {"float16": "F16", "float32": "F32"}


def draw(name: str, shape: tuple, gen, bias_std: float = 0.02):
    """One tensor by tiny._fill's rule: 1-D weights (norm scales) near one, other
    1-D tensors small normal, everything else normal / sqrt(fan_in)."""
    import torch

    x = torch.randn(shape, generator=gen)
    if len(shape) == 1 and name.endswith("weight"):
        return x.mul_(0.1).add_(1.0)
    if len(shape) == 1:
        return x.mul_(bias_std)
    return x.div_(math.sqrt(math.prod(shape[1:])))


def write_safetensors(path: Path, entries: list[tuple[str, tuple]], make, dtype: str = "float16") -> int:
    """Stream a safetensors file: the header (offsets follow from the shapes), then
    each tensor from `make(name, shape)` converted to `dtype`, one at a time.
    Returns the data bytes written."""
    import torch

    tdtype = getattr(torch, dtype)
    item = torch.tensor([], dtype=tdtype).element_size()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in entries:
        n = math.prod(shape) * item
        header[name] = {"dtype": _ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape in entries:
            t = make(name, shape).to(tdtype).contiguous()
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"fullsize: {name} was made with shape {tuple(t.shape)}, expected {shape}")
            f.write(t.numpy().tobytes() if dtype != "bfloat16" else t.view(torch.int16).numpy().tobytes())
    return offset


def write_weights(folder: Path, stem: str, entries: list, make, shard_bytes: int | None, dtype: str = "float16") -> list:
    """Write `entries` as `{stem}.fp16.safetensors`, or when their total is over
    `shard_bytes` as transformers' sharded fp16 variant: `{stem}.fp16-0000i-of-0000N.safetensors`
    plus `{stem}.safetensors.index.fp16.json`. Returns the files written."""
    item = 2 if dtype == "float16" else 4
    sizes = [math.prod(s) * item for _, s in entries]
    total = sum(sizes)
    if shard_bytes is None or total <= shard_bytes:
        path = folder / f"{stem}.fp16.safetensors"
        write_safetensors(path, entries, make, dtype)
        return [path]
    shards, current, size = [], [], 0
    for entry, n in zip(entries, sizes):
        if current and size + n > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += n
    shards.append(current)
    files, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        path = folder / f"{stem}.fp16-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(path, shard, make, dtype)
        weight_map.update({name: path.name for name, _ in shard})
        files.append(path)
        logger.info("wrote %s", path)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.fp16.json").write_text(json.dumps(index, indent=2))
    return files


def _maker(seed: int, special: dict | None = None, bias_std: float = 0.02):
    """make(name, shape): a per-tensor generator seeded from (seed, position), so the
    weights do not depend on how tensors are grouped into shards."""
    import torch

    counter = {"i": 0}

    def make(name, shape):
        counter["i"] += 1
        if special and name in special:
            return special[name]()
        return draw(name, shape, torch.Generator().manual_seed(seed * 1_000_003 + counter["i"]), bias_std)

    return make


def build_resampler(cfg: TinyConfig, hidden: int):
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    return IPAdapterPlusImageProjection(
        embed_dims=cfg.clip_hidden, output_dims=cfg.cross_attention_dim, hidden_dims=hidden,
        depth=cfg.resampler_depth, dim_head=64, heads=cfg.resampler_heads, num_queries=16, ffn_ratio=4,
    )


def write_streaming(out: Path, cfg: TinyConfig = FULL, vocab: int = FULL_VOCAB,
                    resampler_hidden: int = FULL_RESAMPLER_HIDDEN, shard_bytes: int = SHARD_BYTES,
                    unet_sample_size: int = 128, vae_sample_size: int = 1024) -> tuple[Path, Path]:
    """Write a Kolors-diffusers root and an IP-Adapter-Plus root for `cfg`, fp16,
    streaming every tensor; returns (kolors_root, ip_root)."""
    import torch
    from tqdm import tqdm
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor

    from . import ip_weights
    from .exporter import quiet_libraries

    quiet_libraries()
    out = Path(out)
    kolors, ip = out / "kolors", out / "ip"
    kolors.mkdir(parents=True, exist_ok=True)
    (kolors / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    train_tokenizer(kolors / "tokenizer", cfg.vocab_pieces)
    (kolors / "scheduler").mkdir(exist_ok=True)
    (kolors / "scheduler" / "scheduler_config.json").write_text(json.dumps(KOLORS_SCHEDULER, indent=2))

    gen = torch.Generator().manual_seed(cfg.seed)  # the builders' own init draws nothing on meta
    with torch.device("meta"):
        text_encoder = build_text_encoder(cfg, vocab, gen)
        unet = build_unet(cfg, cfg.text_hidden)
        vae = build_vae(cfg)
        clip = build_image_encoder(cfg)
        resampler = build_resampler(cfg, resampler_hidden)
    unet.register_to_config(sample_size=unet_sample_size)
    vae.register_to_config(sample_size=vae_sample_size)

    rope = text_encoder.rotary_pos_emb
    special = {"rotary_pos_emb.inv_freq": lambda: 1.0 / (10000 ** (torch.arange(0, rope.dim, 2).float() / rope.dim))}
    jobs = [
        ("text_encoder", kolors / "text_encoder", text_encoder, "model", shard_bytes, special),
        ("unet", kolors / "unet", unet, "diffusion_pytorch_model", None, None),
        ("vae", kolors / "vae", vae, "diffusion_pytorch_model", None, None),
        ("image_encoder", ip / "image_encoder", clip, "model", None, None),
    ]
    for n, (what, folder, model, stem, shards, extra) in enumerate(tqdm(jobs, desc="fullsize", unit="model")):
        folder.mkdir(parents=True, exist_ok=True)
        entries = [(name, tuple(t.shape)) for name, t in model.state_dict().items()]
        if what == "image_encoder":  # transformers' CLIP folder has no variant files in Kolors-IP-Adapter-Plus
            write_safetensors(folder / "model.safetensors", entries, _maker(cfg.seed + n, extra))
        else:
            write_weights(folder, stem, entries, _maker(cfg.seed + n, extra), shards)
        if hasattr(model, "save_config"):
            model.save_config(folder)
        else:
            model.config.dtype = "float16"
            model.config.save_pretrained(folder)
        logger.info("wrote %s (%.2f B parameters)", folder, sum(math.prod(s) for _, s in entries) / 1e9)
    CLIPImageProcessor(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_center_crop=True, resample=3,
    ).save_pretrained(ip / "image_encoder")

    make = _maker(cfg.seed + 10, bias_std=0.05)
    state = {name: make(name, tuple(t.shape)).half() for name, t in resampler.state_dict().items()}
    make = _maker(cfg.seed + 11)
    kv = [(make("to_k_ip.weight", (hidden, cfg.cross_attention_dim)).half(),
           make("to_v_ip.weight", (hidden, cfg.cross_attention_dim)).half())
          for _, hidden in ip_weights.cross_attention_layers(unet)]
    torch.save(ip_weights.to_original_format(state, kv), ip / IP_WEIGHT_NAME)
    logger.info("wrote full-size checkpoint to %s", out)
    return kolors, ip


# ---- `make fullsize-check`: export, validate and build each component in its own process ----

# Validation dims: small enough for fp16 torch and ONNX Runtime on a CPU, not the trace's
# (export_dims: latents 8x8), non-square, CFG batch for the UNet.
CHECK_VALUES = {"batch": 1, "unet_batch": 2, "latent_height": 16, "latent_width": 24}


def model_dims(paths):
    """ModelDims from the configs alone (no weights are read but the resampler's
    latents, through an mmap)."""
    import torch

    from kolors_trt.runtime import spec as S

    from . import checkpoint as ck

    te, clip = ck.read_config(paths.text_encoder), ck.read_config(paths.image_encoder)
    unet, vae = ck.read_config(paths.unet), ck.read_config(paths.vae)
    state = torch.load(str(paths.ip_weights), map_location="cpu", mmap=True, weights_only=True) \
        if paths.ip_weights.suffix == ".bin" else None
    ip_tokens = state["image_proj"]["latents"].shape[1] if state else 16
    return S.ModelDims(
        text_hidden=te["hidden_size"], image_size=clip["image_size"], ip_tokens=int(ip_tokens),
        cross_attention_dim=unet["cross_attention_dim"], latent_channels=unet["in_channels"],
        vae_scale=2 ** (len(vae["block_out_channels"]) - 1), latent_multiple=2 ** (len(unet["block_out_channels"]) - 1),
    )


def load_graph(paths, name: str, dtype: str):
    """One component's graph wrapper, loaded alone at `dtype` (no fp32 copy)."""
    import torch
    from diffusers import UNet2DConditionModel

    from . import checkpoint as ck
    from .components import ImageEncoderGraph, TextEncoderGraph, UNetGraph, VaeDecoderGraph

    if name == "text_encoder":
        return TextEncoderGraph(ck.load_text_encoder(paths, dtype)).eval()
    if name == "vae_decoder":
        return VaeDecoderGraph(ck.load_vae(paths, dtype)).eval()
    if name == "unet":
        unet = ck.load_unet(paths, dtype)
        return UNetGraph(unet, ck.load_ip_adapter(paths, unet)[1]).eval()
    with torch.device("meta"):  # only its cross-attention count is needed to read the IP weights
        unet = UNet2DConditionModel.from_config(ck.read_config(paths.unet))
    resampler = ck.load_ip_adapter(paths, unet)[0].to(getattr(torch, dtype))
    return ImageEncoderGraph(ck.load_image_encoder(paths, dtype), resampler).eval()


def run_ort_lean(path: Path, feeds: dict) -> dict:
    """ONNX Runtime on the CPU with as few copies of the weights as it allows.

    ONNX Runtime reads external data into its own memory: instead every external
    initializer is handed over as an OrtValue on a copy-on-write memmap of the
    page-aligned data file (add_external_initializers, no copy). No arena, no
    prepacking, no graph optimisation. What remains is the CPU provider's lack of
    fp16 kernels for most ops: its InsertCastTransformer stores fp32 copies of the
    fp16 weights at session creation, whatever the optimisation level, so an fp16
    graph costs about twice its weights in anonymous memory (UNet: 12 GB for 5.8).
    """
    import numpy as np
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.enable_cpu_mem_arena = False
    opts.enable_mem_pattern = False
    opts.add_session_config_entry("session.disable_prepacking", "1")
    model = onnx.load(str(path), load_external_data=False)
    names, values, keep = [], [], []
    for init in model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in init.external_data}
        array = np.memmap(Path(path).parent / info["location"], mode="c", offset=int(info.get("offset", 0)),
                          dtype=onnx.helper.tensor_dtype_to_np_dtype(init.data_type), shape=tuple(init.dims))
        keep.append(array)
        names.append(init.name)
        values.append(ort.OrtValue.ortvalue_from_numpy(array))
    if names:
        opts.add_external_initializers(names, values)
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    out_names = [o.name for o in session.get_outputs()]
    return dict(zip(out_names, session.run(out_names, feeds)))


def export_component(weights: Path, ip_adapter: Path, out: Path, name: str) -> dict:
    """Export one component at its default precision, then validate it on ONNX
    Runtime in a child process against the same torch module (fp16 graph vs fp16
    module: an fp32 reference of the 6 B text encoder would need 25 GB). The
    reference outputs are computed here and saved; the module dies with this
    process before ONNX Runtime loads the graph, so the two never share memory."""
    import resource
    import time

    import numpy as np
    import torch

    from kolors_trt.runtime import spec as S

    from . import checkpoint as ck
    from .exporter import export_dims, quiet_libraries
    from .onnx_export import export_onnx, sample_inputs

    quiet_libraries()
    paths = ck.resolve(weights, ip_adapter)
    dims = model_dims(paths)
    spec, precision = S.engine_specs(dims)[name], S.DEFAULT_PRECISION[name]
    t0 = time.perf_counter()
    graph = load_graph(paths, name, "float16" if precision == "fp16" else "float32")
    load_s = time.perf_counter() - t0
    feeds = sample_inputs(spec, CHECK_VALUES, seed=1)
    t0 = time.perf_counter()
    with torch.no_grad():
        ref = graph(*(torch.from_numpy(feeds[n]) for n in spec.input_names))
    ref = {n: o.numpy() for n, o in zip(spec.output_names, ref if isinstance(ref, tuple) else (ref,))}
    ref_s = time.perf_counter() - t0
    file = Path(out) / f"{name}.onnx"
    t0 = time.perf_counter()
    export_onnx(graph, spec, export_dims(dims), file)
    export_s = time.perf_counter() - t0
    ref_file = Path(out) / f"{name}.reference.npz"
    np.savez(ref_file, **{f"feed.{k}": v for k, v in feeds.items()}, **{f"ref.{k}": v for k, v in ref.items()})
    data = file.with_name(file.name + ".data")
    result = {
        "component": name, "precision": precision, "load_s": round(load_s, 1), "torch_ref_s": round(ref_s, 1),
        "export_s": round(export_s, 1),
        "export_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "onnx_bytes": file.stat().st_size, "external_data": data.name if data.exists() else None,
        "external_data_bytes": data.stat().st_size if data.exists() else 0,
        "validation_dims": CHECK_VALUES, "reference": f"{precision} torch module",
    }
    (Path(out) / f"{name}.export.json").write_text(json.dumps(result))  # kept if validation fails
    del graph
    v = _child(["validate", str(weights), str(ip_adapter), str(out), name], Path(out) / f"{name}.validate.json", None)
    if v.get("stopped_at_rss_cap"):  # measured how far it got; check() validates a slice instead
        result.update(validate_stopped_at_rss_cap=True, validate_peak_rss_mb=v["peak_rss_mb"],
                      validate_peak_anon_rss_mb=v["peak_anon_rss_mb"], validate_s=v["wall_s"])
        return result
    if v.get("exit") != 0 or "rel_err" not in v:
        why = f"stopped above {RSS_CAP_MB} MB" if v.get("stopped_at_rss_cap") else f"exit {v.get('exit')}"
        raise RuntimeError(f"fullsize: validating {file} failed ({why}, peak RSS {v.get('peak_rss_mb')} MB); "
                           "see the log above")
    result.update(validate_s=v["validate_s"], validate_peak_rss_mb=v["peak_rss_mb"],
                  validate_peak_anon_rss_mb=v["peak_anon_rss_mb"], max_abs_err=v["max_abs_err"],
                  rel_err=v["rel_err"])
    ref_file.unlink()
    return result


def validate_component(weights: Path, ip_adapter: Path, out: Path, name: str) -> dict:
    """ONNX Runtime on `out/name.onnx` against the saved reference outputs."""
    import time

    import numpy as np
    import onnx

    from kolors_trt.runtime import spec as S

    from . import checkpoint as ck
    from .validate import check_signature, compare

    spec = S.engine_specs(model_dims(ck.resolve(weights, ip_adapter)))[name]
    file = Path(out) / f"{name}.onnx"
    saved = np.load(Path(out) / f"{name}.reference.npz")
    feeds = {k[5:]: saved[k] for k in saved.files if k.startswith("feed.")}
    ref = {k[4:]: saved[k] for k in saved.files if k.startswith("ref.")}
    t0 = time.perf_counter()
    check_signature(spec, onnx.load(str(file), load_external_data=False))
    got = run_ort_lean(file, feeds)
    abs_err, rel_err = compare(spec, S.DEFAULT_PRECISION[name], ref, got, CHECK_VALUES)
    return {"validate_s": round(time.perf_counter() - t0, 1), "max_abs_err": abs_err, "rel_err": rel_err}


def validate_text_encoder_slice(weights: Path, ip_adapter: Path, out: Path, layers: int = 2) -> dict:
    """The fp16 text encoder cut to its first `layers` layers, at the real widths,
    through the same streaming export and lean ONNX Runtime as the full graph.

    The full graph cannot be checked on ONNX Runtime's CPU provider in 24 GB: it has
    no fp16 kernels for most ops and turns the 12 GB of fp16 weights into fp32
    initializers (InsertCastTransformer), ~25 GB before the first run."""
    import time

    import torch
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, ChatGLMModel

    from kolors_trt.runtime import spec as S

    from . import checkpoint as ck
    from .components import TextEncoderGraph
    from .exporter import export_dims, quiet_libraries
    from .onnx_export import export_onnx, sample_inputs
    from .validate import compare

    quiet_libraries()
    paths = ck.resolve(weights, ip_adapter)
    dims = model_dims(paths)
    config = ChatGLMConfig.from_pretrained(paths.text_encoder)
    config.num_layers = layers
    model = ChatGLMModel.from_pretrained(paths.text_encoder, config=config, torch_dtype=torch.float16,
                                         variant=ck._variant(paths.text_encoder)).eval()
    graph, spec = TextEncoderGraph(model).eval(), S.engine_specs(dims)["text_encoder"]
    feeds = sample_inputs(spec, CHECK_VALUES, seed=1)
    with torch.no_grad():
        ref = dict(zip(spec.output_names, (o.numpy() for o in graph(*(torch.from_numpy(feeds[n])
                                                                       for n in spec.input_names)))))
    file = Path(out) / "slice" / "text_encoder.onnx"
    t0 = time.perf_counter()
    export_onnx(graph, spec, export_dims(dims), file, streaming=True)
    got = run_ort_lean(file, feeds)
    abs_err, rel_err = compare(spec, "fp16", ref, got, CHECK_VALUES)
    return {"slice_layers": layers, "slice_max_abs_err": abs_err, "slice_rel_err": rel_err,
            "slice_s": round(time.perf_counter() - t0, 1)}


def build_component(onnx_dir: Path, engines: Path, name: str) -> dict:
    """TensorRT-RTX AOT build (CPU) of one component with the default profile."""
    from kolors_trt.engines.builder import build_engines

    (r,) = build_engines(onnx_dir, engines, target="tensorrt-rtx", components=[name], force=True)
    return {"build_s": r.build_seconds, "engine_bytes": r.plan_bytes}


def write_export_manifest(weights: Path, ip_adapter: Path, out: Path, results: list) -> None:
    """The export folder's manifest (what `kolors-trt build` reads) and its assets,
    without loading any model: Components would hold all four in fp32."""
    from dataclasses import asdict

    from . import checkpoint as ck
    from .exporter import MANIFEST_FORMAT, MANIFEST_VERSION, _copy_assets
    from .onnx_export import OPSET

    paths = ck.resolve(weights, ip_adapter)
    _copy_assets(paths, out)
    comps = {r["component"]: {
        "file": f"{r['component']}.onnx", "external_data": r["external_data"], "precision": r["precision"],
        "bytes": r["onnx_bytes"] + r["external_data_bytes"], "opset": OPSET,
        "validation": {"max_abs_err": r.get("max_abs_err"), "rel_err": r.get("rel_err"), "dims": r["validation_dims"],
                       "reference": r["reference"]},
    } for r in results if "onnx_bytes" in r}
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "source": {"weights": str(weights)},
                "model_dims": asdict(model_dims(paths)), "components": comps}
    (Path(out) / "manifest.json").write_text(json.dumps(manifest, indent=2))


# The machine is shared: stop a step before its own memory crowds out the others.
# Anonymous memory only: pages of an mmapped weights file count in RSS but the
# kernel can drop them.
RSS_CAP_MB = 17_000


def _memory_mb(pid: int) -> tuple[float, float]:
    """(VmHWM, RssAnon) of a live process in MB: its own peak RSS so far (wait4's
    ru_maxrss also counts the parent's peak at the spawn) and its anonymous memory."""
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "RssAnon"):
                    fields[key] = int(rest.split()[0]) / 1024
    except OSError:
        pass
    return fields.get("VmHWM", 0.0), fields.get("RssAnon", 0.0)


def _child(argv: list, result: Path, timeout: float | None, rss_cap_mb: float = RSS_CAP_MB) -> dict:
    """Run `python -m kolors_trt.export.fullsize <argv>` at nice 19, stopped past
    `timeout` seconds or `rss_cap_mb`; its own peak RSS comes from wait4 (per
    child, unlike RUSAGE_CHILDREN's running maximum)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    result.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(["nice", "-n", "19", sys.executable, "-m", "kolors_trt.export.fullsize", *argv, "--result", str(result)])
    deadline = None if timeout is None else t0 + timeout
    timed_out = over_cap = False
    peak_anon = peak_rss = 0.0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if deadline and time.perf_counter() > deadline and not timed_out:
            proc.send_signal(signal.SIGKILL)
            timed_out = True
        hwm, anon = _memory_mb(proc.pid)
        peak_anon, peak_rss = max(peak_anon, anon), max(peak_rss, hwm)
        if anon > rss_cap_mb and not over_cap:
            proc.send_signal(signal.SIGKILL)
            over_cap = True
        time.sleep(0.5)
    out = json.loads(result.read_text()) if result.is_file() else {}
    out.update(wall_s=round(time.perf_counter() - t0, 1), peak_rss_mb=round(peak_rss or usage.ru_maxrss / 1024),
               exit=os.waitstatus_to_exitcode(status), timed_out=timed_out,
               stopped_at_rss_cap=over_cap, peak_anon_rss_mb=round(peak_anon))
    return out


def check(root: Path, components: tuple, build_timeout: float | None, skip_build: tuple = (),
          build_only: bool = False) -> dict:
    """Write (once) the full-size checkpoint under root/ckpt, then per component in
    its own process: export + validate into root/onnx, build into root/engines.
    Writes root/fullsize-check.{json,md} after every step."""
    root = Path(root)
    kolors, ip, onnx_dir = root / "ckpt" / "kolors", root / "ckpt" / "ip", root / "onnx"
    onnx_dir.mkdir(parents=True, exist_ok=True)
    rows = json.loads((root / "fullsize-check.json").read_text()) if (root / "fullsize-check.json").is_file() else {}
    if not (ip / IP_WEIGHT_NAME).is_file():
        rows["checkpoint"] = _child(["write", str(root / "ckpt")], root / "write.json", None)
    for name in components:
        row = rows.get(name, {}) if build_only else {}
        if "onnx_bytes" not in row:
            row = {"component": name}
            exp = _child(["export", str(kolors), str(ip), str(onnx_dir), name], root / f"{name}.export.json", None)
            row.update({k: v for k, v in exp.items() if k not in ("wall_s", "exit", "timed_out", "peak_rss_mb",
                                                                   "peak_anon_rss_mb", "stopped_at_rss_cap")},
                       export_wall_s=exp["wall_s"], export_exit=exp["exit"],
                       export_peak_anon_rss_mb=exp.get("peak_anon_rss_mb"))
            rows[name] = row
            _report(root, rows)
            if exp["exit"] != 0:
                continue
            if name == "text_encoder" and "rel_err" not in row:
                sl = _child(["validate-slice", str(kolors), str(ip), str(onnx_dir)], root / "slice.json", None)
                row.update({k: v for k, v in sl.items() if k.startswith("slice_")}, slice_peak_rss_mb=sl["peak_rss_mb"])
                _report(root, rows)
        write_export_manifest(kolors, ip, onnx_dir, [r for r in rows.values() if "onnx_bytes" in r])
        if name in skip_build:
            continue
        b = _child(["build", str(onnx_dir), str(root / "engines"), name], root / f"{name}.build.json", build_timeout)
        row.update({k: v for k, v in b.items() if k in ("build_s", "engine_bytes")}, build_wall_s=b["wall_s"],
                   build_peak_rss_mb=b["peak_rss_mb"], build_peak_anon_rss_mb=b["peak_anon_rss_mb"],
                   build_exit=b["exit"], build_timed_out=b["timed_out"], build_stopped_at_rss_cap=b["stopped_at_rss_cap"])
        _report(root, rows)
    return rows


def _report(root: Path, rows: dict) -> None:
    from kolors_trt.runtime.table import markdown_table

    (root / "fullsize-check.json").write_text(json.dumps(rows, indent=2))

    def build_cell(r):
        if "build_s" in r:
            return round(r["build_s"])
        if r.get("build_stopped_at_rss_cap"):
            return f"stopped at {RSS_CAP_MB} MB after {r['build_wall_s']:.0f} s"
        if r.get("build_timed_out"):
            return f"> {r['build_wall_s']:.0f} (stopped)"
        return "failed" if "build_exit" in r else "-"

    table = []
    for name, r in rows.items():
        if name == "checkpoint":
            continue
        gb = (r.get("onnx_bytes", 0) + r.get("external_data_bytes", 0)) / 1e9
        peaks = (f"{r.get('export_peak_rss_mb', '-')} ({r.get('export_peak_anon_rss_mb', '?')}) / "
                 f"{r.get('validate_peak_rss_mb', '-')} ({r.get('validate_peak_anon_rss_mb', '?')})")
        build_peak = f"{r['build_peak_rss_mb']} ({r.get('build_peak_anon_rss_mb', '?')})" if "build_peak_rss_mb" in r else "-"
        err = f"{r['max_abs_err']:.3g} / {r['rel_err']:.3g}" if r.get("rel_err") is not None else "-"
        if r.get("validate_stopped_at_rss_cap"):
            peaks = (f"{r.get('export_peak_rss_mb', '-')} ({r.get('export_peak_anon_rss_mb', '?')}) / "
                     f"stopped at {RSS_CAP_MB} anon")
            if "slice_rel_err" in r:
                err = (f"{r['slice_max_abs_err']:.3g} / {r['slice_rel_err']:.3g} (first {r['slice_layers']} "
                       "layers; full graph: see notes)")
        shape = {"text_encoder": "batch 1 x 256 tokens", "image_encoder": "batch 1 x 336 px",
                 "unet": "batch 2 (CFG) x 16x24 latent", "vae_decoder": "batch 1 x 16x24 latent"}.get(name, "")
        table.append([name, r.get("precision", "?"), r.get("export_s", "failed"), peaks, round(gb, 2),
                      build_cell(r), build_peak, round(r["engine_bytes"] / 1e9, 2) if "engine_bytes" in r else "-",
                      err, shape])
    head = ["component", "precision", "export s", "peak RSS MB (anon) export / validate", "ONNX GB", "build s",
            "build peak RSS MB (anon)", "engine GB", "max abs / rel err vs torch", "validation shape"]
    (root / "fullsize-check.md").write_text(markdown_table(head, table) + "\n")


def main(argv: list | None = None) -> int:
    import argparse

    from kolors_trt.runtime.spec import COMPONENTS

    p = argparse.ArgumentParser(prog="python -m kolors_trt.export.fullsize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)
    c = sub.add_parser("check", help="write, export, validate and build everything at full size; measure")
    c.add_argument("--out", required=True, help="work folder (~60 GB free: checkpoint, graphs, engines)")
    c.add_argument("--components", nargs="+", choices=COMPONENTS,
                   default=["vae_decoder", "image_encoder", "unet", "text_encoder"])
    c.add_argument("--build-timeout", type=float, default=None, help="stop a build after this many seconds")
    c.add_argument("--skip-build", nargs="*", default=[], choices=COMPONENTS)
    c.add_argument("--build-only", action="store_true", help="reuse the graphs a previous check exported")
    for step, args in (("write", ["out"]), ("export", ["weights", "ip_adapter", "out", "name"]),
                       ("validate", ["weights", "ip_adapter", "out", "name"]),
                       ("validate-slice", ["weights", "ip_adapter", "out"]),
                       ("build", ["onnx", "engines", "name"])):
        s = sub.add_parser(step)
        for a in args:
            s.add_argument(a)
        s.add_argument("--result", required=True)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger(__name__).setLevel(logging.INFO)
    if a.step == "check":
        check(Path(a.out), tuple(a.components), a.build_timeout, tuple(a.skip_build), a.build_only)
        print((Path(a.out) / "fullsize-check.md").read_text())
        return 0
    if a.step == "write":
        write_streaming(Path(a.out))
        result = {}
    elif a.step == "export":
        result = export_component(Path(a.weights), Path(a.ip_adapter), Path(a.out), a.name)
    elif a.step == "validate-slice":
        result = validate_text_encoder_slice(Path(a.weights), Path(a.ip_adapter), Path(a.out))
    elif a.step == "validate":
        result = validate_component(Path(a.weights), Path(a.ip_adapter), Path(a.out), a.name)
    else:
        result = build_component(Path(a.onnx), Path(a.engines), a.name)
    Path(a.result).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
