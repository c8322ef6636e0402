"""Model folders: what the runtime reads from an export or engine folder.

An export folder holds ``{component}.onnx`` graphs (run by ONNX Runtime), an
engine folder ``{component}.plan`` files (run by TensorRT or TensorRT-RTX). Both
carry ``manifest.json``, the tokenizer and the scheduler config; the manifest
gives the model dims (and for engines the build profile), so the runtime rebuilds
each engine's I/O contract with ``spec.engine_specs``.

Every path a manifest names stays inside the folder and every file carries its
sha256 (manifest.py); with ``verify`` the files are checked against them, hashing
only what changed since the last check (the ``.verified.json`` stamp).

ONNX Runtime has no build profile: an export folder gets ``ONNX_LIMITS`` (the
sizes and batch of the default engine profile, which a host that runs the model
at all can run), overridable with ``limits``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .errors import ServiceError
from .manifest import (
    MANIFEST,
    FolderError,
    ManifestError,
    StaleFileError,
    contained,
    read_json_object,
    verify_files,
)
from .manifest import field as manifest_field
from .spec import (
    COMPONENTS,
    DEFAULT_PROFILE,
    ENGINE_FORMAT,
    EXPORT_FORMAT,
    EXPORT_VERSION,
    DimRange,
    EngineSpec,
    ModelDims,
    Profile,
    SpecError,
    engine_specs,
    model_dims_from_json,
    profile_from_json,
    spec_hash,
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
    """Read and check an export or engine folder. ``verify`` checks every graph/plan against the
    manifest's sha256 (re-hashing only files changed since the last check); ``limits`` sets the sizes
    and batch an export folder accepts (default ``Limits()``)."""
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise FolderError(f"model folder {root}: not a folder; pass an export folder (--onnx) or engine folder (--engines)")
    if not path.is_file():
        raise FolderError(f"model folder {root}: no {MANIFEST}; pass a folder written by kolors-trt export or kolors-trt build")
    m = read_json_object(path)
    fmt = m.get("format")
    if fmt == EXPORT_FORMAT:
        kind, listing_key, target = "onnx", "components", None
        version = manifest_field(m, "version", "int", path, default=1)
        if version < EXPORT_VERSION:
            raise FolderError(f"{path}: export format version {version}, this runtime needs {EXPORT_VERSION} (the UNet "
                              "takes one IP scale per row since version 2); re-run kolors-trt export")
    elif fmt == ENGINE_FORMAT:
        kind, listing_key = "engines", "engines"
        target = manifest_field(m, "target", "string", path)
    else:
        raise FolderError(
            f"{path}: format {fmt!r}, expected {EXPORT_FORMAT!r} (export folder) or {ENGINE_FORMAT!r} (engine folder)"
        )
    listing = manifest_field(m, listing_key, "object", path)
    missing = [c for c in COMPONENTS if c not in listing]
    if missing:
        raise FolderError(f"{path}: lists no {', '.join(missing)}; the pipeline needs all of {COMPONENTS}")
    runtime = manifest_field(m, "runtime", "object", path)
    manifest_field(m, "runtime.vae_scaling_factor", "number", path)
    if runtime.get("vae_shift_factor") is not None:
        manifest_field(m, "runtime.vae_shift_factor", "number", path)
    manifest_field(m, "runtime.defaults", "object", path, default=None)
    try:
        dims = model_dims_from_json(manifest_field(m, "model_dims", "object", path))
        if kind == "engines":
            profile = profile_from_json(manifest_field(m, "profile", "object", path))
        else:
            profile = (limits or Limits()).profile(dims)
        specs = engine_specs(dims, profile)
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, ManifestError):
            raise
        raise FolderError(f"{path}: model_dims/profile do not make an engine spec ({err}); re-run export / build") from None
    for asset in ("tokenizer", "scheduler"):
        if not (root / asset).is_dir():
            raise FolderError(f"model folder {root}: {asset}/ is missing (written by export, copied by build)")
    files, entries, hashes = {}, {}, {}
    for name in COMPONENTS:
        entry = manifest_field(m, f"{listing_key}.{name}", "object", path)
        where = f"{path}: {listing_key}.{name}"
        file = contained(root, entry.get("file"), f"{where}.file")
        if kind == "onnx":
            hashes[file.relative_to(root).as_posix()] = manifest_field(m, f"{listing_key}.{name}.sha256", "sha256", path)
            if entry.get("external_data") is not None:
                data = contained(root, entry["external_data"], f"{where}.external_data")
                digest = manifest_field(m, f"{listing_key}.{name}.external_data_sha256", "sha256", path)
                hashes[data.relative_to(root).as_posix()] = digest
        else:
            hashes[file.relative_to(root).as_posix()] = manifest_field(m, f"{listing_key}.{name}.plan_sha256", "sha256", path)
            if entry.get("spec_hash") != spec_hash(specs[name]):
                raise StaleArtifactError(
                    f"{where}.spec_hash is {entry.get('spec_hash')!r}, this runtime's contract for {name} is "
                    f"{spec_hash(specs[name])!r} (built by another kolors-trt version or profile); rebuild with "
                    "kolors-trt build"
                )
        if not file.is_file():
            raise FolderError(f"{where}: {file.name} is missing; re-run kolors-trt export / build")
        files[name], entries[name] = file, entry
    if verify:
        try:
            checked = verify_files(root, hashes, path)
        except StaleFileError as err:
            raise StaleArtifactError(str(err)) from None
        logger.info("%s: hashed %d file(s), %d unchanged since the last check", root, len(checked["hashed"]),
                    len(checked["trusted"]))
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
