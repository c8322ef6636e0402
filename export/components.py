"""The four exported graphs as torch modules whose signatures are the spec's.

Each wrapper takes and returns float32 (ids int64) and casts to its module's dtype
inside, so an fp16 export keeps torch's own fp32 islands (ChatGLM's RMSNorm, the
rotary cache) and the graph edges never change with precision.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F
from torch import nn


@contextlib.contextmanager
def additive_attention_masks():
    """Hand boolean SDPA masks over as additive masks in the query's dtype.

    torch.onnx's scaled_dot_product_attention symbolic turns a bool mask into an
    fp32 additive mask (Where(mask, 0.0, -inf) with fp32 constants); the Add then
    promotes fp16 attention, and the output projection after it, to fp32 in the
    graph. The additive mask holds the same 0 / -inf values torch applies for a
    bool mask, so the numbers do not change, and the graph stays fp16.
    """
    sdpa = F.scaled_dot_product_attention

    def with_additive_mask(query, key, value, attn_mask=None, *args, **kwargs):
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill(~attn_mask, float("-inf"))
        return sdpa(query, key, value, attn_mask, *args, **kwargs)

    F.scaled_dot_product_attention = with_additive_mask
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


class TextEncoderGraph(nn.Module):
    """ChatGLM3 -> (prompt_embeds [B, L, H] = hidden_states[-2], pooled [B, H] =
    hidden_states[-1] at the last position), exactly as KolorsPipeline.encode_prompt.

    ChatGLMModel builds its padding mask only `if not attention_mask.all()`, a
    branch a trace bakes in. Here the mask is always built from `attention_mask`
    (the model's own get_masks) and passed as `full_attention_mask`, so padding
    reaches the graph as data. For an unpadded row the mask is the causal one,
    which is what the is_causal branch computes.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids):
        full_mask = self.model.get_masks(input_ids, None, padding_mask=attention_mask)  # [B, 1, L, L] bool
        with additive_attention_masks():
            out = self.model(
                input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                full_attention_mask=full_mask, output_hidden_states=True, use_cache=False, return_dict=True,
            )
        prompt_embeds = out.hidden_states[-2].permute(1, 0, 2)  # [L, B, H] -> [B, L, H]
        pooled = out.hidden_states[-1][-1]  # [B, H]
        return prompt_embeds.float(), pooled.float()


class ImageEncoderGraph(nn.Module):
    """CLIP vision penultimate hidden state -> IP-Adapter-Plus resampler -> ip_tokens.

    The last encoder layer, post_layernorm and the projection feed nothing that
    Kolors uses; they are dropped, so the graph ends at hidden_states[-2].
    """

    def __init__(self, clip, resampler):
        super().__init__()
        # Shallow copies share every weight with `clip`, which stays untouched.
        vision = copy.copy(clip.vision_model)
        vision._modules = dict(vision._modules)
        encoder = copy.copy(vision.encoder)
        encoder._modules = dict(encoder._modules)
        encoder.layers = nn.ModuleList(list(encoder.layers)[:-1])
        vision.encoder = encoder
        self.vision = vision
        self.resampler = resampler

    def forward(self, pixel_values):
        dtype = self.vision.pre_layrnorm.weight.dtype
        # last_hidden_state is taken before post_layernorm: hidden_states[-2] of the full model
        h = self.vision(pixel_values=pixel_values.to(dtype)).last_hidden_state  # [B, 577, C]
        return self.resampler(h).float()  # [B, 16, cross_attention_dim]


class IPInputs:
    """Per-call IP tensors shared by the UNet's IP processors (set by UNetGraph.forward)."""

    tokens: torch.Tensor | None = None
    scale: torch.Tensor | None = None


class IPAttnProcessor(nn.Module):
    """Cross-attention with a decoupled IP branch, scale as a tensor:
    out = attn(q, k_text, v_text) + scale * attn(q, to_k_ip(ip), to_v_ip(ip)).

    Mirrors diffusers' IPAdapterAttnProcessor2_0 (single adapter, no masks) so the
    graph computes what KolorsPipeline with load_ip_adapter computes; diffusers
    skips the branch at scale 0, here it is multiplied by 0, the same value.
    """

    def __init__(self, hidden_size: int, cross_attention_dim: int, ip: IPInputs):
        super().__init__()
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.ip = ip

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        if attention_mask is not None or attn.spatial_norm is not None or hidden_states.ndim != 3:
            raise NotImplementedError("IP attention: masks, spatial norm and 4-D inputs do not occur in Kolors")
        residual = hidden_states
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads

        def heads(x):  # [B, N, heads * d] -> [B, heads, N, d]
            return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        def merge(x):
            return x.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)

        query = heads(query)
        out = merge(F.scaled_dot_product_attention(query, heads(key), heads(value), dropout_p=0.0, is_causal=False))
        ip_key, ip_value = heads(self.to_k_ip(self.ip.tokens)), heads(self.to_v_ip(self.ip.tokens))
        ip_out = merge(F.scaled_dot_product_attention(query, ip_key, ip_value, dropout_p=0.0, is_causal=False))
        out = out + self.ip.scale.view(-1, 1, 1) * ip_out  # scale [B]: one per sample
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def attach_ip(unet, kv) -> IPInputs:
    """Install IP processors with the given (to_k_ip, to_v_ip) weights on every
    cross-attention of `unet`, in the IP-Adapter id order."""
    from .ip_weights import cross_attention_layers

    ip = IPInputs()
    procs = dict(unet.attn_processors)
    layers = cross_attention_layers(unet)
    if len(layers) != len(kv):
        raise ValueError(f"IP weights have {len(kv)} layer pairs, the UNet has {len(layers)} cross-attentions")
    cross_dim = unet.config.cross_attention_dim
    for (name, hidden), (k, v) in zip(layers, kv):
        proc = IPAttnProcessor(hidden, cross_dim, ip)
        proc.to_k_ip.weight.data.copy_(k)
        proc.to_v_ip.weight.data.copy_(v)
        procs[name] = proc.to(dtype=unet.dtype)
    unet.set_attn_processor(procs)
    return ip


class UNetGraph(nn.Module):
    """The IP-augmented Kolors UNet taking IP tokens directly (the resampler runs
    once per image in the image-encoder graph, not per step), the 4096 -> 2048
    text projection inside, and ip_scale as an input tensor with one scale per sample
    (a batch may hold several requests, each with its own IP-Adapter scale).

    With a DeepCache ``split`` (export/deep_cache.py) it also returns the deep feature
    of that split, which the shallow UNet (ShallowUNetGraph) takes on the steps between."""

    def __init__(self, unet, kv, split=None):
        from .deep_cache import FeatureSlot, capture_feature

        super().__init__()
        self.unet = unet
        self.ip = attach_ip(unet, kv)
        self.slot = None
        if split is not None:
            self.slot = FeatureSlot()
            capture_feature(unet, split, self.slot)

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, ip_tokens, ip_scale):
        out = _unet_call(self.unet, self.ip, sample, timestep, encoder_hidden_states, text_embeds, time_ids,
                         ip_tokens, ip_scale)  # [2B, 4, H/8, W/8]
        if self.slot is None:
            return out
        feature, self.slot.value = self.slot.value, None
        return out, feature.float()  # [2B, C_f, H/8/stride, W/8/stride]


class ShallowUNetGraph(nn.Module):
    """DeepCache's shallow step: the UNet without the blocks its cache branch skips, taking the deep
    feature the full UNet (UNetGraph with the same split) output at the last full step.

    Its inputs are the spec's ``unet_shallow`` inputs in order (``input_names``): the text and IP inputs only
    when the shallow blocks hold cross-attention, then ``deep_feature``."""

    def __init__(self, unet, kv, split, input_names):
        from .deep_cache import FeatureSlot, skip_modules

        super().__init__()
        self.unet = unet
        self.ip = attach_ip(unet, kv)
        self.slot = FeatureSlot()
        skip_modules(unet, split, self.slot)
        self.input_names = list(input_names)

    def forward(self, *inputs):
        x = dict(zip(self.input_names, inputs))
        feature = x["deep_feature"]
        self.slot.value = feature.to(self.unet.dtype)
        # Inputs only skipped blocks read: any tensor of the batch serves (the graph drops what feeds nothing).
        text = x.get("encoder_hidden_states", x["text_embeds"][:, None])
        out = _unet_call(self.unet, self.ip, x["sample"], x["timestep"], text, x["text_embeds"], x["time_ids"],
                         x.get("ip_tokens"), x.get("ip_scale"))
        self.slot.value = None
        return out  # [2B, 4, H/8, W/8]


def _unet_call(unet, ip: IPInputs, sample, timestep, encoder_hidden_states, text_embeds, time_ids, ip_tokens,
               ip_scale):
    dtype = unet.dtype
    ip.tokens = None if ip_tokens is None else ip_tokens.to(dtype)
    ip.scale = None if ip_scale is None else ip_scale.to(dtype)
    out = unet(
        sample.to(dtype), timestep, encoder_hidden_states=encoder_hidden_states.to(dtype),
        added_cond_kwargs={"text_embeds": text_embeds.to(dtype), "time_ids": time_ids.to(dtype)},
        return_dict=False,
    )[0]
    ip.tokens = ip.scale = None
    return out.float()


class VaeDecoderGraph(nn.Module):
    """latents (already divided by the scaling factor) -> image in [-1, 1]."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0].float()
