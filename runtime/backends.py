"""Model folders and the engines that run them, behind one small interface.

A model folder is either an export folder (``{component}.onnx``, run by ONNX
Runtime) or an engine folder (``{component}.plan``, run by TensorRT or
TensorRT-RTX, see backend_trt.py). Both carry ``manifest.json``, the tokenizer
and the scheduler config; the manifest gives the model dims (and for engines
the build profile), so the runtime rebuilds each engine's I/O contract with
``spec.engine_specs`` and checks every feed against it before running.

    Engine.run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]
    Engine.runs   how many times it ran (tests prove cache hits with it)

ONNX Runtime has no build profile: an export folder gets a permissive one, so
any image size that is a multiple of ``vae_scale * latent_multiple`` passes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional

import numpy as np

from .errors import InputError, ServiceError
from .hashing import sha256_file
from .postprocess import check_finite
from .spec import (
    COMPONENTS,
    check_feeds,
    ENGINE_FORMAT,
    EXPORT_FORMAT,
    DimRange,
    EngineSpec,
    ModelDims,
    Profile,
    SpecError,
    engine_specs,
    model_dims_from_json,
    profile_from_json,
)

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
BACKENDS = ("auto", "onnxruntime", "tensorrt", "tensorrt-rtx")
TRT_BACKENDS = ("tensorrt", "tensorrt-rtx")
PERMISSIVE_MAX_PIXELS = 16384  # largest side an export folder accepts (ONNX Runtime has no profile)
PERMISSIVE_MAX_BATCH = 64


class FolderError(InputError):
    """A path is not a usable export or engine folder."""


class StaleArtifactError(FolderError):
    """A graph or plan file differs from the one its manifest describes."""


class BackendError(ServiceError):
    """A backend cannot run here (package missing, no GPU, version or GPU mismatch) or failed."""


@dataclass(frozen=True)
class ModelFolder:
    """What the runtime needs from an export or engine folder's manifest."""

    root: Path
    kind: str  # "onnx" | "engines"
    target: Optional[str]  # engine folders: "tensorrt" | "tensorrt-rtx"
    model_dims: ModelDims
    profile: Profile
    runtime: dict  # manifest "runtime": vae_scaling_factor, force_zeros_for_empty_prompt, defaults, ...
    files: dict  # component -> Path of its graph or plan
    entries: dict = field(default_factory=dict)  # component -> manifest entry

    @property
    def specs(self) -> dict[str, EngineSpec]:
        return engine_specs(self.model_dims, self.profile)

    def identity(self, component: str) -> str:
        """A content id of one component's file (its sha256 from the manifest)."""
        entry = self.entries.get(component, {})
        return str(entry.get("sha256") or entry.get("plan_sha256") or self.files[component])

    @property
    def size_multiple(self) -> int:
        return self.model_dims.vae_scale * self.model_dims.latent_multiple


def permissive_profile(dims: ModelDims) -> Profile:
    """Every multiple of vae_scale * latent_multiple up to PERMISSIVE_MAX_PIXELS, batch up to PERMISSIVE_MAX_BATCH."""
    unit = dims.vae_scale * dims.latent_multiple
    side = DimRange(unit, unit, max(unit, PERMISSIVE_MAX_PIXELS // unit * unit))
    return Profile(DimRange(1, 1, PERMISSIVE_MAX_BATCH), side, side)


def _check_file(root: Path, component: str, path: Path, expected: Optional[str], verify: bool) -> None:
    if not path.is_file():
        raise FolderError(
            f"model folder {root}: {component} file {path.name} listed in {MANIFEST} is missing; "
            "re-run kolors-trt export / build"
        )
    if verify and expected:
        found = sha256_file(path)
        if found != expected:
            raise StaleArtifactError(
                f"model folder {root}: {path.name} ({component}) has sha256 {found[:16]}..., the manifest expects "
                f"{expected[:16]}...; the file was replaced after the manifest was written: re-run kolors-trt "
                "export / build for this folder"
            )


def read_folder(root: str | Path, verify: bool = True) -> ModelFolder:
    """Read and check an export or engine folder; ``verify`` hashes every graph/plan against the manifest."""
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise FolderError(f"model folder {root}: not a folder; pass an export folder (--onnx) or engine folder (--engines)")
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        raise FolderError(
            f"model folder {root}: no {MANIFEST}; pass a folder written by kolors-trt export or kolors-trt build"
        ) from None
    except (OSError, json.JSONDecodeError) as err:
        raise FolderError(f"model folder {root}: {MANIFEST} is unreadable ({err}); re-run kolors-trt export / build") from None
    if not isinstance(m, dict):
        raise FolderError(f"model folder {root}: {MANIFEST} is not a JSON object")
    fmt = m.get("format")
    if fmt == EXPORT_FORMAT:
        kind, listing, target = "onnx", m.get("components"), None
    elif fmt == ENGINE_FORMAT:
        kind, listing, target = "engines", m.get("engines"), m.get("target")
    else:
        raise FolderError(
            f"model folder {root}: {MANIFEST} has format {fmt!r}, expected {EXPORT_FORMAT!r} (export folder) "
            f"or {ENGINE_FORMAT!r} (engine folder)"
        )
    if not isinstance(listing, dict) or "model_dims" not in m:
        raise FolderError(f"model folder {root}: {MANIFEST} lacks model_dims or its component list; re-run export / build")
    missing = [c for c in COMPONENTS if c not in listing]
    if missing:
        raise FolderError(f"model folder {root}: {MANIFEST} lists no {', '.join(missing)}; the pipeline needs all of {COMPONENTS}")
    runtime = m.get("runtime")
    if not isinstance(runtime, dict) or "vae_scaling_factor" not in runtime:
        raise FolderError(
            f"model folder {root}: {MANIFEST} has no 'runtime' constants (vae_scaling_factor, defaults, ...); "
            "export folders write them, engine folders copy them from the export manifest: rebuild with a "
            "kolors-trt that does"
        )
    try:
        dims = model_dims_from_json(m["model_dims"])
        profile = profile_from_json(m["profile"]) if kind == "engines" else permissive_profile(dims)
        engine_specs(dims, profile)
    except (KeyError, TypeError, SpecError) as err:
        raise FolderError(f"model folder {root}: model_dims/profile in {MANIFEST} do not make a spec ({err!r})") from None
    for asset in ("tokenizer", "scheduler"):
        if not (root / asset).is_dir():
            raise FolderError(f"model folder {root}: {asset}/ is missing (written by export, copied by build)")
    files, entries = {}, {}
    for name in COMPONENTS:
        entry = listing[name]
        suffix = ".onnx" if kind == "onnx" else ".plan"
        file = root / entry.get("file", f"{name}{suffix}")
        if kind == "onnx":
            _check_file(root, name, file, entry.get("sha256"), verify)
            if entry.get("external_data"):
                _check_file(root, name, root / entry["external_data"], entry.get("external_data_sha256"), verify)
        else:
            _check_file(root, name, file, entry.get("plan_sha256"), verify)
        files[name], entries[name] = file, entry
    return ModelFolder(root, kind, target, dims, profile, dict(runtime), files, entries)


def resolve_backend(folder: ModelFolder, backend: str) -> str:
    """The backend for a folder: "auto" is ONNX Runtime for export folders and the build target for engines."""
    if backend not in BACKENDS:
        raise BackendError(f"runtime: unknown backend {backend!r}; choose one of {BACKENDS}")
    if folder.kind == "onnx":
        if backend in ("auto", "onnxruntime"):
            return "onnxruntime"
        raise BackendError(
            f"runtime: {folder.root} is an export folder (ONNX graphs); backend {backend!r} runs engine folders: "
            f"build engines with kolors-trt build, or use --backend onnxruntime"
        )
    target = folder.target if folder.target in TRT_BACKENDS else None
    if backend == "auto":
        if target is None:
            raise BackendError(f"runtime: {folder.root}: manifest target {folder.target!r} is not one of {TRT_BACKENDS}")
        return target
    if backend == "onnxruntime":
        raise BackendError(f"runtime: {folder.root} is an engine folder (plans); ONNX Runtime runs export folders (--onnx)")
    if target is not None and backend != target:
        raise BackendError(f"runtime: {folder.root} holds {target} plans; they cannot run on {backend}")
    return backend


class Engine:
    """One component's runnable graph. Subclasses implement ``_execute``."""

    def __init__(self, spec: EngineSpec, source: Path):
        self.spec = spec
        self.source = Path(source)
        self.runs = 0

    @property
    def name(self) -> str:
        return self.spec.name

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check the feeds against the spec, run, check the outputs are finite."""
        values = check_feeds(self.spec, feeds)
        self.runs += 1
        outputs = self._execute(feeds, values)
        for name, value in outputs.items():
            check_finite(self.name, name, value)
        return outputs

    def _execute(self, feeds: Mapping[str, np.ndarray], values: Mapping[str, int]) -> dict[str, np.ndarray]:
        """Run on feeds already checked; `values` are the dynamic dims they imply."""
        raise NotImplementedError


class OrtEngine(Engine):
    """An ONNX graph on ONNX Runtime (CUDA when onnxruntime-gpu offers it, else CPU)."""

    def __init__(self, spec: EngineSpec, path: Path, providers: Optional[list] = None):
        super().__init__(spec, path)
        import onnxruntime as ort

        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        options = ort.SessionOptions()
        options.log_severity_level = 3  # warnings about unused initialisers etc. are not the user's business
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as err:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            raise BackendError(f"{spec.name}: ONNX Runtime cannot load {path} ({err}); re-run kolors-trt export") from err
        inputs = {i.name for i in self.session.get_inputs()}
        if inputs != set(spec.input_names):
            raise FolderError(
                f"{spec.name}: {path.name} has inputs {sorted(inputs)}, the spec expects {sorted(spec.input_names)}; "
                "re-export with this kolors-trt"
            )
        logger.debug("%s: %s on %s", spec.name, path.name, self.session.get_providers())

    def _execute(self, feeds: Mapping[str, np.ndarray], values: Mapping[str, int]) -> dict[str, np.ndarray]:
        names = self.spec.output_names
        values = self.session.run(names, {k: np.ascontiguousarray(v) for k, v in feeds.items()})
        return dict(zip(names, values))


def open_engines(folder: ModelFolder, backend: str, cuda_graph: Optional[bool] = None) -> dict[str, Engine]:
    """One Engine per component for a resolved backend name."""
    specs = folder.specs
    if backend == "onnxruntime":
        return {name: OrtEngine(specs[name], folder.files[name]) for name in COMPONENTS}
    from .backend_trt import open_trt_engines

    return open_trt_engines(folder, backend, specs, cuda_graph)


def denoise_numpy(
    unet: Engine,
    latents: np.ndarray,
    conditioning: Mapping[str, np.ndarray],
    scheduler,
    guidance_scale: float,
    do_cfg: bool,
    on_step: Optional[Callable[[int], None]] = None,
) -> np.ndarray:
    """The denoising loop on the host: UNet, CFG combine, Euler step, in float32.

    ``latents`` [B, C, h, w]; ``conditioning`` holds the UNet inputs that do not
    change per step (encoder_hidden_states, text_embeds, time_ids, ip_tokens,
    ip_scale), batched [uncond, cond] under CFG.
    """
    g = np.float32(guidance_scale)
    for i, t in enumerate(scheduler.timesteps):
        model_input = np.concatenate([latents, latents]) if do_cfg else latents  # [2B or B, C, h, w]
        model_input = scheduler.scale_model_input(model_input, i)
        feeds = {"sample": model_input, "timestep": np.array([t], dtype=np.float32), **conditioning}
        noise = unet.run(feeds)["noise_pred"]
        if do_cfg:
            uncond, cond = np.split(noise, 2)
            noise = uncond + g * (cond - uncond)
        latents = scheduler.step(noise, i, latents)
        if on_step is not None:
            on_step(i)
    return latents


__all__ = [
    "BACKENDS",
    "BackendError",
    "Engine",
    "FolderError",
    "ModelFolder",
    "OrtEngine",
    "StaleArtifactError",
    "denoise_numpy",
    "open_engines",
    "permissive_profile",
    "read_folder",
    "resolve_backend",
]
