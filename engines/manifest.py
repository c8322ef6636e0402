"""The engine folder's manifest: written by the build, read back by the next build and verified.

Pure Python: verify_engine_folder runs on a machine with neither TensorRT nor a GPU.

Engine folder layout (the deployable artifact)::

    {component}.plan ...   serialized engines
    tokenizer/ scheduler/  copied from the export folder
    manifest.json          {"format", "target", "model_dims", "profile", "runtime", "assets", "engines": {component: entry}}

An entry holds: file, precision, onnx_sha256, onnx_data_sha256 (or null), spec_hash,
profile ({input: {"min","opt","max"}} shapes), builder ({"name","version"}),
compute_capabilities, options, cache_key, build_seconds, plan_bytes, plan_sha256.
"assets" maps each copied asset file ("tokenizer/tokenizer.model") to its sha256.
The runtime rebuilds each engine's spec with
``engine_specs(model_dims_from_json(m["model_dims"]), profile_from_json(m["profile"]))``.

Like the export folder (runtime/artifacts.py, which also reads this manifest), an engine folder is the old complete
state, the new one, or refused: plans and the manifest are written under temporary
names and renamed, the manifest last; a malformed manifest, a path that leaves the
folder or an entry without its plan's sha256 is refused naming the file and field.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Mapping

from kolors_trt.runtime.hashing import sha256_file
from kolors_trt.runtime.artifacts import (
    MANIFEST,
    EngineFolderError,
    engine_specs_of,
    lora_file_hashes,
    missing_asset_dirs,
    read_engine_manifest,
    spec_mismatches,
    stale_assets,
)
from kolors_trt.runtime.manifest import StaleFileError, verify_files
from kolors_trt.runtime.spec import ENGINE_FORMAT, ModelDims, to_json, trt_profile

from .targets import PLAN_MAGIC

log = logging.getLogger(__name__)



def profile_json(spec) -> dict:
    """{input: {"min": [...], "opt": [...], "max": [...]}} for one engine."""
    return {name: dict(zip(("min", "opt", "max"), map(list, shapes))) for name, shapes in trt_profile(spec).items()}


def cache_key(fields: Mapping) -> str:
    """Everything that changes a plan: ONNX hashes, spec hash, precision, builder
    name/version and build options."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def new_engine_manifest(target: str, model_dims: ModelDims, profile, runtime: Mapping) -> dict:
    return {"format": ENGINE_FORMAT, "target": target, "model_dims": to_json(model_dims), "profile": to_json(profile),
            "runtime": dict(runtime), "assets": {}, "engines": {}}


def plan_problems(folder: Path, name: str, entry: Mapping) -> list[str]:
    """What is wrong with one engine's plan file (and its LoRA files) against its (checked) manifest entry:
    cheap checks first, the sha256 only when size and header agree."""
    lora = [f"{name}: LoRA file {rel} is missing or differs from its sha256 in the manifest"
            for rel, want in lora_file_hashes(entry).items()
            if not (Path(folder) / rel).is_file() or sha256_file(Path(folder) / rel) != want]
    return lora + _plan_file_problems(folder, name, entry)


def _plan_file_problems(folder: Path, name: str, entry: Mapping) -> list[str]:
    plan = Path(folder) / entry["file"]
    if not plan.is_file():
        return [f"{name}: plan {entry['file']} is missing"]
    size = plan.stat().st_size
    if size != entry["plan_bytes"]:
        return [f"{name}: {plan.name} has {size} bytes, the manifest says {entry['plan_bytes']} (truncated or replaced)"]
    builder = entry["builder"]["name"]
    magic = PLAN_MAGIC.get(builder)
    if magic is None:
        return [f"{name}: unknown builder {builder!r} in the manifest (known: {sorted(PLAN_MAGIC)})"]
    with open(plan, "rb") as f:
        head = f.read(len(magic))
    if head != magic:
        return [f"{name}: {plan.name} does not start with the {builder} plan header {magic!r} (found {head!r}): not a {builder} plan"]
    digest = sha256_file(plan)
    if digest != entry["plan_sha256"]:
        return [f"{name}: {plan.name} sha256 {digest[:16]}... differs from the manifest's {entry['plan_sha256'][:16]}..."]
    return []


def damaged_plans(folder: Path, m: Mapping) -> dict:
    """{engine: problem} for the plans of a checked manifest that differ from their entries.

    A build calls this on every run: the verification stamp (runtime/manifest.verify_files)
    lets it hash only plans changed since the last check; the entry-by-entry check runs only
    when something differs."""
    engines = m["engines"]
    files = {rel: sha for e in engines.values() for rel, sha in {e["file"]: e["plan_sha256"], **lora_file_hashes(e)}.items()}
    try:
        verify_files(folder, files, Path(folder) / MANIFEST)
        return {}
    except StaleFileError:
        return {name: "; ".join(found) for name, e in engines.items() if (found := plan_problems(folder, name, e))}


def verify_engine_folder(folder: Path) -> dict:
    """Check an engine folder without deserialising a plan (no GPU, no TensorRT):
    the manifest field by field, its paths inside the folder, assets and their hashes,
    each plan's size, header and sha256, and each entry's spec hash and profile against
    the spec rebuilt from the manifest. Returns the manifest; raises EngineFolderError
    listing every problem (ManifestError for a malformed manifest)."""
    folder = Path(folder)
    path = folder / MANIFEST
    m = read_engine_manifest(folder)
    if m is None:
        raise EngineFolderError(f"engines: {path} is missing; build the folder with kolors-trt build")
    specs = engine_specs_of(m, path)
    problems = [f"{d} is missing (copied from the export folder at build time)" for d in missing_asset_dirs(folder)]
    problems += stale_assets(folder, m.get("assets", {}))
    stale = spec_mismatches(m, specs)
    engines = m["engines"]
    if not engines:
        problems.append("the manifest lists no engines")
    for name, entry in engines.items():
        if name not in specs:
            problems.append(f"{name}: not an engine of the spec (known: {sorted(specs)})")
            continue
        if name in stale:
            problems.append(f"{name}: {stale[name]}")
        if entry["profile"] != profile_json(specs[name]):
            problems.append(f"{name}: the profile shapes differ from the spec's")
        problems += plan_problems(folder, name, entry)
    if problems:
        raise EngineFolderError(
            f"engines: {folder} failed verification:\n  " + "\n  ".join(problems) + "\nrebuild with kolors-trt build --force"
        )
    return m
