"""Find and load a Kolors checkpoint and IP-Adapter-Plus weights from local folders.

Two base layouts are accepted:
  * a Kolors-diffusers root: model_index.json, text_encoder/, tokenizer/, unet/, vae/, scheduler/
  * the original Kolors repo's `weights/Kolors`: the same folders, but the tokenizer
    files (tokenizer.model, tokenizer_config.json) sit in text_encoder/.
The IP-Adapter root holds image_encoder/ and ip_adapter_plus_general.{bin,safetensors}.
Every problem is reported as one CheckpointError naming the path and what was expected.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from kolors_trt.runtime.errors import InputError

from .ip_weights import IPWeightsError, convert, cross_attention_layers, load_original

logger = logging.getLogger(__name__)

IP_WEIGHT_NAMES = ("ip_adapter_plus_general.safetensors", "ip_adapter_plus_general.bin")


class CheckpointError(InputError):
    """A checkpoint folder or file is missing, of the wrong layout, or corrupt."""


@dataclass(frozen=True)
class CheckpointPaths:
    root: Path
    text_encoder: Path
    tokenizer: Path
    unet: Path
    vae: Path
    scheduler: Path
    ip_root: Path
    image_encoder: Path
    ip_weights: Path


def _need_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise CheckpointError(f"checkpoint: {path} is missing; expected the {what} folder there")
    if not (path / "config.json").is_file() and what not in ("tokenizer", "scheduler"):
        raise CheckpointError(f"checkpoint: {path / 'config.json'} is missing; {path} is not a {what} folder")
    return path


def resolve(weights: Path, ip_adapter: Path) -> CheckpointPaths:
    """Locate every component folder, checking the layout before anything loads."""
    root, ip_root = Path(weights), Path(ip_adapter)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint: --weights {root} is not a folder; expected a Kolors-diffusers root "
                              "(model_index.json, text_encoder/, tokenizer/, unet/, vae/, scheduler/) or weights/Kolors")
    if not ip_root.is_dir():
        raise CheckpointError(f"checkpoint: --ip-adapter {ip_root} is not a folder; expected a Kolors-IP-Adapter-Plus "
                              "root with image_encoder/ and ip_adapter_plus_general.bin")
    text_encoder = _need_dir(root / "text_encoder", "text_encoder")
    tokenizer = root / "tokenizer"
    if not (tokenizer / "tokenizer.model").is_file():
        if (text_encoder / "tokenizer.model").is_file():  # original Kolors layout
            tokenizer = text_encoder
        else:
            raise CheckpointError(f"checkpoint: no tokenizer.model in {root / 'tokenizer'} or {text_encoder}; "
                                  "expected the ChatGLM sentencepiece model in one of them")
    scheduler = root / "scheduler"
    if not (scheduler / "scheduler_config.json").is_file():
        raise CheckpointError(f"checkpoint: {scheduler / 'scheduler_config.json'} is missing")
    ip_file = next((ip_root / n for n in IP_WEIGHT_NAMES if (ip_root / n).is_file()), None)
    if ip_file is None:
        raise CheckpointError(f"checkpoint: {ip_root} has none of {list(IP_WEIGHT_NAMES)}")
    return CheckpointPaths(
        root=root, text_encoder=text_encoder, tokenizer=tokenizer, unet=_need_dir(root / "unet", "unet"),
        vae=_need_dir(root / "vae", "vae"), scheduler=scheduler, ip_root=ip_root,
        image_encoder=_need_dir(ip_root / "image_encoder", "image_encoder"), ip_weights=ip_file,
    )


# Files up to this size are fingerprinted by content: configs, indices, the tokenizer
# model (~1 MB in Kolors). Larger ones are weights, fingerprinted by size and mtime.
FINGERPRINT_CONTENT_BYTES = 16 << 20


def fingerprint(paths: CheckpointPaths) -> str:
    """A cheap, honest identity of the checkpoint files an export reads, for "up to date".

    sha256 over, per file (sorted by path): its path relative to its root, and either its
    content's sha256 (files up to 16 MB: every config, index and tokenizer file) or its
    size and mtime_ns (larger files: the weights, which would take minutes to hash).
    Covered: model_index.json and the text_encoder, tokenizer, unet, vae and scheduler
    folders of --weights; the image_encoder folder and the IP weights file of --ip-adapter.
    A weight file rewritten in place with the same size within the same mtime tick would go
    unnoticed; `kolors-trt export --force` re-exports regardless."""
    import hashlib

    from kolors_trt.runtime.hashing import sha256_file

    files = [("ip", paths.ip_root, paths.ip_weights)]
    if (paths.root / "model_index.json").is_file():
        files.append(("weights", paths.root, paths.root / "model_index.json"))
    for folder in (paths.text_encoder, paths.tokenizer, paths.unet, paths.vae, paths.scheduler):
        files += [("weights", paths.root, p) for p in folder.iterdir() if p.is_file()]
    files += [("ip", paths.ip_root, p) for p in paths.image_encoder.iterdir() if p.is_file()]
    rows = set()  # a set: in the original layout the tokenizer folder is the text encoder's
    for label, root, path in files:
        st = path.stat()
        what = sha256_file(path) if st.st_size <= FINGERPRINT_CONTENT_BYTES else f"{st.st_size}:{st.st_mtime_ns}"
        rows.add(f"{label}/{path.relative_to(root).as_posix()} {what}")
    return hashlib.sha256("\n".join(sorted(rows)).encode()).hexdigest()


def read_config(folder: Path, name: str = "config.json") -> dict:
    path = Path(folder) / name
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint: cannot read {path} ({exc}); expected a JSON config") from exc


def _variant(folder: Path) -> str | None:
    """'fp16' when the folder only has fp16-variant weight files (Kolors-diffusers ships those)."""
    names = [p.name for p in folder.iterdir()]
    plain = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "model.safetensors",
             "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json",
             "diffusion_pytorch_model.safetensors.index.json")
    if any(n in names for n in plain):
        return None
    return "fp16" if any(".fp16" in n for n in names) else None


def _from_pretrained(what: str, cls, folder: Path, dtype: str, variants: bool = True):
    """`cls.from_pretrained(folder)` at `dtype` in eval mode; any failure becomes one
    CheckpointError naming the component and the folder."""
    import torch

    try:
        kwargs = {"variant": _variant(folder)} if variants else {}
        return cls.from_pretrained(folder, torch_dtype=getattr(torch, dtype), **kwargs).eval()
    except Exception as exc:  # transformers/diffusers raise OSError, ValueError, RuntimeError, safetensors errors
        raise CheckpointError(f"checkpoint: cannot load the {what} from {folder} ({type(exc).__name__}: "
                              f"{str(exc)[:300]}); the files are missing or corrupt") from exc


def load_text_encoder(paths: CheckpointPaths, dtype: str = "float32"):
    from diffusers.pipelines.kolors.text_encoder import ChatGLMModel

    return _from_pretrained("text encoder (ChatGLM)", ChatGLMModel, paths.text_encoder, dtype)


def load_unet(paths: CheckpointPaths, dtype: str = "float32"):
    from diffusers import UNet2DConditionModel

    return _from_pretrained("UNet", UNet2DConditionModel, paths.unet, dtype)


def load_vae(paths: CheckpointPaths, dtype: str = "float32"):
    from diffusers import AutoencoderKL

    return _from_pretrained("VAE", AutoencoderKL, paths.vae, dtype)


def load_image_encoder(paths: CheckpointPaths, dtype: str = "float32"):
    from transformers import CLIPVisionModelWithProjection

    return _from_pretrained("image encoder (CLIP vision)", CLIPVisionModelWithProjection, paths.image_encoder,
                            dtype, variants=False)


def model_dims(paths: CheckpointPaths):
    """The sizes the checkpoint fixes (runtime.spec.ModelDims), from its configs and
    the shape of the resampler's latents: no model is loaded."""
    from kolors_trt.runtime.spec import ModelDims

    te, clip = read_config(paths.text_encoder), read_config(paths.image_encoder)
    unet, vae = read_config(paths.unet), read_config(paths.vae)
    if vae.get("latent_channels", 4) != unet["in_channels"]:
        raise CheckpointError(f"checkpoint: {paths.unet} takes {unet['in_channels']} latent channels, {paths.vae} "
                              f"makes {vae.get('latent_channels')}; they are not from one model")
    return ModelDims(
        text_hidden=te["hidden_size"], image_size=clip["image_size"], ip_tokens=_ip_queries(paths.ip_weights),
        cross_attention_dim=unet["cross_attention_dim"], latent_channels=unet["in_channels"],
        vae_scale=2 ** (len(vae["block_out_channels"]) - 1),
        latent_multiple=2 ** (len(unet["block_out_channels"]) - 1),
    )


def _ip_queries(path: Path) -> int:
    """Number of resampler queries (IP tokens): latents [1, Q, hidden], read lazily."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as f:
                return int(f.get_slice("image_proj.latents").get_shape()[1])
        import torch

        state = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
        return int(state["image_proj"]["latents"].shape[1])
    except Exception as exc:  # torch/safetensors raise many types for a damaged file
        raise CheckpointError(f"checkpoint: cannot read image_proj.latents from {path} ({type(exc).__name__}: "
                              f"{exc}); the IP-Adapter weights are missing or corrupt") from exc


def load_ip_adapter(paths: CheckpointPaths, unet):
    """The resampler (diffusers' IPAdapterPlusImageProjection, weights converted from
    the original keys) and the [(to_k_ip, to_v_ip)] pairs for `unet`'s cross-attentions."""
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    try:
        state = load_original(paths.ip_weights)
        kwargs, resampler_state, kv = convert(state, len(cross_attention_layers(unet)), str(paths.ip_weights))
    except IPWeightsError as exc:
        raise CheckpointError(str(exc)) from exc
    resampler = IPAdapterPlusImageProjection(**kwargs)
    resampler.load_state_dict(resampler_state, strict=True)
    return resampler.eval(), kv
