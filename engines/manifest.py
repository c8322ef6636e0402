"""Manifests of the export folder (read) and the engine folder (written and verified).

Pure Python: verify_engine_folder runs on a machine with neither TensorRT nor a GPU.

Engine folder layout (the deployable artifact)::

    {component}.plan ...   serialized engines
    tokenizer/ scheduler/  copied from the export folder
    manifest.json          {"format", "target", "model_dims", "profile", "engines": {component: entry}}

An entry holds: file, precision, onnx_sha256, onnx_data_sha256 (or null), spec_hash,
profile ({input: {"min","opt","max"}} shapes), builder ({"name","version"}),
compute_capabilities, options, cache_key, build_seconds, plan_bytes, plan_sha256.
The runtime rebuilds each engine's spec with
``engine_specs(model_dims_from_json(m["model_dims"]), profile_from_json(m["profile"]))``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

from kolors_trt.runtime.hashing import sha256_file
from kolors_trt.runtime.spec import (
    ENGINE_FORMAT,
    COMPONENTS,
    DEFAULT_PRECISION,
    PRECISIONS,
    ModelDims,
    SpecError,
    engine_specs,
    model_dims_from_json,
    profile_from_json,
    spec_hash,
    to_json,
    trt_profile,
)

from .errors import EngineFolderError, ExportFolderError
from .targets import PLAN_MAGIC

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = ENGINE_FORMAT
ASSET_DIRS = ("tokenizer", "scheduler")  # copied verbatim from the export folder
# Copied when present: without it the runtime takes the CLIP settings from the manifest's runtime constants.
OPTIONAL_ASSET_DIRS = ("image_processor",)


def write_json_atomic(path: Path, data: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def profile_json(spec) -> dict:
    """{input: {"min": [...], "opt": [...], "max": [...]}} for one engine."""
    return {name: dict(zip(("min", "opt", "max"), map(list, shapes))) for name, shapes in trt_profile(spec).items()}


def cache_key(fields: Mapping) -> str:
    """Everything that changes a plan: ONNX hashes, spec hash, precision, builder
    name/version and build options."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


# ---- export folder ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportComponent:
    name: str
    onnx: Path
    data: Optional[Path]  # external-data file, if any
    precision: str


@dataclass(frozen=True)
class ExportFolder:
    root: Path
    model_dims: ModelDims
    components: dict  # name -> ExportComponent
    runtime: dict = field(default_factory=dict)  # export manifest "runtime": constants the pipeline needs


def read_export_folder(root: Path) -> ExportFolder:
    """Read ``root/manifest.json`` and locate each component's ONNX file."""
    root = Path(root)
    path = root / MANIFEST
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportFolderError(f"engines: {path} is missing; point --onnx at a folder written by kolors-trt export") from None
    except json.JSONDecodeError as e:
        raise ExportFolderError(f"engines: {path} is not valid JSON ({e}); re-run kolors-trt export") from None
    if "model_dims" not in m or not isinstance(m.get("components"), dict):
        raise ExportFolderError(
            f"engines: {path} needs 'model_dims' and 'components' (found keys {sorted(m)}); re-run kolors-trt export"
        )
    comps = {}
    for name, c in m["components"].items():
        if name not in COMPONENTS:
            log.warning("%s: ignoring unknown component %r (known: %s)", path, name, COMPONENTS)
            continue
        onnx = root / c.get("file", f"{name}.onnx")
        if not onnx.is_file():
            raise ExportFolderError(f"engines: {path} lists {name} as {onnx.name}, which is missing; re-run kolors-trt export")
        precision = c.get("precision", DEFAULT_PRECISION[name])
        if precision not in PRECISIONS:
            raise ExportFolderError(f"engines: {path}: {name} has precision {precision!r}, expected one of {PRECISIONS}")
        data = root / c["external_data"] if c.get("external_data") else onnx.with_name(onnx.name + ".data")
        if c.get("external_data") and not data.is_file():
            raise ExportFolderError(f"engines: {path} lists {data.name} as {name}'s external data, which is missing; re-run kolors-trt export")
        comps[name] = ExportComponent(name, onnx, data if data.is_file() else None, precision)
    return ExportFolder(root, model_dims_from_json(m["model_dims"]), comps, dict(m.get("runtime") or {}))


# ---- engine folder ----------------------------------------------------------------------------


def read_engine_manifest(folder: Path) -> Optional[dict]:
    """The engine folder's manifest, or None when absent or unreadable (a build starts afresh)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        log.warning("%s is not valid JSON (%s); every engine will be rebuilt", path, e)
        return None
    if m.get("format") != FORMAT or not isinstance(m.get("engines"), dict):
        log.warning("%s has format %r, expected %r; every engine will be rebuilt", path, m.get("format"), FORMAT)
        return None
    return m


def new_engine_manifest(target: str, model_dims: ModelDims, profile, runtime: Mapping) -> dict:
    return {"format": FORMAT, "target": target, "model_dims": to_json(model_dims), "profile": to_json(profile),
            "runtime": dict(runtime), "engines": {}}


def plan_problems(folder: Path, name: str, entry: Mapping) -> list[str]:
    """What is wrong with one engine's plan file against its manifest entry (cheap
    checks first; the sha256 only when size and header agree)."""
    plan = Path(folder) / entry.get("file", f"{name}.plan")
    if not plan.is_file():
        return [f"{name}: plan {plan.name} is missing"]
    size = plan.stat().st_size
    if size != entry.get("plan_bytes"):
        return [f"{name}: {plan.name} has {size} bytes, the manifest says {entry.get('plan_bytes')} (truncated or replaced)"]
    builder = entry.get("builder", {}).get("name")
    magic = PLAN_MAGIC.get(builder)
    with open(plan, "rb") as f:
        head = f.read(len(magic or b""))
    if magic is None:
        return [f"{name}: unknown builder {builder!r} in the manifest (known: {sorted(PLAN_MAGIC)})"]
    if head != magic:
        return [f"{name}: {plan.name} does not start with the {builder} plan header {magic!r} (found {head!r}): not a {builder} plan"]
    digest = sha256_file(plan)
    if digest != entry.get("plan_sha256"):
        return [f"{name}: {plan.name} sha256 {digest[:16]}... differs from the manifest's {str(entry.get('plan_sha256'))[:16]}..."]
    return []


def verify_engine_folder(folder: Path) -> dict:
    """Check an engine folder without deserialising a plan (no GPU, no TensorRT):
    manifest format, assets, each plan's size, header and sha256, and each
    entry's spec hash and profile against the spec rebuilt from the manifest.
    Returns the manifest; raises EngineFolderError listing every problem."""
    folder = Path(folder)
    path = folder / MANIFEST
    try:
        m = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError) as e:
        raise EngineFolderError(f"engines: {path} is missing or unreadable ({e}); rebuild with kolors-trt build") from None
    problems = []
    if m.get("format") != FORMAT:
        problems.append(f"manifest format is {m.get('format')!r}, expected {FORMAT!r}")
    try:
        specs = engine_specs(model_dims_from_json(m["model_dims"]), profile_from_json(m["profile"]))
    except (KeyError, TypeError, SpecError) as e:
        raise EngineFolderError(f"engines: {path}: model_dims/profile do not make a spec ({e!r}); rebuild with kolors-trt build") from None
    for d in ASSET_DIRS:
        if not (folder / d).is_dir():
            problems.append(f"{d}/ is missing (copied from the export folder at build time)")
    engines = m.get("engines") or {}
    if not engines:
        problems.append("the manifest lists no engines")
    for name, entry in engines.items():
        if name not in specs:
            problems.append(f"{name}: not an engine of the spec (known: {sorted(specs)})")
            continue
        if entry.get("spec_hash") != spec_hash(specs[name]):
            problems.append(f"{name}: spec_hash {entry.get('spec_hash')} differs from the manifest's model_dims/profile ({spec_hash(specs[name])})")
        if entry.get("profile") != profile_json(specs[name]):
            problems.append(f"{name}: the profile shapes differ from the spec's")
        problems += plan_problems(folder, name, entry)
    if problems:
        raise EngineFolderError(
            f"engines: {folder} failed verification:\n  " + "\n  ".join(problems) + "\nrebuild with kolors-trt build --force"
        )
    return m
