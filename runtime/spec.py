"""The I/O contract of the four engines, stated once.

Every other stage derives from this module: dynamic axes and sample inputs for
the ONNX export, optimisation profiles for TensorRT, buffer shapes and input
checks for the runtime. Pure Python, no third-party imports.

A shape is a tuple of entries; an entry is an ``int`` (a size fixed by the
model, e.g. the 256 text tokens), a ``str`` (a named dynamic dim with a
min/opt/max range) or a ``(name, factor)`` / ``(name, factor, divisor)`` tuple (a
dynamic dim scaled by a constant, e.g. the decoded image is ``latent_height * 8``
pixels high, DeepCache's feature at branch 3 ``latent_height / 2``).

The UNet comes as one graph, or (DeepCache, ``ModelDims.deep_cache``) as two: the
full ``unet``, which also outputs the deep feature of its cache branch, and
``unet_shallow``, the blocks outside the branch, which takes that feature.

Graph inputs and outputs are float32 (token ids int64) whatever the component's
precision: the precision lives inside the graph, which casts at its edges, so a
caller never changes buffers when a component moves between fp16 and fp32.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Iterable, Mapping, Union

from .errors import InputError

COMPONENTS = ("text_encoder", "image_encoder", "unet", "vae_decoder")
# Graphs a folder may hold besides the four: the shallow UNet of DeepCache (export's --deep-cache-branch),
# exported with the unet, at the unet's precision.
SHALLOW_UNET = "unet_shallow"
OPTIONAL_COMPONENTS = (SHALLOW_UNET,)
ALL_COMPONENTS = COMPONENTS + OPTIONAL_COMPONENTS
DEFAULT_DEEP_CACHE_BRANCH = 0  # DeepCache's cache_branch_id in its README: the outermost skip branch
# The ModelDims fields the export's DeepCache split sets (not the checkpoint): the unet graphs' only.
DEEP_CACHE_FIELDS = ("deep_cache_branch", "deep_feature_channels", "deep_feature_stride", "deep_feature_cross_attention")
PRECISIONS = ("fp16", "fp32")
# 8-bit UNets (Q/DQ graphs with an fp16 body, calibrated at export: export/quantize.py). The
# other components stay fp16/fp32: the UNet runs once per step, they run once per request.
QUANTIZED_PRECISIONS = ("int8", "fp8")
COMPONENT_PRECISIONS = {"text_encoder": PRECISIONS, "image_encoder": PRECISIONS,
                        "unet": PRECISIONS + QUANTIZED_PRECISIONS, "vae_decoder": PRECISIONS,
                        SHALLOW_UNET: PRECISIONS}  # the unet's; fp16 beside an 8-bit unet (exporter.resolve_precisions)
DEFAULT_PRECISION = {"text_encoder": "fp16", "image_encoder": "fp16", "unet": "fp16", "vae_decoder": "fp32",
                     SHALLOW_UNET: "fp16"}

# Kolors' common sizes (height x width); the optimum of the default profile is the first.
KOLORS_SIZES = ((1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344))

TEXT_LENGTH = 256  # ChatGLM3 prompt length in Kolors, fixed
# The reference sampling settings (diffusers' KolorsPipeline with IP scale 0.5); written
# into every manifest as runtime.defaults, which the runtime and the CLI read.
SAMPLING_DEFAULTS = {"height": 1024, "width": 1024, "num_inference_steps": 50, "guidance_scale": 5.0,
                     "ip_adapter_scale": 0.5}
EXPORT_FORMAT = "kolors-trt/export"  # manifest.json "format" of an export folder
# Export manifest "version": 2 = ip_scale per UNet row. The runtime refuses older folders.
EXPORT_VERSION = 2
ENGINE_FORMAT = "kolors-trt-engines/1"  # ... and of an engine folder
TIME_IDS = 6  # [orig_h, orig_w, crop_top, crop_left, target_h, target_w]

DimEntry = Union[int, str, tuple]


class SpecError(InputError):
    """An input does not match the engine contract."""


@dataclass(frozen=True)
class DimRange:
    min: int
    opt: int
    max: int

    def __post_init__(self):
        if not (1 <= self.min <= self.opt <= self.max):
            raise SpecError(f"dim range must satisfy 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}")

    def contains(self, value: int) -> bool:
        return self.min <= value <= self.max


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32" | "int64"
    shape: tuple  # of DimEntry


@dataclass(frozen=True)
class EngineSpec:
    name: str
    inputs: tuple
    outputs: tuple
    dims: Mapping[str, DimRange]  # named dynamic dims
    # Parity tolerances of the ONNX graph against the fp32 PyTorch module, per
    # precision: (atol, rtol) on values normalised by the reference's max abs.
    tolerance: Mapping[str, tuple] = field(default_factory=dict)

    def tensor(self, name: str) -> TensorSpec:
        for t in self.inputs + self.outputs:
            if t.name == name:
                return t
        raise KeyError(f"{self.name} has no tensor {name!r}")

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


@dataclass(frozen=True)
class ModelDims:
    """The sizes a checkpoint fixes; read from its configs at export time and
    stored in the manifest, so the runtime never needs the checkpoint."""

    text_hidden: int = 4096  # ChatGLM hidden size: prompt_embeds and pooled width
    image_size: int = 336  # CLIP input resolution
    ip_tokens: int = 16  # resampler queries
    cross_attention_dim: int = 2048  # UNet cross-attention width = IP token width
    latent_channels: int = 4
    vae_scale: int = 8  # pixels per latent
    latent_multiple: int = 4  # latent sizes must divide by 2**(UNet blocks - 1)
    text_length: int = TEXT_LENGTH
    # DeepCache's split, fixed at export (export/deep_cache.py): the cache branch (DeepCache's cache_branch_id,
    # -1 = none), and the deep feature the full UNet outputs and the shallow one takes:
    # [unet_batch, deep_feature_channels, latent_height / deep_feature_stride, latent_width / ...].
    deep_cache_branch: int = -1
    deep_feature_channels: int = 0  # 0: no shallow graph
    deep_feature_stride: int = 1
    deep_feature_cross_attention: int = 0  # 1: the shallow blocks hold cross-attention (take text and IP inputs)

    @property
    def deep_cache(self) -> bool:
        """The UNet is split for DeepCache: a unet_shallow graph, and the feature as a unet output."""
        return self.deep_feature_channels > 0


@dataclass(frozen=True)
class Profile:
    """Build-time coverage: images per request and pixel sizes."""

    batch: DimRange = DimRange(1, 1, 4)
    height: DimRange = DimRange(768, 1024, 1344)
    width: DimRange = DimRange(768, 1024, 1344)

    @classmethod
    def from_sizes(cls, sizes: Iterable[tuple], batch: DimRange = DimRange(1, 1, 4)) -> "Profile":
        """Cover a list of (height, width) sizes; the first one is the optimum."""
        sizes = list(sizes)
        if not sizes:
            raise SpecError("profile needs at least one size")
        hs, ws = [h for h, _ in sizes], [w for _, w in sizes]
        return cls(batch, DimRange(min(hs), sizes[0][0], max(hs)), DimRange(min(ws), sizes[0][1], max(ws)))

    @classmethod
    def static(cls, batch: int, height: int, width: int) -> "Profile":
        return cls(DimRange(batch, batch, batch), DimRange(height, height, height), DimRange(width, width, width))

    @property
    def is_static(self) -> bool:
        return all(r.min == r.max for r in (self.batch, self.height, self.width))


DEFAULT_PROFILE = Profile.from_sizes(KOLORS_SIZES)


def _latent(r: DimRange, m: ModelDims) -> DimRange:
    for v in (r.min, r.opt, r.max):
        if v % (m.vae_scale * m.latent_multiple):
            raise SpecError(
                f"image size {v} is not a multiple of {m.vae_scale * m.latent_multiple} "
                f"(VAE factor {m.vae_scale} x UNet downsampling {m.latent_multiple}); choose another size"
            )
    return DimRange(r.min // m.vae_scale, r.opt // m.vae_scale, r.max // m.vae_scale)


def engine_specs(model: ModelDims = ModelDims(), profile: Profile = DEFAULT_PROFILE) -> dict[str, EngineSpec]:
    """The four engines for one checkpoint's sizes and one build profile."""
    m, b = model, profile.batch
    lat_h, lat_w = _latent(profile.height, m), _latent(profile.width, m)
    # Under classifier-free guidance the UNet sees [uncond, cond]: 2x the images.
    # A dynamic profile also admits the unguided batch (guidance <= 1); a static
    # one (for CUDA graphs) is exactly the CFG batch.
    unet_b = DimRange(2 * b.min if profile.is_static else b.min, 2 * b.opt, 2 * b.max)
    # The encoders run once per prompt and per new reference image, at batch 1,
    # whatever the number of images per request; the constants (empty negative,
    # zero image) are batch 1 too.
    one = DimRange(1, 1, 1)
    f32, i64 = "float32", "int64"
    L, C = m.text_length, m.latent_channels
    latent = ("unet_batch", C, "latent_height", "latent_width")
    unet_inputs = (
        TensorSpec("sample", f32, latent),
        TensorSpec("timestep", f32, (1,)),
        TensorSpec("encoder_hidden_states", f32, ("unet_batch", L, m.text_hidden)),
        TensorSpec("text_embeds", f32, ("unet_batch", m.text_hidden)),
        TensorSpec("time_ids", f32, ("unet_batch", TIME_IDS)),
        TensorSpec("ip_tokens", f32, ("unet_batch", m.ip_tokens, m.cross_attention_dim)),
        TensorSpec("ip_scale", f32, ("unet_batch",)),  # per row: each request its own scale
    )
    unet_dims = {"unet_batch": unet_b, "latent_height": lat_h, "latent_width": lat_w}
    unet_outputs = (TensorSpec("noise_pred", f32, latent),)
    shallow = {}
    if m.deep_cache:
        feature = TensorSpec("deep_feature", f32, ("unet_batch", m.deep_feature_channels,
                                                   _scaled("latent_height", m.deep_feature_stride),
                                                   _scaled("latent_width", m.deep_feature_stride)))
        unet_outputs += (feature,)
        # The shallow blocks use the text and IP inputs only through cross-attention; an input a graph does not
        # use is dropped by the exporter and by TensorRT, so the spec leaves it out.
        cross = ("encoder_hidden_states", "ip_tokens", "ip_scale")
        inputs = tuple(t for t in unet_inputs if m.deep_feature_cross_attention or t.name not in cross)
        shallow[SHALLOW_UNET] = EngineSpec(SHALLOW_UNET, inputs=inputs + (feature,),
                                           outputs=(TensorSpec("noise_pred", f32, latent),), dims=unet_dims,
                                           tolerance={"fp32": (1e-4, 1e-4), "fp16": (2e-2, 2e-2)})
    return {
        "text_encoder": EngineSpec(
            "text_encoder",
            inputs=(
                TensorSpec("input_ids", i64, ("batch", L)),
                TensorSpec("attention_mask", i64, ("batch", L)),
                TensorSpec("position_ids", i64, ("batch", L)),
            ),
            outputs=(
                TensorSpec("prompt_embeds", f32, ("batch", L, m.text_hidden)),  # hidden_states[-2]
                TensorSpec("pooled", f32, ("batch", m.text_hidden)),  # hidden_states[-1], last position
            ),
            dims={"batch": one},
            tolerance={"fp32": (1e-4, 1e-4), "fp16": (2e-2, 2e-2)},
        ),
        "image_encoder": EngineSpec(
            "image_encoder",
            inputs=(TensorSpec("pixel_values", f32, ("batch", 3, m.image_size, m.image_size)),),
            outputs=(TensorSpec("ip_tokens", f32, ("batch", m.ip_tokens, m.cross_attention_dim)),),
            dims={"batch": one},
            tolerance={"fp32": (1e-4, 1e-4), "fp16": (2e-2, 2e-2)},
        ),
        "unet": EngineSpec("unet", inputs=unet_inputs, outputs=unet_outputs, dims=unet_dims,
                           tolerance={"fp32": (1e-4, 1e-4), "fp16": (2e-2, 2e-2)}),
        "vae_decoder": EngineSpec(
            "vae_decoder",
            inputs=(TensorSpec("latents", f32, ("batch", C, "latent_height", "latent_width")),),
            outputs=(
                TensorSpec("image", f32, ("batch", 3, ("latent_height", m.vae_scale), ("latent_width", m.vae_scale))),
            ),
            dims={"batch": b, "latent_height": lat_h, "latent_width": lat_w},
            tolerance={"fp32": (1e-4, 1e-4), "fp16": (2e-2, 2e-2)},
        ),
        **shallow,
    }


def _scaled(name: str, divisor: int) -> DimEntry:
    return name if divisor == 1 else (name, 1, divisor)


# ---- derived views -------------------------------------------------------------------------


def _entry_value(entry: DimEntry, values: Mapping[str, int]) -> int:
    if isinstance(entry, int):
        return entry
    if isinstance(entry, str):
        return values[entry]
    name, factor, divisor = (*entry, 1)[:3]
    return values[name] * factor // divisor


def dim_label(entry: DimEntry) -> object:
    """How a graph names one dim of a tensor: the size, the dim's name, or "latent_height*8" /
    "latent_height/2" for a scaled one."""
    if isinstance(entry, (int, str)):
        return entry
    name, factor, divisor = (*entry, 1)[:3]
    return name + (f"*{factor}" if factor != 1 else "") + (f"/{divisor}" if divisor != 1 else "")


def shape_of(tensor: TensorSpec, values: Mapping[str, int]) -> tuple:
    """Concrete shape of a tensor for given dynamic dim values."""
    return tuple(_entry_value(e, values) for e in tensor.shape)


def dim_values(spec: EngineSpec, which: str = "opt") -> dict[str, int]:
    """Dynamic dim values at one corner of the ranges: "min", "opt" or "max"."""
    return {name: getattr(r, which) for name, r in spec.dims.items()}


def sample_shapes(spec: EngineSpec, values: Mapping[str, int]) -> dict[str, tuple]:
    return {t.name: shape_of(t, values) for t in spec.inputs + spec.outputs}


def dynamic_axes(spec: EngineSpec) -> dict[str, dict[int, str]]:
    """torch.onnx ``dynamic_axes``: the named (unscaled) dims of every tensor, and the scaled dims of inputs.

    Scaled output dims are left to shape inference: ONNX derives them from the
    inputs, and naming them would assert an equality that is not one. A scaled
    input dim (the deep feature's) must be dynamic, or the trace bakes in its size.
    """
    axes = {}
    for t in spec.inputs + spec.outputs:
        scaled = t in spec.inputs
        named = {i: dim_label(e) for i, e in enumerate(t.shape) if isinstance(e, str) or (scaled and isinstance(e, tuple))}
        if named:
            axes[t.name] = named
    return axes


def trt_profile(spec: EngineSpec) -> dict[str, tuple]:
    """Input name -> (min, opt, max) shapes: one TensorRT optimisation profile."""
    corners = [dim_values(spec, w) for w in ("min", "opt", "max")]
    return {t.name: tuple(shape_of(t, c) for c in corners) for t in spec.inputs}


def check_feeds(spec: EngineSpec, feeds: Mapping[str, object]) -> dict[str, int]:
    """Check names, dtypes and shapes of a feed dict (array-likes with .shape and
    .dtype); returns the dynamic dim values it implies. Raises SpecError."""
    names = set(feeds)
    expected = set(spec.input_names)
    if names != expected:
        raise SpecError(
            f"{spec.name}: inputs {sorted(names)} do not match the engine's {sorted(expected)} "
            f"(missing {sorted(expected - names)}, unexpected {sorted(names - expected)})"
        )
    values: dict[str, int] = {}
    for t in spec.inputs:
        arr = feeds[t.name]
        dtype = str(getattr(arr, "dtype", "")).replace("torch.", "")
        if dtype != t.dtype:
            raise SpecError(f"{spec.name}: input {t.name!r} has dtype {dtype}, expected {t.dtype}")
        shape = tuple(arr.shape)
        if len(shape) != len(t.shape):
            raise SpecError(f"{spec.name}: input {t.name!r} has shape {shape}, expected rank {len(t.shape)} {t.shape}")
        for axis, (entry, size) in enumerate(zip(t.shape, shape)):
            if isinstance(entry, int):
                if size != entry:
                    raise SpecError(f"{spec.name}: input {t.name!r} axis {axis} is {size}, expected {entry}")
            elif isinstance(entry, str):
                if values.setdefault(entry, size) != size:
                    raise SpecError(
                        f"{spec.name}: dim {entry!r} is {values[entry]} in one input and {size} in {t.name!r}"
                    )
    for t in spec.inputs:  # scaled dims follow from the named ones
        for axis, (entry, size) in enumerate(zip(t.shape, feeds[t.name].shape)):
            if isinstance(entry, tuple) and entry[0] in values and size != _entry_value(entry, values):
                raise SpecError(f"{spec.name}: input {t.name!r} axis {axis} is {size}, expected "
                                f"{dim_label(entry)} = {_entry_value(entry, values)}")
    for name, value in values.items():
        r = spec.dims[name]
        if not r.contains(value):
            raise SpecError(
                f"{spec.name}: dim {name!r} = {value} is outside the engine profile [{r.min}, {r.max}]; "
                "rebuild the engine with a profile that covers it"
            )
    return values


def to_json(obj) -> object:
    """Plain JSON form of a spec object (for manifests and hashing)."""
    if isinstance(obj, dict):
        return {k: to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if hasattr(obj, "__dataclass_fields__"):
        return to_json(asdict(obj))
    return obj


def spec_hash(spec: EngineSpec) -> str:
    """Stable hash of an engine's contract, for cache keys."""
    text = json.dumps(to_json(spec), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse_size(text: str) -> tuple:
    """"1024x1024" (height x width) -> (1024, 1024); raises SpecError."""
    h, sep, w = str(text).lower().partition("x")
    if not sep or not h.strip().isdigit() or not w.strip().isdigit():
        raise SpecError(f"size {text!r} is not HEIGHTxWIDTH, e.g. 1024x1024")
    return int(h), int(w)


def model_dims_from_json(d: Mapping) -> ModelDims:
    return replace(ModelDims(), **{k: int(v) for k, v in d.items() if k in ModelDims.__dataclass_fields__})


def profile_from_json(d: Mapping) -> Profile:
    return Profile(DimRange(**d["batch"]), DimRange(**d["height"]), DimRange(**d["width"]))
