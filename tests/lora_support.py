"""LoRA files for the tests, made the way users make them: peft adapters on the tiny models
(random non-zero lora_A and lora_B, so every delta matters) saved with diffusers' own
``save_lora_weights`` or peft's ``save_pretrained``, and kohya-style copies of the same
weights (diffusers' or SGM's block names, as kohya-ss writes SDXL LoRAs).
"""

from __future__ import annotations

import re
from pathlib import Path

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]
CONV_TARGETS = ["to_q", "to_v", "conv1", "conv2", "time_emb_proj"]
TEXT_TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


def randomize(model, seed: int) -> None:
    """Every lora_A / lora_B weight ~ N(0, (0.5 / sqrt(fan_in))^2): a delta of about the size of the weight's
    own spread, which changes the image everywhere without making the tiny network chaotic."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 / fan_in**0.5))


def unet_lora(unet_dir: Path, seed: int, targets=UNET_TARGETS, r: int = 4, alpha: float = 8, alpha_pattern=None):
    """(peft state dict of the UNet, its LoraConfig)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(unet_dir)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, alpha_pattern=alpha_pattern or {})
    unet.add_adapter(config)
    randomize(unet, seed)
    return get_peft_model_state_dict(unet), config


def text_lora(text_dir: Path, seed: int, r: int = 2, alpha: float = 3):
    """(the ChatGLM PeftModel, its adapter's state dict in ChatGLM's module names, its LoraConfig)."""
    from diffusers.pipelines.kolors.text_encoder import ChatGLMModel
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=TEXT_TARGETS)
    model = get_peft_model(ChatGLMModel.from_pretrained(text_dir), config)
    randomize(model, seed)
    state = {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(model).items()}
    return model, state, config


def save_diffusers(folder: Path, unet=None, text=None, weight_name: str = "pytorch_lora_weights.safetensors") -> Path:
    """diffusers' KolorsPipeline.save_lora_weights. The ChatGLM layers go in diffusers' `lora_linear_layer` naming
    with their config as metadata: the only form diffusers' text-encoder loader reads for a non-CLIP encoder."""
    from diffusers import KolorsPipeline

    kwargs = {}
    if unet is not None:
        kwargs.update(unet_lora_layers=unet[0], unet_lora_adapter_metadata=unet[1].to_dict())
    if text is not None:
        layers = {k.replace(".lora_A.", ".lora_linear_layer.down.").replace(".lora_B.", ".lora_linear_layer.up."): v
                  for k, v in text[0].items()}
        kwargs.update(text_encoder_lora_layers=layers, text_encoder_lora_adapter_metadata=text[1].to_dict())
    KolorsPipeline.save_lora_weights(folder, weight_name=weight_name, **kwargs)
    return Path(folder) / weight_name


def kohya_name(module: str, layers_per_block: int, sgm: bool) -> str:
    """kohya-ss's name of a diffusers UNet module: dots as underscores, in SGM's block layout when ``sgm``
    (input_blocks i = 1 + block * (lpb + 1) + layer; middle_block 0/1/2; output_blocks i = block * (lpb + 1) + layer;
    resnet convs in_layers.2 / out_layers.3, emb_layers.1)."""
    name = module
    if sgm:
        per = layers_per_block + 1
        m = re.match(r"^down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$", name)
        if m:
            b, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
            name = f"input_blocks.{1 + b * per + layer}.{0 if kind == 'resnets' else 1}.{rest}"
        m = re.match(r"^up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$", name)
        if m:
            b, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
            name = f"output_blocks.{b * per + layer}.{0 if kind == 'resnets' else 1}.{rest}"
        m = re.match(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", name)
        if m:
            index = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[(m[1], m[2])]
            name = f"middle_block.{index}.{m[3]}"
        for old, new in ((".conv1", ".in_layers.2"), (".conv2", ".out_layers.3"), (".time_emb_proj", ".emb_layers.1")):
            if name.endswith(old):
                name = name[: -len(old)] + new
    return "lora_unet_" + name.replace(".", "_")


def save_kohya(path: Path, unet_state: dict, alpha: float, layers_per_block: int, sgm: bool,
               dtype=None) -> Path:
    """The UNet part of a peft state dict as a kohya-ss file: lora_down / lora_up / alpha per module."""
    import torch
    from safetensors.torch import save_file

    out = {}
    for key, value in unet_state.items():
        module, _, kind = key.rpartition(".lora_")
        name = kohya_name(module, layers_per_block, sgm)
        role = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}[kind]
        out[f"{name}.{role}"] = value.to(dtype or value.dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    save_file(out, str(path))
    return Path(path)
