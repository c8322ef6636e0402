"""LoRA files -> (component, module, down, up, scale) layers, without torch or diffusers.

Formats, as diffusers' ``KolorsPipeline.load_lora_weights`` (StableDiffusionLoraLoaderMixin,
diffusers 0.42) and Kolors' dreambooth script write and read them:

- diffusers / PEFT: ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (``save_lora_weights``),
  the older ``<module>.lora.down.weight`` / ``lora.up.weight``, the attention-processor form
  ``<path>.processor.to_q_lora.down.weight`` and ``text_encoder.<module>.lora_linear_layer.down``;
  scale ``lora_alpha / r`` from the ``lora_adapter_metadata`` header (``unet.lora_alpha``,
  ``unet.alpha_pattern``, ``unet.use_rslora``, ... as ``save_lora_weights`` writes it), else 1
  (diffusers' default: alpha = rank).
- a PEFT adapter (``adapter_model.safetensors`` + ``adapter_config.json``, what Kolors' dreambooth
  script saves for ChatGLM): ``base_model.model.<module>.lora_A.weight``; the config gives the scale.
  Unprefixed keys (``save_lora_adapter``) are placed by the component that has the module.
- kohya-ss: ``lora_unet_<module with _>.lora_down.weight`` / ``lora_up.weight`` / ``alpha``, in
  diffusers' block names or SGM's (``input_blocks_4_1_...``), which are remapped with the layout
  rule of diffusers' ``_maybe_map_sgm_blocks_to_diffusers``; scale ``alpha / rank`` (1 without
  alpha). Names are matched against the model's own module names with ``.`` read as ``_``, which
  places every name diffusers' renaming chain places, and refuses the rest.

``.safetensors`` only: read with safetensors' numpy API (bf16 tensors, which numpy cannot name,
from the documented header's byte offsets); nothing is unpickled. A key that cannot be placed,
DoRA, a LoRA bias, LyCORIS factors or a non-finite value refuse the file naming the key.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional

import numpy as np

from .errors import InputError

METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
PEFT_WEIGHT_NAME, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
PREFIXES = {"unet": "unet", "text_encoder": "text_encoder"}  # the file's prefix -> component

_PEFT = [(".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora.down.weight", "down"),
         (".lora.up.weight", "up"), (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up")]
_PROCESSOR = re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_KOHYA = re.compile(r"^(lora_unet|lora_te1?|lora_te2)_(.+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_UNSUPPORTED = {"dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "lora_B.bias": "a LoRA bias",
                "hada_": "LoHa", "lokr_": "LoKr", ".diff": "a full-weight difference"}


class LoraError(InputError):
    """A LoRA adapter, its file, name or weight is wrong for this Pipeline; nothing was changed."""


class LoraFileError(LoraError):
    """A LoRA file cannot be read or placed on this model; names the file and the key."""


class LoraUnavailableError(LoraError):
    """LoRA cannot apply to a component of this folder (no map, a quantized graph, a plan that is not refittable)."""


@dataclass(frozen=True)
class LoraLayer:
    """One module's low-rank update: ``delta = scale * up @ down`` ([out, in(, kh, kw)])."""

    component: str  # "unet" | "text_encoder"
    module: str  # the module's name in diffusers' UNet / ChatGLM
    down: np.ndarray  # float32 [r, in] or [r, in, kh, kw]
    up: np.ndarray  # float32 [out, r] or [out, r, 1, 1]
    scale: float  # alpha / r (alpha / sqrt(r) with rsLoRA)
    key: str  # the file's key of the down weight, for messages

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


# Where a module name lives: component -> set of its module names (from the LoRA maps).
Modules = Mapping[str, frozenset]


def read_safetensors(path: Path) -> tuple[dict, dict]:
    """(tensors as float32 numpy arrays, the header's metadata) of a .safetensors file."""
    from safetensors import SafetensorError, safe_open

    tensors, bf16 = {}, []
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = dict(f.metadata() or {})
            for key in f.keys():
                if f.get_slice(key).get_dtype() == "BF16":
                    bf16.append(key)  # numpy has no bfloat16: read below from the header's offsets
                else:
                    tensors[key] = f.get_tensor(key)
    except (SafetensorError, OSError, ValueError, TypeError) as err:
        raise LoraFileError(f"lora: {path} is not a readable .safetensors file ({err})") from None
    if bf16:
        tensors.update(_read_bf16(path, bf16))
    return tensors, metadata


def _read_bf16(path: Path, keys: list) -> dict:
    """bfloat16 tensors as float32: the safetensors layout is an 8-byte little-endian header size, a JSON
    header with each tensor's dtype, shape and data_offsets, then the data."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        base = 8 + size
        out = {}
        for key in keys:
            start, end = header[key]["data_offsets"]
            f.seek(base + start)
            raw = np.frombuffer(f.read(end - start), dtype="<u2")
            out[key] = (raw.astype(np.uint32) << 16).view(np.float32).reshape(header[key]["shape"])
    return out


def _pattern_value(patterns: Mapping, module: str, default):
    """PEFT's rank/alpha pattern lookup (peft.utils.other.get_pattern_key): the first pattern p with
    re.match(rf"(.*\\.)?({p})$", module)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _peft_scale(config: Optional[Mapping], module: str, rank: int, where: str) -> float:
    if not config:
        return 1.0  # diffusers without metadata: lora_alpha = r
    if config.get("use_dora"):
        raise LoraFileError(f"lora: {where}: DoRA adapters (use_dora) are not supported; use a plain LoRA")
    r = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", rank))
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", r))
    if int(r) != rank:
        raise LoraFileError(f"lora: {where}: {module} has rank {rank} in the file and {r} in its config")
    return float(alpha) / (math.sqrt(r) if config.get("use_rslora") else float(r))


def _component_config(metadata: Mapping, component: str) -> Optional[dict]:
    """The LoraConfig of one component from diffusers' metadata header ({"unet.r": 4, ...})."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return None
    try:
        packed = json.loads(raw)
    except ValueError:
        return None
    prefix = f"{component}."
    config = {k[len(prefix):]: v for k, v in packed.items() if k.startswith(prefix)}
    return config or None


def sgm_to_diffusers(name: str, layers_per_block: int) -> str:
    """One kohya UNet name in SGM's layout (underscored, without ``lora_unet_``) -> diffusers' layout,
    by the rule of diffusers' _maybe_map_sgm_blocks_to_diffusers and _convert_unet_lora_key."""
    per = layers_per_block + 1
    for old, new in (("input_blocks_0_0", "conv_in"), ("out_2", "conv_out"), ("time_embed_0", "time_embedding_linear_1"),
                     ("time_embed_2", "time_embedding_linear_2"), ("label_emb_0_0", "add_embedding_linear_1"),
                     ("label_emb_0_2", "add_embedding_linear_2")):
        if name == old or name.startswith(old + "_"):
            return new + name[len(old):]
    m = re.match(r"^middle_block_([012])_(.+)$", name)  # SGM's middle block has no inner index
    if m:
        block = ("mid_block_resnets_0", "mid_block_attentions_0", "mid_block_resnets_1")[int(m.group(1))]
        rest = m.group(2)
    else:
        m = re.match(r"^(input_blocks|output_blocks)_(\d+)_([012])_(.+)$", name)
        if not m:
            return name
        kind, i, j, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        if kind == "input_blocks":
            block = f"down_blocks_{(i - 1) // per}_"
            block += "downsamplers_0" if rest == "op" else f"{('resnets', 'attentions', 'inner2')[j]}_{(i - 1) % per}"
        else:
            block = f"up_blocks_{i // per}_{('resnets', 'attentions', 'upsamplers')[j]}_{i % per if j < 2 else 0}"
    for old, new in (("in_layers_2", "conv1"), ("out_layers_3", "conv2"), ("emb_layers_1", "time_emb_proj"),
                     ("skip_connection", "conv_shortcut"), ("op", "conv")):
        if rest == old:
            rest = new
    return f"{block}_{rest}"


def _underscored(names: frozenset) -> dict:
    """{name with . as _: name} for the names that stay unique that way."""
    table: dict = {}
    for name in names:
        table.setdefault(name.replace(".", "_"), []).append(name)
    return {k: v[0] for k, v in table.items() if len(v) == 1}


def _check_supported(key: str, where: str) -> None:
    for mark, what in _UNSUPPORTED.items():
        if mark in key:
            raise LoraFileError(f"lora: {where}: key {key!r} is {what}, which is not supported; use a plain LoRA "
                                "(lora_A/lora_B or lora_down/lora_up)")


def parse_layers(tensors: Mapping, metadata: Mapping, where: str, modules: Modules, layers_per_block: int,
                 peft_config: Optional[Mapping] = None, unavailable: Optional[Mapping] = None) -> list[LoraLayer]:
    """The layers of one file's tensors. ``modules``: each component's module names (from the LoRA maps);
    ``peft_config``: the adapter_config.json of a PEFT adapter file; ``unavailable``: {component: why LoRA
    cannot apply to it} for the components without a usable map."""
    unavailable = unavailable or {}
    if any(_KOHYA.match(k) for k in tensors):
        return _kohya_layers(tensors, where, modules, layers_per_block, unavailable)
    pairs: dict = {}  # (component, module) -> {"down": (key, array), "up": ...}
    for key, value in tensors.items():
        _check_supported(key, where)
        component, module, role = _place_peft(key, modules)
        named = key.removeprefix("base_model.model.").partition(".")[0]
        if component is None and PREFIXES.get(named) in unavailable:
            raise LoraUnavailableError(f"lora: {where}: {key!r}: {unavailable[PREFIXES[named]]}")
        if component is None and not modules and unavailable:
            raise LoraUnavailableError(f"lora: {where}: {next(iter(unavailable.values()))}")
        if component is None:
            raise LoraFileError(f"lora: {where}: cannot place key {key!r}: no module {module!r} in this model's UNet "
                                f"or text encoder (a LoRA for another model, or an unsupported format)")
        slot = pairs.setdefault((component, module), {})
        if role in slot:
            raise LoraFileError(f"lora: {where}: {module} has two {role} weights ({slot[role][0]!r}, {key!r})")
        slot[role] = (key, value)
    layers = []
    for (component, module), slot in pairs.items():
        down, up = _pair(slot, module, where)
        config = peft_config if peft_config is not None else _component_config(metadata, component)
        scale = _peft_scale(config, module, down[1].shape[0], where)
        layers.append(LoraLayer(component, module, down[1], up[1], scale, down[0]))
    return layers


def _place_peft(key: str, modules: Modules) -> tuple:
    """(component or None, module, "down" | "up") of one diffusers / PEFT key."""
    rest = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
    component = None
    head, _, tail = rest.partition(".")
    if head in PREFIXES and tail:
        component, rest = PREFIXES[head], tail
    m = _PROCESSOR.match(rest)
    if m:
        proj = "to_out.0" if m.group(2) == "to_out" else m.group(2)
        module, role = f"{m.group(1)}.{proj}", m.group(3)
    else:
        suffix = next(((s, r) for s, r in _PEFT if rest.endswith(s)), None)
        if suffix is None:
            return None, rest, None
        module, role = rest[: -len(suffix[0])], suffix[1]
    candidates = [component] if component else list(modules)
    found = [c for c in candidates if module in modules.get(c, ())]
    return (found[0] if len(found) == 1 else None), module, role


def _pair(slot: dict, module: str, where: str) -> tuple:
    if "down" not in slot or "up" not in slot:
        have = next(iter(slot.values()))[0]
        raise LoraFileError(f"lora: {where}: {have!r} has no matching {'up' if 'down' in slot else 'down'} weight")
    return slot["down"], slot["up"]


def _kohya_layers(tensors: Mapping, where: str, modules: Modules, layers_per_block: int,
                  unavailable: Mapping) -> list[LoraLayer]:
    groups: dict = {}
    for key, value in tensors.items():
        _check_supported(key, where)
        m = _KOHYA.match(key)
        if not m:
            raise LoraFileError(f"lora: {where}: cannot place key {key!r} in a kohya-style file (expected "
                                "lora_unet_<module>.lora_down.weight / .lora_up.weight / .alpha)")
        groups.setdefault((m.group(1), m.group(2)), {})[m.group(3)] = (key, value)
    tables = {c: _underscored(names) for c, names in modules.items()}
    layers = []
    for (prefix, name), parts in groups.items():
        component = "unet" if prefix == "lora_unet" else "text_encoder"
        if prefix == "lora_te2":
            raise LoraFileError(f"lora: {where}: {parts[next(iter(parts))][0]!r} is for a second text encoder, "
                                "which Kolors does not have")
        diffusers = sgm_to_diffusers(name, layers_per_block) if component == "unet" else name
        module = tables.get(component, {}).get(diffusers)
        key = parts.get("lora_down.weight", next(iter(parts.values())))[0]
        if component in unavailable:
            raise LoraUnavailableError(f"lora: {where}: {key!r}: {unavailable[component]}")
        if module is None:
            raise LoraFileError(f"lora: {where}: cannot place key {key!r}: this model's {component} has no module "
                                f"{diffusers.replace('_', '.')!r} (a LoRA for another model?)")
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise LoraFileError(f"lora: {where}: {key!r} lacks its lora_down or lora_up weight")
        down, up = parts["lora_down.weight"][1], parts["lora_up.weight"][1]
        rank = down.shape[0] if down.ndim else 0
        alpha = float(np.asarray(parts["alpha"][1]).reshape(-1)[0]) if "alpha" in parts else float(rank)
        layers.append(LoraLayer(component, module, down, up, alpha / rank if rank else 0.0, key))
    return layers


def check_values(tensors: Mapping, where: str) -> dict:
    """float32 copies of every tensor; refuses non-finite values and non-float tensors, naming the key."""
    out = {}
    for key, value in tensors.items():
        array = np.asarray(value)
        if array.dtype.kind != "f":
            raise LoraFileError(f"lora: {where}: {key!r} has dtype {array.dtype}, expected floating point")
        array = array.astype(np.float32)
        if not np.isfinite(array).all():
            raise LoraFileError(f"lora: {where}: {key!r} holds NaN or Inf; the file is damaged")
        out[key] = array
    return out


def weight_files(path: Path, weight_name: Optional[str]) -> list[tuple[Path, Optional[Path]]]:
    """[(weights file, its PEFT adapter_config.json or None)] that ``load_lora_weights(path, weight_name)``
    reads: a file; in a folder ``weight_name``, else diffusers' pytorch_lora_weights.safetensors and/or a PEFT
    adapter_model.safetensors (the two files Kolors' dreambooth script writes into one checkpoint folder)."""
    path = Path(path)
    if path.is_dir():
        if weight_name is not None:
            files = [path / weight_name]
        else:
            files = [path / n for n in (DIFFUSERS_WEIGHT_NAME, PEFT_WEIGHT_NAME) if (path / n).is_file()]
            if not files:
                raise LoraFileError(f"lora: {path} holds neither {DIFFUSERS_WEIGHT_NAME} nor {PEFT_WEIGHT_NAME}; "
                                    "pass weight_name")
    elif weight_name is not None:
        raise LoraFileError(f"lora: weight_name {weight_name!r} is for a folder, and {path} is a file")
    else:
        files = [path]
    out = []
    for file in files:
        if file.suffix != ".safetensors":
            raise LoraFileError(f"lora: {file}: only .safetensors files are read (a pickled .bin/.pt/.ckpt could run "
                                "code on load); convert it with safetensors")
        if not file.is_file():
            raise LoraFileError(f"lora: {file} does not exist")
        config = file.with_name(PEFT_CONFIG) if file.name == PEFT_WEIGHT_NAME else None
        out.append((file, config if config is not None and config.is_file() else None))
    return out


def read_peft_config(path: Optional[Path]) -> Optional[dict]:
    if path is None:
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise LoraFileError(f"lora: {path}: not a readable adapter_config.json ({err})") from None
    if not isinstance(config, dict):
        raise LoraFileError(f"lora: {path}: expected a JSON object")
    return config


ReadFile = Callable[[Path], tuple]

__all__ = ["DIFFUSERS_WEIGHT_NAME", "LoraError", "LoraFileError", "LoraLayer", "LoraUnavailableError", "PEFT_WEIGHT_NAME",
           "check_values", "parse_layers", "read_peft_config", "read_safetensors", "sgm_to_diffusers", "weight_files"]
