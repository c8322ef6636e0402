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
and build, which is what `make fullsize-check` measures (export/fullsize_check.py).
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
