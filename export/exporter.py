"""Export the four components of a checkpoint into a self-contained export folder.

    out/text_encoder.onnx  image_encoder.onnx  unet.onnx  vae_decoder.onnx
    out/tokenizer/         tokenizer.model (+ tokenizer_config.json)
    out/scheduler/         scheduler_config.json
    out/image_processor/   preprocessor_config.json
    out/unet.lora.json text_encoder.lora.json   where each weight a LoRA can change lives (lora_map.py)
    out/manifest.json      model dims, per-component precision, hashes, parity, runtime constants,
                           the checkpoint's fingerprint, asset hashes

Each graph is traced at a small sample shape and validated on ONNX Runtime at
another shape (other batch, non-square latents), so a dim baked in by the trace
cannot pass unnoticed. Graphs are staged and committed together (folder.py): an
interrupted export leaves the folder as it was.
"""

from __future__ import annotations

import copy
import logging
import resource
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from kolors_trt.runtime import spec as S
from kolors_trt.runtime.errors import InputError
from kolors_trt.runtime.hashing import sha256_file
from kolors_trt.runtime.manifest import clean_leftovers
from kolors_trt.runtime.preprocess import CLIP_MEAN, CLIP_STD

from . import checkpoint as ck
from . import deep_cache as D
from . import folder as F
from . import lora_map as LM
from .onnx_export import OPSET, export_onnx, sample_inputs
from .quantize import OPSET_8BIT
from .validate import Parity, validate

logger = logging.getLogger(__name__)

MANIFEST_VERSION = S.EXPORT_VERSION


class PrecisionError(InputError):
    """A precision setting names an unknown component or precision."""


EXPORTED, UP_TO_DATE = "exported", "up-to-date"


@dataclass
class ExportResult:
    component: str
    precision: str
    file: str
    bytes: int
    export_seconds: float
    peak_rss_mb: float
    parity: Parity
    status: str = EXPORTED  # EXPORTED | UP_TO_DATE (numbers from the manifest of the earlier export)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def resolve_precisions(default: str = "fp16", overrides: dict | None = None) -> dict:
    """Per-component precision: `default` for the text encoder, image encoder and
    UNet, fp32 for the VAE (the SDXL VAE overflows in fp16), then `overrides`; the
    shallow UNet follows the UNet (``shallow_precision``)."""
    if default not in S.PRECISIONS:
        raise PrecisionError(f"export: precision {default!r} is not one of {S.PRECISIONS}")
    out = {c: (default if c != "vae_decoder" else S.DEFAULT_PRECISION[c]) for c in S.COMPONENTS}
    for comp, prec in (overrides or {}).items():
        if comp not in S.COMPONENTS or prec not in S.COMPONENT_PRECISIONS[comp]:
            allowed = "; ".join(f"{c}: {'/'.join(p)}" for c, p in S.COMPONENT_PRECISIONS.items() if c in S.COMPONENTS)
            follows = f" ({comp} takes the unet's precision)" if comp == S.SHALLOW_UNET else ""
            raise PrecisionError(f"export: cannot set {comp}={prec}{follows}; precisions per component are {allowed}")
        out[comp] = prec
    out[S.SHALLOW_UNET] = shallow_precision(out["unet"])
    return out


def shallow_precision(unet: str) -> str:
    """The shallow UNet's precision: the unet's; fp16 beside an 8-bit unet (calibrating it on its own would
    buy little: at branch 0 it is about 1.4% of the UNet's FLOPs, README "DeepCache")."""
    return unet if unet in S.PRECISIONS else "fp16"


def with_shallow_unet(components, deep_cache_branch: Optional[int]) -> tuple:
    """The graphs to export: the unet and its shallow half go together (one DeepCache split), the shallow one
    only with a branch (``--no-deep-cache``: refused if asked for)."""
    components = tuple(components)
    if deep_cache_branch is None:
        if S.SHALLOW_UNET in components:
            raise InputError(f"export: {S.SHALLOW_UNET} is DeepCache's shallow UNet; --no-deep-cache leaves it out: "
                             "drop one of the two")
        return components
    if "unet" not in components and S.SHALLOW_UNET not in components:
        return components
    unet = ("unet", S.SHALLOW_UNET)  # in this order, where the first of the two was asked for
    first = min(components.index(c) for c in unet if c in components)
    rest = [c for c in components if c not in unet]
    return tuple(rest[:first] + list(unet) + rest[first:])


def export_dims(model: S.ModelDims) -> dict:
    m = model.latent_multiple
    return {"batch": 1, "unet_batch": 2, "latent_height": 2 * m, "latent_width": 2 * m}


def check_dims(model: S.ModelDims) -> dict:
    m = model.latent_multiple
    return {"batch": 2, "unet_batch": 4, "latent_height": 3 * m, "latent_width": 4 * m}


class Components:
    """A checkpoint's fp32 torch modules, loaded when first needed and released once
    their graph is exported and validated: at most one component's weights are held
    at a time (the 6.2 B text encoder alone is 25 GB in fp32)."""

    _FOR_GRAPH = {"text_encoder": ("text_encoder",), "image_encoder": ("clip",), "unet": ("unet",),
                  S.SHALLOW_UNET: ("unet",), "vae_decoder": ("vae",)}

    def __init__(self, paths: ck.CheckpointPaths, deep_cache_branch: Optional[int] = None):
        self.paths = paths
        config = ck.read_config(paths.unet)
        self.dims = replace(ck.model_dims(paths), **D.feature_dims(config, deep_cache_branch))
        self.split = None if deep_cache_branch is None else D.split(config, deep_cache_branch)
        self._loaded: dict = {}

    def _get(self, key: str, load):
        if key not in self._loaded:
            self._loaded[key] = load()
        return self._loaded[key]

    @property
    def text_encoder(self):
        return self._get("text_encoder", lambda: ck.load_text_encoder(self.paths))

    @property
    def unet(self):
        return self._get("unet", lambda: ck.load_unet(self.paths))

    @property
    def vae(self):
        return self._get("vae", lambda: ck.load_vae(self.paths))

    @property
    def clip(self):
        return self._get("clip", lambda: ck.load_image_encoder(self.paths))

    @property
    def resampler(self):
        return self._ip()[0]

    @property
    def kv(self):
        return self._ip()[1]

    def _ip(self):
        def load():
            unet = self._loaded.get("unet")
            if unet is None:  # only the UNet's cross-attention layout is needed: no weights
                import torch
                from diffusers import UNet2DConditionModel

                with torch.device("meta"):
                    unet = UNet2DConditionModel.from_config(ck.read_config(self.paths.unet))
            return ck.load_ip_adapter(self.paths, unet)

        return self._get("ip", load)

    def release(self, name: str, later: tuple = ()) -> None:
        """Drop the modules graph `name` uses and no graph in `later` does (the IP weights stay: the image
        encoder and the UNets share them)."""
        import gc

        needed = {key for other in later for key in self._FOR_GRAPH[other]}
        for key in self._FOR_GRAPH[name]:
            if key not in needed:
                self._loaded.pop(key, None)
        gc.collect()

    def graph(self, name: str, precision: str):
        """The wrapper for `name` at `precision` (fp16 on a copy: the fp32 modules
        stay the reference)."""
        import torch

        from .components import ImageEncoderGraph, ShallowUNetGraph, TextEncoderGraph, UNetGraph, VaeDecoderGraph

        dtype = torch.float16 if precision == "fp16" else torch.float32

        def cast(m):
            return copy.deepcopy(m).to(dtype) if dtype != torch.float32 else m

        if name == "text_encoder":
            return TextEncoderGraph(cast(self.text_encoder)).eval()
        if name == "image_encoder":
            return ImageEncoderGraph(cast(self.clip), cast(self.resampler)).eval()
        if name == "unet":
            return UNetGraph(copy.deepcopy(self.unet).to(dtype), self.kv, self.split).eval()
        if name == S.SHALLOW_UNET:
            inputs = S.engine_specs(self.dims)[name].input_names
            return ShallowUNetGraph(copy.deepcopy(self.unet).to(dtype), self.kv, self.split, inputs).eval()
        if name == "vae_decoder":
            return VaeDecoderGraph(cast(self.vae)).eval()
        raise KeyError(name)

    def configs(self) -> dict:
        p = self.paths
        return {
            "text_encoder": ck.read_config(p.text_encoder),
            "image_encoder": ck.read_config(p.image_encoder),
            "unet": ck.read_config(p.unet),
            S.SHALLOW_UNET: {**ck.read_config(p.unet), "deep_cache_branch": self.dims.deep_cache_branch},
            "vae_decoder": ck.read_config(p.vae),
            "resampler": {"num_queries": int(self.resampler.latents.shape[1]),
                          "hidden_dims": int(self.resampler.latents.shape[2]), "depth": len(self.resampler.layers)},
        }


def runtime_constants(paths: ck.CheckpointPaths, dims: S.ModelDims) -> dict:
    """What the runtime needs from the checkpoint besides the graphs (manifest "runtime")."""
    vae = ck.read_config(paths.vae)
    index = {}
    if (paths.root / "model_index.json").is_file():
        index = ck.read_config(paths.root, "model_index.json")
    pre = {}
    if (paths.image_encoder / "preprocessor_config.json").is_file():
        pre = ck.read_config(paths.image_encoder, "preprocessor_config.json")
    return {
        "vae_scaling_factor": float(vae["scaling_factor"]),
        "vae_shift_factor": vae.get("shift_factor"),
        "force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", False)),
        "image_mean": list(pre.get("image_mean", CLIP_MEAN)),
        "image_std": list(pre.get("image_std", CLIP_STD)),
        "image_size": dims.image_size,
        "text_length": dims.text_length,
        "defaults": dict(S.SAMPLING_DEFAULTS),
    }


def quiet_libraries() -> None:
    """Keep library chatter (ONNX Runtime's optimiser, polygraphy's folding log,
    diffusers/transformers notices and their progress bars) out of the CLI output
    unless this package logs at INFO or below."""
    if logging.getLogger("kolors_trt").getEffectiveLevel() <= logging.INFO:
        return
    import diffusers
    import onnxruntime
    import transformers
    from polygraphy.logger import G_LOGGER

    onnxruntime.set_default_logger_severity(3)
    G_LOGGER.module_severity = G_LOGGER.ERROR
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def export_all(weights: Path, ip_adapter: Path, out: Path, precisions: dict,
               components: tuple = S.COMPONENTS, progress: bool = True, force: bool = False,
               calibration=None, deep_cache_branch: Optional[int] = S.DEFAULT_DEEP_CACHE_BRANCH) -> list[ExportResult]:
    """Export, validate and hash every requested component; write the manifest.

    A UNet at int8 or fp8 is calibrated with ``calibration`` (export.calibration.Calibration;
    None: NVIDIA's recipe) in the pipeline of this export's other graphs, so it is exported last
    (export/quantized_unet.py). ``deep_cache_branch`` (DeepCache's cache_branch_id; None: no split)
    adds the shallow UNet to the unet, and the deep feature to the unet's outputs
    (export/deep_cache.py). Skipped ("up-to-date" results) when ``out`` already verifies and
    holds these components from the same checkpoint fingerprint at these precisions (and the same
    calibration and split), unless ``force``. Adding some components to a folder of another
    checkpoint is refused (folder.check_addition)."""
    from tqdm import tqdm

    paths = ck.resolve(weights, ip_adapter)
    components = with_shallow_unet(components, deep_cache_branch)
    out = Path(out)
    fingerprint = ck.fingerprint(paths)
    cal = _calibration(precisions, components, calibration)
    precisions = {**precisions, S.SHALLOW_UNET: shallow_precision(precisions["unet"])}
    old, problem = F.existing_folder(out)
    clean_leftovers(out)  # what an interrupted or killed export left, also when this one is skipped
    comps = Components(paths, deep_cache_branch)
    # The split is the unet's: a folder whose unet is kept keeps its split.
    keep_split = "unet" not in components and old is not None
    dims = comps.dims
    if keep_split:
        dims = replace(dims, **{k: getattr(old.model_dims, k) for k in S.DEEP_CACHE_FIELDS})
    if not force and F.up_to_date(old, fingerprint, precisions, components, dims, cal.sha256() if cal else None):
        logger.info("%s: up to date (checkpoint fingerprint %s...)", out, fingerprint[:12])
        return [_up_to_date_result(old.components[name]) for name in components]
    runtime = runtime_constants(paths, dims)
    if set(components) - {S.SHALLOW_UNET} != set(S.COMPONENTS):
        tokenizer = sha256_file(F.asset_sources(paths)["tokenizer/tokenizer.model"])
        F.check_addition(out, old, problem, components, dims, tokenizer, runtime)
    quiet_libraries()
    out.mkdir(parents=True, exist_ok=True)
    specs = S.engine_specs(dims)
    results, entries, staged = [], {}, {}
    # A quantized UNet is calibrated in the pipeline of the other graphs: it goes last.
    order = sorted(components, key=lambda c: c == "unet" and cal is not None)
    try:
        # The bar as a context: closed (its line ended) before an interrupt's message is printed.
        with tqdm(order, desc="export", unit="graph", disable=not progress) as bar:
            for index, name in enumerate(bar):
                precision = precisions[name]
                bar.set_postfix_str(f"{name} {precision}")
                staged[name] = F.stage_dir(out, name)
                spec, file = specs[name], staged[name] / f"{name}.onnx"
                start = time.perf_counter()
                quantization = prints = None
                if name == "unet" and cal is not None:
                    quantization = _export_quantized(comps, cal, out, staged, entries, old, paths, runtime, fingerprint)
                    parity = _quantized_parity(spec, file, quantization)
                else:
                    graph = comps.graph(name, precision)
                    prints = LM.fingerprints(graph, name) if _maps_lora(name, precision) else None
                    export_onnx(graph, spec, export_dims(comps.dims), file)
                    del graph  # the fp16 copy is freed here
                seconds = time.perf_counter() - start
                if quantization is None:
                    values = check_dims(comps.dims)
                    reference = comps.graph(name, "fp32")
                    parity = validate(spec, precision, file, reference, values, sample_inputs(spec, values, seed=1))
                    del reference
                comps.release(name, later=order[index + 1:])
                if name in LM.LORA_COMPONENTS:
                    LM.write_lora_map(staged[name], name, _lora_map(prints, file, name, precision))
                fields = F.graph_fields(staged[name], name)
                results.append(ExportResult(name, precision, file.name, fields["bytes"], seconds, peak_rss_mb(), parity))
                entries[name] = _entry(fields, results[-1], fingerprint)
                if quantization is not None:
                    entries[name]["quantization"] = quantization
                    entries[name]["validation"]["rms_rel_err"] = quantization["error"]["rms_rel_err"]
                logger.info("%s (%s): max abs err %.3g, rel err %.3g", name, precision, parity.max_abs_err, parity.rel_err)
            configs = comps.configs()
            for name, entry in entries.items():
                entry["config"] = configs[name]
            extra = {"resampler": configs["resampler"]}
            # A re-exported unet replaces its split: an older shallow UNet goes unless exported with it.
            drop = (S.SHALLOW_UNET,) if "unet" in entries and S.SHALLOW_UNET not in entries else ()
            F.commit(out, staged, lambda: F.write_manifest(out, paths, dims, runtime, entries, old, extra, drop), drop)
    finally:
        F.remove_stages(staged)
    return results


def _maps_lora(name: str, precision: str) -> bool:
    return name in LM.LORA_COMPONENTS and precision in LM.PLAIN_PRECISIONS


def _lora_map(prints, file: Path, name: str, precision: str) -> dict:
    """The graph's LoRA map (lora_map.py), or one that says why LoRA cannot apply to it."""
    if prints is None:
        return LM.unsupported_map(name, precision, file, f"the {name} graph is {precision}: its weights are not "
                                  "plain fp16/fp32 tensors a LoRA delta can be added to; export it at fp16 or fp32")
    return LM.build_lora_map(prints, file, name, precision)


def _entry(fields: dict, r: ExportResult, fingerprint: str) -> dict:
    quantized = r.precision in S.QUANTIZED_PRECISIONS
    return {
        **fields,
        "precision": r.precision,
        "opset": OPSET_8BIT if quantized else OPSET,
        "export_seconds": round(r.export_seconds, 3),
        "validation": {"max_abs_err": r.parity.max_abs_err, "rel_err": r.parity.rel_err,
                       "dims": r.parity.dims,
                       "reference": "fp32 PyTorch module" + (" on held-out pipeline inputs" if quantized else "")},
        "checkpoint": fingerprint,
    }


def _calibration(precisions: dict, components, calibration):
    """The UNet's calibration when it is exported at int8/fp8 (NVIDIA's recipe unless given), else None."""
    if "unet" not in components or precisions["unet"] not in S.QUANTIZED_PRECISIONS:
        return None
    from .calibration import calibration as recipe

    cal = calibration or recipe(precisions["unet"])
    if cal.precision != precisions["unet"]:
        raise PrecisionError(f"export: the calibration is for {cal.precision}, the UNet is exported at "
                             f"{precisions['unet']}")
    return cal


def _export_quantized(comps, cal, out: Path, staged: dict, entries: dict, old, paths, runtime, fingerprint: str) -> dict:
    """The quantized UNet into staged["unet"]; the other graphs from this export or the folder it adds to,
    and the folder's fp16 UNet graph of this checkpoint, when it holds one, as the image reference."""
    from .quantized_unet import OTHERS, export_quantized_unet

    graphs, others = {}, {}
    for name in OTHERS:
        if name in entries:
            graphs[name], others[name] = staged[name], entries[name]
        elif old is not None and name in old.components:
            graphs[name], others[name] = out, old.components[name].entry
        else:
            raise PrecisionError(f"export: a {cal.precision} UNet is calibrated in the pipeline of the other graphs; "
                                 f"{out} has no {name}: export all components together (omit --components)")
    unet = old.components.get("unet") if old is not None else None
    if unet is not None and unet.precision == "fp16" and unet.entry.get("checkpoint") == fingerprint \
            and unet.entry.get("opset") == OPSET:
        graphs["unet"] = out  # what export_onnx would write again (the export is deterministic)
    return export_quantized_unet(comps, cal, out, staged["unet"], graphs, others, paths, comps.dims, runtime,
                                 export_dims(comps.dims))


def _quantized_parity(spec: S.EngineSpec, file: Path, quantization: dict) -> Parity:
    """The check of a quantized graph: its signature here, its error measured on held-out inputs."""
    import onnx

    from .validate import check_signature

    check_signature(spec, onnx.load(str(file), load_external_data=False))
    err, cal = quantization["error"], quantization["calibration"]
    dims = {"unet_batch": 2 * cal["batch"], "latent_height": cal["size"][0] // 8, "latent_width": cal["size"][1] // 8}
    return Parity("unet", quantization["mode"], err["max_abs_err"], err["max_rel_err"], 0.0, dims)


def _up_to_date_result(comp) -> ExportResult:
    v = comp.entry.get("validation") or {}
    parity = Parity(comp.name, comp.precision, v.get("max_abs_err"), v.get("rel_err"), 0.0, v.get("dims") or {})
    return ExportResult(comp.name, comp.precision, comp.onnx.name, comp.entry.get("bytes", 0),
                        comp.entry.get("export_seconds", 0.0), 0.0, parity, UP_TO_DATE)
