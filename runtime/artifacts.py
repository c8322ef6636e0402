"""The manifest format's one home: the folders the toolkit hands on, as their readers see
them: export folders (``read_export_folder``) and engine folders (``read_engine_manifest``,
``engine_specs_of``, ``spec_mismatches``), each manifest typed, every path contained,
every file against its sha256. Export, build, runtime, CLI and server read manifests only
through this module (``manifest_format``, ``read_manifest`` for a quick look);
runtime/manifest.py holds the file mechanics beneath it (atomic writes, containment,
typed fields, the verification stamp).

Pure Python (no torch, no TensorRT). `kolors-trt build` reads its input and its
previous output with it, `kolors-trt export` an existing output folder before it adds
to it, and the runtime (folder.py) the folder it serves.

Why a folder is the old valid one, the new valid one, or refused, never a mix
handed on: writers (export, build) write every file under a temporary name in the
folder and rename it into place, the manifest last, with SIGINT and SIGTERM held
back during the renames (manifest.deferred_interrupts); and every reader
checks every file the manifest names against its sha256 (``verify_files``, whose
stamp makes a second read of an unchanged folder hash nothing). Only SIGKILL or a
power cut can stop a writer between two renames; the folder then holds a file its
manifest does not describe, its hash fails, and readers refuse it with
StaleFileError until a rerun (which first removes the leftovers) completes it.

Every path in a manifest is relative and stays inside the folder (``contained``),
every file carries its sha256, and each malformed field is reported with the
file and the field.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

from .hashing import sha256_file
from .manifest import (
    FolderError,
    ManifestError,
    StaleFileError,
    atomic_path,
    contained,
    is_sha256,
    read_json_object,
    verify_files,
)
from .manifest import field as typed
from .spec import (
    COMPONENT_PRECISIONS,
    ALL_COMPONENTS,
    ENGINE_FORMAT,
    EXPORT_FORMAT,
    EXPORT_VERSION,
    EngineSpec,
    ModelDims,
    SpecError,
    engine_specs,
    model_dims_from_json,
    profile_from_json,
    spec_hash,
)

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ASSET_DIRS = ("tokenizer", "scheduler")  # every export folder has them; engine folders copy them
# Copied when present: without it the runtime takes the CLIP settings from the manifest's runtime constants.
OPTIONAL_ASSET_DIRS = ("image_processor",)
TOKENIZER_MODEL = "tokenizer/tokenizer.model"

LORA_FILE_FIELDS = ("lora_map", "lora_base")  # optional engine-entry fields, each with a "_sha256" beside it
# Fields every engine entry has, with their kinds (manifest.field).
_ENTRY_FIELDS = {"file": "string", "plan_sha256": "sha256", "plan_bytes": "int", "precision": "string",
                 "spec_hash": "string", "cache_key": "string", "builder.name": "string", "builder.version": "string",
                 "profile": "object", "build_seconds": "number"}


class ExportFolderError(FolderError):
    """The export folder (the build's input, or export's existing output) is missing, foreign or of another version."""


class EngineFolderError(FolderError):
    """An engine folder is foreign or failed verification; the message lists every problem."""


# Runtime constants a reader uses as numbers; kind per runtime/manifest.field.
_RUNTIME_FIELDS = {"vae_scaling_factor": "number", "image_size": "int", "text_length": "int",
                   "force_zeros_for_empty_prompt": "bool", "image_mean": "list", "image_std": "list",
                   "defaults": "object"}


@dataclass(frozen=True)
class ExportComponent:
    name: str
    onnx: Path
    data: Optional[Path]  # external-data file, if any
    precision: str
    sha256: str  # of `onnx`, verified against the file
    data_sha256: Optional[str] = None
    entry: dict = field(default_factory=dict, compare=False)  # the manifest entry as written
    lora_map: Optional[Path] = None  # {component}.lora.json (UNet, text encoder; export/lora_map.py)
    lora_map_sha256: Optional[str] = None


@dataclass(frozen=True)
class ExportFolder:
    root: Path
    model_dims: ModelDims
    components: dict  # name -> ExportComponent
    runtime: dict = field(default_factory=dict)  # manifest "runtime": constants the pipeline needs
    assets: dict = field(default_factory=dict)  # "tokenizer/tokenizer.model" -> sha256 (empty in older folders)
    manifest: dict = field(default_factory=dict, compare=False)


def read_export_folder(root: Path, verify: bool = True) -> ExportFolder:
    """Read ``root/manifest.json`` strictly and (``verify``) check every file it names (graphs,
    external data, assets) against its sha256. Raises ExportFolderError (no manifest, another
    format or version), ManifestError naming the file and field (malformed, or a path leaving
    the folder: PathEscapeError) or StaleFileError (a file differs from its hash)."""
    root = Path(root)
    path = root / MANIFEST
    if not path.exists():
        raise ExportFolderError(f"{path} is missing; point --onnx at a folder written by kolors-trt export")
    m = read_json_object(path)
    check_export_format(m, path)
    dims = model_dims_json(m, path)
    runtime = _runtime(m, path)
    listing = typed(m, "components", "object", path)
    comps, files = {}, {}
    for name in listing:
        if name not in ALL_COMPONENTS:
            log.warning("%s: ignoring unknown component %r (known: %s)", path, name, ALL_COMPONENTS)
            continue
        comps[name] = _component(root, path, m, name)
        files[comps[name].onnx.relative_to(root).as_posix()] = comps[name].sha256
        if comps[name].data is not None:
            files[comps[name].data.relative_to(root).as_posix()] = comps[name].data_sha256
        if comps[name].lora_map is not None:
            files[comps[name].lora_map.relative_to(root).as_posix()] = comps[name].lora_map_sha256
    assets = asset_hashes(root, m, path)
    for d in ASSET_DIRS:
        contained(root, d, f"{path}: asset folder")
    missing = missing_asset_dirs(root)
    if missing:
        raise ExportFolderError(f"{root / missing[0]} is missing; every export folder has it: re-run kolors-trt export")
    if verify:
        verify_files(root, {**files, **assets}, path)
    return ExportFolder(root, model_dims_from_json(dims), comps, runtime, assets, m)


def check_export_format(m: Mapping, path: Path) -> None:
    """The manifest is an export manifest of the current version (older: re-export)."""
    fmt = typed(m, "format", "string", path)
    if fmt != EXPORT_FORMAT:
        raise ExportFolderError(f"{path} has format {fmt!r}, expected {EXPORT_FORMAT!r}: not an export folder "
                                "(point --onnx at a folder written by kolors-trt export)")
    version = typed(m, "version", "int", path)
    if version < EXPORT_VERSION:
        raise ExportFolderError(f"{path} has export version {version}, older than this kolors-trt's "
                                f"{EXPORT_VERSION} (the graphs' inputs changed since): re-export with kolors-trt export")
    if version > EXPORT_VERSION:
        raise ExportFolderError(f"{path} has export version {version}, newer than this kolors-trt's "
                                f"{EXPORT_VERSION}: use the kolors-trt that wrote it, or re-export")


def model_dims_json(m: Mapping, path: Path) -> dict:
    """The manifest's model_dims, every field an integer (checked, named on error)."""
    dims = typed(m, "model_dims", "object", path)
    for key in ModelDims.__dataclass_fields__:
        if key in dims:
            typed(m, f"model_dims.{key}", "int", path)
    return dims


def _runtime(m: Mapping, path: Path) -> dict:
    runtime = typed(m, "runtime", "object", path)
    typed(m, "runtime.vae_scaling_factor", "number", path)  # the pipeline cannot decode without it
    for key, kind in _RUNTIME_FIELDS.items():
        if key in runtime:
            typed(m, f"runtime.{key}", kind, path)
    for key in ("image_mean", "image_std"):
        for i, value in enumerate(runtime.get(key, [])):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ManifestError(f"{path}: field 'runtime.{key}[{i}]' must be a number, found {value!r}")
    for key in runtime.get("defaults", {}):
        typed(m, f"runtime.defaults.{key}", "number", path)
    if runtime.get("vae_shift_factor") is not None:
        typed(m, "runtime.vae_shift_factor", "number", path)
    return dict(runtime)


def _component(root: Path, path: Path, m: Mapping, name: str) -> ExportComponent:
    key = f"components.{name}"
    typed(m, key, "object", path)
    onnx = contained(root, typed(m, f"{key}.file", "string", path), f"{path}: {key}.file")
    sha = typed(m, f"{key}.sha256", "sha256", path)
    precision = typed(m, f"{key}.precision", "string", path)
    if precision not in COMPONENT_PRECISIONS[name]:
        raise ManifestError(f"{path}: field '{key}.precision' must be one of {COMPONENT_PRECISIONS[name]}, "
                            f"found {precision!r}")
    data = data_sha = None
    if m["components"][name].get("external_data") is not None:
        data = contained(root, typed(m, f"{key}.external_data", "string", path), f"{path}: {key}.external_data")
        data_sha = typed(m, f"{key}.external_data_sha256", "sha256", path)
    lora = lora_sha = None
    if m["components"][name].get("lora_map") is not None:
        lora = contained(root, typed(m, f"{key}.lora_map", "string", path), f"{path}: {key}.lora_map")
        lora_sha = typed(m, f"{key}.lora_map_sha256", "sha256", path)
    return ExportComponent(name, onnx, data, precision, sha, data_sha, dict(m["components"][name]), lora, lora_sha)


def asset_hashes(root: Path, m: Mapping, path: Path) -> dict:
    """The manifest's "assets" ({relative file: sha256}), each path contained; empty for
    folders written before assets were hashed."""
    assets = typed(m, "assets", "object", path, default={})
    for rel, value in assets.items():
        folder, _, name = rel.partition("/")
        if folder not in ASSET_DIRS + OPTIONAL_ASSET_DIRS or not name or "/" in name:
            raise ManifestError(f"{path}: field 'assets' names {rel[:80]!r}; expected a file directly in one of "
                                f"{ASSET_DIRS + OPTIONAL_ASSET_DIRS}")
        contained(root, rel, f"{path}: assets")
        if not is_sha256(value):  # the key holds dots (file names), so field()'s dotted path cannot name it
            raise ManifestError(f"{path}: field 'assets.{rel}' must be a sha256, found {str(value)[:80]!r}")
    return dict(assets)


def tokenizer_sha256(folder: ExportFolder) -> str:
    """The tokenizer model's sha256 (from the manifest, or hashed for older folders)."""
    return folder.assets.get(TOKENIZER_MODEL) or sha256_file(contained(folder.root, TOKENIZER_MODEL, "tokenizer"))


def export_assets(root: Path, assets: Mapping) -> dict:
    """{relative path: source file} of an export folder's assets: those its manifest hashes, or
    (older folders) the files in its asset folders, each checked to stay inside the folder."""
    if assets:
        return {rel: contained(root, rel, f"{root / MANIFEST}: assets") for rel in assets}
    files = {}
    for d in ASSET_DIRS + OPTIONAL_ASSET_DIRS:
        folder = contained(root, d, f"{root}: asset folder")
        if folder.is_dir():
            for p in sorted(folder.iterdir()):
                if p.is_file():
                    files[f"{d}/{p.name}"] = contained(root, f"{d}/{p.name}", f"{root}: asset")
    return files


def copy_assets(files: Mapping[str, Path], out: Path) -> dict:
    """Copy {relative path: source} into ``out``, each file atomically; return {relative path: sha256}.

    An asset folder in ``out`` that is a symlink (or a file) is replaced by a real folder: the
    link is removed, never what it points to, so nothing outside ``out`` is written."""
    out = Path(out)
    hashes = {}
    for rel, src in sorted(files.items()):
        dst = out / rel
        folder = dst.parent
        if folder != out and (folder.is_symlink() or (folder.exists() and not folder.is_dir())):
            folder.unlink()
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
        hashes[rel] = sha256_file(dst)
    return hashes


def read_engine_manifest(folder: Path) -> Optional[dict]:
    """The engine folder's manifest, checked field by field, or None when there is none.

    A manifest of another format (an export folder, another tool's file) raises
    EngineFolderError: the build does not write into a folder it did not make, and the runtime
    does not serve it as engines. A malformed one raises ManifestError naming the file and
    field, a path leaving the folder PathEscapeError."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists() and not path.is_symlink():
        return None
    m = read_json_object(path)
    if m.get("format") != ENGINE_FORMAT:
        raise EngineFolderError(
            f"engines: {path} has format {str(m.get('format'))[:80]!r}, expected {ENGINE_FORMAT!r}: {folder} is not an "
            "engine folder written by kolors-trt build; choose another --out"
        )
    for key in ("target", "model_dims", "profile", "runtime", "engines"):
        typed(m, key, "string" if key == "target" else "object", path)
    model_dims_json(m, path)
    _runtime(m, path)
    asset_hashes(folder, m, path)
    for name in m["engines"]:
        typed(m, f"engines.{name}", "object", path)
        for key, kind in _ENTRY_FIELDS.items():
            typed(m, f"engines.{name}.{key}", kind, path)
        contained(folder, m["engines"][name]["file"], f"{path}: engines.{name}.file")
        for key in LORA_FILE_FIELDS:  # a refittable plan's LoRA map and base weights (engines/lora.py)
            if m["engines"][name].get(key) is not None:
                contained(folder, typed(m, f"engines.{name}.{key}", "string", path), f"{path}: engines.{name}.{key}")
                typed(m, f"engines.{name}.{key}_sha256", "sha256", path)
    return m


def manifest_format(root: Path) -> Optional[str]:
    """The "format" of ``root/manifest.json`` (EXPORT_FORMAT, ENGINE_FORMAT or another tool's value),
    or None when the folder has no manifest. A malformed file raises ManifestError naming it."""
    path = Path(root) / MANIFEST
    if not path.exists() and not path.is_symlink():
        return None
    fmt = read_json_object(path).get("format")
    return fmt if isinstance(fmt, str) else repr(fmt)


def read_manifest(root: Path) -> dict:
    """An export or engine folder's manifest, checked field by field but no file hashed (for a quick
    look: bench's defaults, the checkpoint it came from); {} when the folder has none (a command that
    needs one says so later)."""
    fmt = manifest_format(root)
    if fmt is None:
        return {}
    if fmt == ENGINE_FORMAT:
        return read_engine_manifest(root)
    return dict(read_export_folder(root, verify=False).manifest)


def engine_specs_of(m: Mapping, path: Path) -> dict:
    """{engine: EngineSpec} rebuilt from a checked engine manifest's model_dims and profile (the
    I/O contract its plans were built for); EngineFolderError when they do not make a spec."""
    try:
        return engine_specs(model_dims_from_json(m["model_dims"]), profile_from_json(m["profile"]))
    except (KeyError, TypeError, ValueError, SpecError) as err:
        raise EngineFolderError(f"engines: {path}: model_dims/profile do not make an engine spec ({err}); "
                                "rebuild with kolors-trt build") from None


def spec_mismatches(m: Mapping, specs: Mapping[str, EngineSpec]) -> dict:
    """{engine: message} for each entry whose spec_hash is not this kolors-trt's contract for it
    (built by another version or profile); engines the spec does not know are left to the caller."""
    found = {}
    for name, entry in m["engines"].items():
        if name in specs and entry["spec_hash"] != spec_hash(specs[name]):
            found[name] = (f"engines.{name}.spec_hash is {entry['spec_hash']!r}, this kolors-trt's contract for {name} "
                           f"is {spec_hash(specs[name])!r} (built by another kolors-trt version or profile)")
    return found


def missing_asset_dirs(root: Path) -> list[str]:
    """The asset folders (ASSET_DIRS) a folder lacks: every export folder has them, build copies them."""
    return [f"{d}/" for d in ASSET_DIRS if not (Path(root) / d).is_dir()]


def stale_assets(root: Path, assets: Mapping) -> list[str]:
    """What is wrong with a folder's asset files against the manifest's sha256s (through the
    verification stamp): [] or the first problem."""
    try:
        verify_files(root, dict(assets), Path(root) / MANIFEST)
    except StaleFileError as err:
        return [str(err)]
    return []


def lora_file_hashes(entry: Mapping) -> dict:
    """{relative file: sha256} of an engine entry's LoRA files (checked by read_engine_manifest)."""
    return {entry[key]: entry[f"{key}_sha256"] for key in LORA_FILE_FIELDS if entry.get(key) is not None}
