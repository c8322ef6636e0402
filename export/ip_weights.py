"""IP-Adapter-Plus weights in the original key format, to and from diffusers' names.

The published `ip_adapter_plus_general.bin` holds two state dicts:

    image_proj.{latents, proj_in, proj_out, norm_out,
                layers.i.0.{norm1, norm2, to_q, to_kv, to_out},   # perceiver attention
                layers.i.1.{0, 1, 3}}                              # LayerNorm, Linear, GELU, Linear
    ip_adapter.{1, 3, 5, ...}.{to_k_ip, to_v_ip}.weight            # one pair per cross-attention

(`.safetensors` files flatten the two dicts under those prefixes). The pairs follow
`unet.attn_processors` order, which lists the up blocks before the mid block, and
count only cross-attention layers (ids 1, 3, 5, ...). diffusers' own loader infers
the resampler's heads as to_q rows / 64 and assumes depth 4; here the depth is read
from the keys and the head count follows the same 64-wide-head rule.
"""

from __future__ import annotations

import re
from pathlib import Path

from kolors_trt.runtime.errors import InputError


class IPWeightsError(InputError):
    """The IP-Adapter weights file is missing, corrupt or has the wrong keys."""


HEAD_DIM = 64

# original perceiver-layer suffix -> diffusers suffix (to_kv is split in two)
_LAYER_MAP = {
    "0.norm1": "ln0",
    "0.norm2": "ln1",
    "0.to_q": "attn.to_q",
    "0.to_out": "attn.to_out.0",
    "1.0": "ff.0",
    "1.1": "ff.1.net.0.proj",
    "1.3": "ff.1.net.2",
}
_TOP = ("latents", "proj_in.weight", "proj_in.bias", "proj_out.weight", "proj_out.bias", "norm_out.weight",
        "norm_out.bias")


def cross_attention_layers(unet) -> list[tuple[str, int]]:
    """(processor name, inner width) of every cross-attention layer, in the order
    the IP-Adapter ids follow (`unet.attn_processors`, self-attention skipped)."""
    layers = []
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        attn = unet.get_submodule(name[: -len(".processor")])
        layers.append((name, attn.to_k.out_features))
    return layers


def to_original_format(resampler_state: dict, kv: list) -> dict:
    """diffusers resampler state dict + [(to_k_ip, to_v_ip)] -> original nested format."""
    import torch

    proj = {k: resampler_state[k] for k in _TOP}
    depth = 1 + max(int(k.split(".")[1]) for k in resampler_state if k.startswith("layers."))
    for i in range(depth):
        for orig, diff in _LAYER_MAP.items():
            for kind in ("weight", "bias"):
                key = f"layers.{i}.{diff}.{kind}"
                if key in resampler_state:
                    proj[f"layers.{i}.{orig}.{kind}"] = resampler_state[key]
        proj[f"layers.{i}.0.to_kv.weight"] = torch.cat(
            [resampler_state[f"layers.{i}.attn.to_k.weight"], resampler_state[f"layers.{i}.attn.to_v.weight"]], 0
        )
    adapter = {}
    for n, (k, v) in enumerate(kv):
        adapter[f"{2 * n + 1}.to_k_ip.weight"] = k
        adapter[f"{2 * n + 1}.to_v_ip.weight"] = v
    return {"image_proj": proj, "ip_adapter": adapter}


def load_original(path: Path) -> dict:
    """Read `.bin` (torch.load, weights only) or `.safetensors` into the nested format."""
    path = Path(path)
    if not path.is_file():
        raise IPWeightsError(f"IP-Adapter weights: {path} does not exist; expected ip_adapter_plus_general.bin "
                             "or .safetensors from a Kolors-IP-Adapter-Plus folder")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            flat = load_file(str(path))
            state = {"image_proj": {}, "ip_adapter": {}}
            for key, value in flat.items():
                prefix, _, rest = key.partition(".")
                if prefix not in state:
                    raise IPWeightsError(f"IP-Adapter weights: {path} has key {key!r}; expected every key under "
                                         "'image_proj.' or 'ip_adapter.'")
                state[prefix][rest] = value
        else:
            import torch

            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except IPWeightsError:
        raise
    except Exception as exc:  # torch/safetensors raise many types for a damaged file
        raise IPWeightsError(f"IP-Adapter weights: cannot read {path} ({type(exc).__name__}: {exc}); "
                             "the file is corrupt or not a weights file, download it again") from exc
    if not isinstance(state, dict) or set(state) != {"image_proj", "ip_adapter"}:
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise IPWeightsError(f"IP-Adapter weights: {path} holds {found}; expected the two state dicts "
                             "'image_proj' and 'ip_adapter' of the original IP-Adapter-Plus format")
    return state


def convert(state: dict, num_cross_layers: int, source: str = "IP-Adapter weights") -> tuple[dict, dict, list]:
    """Original nested format -> (resampler kwargs, diffusers resampler state dict,
    [(to_k_ip, to_v_ip)] per cross-attention layer). Checks the key set exactly."""
    import torch

    proj, adapter = state["image_proj"], state["ip_adapter"]
    missing = [k for k in _TOP if k not in proj]
    if missing:
        raise IPWeightsError(f"{source}: image_proj lacks {missing}; this is not an IP-Adapter-Plus resampler")
    layer_ids = {int(m.group(1)) for k in proj if (m := re.match(r"layers\.(\d+)\.", k))}
    depth = len(layer_ids)
    if depth == 0 or layer_ids != set(range(depth)):
        raise IPWeightsError(f"{source}: image_proj layers {sorted(layer_ids)} are not 0..N-1")
    expected = set(_TOP)
    for i in range(depth):
        expected |= {f"layers.{i}.0.norm1.weight", f"layers.{i}.0.norm1.bias", f"layers.{i}.0.norm2.weight",
                     f"layers.{i}.0.norm2.bias", f"layers.{i}.0.to_q.weight", f"layers.{i}.0.to_kv.weight",
                     f"layers.{i}.0.to_out.weight", f"layers.{i}.1.0.weight", f"layers.{i}.1.0.bias",
                     f"layers.{i}.1.1.weight", f"layers.{i}.1.3.weight"}
    if set(proj) != expected:
        raise IPWeightsError(f"{source}: image_proj keys differ from the IP-Adapter-Plus resampler: "
                             f"missing {sorted(expected - set(proj))[:6]}, unexpected {sorted(set(proj) - expected)[:6]}")
    want_adapter = {f"{2 * n + 1}.to_{kv}_ip.weight" for n in range(num_cross_layers) for kv in "kv"}
    if set(adapter) != want_adapter:
        raise IPWeightsError(
            f"{source}: ip_adapter has {len(adapter)} tensors, expected to_k_ip/to_v_ip for the UNet's "
            f"{num_cross_layers} cross-attention layers (ids 1, 3, ..., {2 * num_cross_layers - 1}): "
            f"missing {sorted(want_adapter - set(adapter))[:4]}, unexpected {sorted(set(adapter) - want_adapter)[:4]}; "
            "are these weights for another base model?"
        )

    out = {k: proj[k] for k in _TOP}
    for i in range(depth):
        for orig, diff in _LAYER_MAP.items():
            for kind in ("weight", "bias"):
                if f"layers.{i}.{orig}.{kind}" in proj:
                    out[f"layers.{i}.{diff}.{kind}"] = proj[f"layers.{i}.{orig}.{kind}"]
        k, v = torch.chunk(proj[f"layers.{i}.0.to_kv.weight"], 2, dim=0)
        out[f"layers.{i}.attn.to_k.weight"], out[f"layers.{i}.attn.to_v.weight"] = k, v
    latents = proj["latents"]
    inner = proj["layers.0.0.to_q.weight"].shape[0]
    kwargs = dict(
        embed_dims=proj["proj_in.weight"].shape[1], output_dims=proj["proj_out.weight"].shape[0],
        hidden_dims=latents.shape[2], depth=depth, dim_head=HEAD_DIM, heads=inner // HEAD_DIM,
        num_queries=latents.shape[1], ffn_ratio=proj["layers.0.1.1.weight"].shape[0] / latents.shape[2],
    )
    kv = [(adapter[f"{2 * n + 1}.to_k_ip.weight"], adapter[f"{2 * n + 1}.to_v_ip.weight"])
          for n in range(num_cross_layers)]
    return kwargs, out, kv
