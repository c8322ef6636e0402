"""Model folders: what the runtime reads from an export or engine folder.

An export folder holds ``{component}.onnx`` graphs (run by ONNX Runtime), an
engine folder ``{component}.plan`` files (run by TensorRT or TensorRT-RTX). Both
carry ``manifest.json``, the tokenizer and the scheduler config; the manifest
gives the model dims (and for engines the build profile), so the runtime rebuilds
each engine's I/O contract with ``spec.engine_specs``.

Both manifests are read strictly by artifacts.py, the same reader the build uses:
every path stays inside the folder and every file carries its sha256; with
``verify`` the files are checked against them, hashing only what changed since the
last check (the ``.verified.json`` stamp).

ONNX Runtime has no build profile: an export folder gets ``ONNX_LIMITS`` (the
sizes and batch of the default engine profile, which a host that runs the model
at all can run), overridable with ``limits``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .artifacts import (
    MANIFEST,
    asset_hashes,
    engine_specs_of,
    lora_file_hashes,
    manifest_format,
    missing_asset_dirs,
    read_engine_manifest,
    read_export_folder,
    spec_mismatches,
)
from .errors import ServiceError
from .manifest import FolderError, StaleFileError, verify_files
from .spec import (
    COMPONENTS,
    DEFAULT_PROFILE,
    SHALLOW_UNET,
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

BACKENDS = ("auto", "onnxruntime", "tensorrt", "tensorrt-rtx")
TRT_BACKENDS = ("tensorrt", "tensorrt-rtx")


class StaleArtifactError(StaleFileError):
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
    profile: Profile  # engine folders: the build profile; export folders: the limits
    runtime: dict  # manifest "runtime": vae_scaling_factor, force_zeros_for_empty_prompt, defaults, ...
    files: dict  # component -> Path of its graph or plan
    entries: dict = field(default_factory=dict)  # component -> manifest entry

    @property
    def specs(self) -> dict[str, EngineSpec]:
        return engine_specs(self.model_dims, self.profile)

    def identity(self, component: str) -> str:
        """A content id of one component's file (its sha256 from the manifest)."""
        entry = self.entries[component]
        return str(entry.get("sha256") or entry.get("plan_sha256"))

    @property
    def size_multiple(self) -> int:
        return self.model_dims.vae_scale * self.model_dims.latent_multiple


@dataclass(frozen=True)
class Limits:
    """What an export folder accepts (ONNX Runtime has no build profile): sides up to ``max_side`` pixels,
    up to ``max_batch`` images per UNet batch. The defaults are the default engine profile's ceiling, which
    a host that runs the model at all can run; a larger size is refused with this range rather than
    failing inside ONNX Runtime's allocator."""

    max_side: int = DEFAULT_PROFILE.height.max
    max_batch: int = DEFAULT_PROFILE.batch.max

    def profile(self, dims: ModelDims) -> Profile:
        """Every multiple of the size unit from one unit to max_side, batch 1..max_batch."""
        unit = dims.vae_scale * dims.latent_multiple
        if not isinstance(self.max_side, int) or not isinstance(self.max_batch, int) or self.max_side < unit \
                or self.max_batch < 1:
            raise SpecError(f"limits: need an int max size >= {unit} px and an int max batch >= 1, found "
                            f"{self.max_side!r} and {self.max_batch!r}")
        side = DimRange(unit, unit, self.max_side // unit * unit)
        return Profile(DimRange(1, 1, self.max_batch), side, side)


def read_folder(root: str | Path, verify: bool = True, limits: Optional[Limits] = None) -> ModelFolder:
    """Read and check an export or engine folder (artifacts.py reads either manifest strictly). ``verify``
    checks every graph/plan and asset against the manifest's sha256 (re-hashing only files changed since the
    last check); ``limits`` sets the sizes and batch an export folder accepts (default ``Limits()``)."""
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise FolderError(f"model folder {root}: not a folder; pass an export folder (--onnx) or engine folder (--engines)")
    if not path.is_file():
        raise FolderError(f"model folder {root}: no {MANIFEST}; pass a folder written by kolors-trt export or kolors-trt build")
    fmt = manifest_format(root)
    try:
        if fmt == EXPORT_FORMAT:
            folder = _export_folder(root, verify, limits)
        elif fmt == ENGINE_FORMAT:
            folder = _engine_folder(root, verify)
        else:
            raise FolderError(f"{path}: format {str(fmt)[:80]!r}, expected {EXPORT_FORMAT!r} (export folder) or "
                              f"{ENGINE_FORMAT!r} (engine folder)")
    except StaleFileError as err:
        if isinstance(err, StaleArtifactError):
            raise
        raise StaleArtifactError(str(err)) from None
    missing = [c for c in COMPONENTS if c not in folder.files]
    if missing:
        raise FolderError(f"{path}: lists no {', '.join(missing)}; the pipeline needs all of {COMPONENTS}")
    if SHALLOW_UNET in folder.files and not folder.model_dims.deep_cache:
        raise FolderError(f"{path}: lists {SHALLOW_UNET} but its model_dims hold no DeepCache split "
                          f"(deep_feature_channels 0); re-export with kolors-trt export")
    return folder


def _export_folder(root: Path, verify: bool, limits: Optional[Limits]) -> ModelFolder:
    export = read_export_folder(root, verify=verify)
    files = {name: c.onnx for name, c in export.components.items()}
    entries = {name: c.entry for name, c in export.components.items()}
    profile = (limits or Limits()).profile(export.model_dims)
    return ModelFolder(root, "onnx", None, export.model_dims, profile, dict(export.runtime), files, entries)


def _engine_folder(root: Path, verify: bool) -> ModelFolder:
    path = root / MANIFEST
    m = read_engine_manifest(root)
    specs = engine_specs_of(m, path)
    dims, profile = model_dims_from_json(m["model_dims"]), profile_from_json(m["profile"])
    stale = spec_mismatches(m, specs)
    if stale:
        raise StaleArtifactError(f"{path}: {next(iter(stale.values()))}; rebuild with kolors-trt build")
    files, entries, hashes = {}, {}, {}
    for name, entry in m["engines"].items():
        if name in specs:
            files[name], entries[name] = root / entry["file"], entry
            hashes[entry["file"]] = entry["plan_sha256"]
            hashes.update(lora_file_hashes(entry))
    missing = missing_asset_dirs(root)
    if missing:
        raise FolderError(f"model folder {root}: {missing[0]} is missing (copied from the export folder by build)")
    if verify:
        checked = verify_files(root, {**hashes, **asset_hashes(root, m, path)}, path)
        logger.info("%s: hashed %d file(s), %d unchanged since the last check", root, len(checked["hashed"]),
                    len(checked["trusted"]))
    return ModelFolder(root, "engines", m["target"], dims, profile, dict(m["runtime"]), files, entries)


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


__all__ = [
    "BACKENDS",
    "BackendError",
    "FolderError",
    "Limits",
    "ModelFolder",
    "StaleArtifactError",
    "TRT_BACKENDS",
    "read_folder",
    "resolve_backend",
]
