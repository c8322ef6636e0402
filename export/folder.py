"""The export folder as `kolors-trt export` writes it: graphs staged, one commit, the manifest last.

    out/.unet.kt-tmp-<pid>-<token>/   staging: the traced graph (and its .onnx.data), the
                                       exporter's own temporary files; validated here
    out/unet.onnx [unet.onnx.data] [unet.lora.json] ... tokenizer/ scheduler/ image_processor/ manifest.json

Nothing in the folder changes until every requested graph is exported and validated.
Then one commit, with SIGINT and SIGTERM held back, moves the staged files into place,
copies the assets (each atomically) and writes the manifest last. A rerun first removes
staging folders an interrupted run left behind (``clean_leftovers``; one writer per
folder at a time). Why a reader never takes a folder cut between two renames (by
SIGKILL) for a valid one: every reader verifies every hash the manifest records
(kolors_trt.runtime.artifacts).

The manifest records per component the checkpoint's fingerprint (checkpoint.fingerprint)
and per asset its sha256, so that a second export of an unchanged checkpoint is skipped,
and so that adding components (``--components``) to a folder holding another
checkpoint's graphs (other model dims, tokenizer or runtime constants) is refused
before it mixes them.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Mapping, Optional

from kolors_trt.runtime import spec as S
from kolors_trt.runtime.artifacts import (
    MANIFEST,
    ExportFolder,
    ExportFolderError,
    copy_assets,
    manifest_format,
    read_export_folder,
    tokenizer_sha256,
)
from kolors_trt.runtime.errors import InputError
from kolors_trt.runtime.hashing import sha256_file
from kolors_trt.runtime.manifest import ManifestError, deferred_interrupts, temp_path, write_json_atomic

from . import checkpoint as ck

log = logging.getLogger(__name__)


class OutputFolderError(InputError):
    """The export's --out folder cannot take this export: another tool's folder, or one that
    holds another checkpoint's graphs."""


def asset_sources(paths: ck.CheckpointPaths) -> dict:
    """{relative path in the export folder: checkpoint file} of what the runtime needs besides the graphs."""
    files = {f"tokenizer/{n}": paths.tokenizer / n for n in ("tokenizer.model", "tokenizer_config.json")
             if (paths.tokenizer / n).is_file()}
    files["scheduler/scheduler_config.json"] = paths.scheduler / "scheduler_config.json"
    pre = paths.image_encoder / "preprocessor_config.json"
    if pre.is_file():
        files["image_processor/preprocessor_config.json"] = pre
    return files


def existing_folder(out: Path) -> tuple[Optional[ExportFolder], Optional[Exception]]:
    """(the folder, None) when ``out`` holds a valid export folder; (None, why) when it holds a
    broken or outdated one; (None, None) when it holds none. A folder whose manifest is not an
    export manifest is not ours to overwrite: OutputFolderError."""
    path = Path(out) / MANIFEST
    try:
        fmt = manifest_format(out)
    except ManifestError as err:
        raise OutputFolderError(f"export: {err}: {out} is not an export folder; choose another --out") from None
    if fmt is None:
        return None, None
    if fmt != S.EXPORT_FORMAT:
        raise OutputFolderError(f"export: {path} has format {fmt[:80]!r}, not {S.EXPORT_FORMAT!r}: "
                                f"{out} is not an export folder (an engine folder, or another tool's); choose another --out")
    try:
        return read_export_folder(out), None
    except (ExportFolderError, ManifestError) as err:
        return None, err


def up_to_date(old: Optional[ExportFolder], fingerprint: str, precisions: Mapping, components,
               dims: S.ModelDims, calibration: Optional[str] = None) -> bool:
    """The folder verified, is of this export version, holds every requested component
    exported from this checkpoint (same fingerprint) at the requested precision; a quantized
    UNet also from the same calibration (its sha256, ``calibration``); and (when the unet is
    requested) its DeepCache split is ``dims``'."""
    if old is None or not old.assets:  # no assets hashes: written before fingerprints were recorded
        return False
    if "unet" in components and any(getattr(old.model_dims, k) != getattr(dims, k) for k in S.DEEP_CACHE_FIELDS):
        return False
    for name in components:
        comp = old.components.get(name)
        if comp is None or comp.entry.get("checkpoint") != fingerprint or comp.precision != precisions[name]:
            return False
        if name == "unet" and calibration is not None and \
                (comp.entry.get("quantization") or {}).get("calibration", {}).get("sha256") != calibration:
            return False
    return True


def check_addition(out: Path, old: Optional[ExportFolder], problem: Optional[Exception], components,
                   dims: S.ModelDims, tokenizer: str, runtime: Mapping) -> None:
    """Refuse to add ``components`` to a folder whose other entries would not fit them."""
    fix = "export all components into it (omit --components), or choose a new --out"
    adding = ", ".join(components)
    if problem is not None:
        raise OutputFolderError(f"export: cannot add {adding} to {out}: {problem}; {fix}")
    if old is None:
        return
    found = []
    new_dims, old_dims = asdict(dims), asdict(old.model_dims)
    # The DeepCache split is the unet's alone: re-exporting the unet may change it.
    found += [f"model_dims.{k} {old_dims[k]} -> {v}" for k, v in new_dims.items()
              if old_dims[k] != v and k not in S.DEEP_CACHE_FIELDS]
    old_tokenizer = tokenizer_sha256(old)
    if old_tokenizer != tokenizer:
        found.append(f"tokenizer.model sha256 {old_tokenizer[:12]}... -> {tokenizer[:12]}...")
    found += [f"runtime.{k}" for k in sorted(set(runtime) | set(old.runtime)) if old.runtime.get(k) != runtime.get(k)]
    if found:
        raise OutputFolderError(f"export: {out} holds graphs of another checkpoint ({'; '.join(found)}); adding "
                                f"{adding} would mix the two: {fix}")


def stage_dir(out: Path, name: str) -> Path:
    """A fresh staging folder for one graph, named as a leftover so that a rerun removes it."""
    stage = temp_path(Path(out) / name, suffix="")
    stage.mkdir()
    return stage


def graph_fields(folder: Path, name: str) -> dict:
    """The file fields of a component entry for ``folder/{name}.onnx`` (and its .onnx.data)."""
    graph, data = Path(folder) / f"{name}.onnx", Path(folder) / f"{name}.onnx.data"
    lora = Path(folder) / f"{name}.lora.json"
    has_data = data.is_file()
    fields = {
        "file": graph.name,
        "external_data": data.name if has_data else None,
        "sha256": sha256_file(graph),
        "external_data_sha256": sha256_file(data) if has_data else None,
        "bytes": graph.stat().st_size + (data.stat().st_size if has_data else 0),
    }
    if lora.is_file():  # the UNet's and the text encoder's LoRA map (lora_map.py)
        fields.update(lora_map=lora.name, lora_map_sha256=sha256_file(lora))
    return fields


def commit(out: Path, staged: Mapping[str, Path], write_manifest: Callable[[], dict], drop: tuple = ()) -> dict:
    """Move each staged graph into ``out`` and write the manifest, interrupts held back; then remove the
    files of the graphs in ``drop`` (the manifest no longer names them)."""
    out = Path(out)
    with deferred_interrupts():
        for name, stage in staged.items():
            data = f"{name}.onnx.data"
            for extra in (data, f"{name}.lora.json"):  # before the graph: the new graph's entry names them
                if (stage / extra).exists():
                    os.replace(stage / extra, out / extra)
                else:
                    (out / extra).unlink(missing_ok=True)  # an older export's; nothing names it now
            os.replace(stage / f"{name}.onnx", out / f"{name}.onnx")
        manifest = write_manifest()
        for name in drop:
            for file in (f"{name}.onnx", f"{name}.onnx.data"):
                (out / file).unlink(missing_ok=True)
        return manifest


def remove_stages(staged: Mapping[str, Path]) -> None:
    for stage in staged.values():
        shutil.rmtree(stage, ignore_errors=True)


def write_manifest(out: Path, paths: ck.CheckpointPaths, dims: S.ModelDims, runtime: Mapping, entries: Mapping,
                   keep: Optional[ExportFolder] = None, extra: Optional[Mapping] = None, drop: tuple = ()) -> dict:
    """Copy the assets and write ``out/manifest.json`` (atomically): ``entries`` plus the
    entries of ``keep`` (an earlier export into this folder) that were not re-exported, less ``drop``."""
    kept = {n: c.entry for n, c in (keep.components.items() if keep else ()) if n not in entries and n not in drop}
    manifest = {
        "format": S.EXPORT_FORMAT,
        "version": S.EXPORT_VERSION,
        "source": {"weights": str(paths.root.resolve()), "ip_adapter": str(paths.ip_root.resolve()),
                   "ip_weights": paths.ip_weights.name},
        "model_dims": asdict(dims),
        **(extra or {}),
        "runtime": dict(runtime),
        "assets": copy_assets(asset_sources(paths), Path(out)),
        "components": {**kept, **entries},
    }
    write_json_atomic(Path(out) / MANIFEST, manifest)
    return manifest
