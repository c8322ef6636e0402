"""Deterministic random-weight checkpoints of the real Kolors architectures.

`write_tiny(out)` writes two folders in the real on-disk layouts:

    out/kolors  a Kolors-diffusers root: model_index.json, text_encoder/ (ChatGLM,
                grouped-query attention, RoPE), tokenizer/ (sentencepiece model
                trained here), unet/ (Kolors block layout, text_proj, text_time),
                vae/ (SDXL layout), scheduler/ (Kolors Euler config)
    out/ip      a Kolors-IP-Adapter-Plus root: image_encoder/ (CLIP vision at 336 px,
                patch 14) and ip_adapter_plus_general.bin in the original key format

The widths and depths are small; the layouts, the classes and every code path are
the real ones. This is the embedded default of every make target and the test
fixture. Two presets (`TINY`, `TINY_ALT`) differ in every size so that nothing
downstream can hard-code one of them.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

logger = logging.getLogger(__name__)

KOLORS_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.014,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1100,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

MODEL_INDEX = {
    "_class_name": "KolorsPipeline",
    "_diffusers_version": "0.30.0",
    "force_zeros_for_empty_prompt": False,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["kolors", "ChatGLMModel"],
    "tokenizer": ["kolors", "ChatGLMTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

IP_WEIGHT_NAME = "ip_adapter_plus_general.bin"


@dataclass(frozen=True)
class TinyConfig:
    seed: int
    # ChatGLM
    text_layers: int
    text_hidden: int
    text_heads: int
    text_kv_channels: int
    text_groups: int
    text_ffn: int
    vocab_pieces: int  # sentencepiece pieces; the model adds 9 special tokens
    # UNet
    unet_channels: tuple
    unet_layers: int
    unet_transformer_layers: tuple
    unet_heads: tuple
    cross_attention_dim: int
    time_embed_dim: int
    # VAE
    vae_channels: tuple
    vae_layers: int
    # CLIP vision and resampler
    clip_hidden: int
    clip_layers: int
    clip_heads: int
    clip_ffn: int
    resampler_heads: int  # head dim is 64: diffusers' loader infers heads = to_q rows / 64
    resampler_depth: int = 4  # diffusers' loader assumes 4


TINY = TinyConfig(
    seed=0,
    text_layers=2, text_hidden=64, text_heads=4, text_kv_channels=16, text_groups=2, text_ffn=96,
    vocab_pieces=600,
    unet_channels=(32, 64, 64), unet_layers=1, unet_transformer_layers=(1, 1, 2), unet_heads=(1, 2, 2),
    cross_attention_dim=64, time_embed_dim=8,
    vae_channels=(32, 32, 64, 64), vae_layers=1,
    clip_hidden=32, clip_layers=3, clip_heads=2, clip_ffn=64, resampler_heads=1,
)

# Every size differs from TINY (and the UNet uses two layers per block, like Kolors).
TINY_ALT = TinyConfig(
    seed=1,
    text_layers=3, text_hidden=96, text_heads=6, text_kv_channels=16, text_groups=3, text_ffn=160,
    vocab_pieces=700,
    unet_channels=(32, 32, 64), unet_layers=2, unet_transformer_layers=(1, 2, 1), unet_heads=(2, 1, 4),
    cross_attention_dim=96, time_embed_dim=16,
    vae_channels=(32, 64, 64, 64), vae_layers=2,
    clip_hidden=48, clip_layers=2, clip_heads=3, clip_ffn=96, resampler_heads=2,
)

# A UNet of the real widths (320/640/1280 channels, 5/10/20 heads, cross-attention 2048, 256-wide
# time ids) with one layer and one transformer block per level: 435 M parameters (the real one
# has 2.58 B). The other components stay tiny. For measuring what scales with the UNet (8-bit
# calibration time and memory, README "INT8 and FP8 UNets"); not used by the tests.
MID = replace(TINY, seed=2, unet_channels=(320, 640, 1280), unet_layers=1, unet_transformer_layers=(1, 1, 1),
              unet_heads=(5, 10, 20), cross_attention_dim=2048, time_embed_dim=256)

PRESETS = {"default": TINY, "alt": TINY_ALT, "mid": MID}

# A small bilingual corpus for the tokenizer: words are combined deterministically
# into sentences so that the model learns multi-character pieces in both scripts.
_EN = (
    "a cute dog is running on the grass a girl looking towards distant mountains snowy background "
    "japanese ukiyo-e style blue and red pastel color palette high resolution beautiful lady cat "
    "among flowers looking at the camera standing in front of the jungle wearing a sun hat quality "
    "detail anime scenery fresh bright light shadow best ultra black t-shirt green letters portrait "
    "city night river boat tree house sky cloud sun moon star painting photo realistic cinematic"
).split()
_ZH = (
    "一只 可爱 的 小狗 在 奔跑 穿着 黑色 T恤衫 上面 中文 绿色 大字 写着 可图 一个 看向 远山 少女 形象 "
    "雪山 背景 采用 日本 浮世绘 风格 混合 蓝色 和 红色 柔和 调色板 高分辨率 漂亮 美女 远方 猫咪 花丛 "
    "镜头 站在 丛林 前 戴着 太阳帽 高画质 高细节 高清 疯狂 细节 超高清 头像 新海诚 动漫 丰富 色彩 "
    "唯美 风景 清新 明亮 斑驳 光影 最好 质量 超 8K 城市 夜晚 河流 小船 树 房子 天空 云 太阳 月亮 星星"
).split()


def tokenizer_corpus(lines: int = 3000) -> list[str]:
    out = []
    for i in range(lines):
        words = _EN if i % 2 else _ZH
        n = 4 + (i * 7) % 9
        sent = [words[(i * 31 + k * 17) % len(words)] for k in range(n)]
        out.append((" " if i % 2 else "").join(sent) + ("。" if not i % 2 else "."))
    return out


def train_tokenizer(folder: Path, vocab_pieces: int = 600) -> Path:
    """Train a ChatGLM-style sentencepiece model (unk 0, bos 1, eos 2, byte
    fallback) and write it with the diffusers tokenizer config into `folder`."""
    import sentencepiece as spm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "_corpus.txt"
    corpus.write_text("\n".join(tokenizer_corpus()), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=vocab_pieces,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        num_threads=1,
        minloglevel=2,
    )
    corpus.unlink()
    (folder / "tokenizer.vocab").unlink(missing_ok=True)
    config = {"tokenizer_class": "ChatGLMTokenizer", "padding_side": "left", "remove_space": False,
              "do_lower_case": False, "model_max_length": 1000000000000000019884624838656}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder / "tokenizer.model"


def _fill(module, gen, std: float = 0.02) -> None:
    """Initialise every parameter from `gen`: norms near one, everything else
    small normal. diffusers' ChatGLM leaves RMSNorm weights as torch.empty and its
    _init_weights does nothing, so no parameter may keep its constructor value."""
    import torch

    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):  # every 1-D weight is a norm scale
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:
                p.copy_(std * torch.randn(p.shape, generator=gen))
            else:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))


def build_text_encoder(cfg: TinyConfig, vocab_size: int, gen):
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, ChatGLMModel

    config = ChatGLMConfig(
        num_layers=cfg.text_layers, padded_vocab_size=vocab_size, hidden_size=cfg.text_hidden,
        ffn_hidden_size=cfg.text_ffn, kv_channels=cfg.text_kv_channels, num_attention_heads=cfg.text_heads,
        seq_length=512, layernorm_epsilon=1e-5, rmsnorm=True, post_layer_norm=True, add_bias_linear=False,
        add_qkv_bias=True, multi_query_attention=True, multi_query_group_num=cfg.text_groups,
        apply_query_key_layer_scaling=True, attention_softmax_in_fp32=True, original_rope=True,
        torch_dtype="float32", pad_token_id=0, eos_token_id=2,
    )
    config.architectures = ["ChatGLMModel"]
    model = ChatGLMModel(config, empty_init=False)
    _fill(model, gen)
    return model.eval()


def build_unet(cfg: TinyConfig, text_hidden: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=cfg.unet_channels, layers_per_block=cfg.unet_layers,
        transformer_layers_per_block=cfg.unet_transformer_layers, attention_head_dim=cfg.unet_heads,
        cross_attention_dim=cfg.cross_attention_dim, encoder_hid_dim=text_hidden, encoder_hid_dim_type="text_proj",
        addition_embed_type="text_time", addition_time_embed_dim=cfg.time_embed_dim,
        projection_class_embeddings_input_dim=text_hidden + 6 * cfg.time_embed_dim,
        use_linear_projection=True, norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
    ).eval()


def build_vae(cfg: TinyConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels, layers_per_block=cfg.vae_layers, norm_num_groups=32,
        sample_size=64, scaling_factor=0.13025, force_upcast=True,
    ).eval()


def build_image_encoder(cfg: TinyConfig):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=cfg.clip_hidden, intermediate_size=cfg.clip_ffn, num_hidden_layers=cfg.clip_layers,
        num_attention_heads=cfg.clip_heads, image_size=336, patch_size=14, projection_dim=cfg.clip_hidden,
        hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )
    return CLIPVisionModelWithProjection(config).eval()


def build_resampler(cfg: TinyConfig, gen):
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    model = IPAdapterPlusImageProjection(
        embed_dims=cfg.clip_hidden, output_dims=cfg.cross_attention_dim, hidden_dims=64 * cfg.resampler_heads,
        depth=cfg.resampler_depth, dim_head=64, heads=cfg.resampler_heads, num_queries=16, ffn_ratio=4,
    )
    _fill(model, gen, std=0.05)
    return model.eval()


def write_tiny(out: Path, preset: str = "default") -> tuple[Path, Path]:
    """Write the tiny checkpoint; returns (kolors_root, ip_root)."""
    import torch
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor

    from . import ip_weights
    from .exporter import quiet_libraries

    quiet_libraries()

    if preset not in PRESETS:
        raise ValueError(f"tiny: unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[preset]
    out = Path(out)
    kolors, ip = out / "kolors", out / "ip"
    torch.manual_seed(cfg.seed)  # diffusers/transformers constructors draw from the global generator
    gen = torch.Generator().manual_seed(cfg.seed)

    kolors.mkdir(parents=True, exist_ok=True)
    (kolors / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    sp_model = train_tokenizer(kolors / "tokenizer", cfg.vocab_pieces)
    import sentencepiece as spm

    n_words = spm.SentencePieceProcessor(model_file=str(sp_model)).vocab_size() + 9  # + ChatGLM specials
    vocab = 64 * math.ceil(n_words / 64)

    text_encoder = build_text_encoder(cfg, vocab, gen)
    text_encoder.save_pretrained(kolors / "text_encoder", safe_serialization=True)

    unet = build_unet(cfg, cfg.text_hidden)
    _fill(unet, gen)
    unet.save_pretrained(kolors / "unet", safe_serialization=True)

    vae = build_vae(cfg)
    _fill(vae, gen)
    vae.save_pretrained(kolors / "vae", safe_serialization=True)

    (kolors / "scheduler").mkdir(exist_ok=True)
    (kolors / "scheduler" / "scheduler_config.json").write_text(json.dumps(KOLORS_SCHEDULER, indent=2))

    ip.mkdir(parents=True, exist_ok=True)
    image_encoder = build_image_encoder(cfg)
    _fill(image_encoder, gen)
    image_encoder.save_pretrained(ip / "image_encoder", safe_serialization=True)
    CLIPImageProcessor(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_center_crop=True, resample=3,
    ).save_pretrained(ip / "image_encoder")

    resampler = build_resampler(cfg, gen)
    cross_layers = ip_weights.cross_attention_layers(unet)
    kv = []
    for _, hidden in cross_layers:
        k = torch.randn(hidden, cfg.cross_attention_dim, generator=gen) / math.sqrt(cfg.cross_attention_dim)
        v = torch.randn(hidden, cfg.cross_attention_dim, generator=gen) / math.sqrt(cfg.cross_attention_dim)
        kv.append((k, v))
    state = ip_weights.to_original_format(resampler.state_dict(), kv)
    torch.save(state, ip / IP_WEIGHT_NAME)
    logger.info("wrote tiny checkpoint (%s) to %s", preset, out)
    return kolors, ip
