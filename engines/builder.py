"""ONNX graphs -> TensorRT / TensorRT-RTX plans, with a content-addressed cache.

One call builds the requested components of an export folder into an engine
folder. An engine is rebuilt only when its cache key changes: the ONNX file
hashes, the spec hash (model dims + profile), the precision, the builder name
and version, and the build options.

The export folder is verified first (every graph, external-data file and asset
against its sha256; a stamp spares re-hashing an unchanged folder). The engine
folder changes only in commits: after each engine, its plan, the assets and the
manifest are renamed into place with interrupts held back, so an interrupted
build leaves the folder as it was after the last finished engine (see
runtime/artifacts.py for why a folder is old valid, new valid or refused). Nothing
outside the engine folder is written or deleted: paths from an existing manifest
must stay inside it, and only plans are ever removed.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Optional, Sequence

from kolors_trt.runtime.artifacts import (
    ExportComponent,
    ExportFolder,
    ExportFolderError,
    copy_assets,
    export_assets,
    lora_file_hashes,
    read_engine_manifest,
    read_export_folder,
)
from kolors_trt.runtime.lora_map import LORA_COMPONENTS
from kolors_trt.runtime.manifest import (
    ManifestError,
    atomic_path,
    clean_leftovers,
    deferred_interrupts,
    temp_path,
    write_bytes_atomic,
    write_json_atomic,
)
from kolors_trt.runtime.spec import ALL_COMPONENTS, DEFAULT_PROFILE, EngineSpec, Profile, engine_specs, spec_hash, trt_profile
from kolors_trt.runtime.trt_logger import trt_logger

from .errors import EngineBuildError, TimingCacheError
from .interrupt import progress_monitor, run_cancellable
from kolors_trt.runtime.artifacts import MANIFEST

from .lora import refittable_weights, write_lora_files
from .manifest import cache_key, damaged_plans, new_engine_manifest, profile_json
from .network import check_network, parse_onnx
from .precision import plan_targets
from .targets import (
    RTX_DEFAULT_COMPUTE_CAPABILITIES,
    Target,
    default_target_name,
    device_compute_capability,
    get_target,
    normalize_compute_capability,
)

log = logging.getLogger(__name__)

BUILT, UP_TO_DATE = "built", "up-to-date"
BUILT_FILES = (".plan", ".lora.bin", ".lora.json")  # the files a build writes and may remove again


@dataclass(frozen=True)
class BuildResult:
    component: str
    status: str  # BUILT | UP_TO_DATE
    plan: Path
    precision: str
    profile: dict  # input -> {"min","opt","max"} shapes, in the spec's input order
    plan_bytes: int
    build_seconds: float  # how long the plan took to build (for an up-to-date plan: its original build)


@dataclass(frozen=True)
class _Options:
    """Build options that change a plan (part of the cache key)."""

    opt_level: Optional[int]
    workspace_gib: Optional[float]
    refit: bool  # the LoRA map's weights refittable (engines/lora.py)
    tf32: bool
    compute_capabilities: tuple

    def as_json(self) -> dict:
        return {
            "opt_level": self.opt_level,
            "workspace_gib": self.workspace_gib,
            "refit": "lora-map" if self.refit else False,
            "tf32": self.tf32,
            "compute_capabilities": list(self.compute_capabilities),
        }


def build_engines(
    onnx_dir: Path,
    out_dir: Path,
    target: Optional[str] = None,
    profile: Profile = DEFAULT_PROFILE,
    components: Optional[Sequence[str]] = None,
    opt_level: Optional[int] = None,
    timing_cache: Optional[Path] = None,
    workspace_gib: Optional[float] = None,
    refit: bool = False,
    force: bool = False,
    compute_capabilities: Optional[Sequence[str]] = None,
    drop_unsupported_targets: bool = False,
) -> list[BuildResult]:
    """Build ``components`` of the export folder ``onnx_dir`` into ``out_dir``.

    target: "tensorrt" | "tensorrt-rtx" | None (TensorRT with a GPU, else TensorRT-RTX).
    components: None = every graph of the export folder (the four, and DeepCache's unet_shallow
    where it was exported), in the spec's order.
    opt_level / workspace_gib: None keeps the builder's default.
    timing_cache: file read before and written after each build (TensorRT only).
    refit: make the UNet and text encoder plans refittable for LoRA: the weights their LoRA maps name are marked
    refittable, and their base values and the map are written beside the plan (engines/lora.py).
    force: rebuild every engine, and replace a malformed engine manifest in ``out_dir``.
    compute_capabilities: TensorRT-RTX AOT targets like ("SM86", "SM89"); None = its portable default.
    drop_unsupported_targets: build an engine whose precision a requested compute capability cannot
    run (an FP8 UNet below 8.9) for the others only, instead of refusing (engines/precision.py).

    KeyboardInterrupt (Ctrl-C; SIGTERM in the CLI) stops the build within seconds and
    leaves ``out_dir`` as the last commit left it.
    """
    from tqdm.auto import tqdm

    tgt = get_target(target or default_target_name())
    trt = tgt.load()
    tgt.check_host()
    export = read_export_folder(Path(onnx_dir))
    if components is None:
        components = [c for c in ALL_COMPONENTS if c in export.components]
    lora_components = [c for c in components if c in LORA_COMPONENTS] if refit else []
    if lora_components:
        tgt.check_refit()
    missing = [c for c in components if c not in export.components]
    if missing:
        raise ExportFolderError(
            f"engines: {export.root / MANIFEST} has no {missing} (it has {sorted(export.components)}); "
            "export them first or pass --components"
        )
    for name in lora_components:  # no map, or a quantized UNet: refused before anything is built
        refittable_weights(export.components[name])
    specs = engine_specs(export.model_dims, profile)
    # Per component, checked before any build: an FP8 plan serves compute capability 8.9+ only.
    targets = {name: _plan_targets(tgt, name, export.components[name].precision, compute_capabilities,
                                   drop_unsupported_targets) for name in components}
    out = Path(out_dir)
    if out.resolve() == export.root.resolve():
        raise ExportFolderError(f"engines: --out {out} is the export folder itself; write the engines to another folder")
    folder = _EngineFolder(out, _old_manifest(out, force), tgt, trt, export, profile, specs)
    if timing_cache is not None and not tgt.uses_timing_cache:
        log.warning("target %s ignores the timing cache %s (no effect on its plans; it would need a GPU)", tgt.name, timing_cache)
        timing_cache = None

    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    cancel = threading.Event()
    monitor = progress_monitor(trt, cancel)  # referenced until the loop ends: TensorRT keeps a raw pointer
    results = []
    # The bar as a context: closed (its line ended) before an interrupt's message is printed.
    with tqdm(list(components), desc="engines", unit="engine", disable=len(components) < 2) as bar:
        for name in bar:
            comp = export.components[name]
            config = builder.create_builder_config()
            if monitor is not None:
                config.progress_monitor = monitor
            ccs = tuple(tgt.set_compute_capabilities(trt, config, targets[name]))
            # TensorRT allows TF32 by default. Only the fp32 VAE may use it; elsewhere it is
            # cleared, so fp16 graphs keep their fp32 islands exact and a component exported
            # at fp32 for accuracy gets fp32 math.
            tf32 = name == "vae_decoder" and comp.precision == "fp32"
            opts = _Options(opt_level, workspace_gib, name in lora_components, tf32, ccs)
            job = _Job(trt, tgt, builder, logger, config, cancel)
            results.append(_build_one(job, comp, specs[name], folder, opts, timing_cache, force))
    folder.commit()
    return results


def _plan_targets(tgt: Target, name: str, precision: str, requested: Optional[Sequence[str]],
                  drop: bool) -> Optional[list]:
    """The compute capabilities to build ``name`` for (None: the target's default), after the precision rule."""
    if precision != "fp8":
        return list(requested) if requested else None
    if tgt.aot_on_cpu:
        wanted = [normalize_compute_capability(c) for c in requested] if requested else list(RTX_DEFAULT_COMPUTE_CAPABILITIES)
        return plan_targets(name, precision, wanted, bool(requested), drop)
    local = device_compute_capability()  # TensorRT builds for the GPU it runs on
    if local is not None:
        plan_targets(name, precision, [local], True, False)
    return list(requested) if requested else None


@dataclass(frozen=True)
class _Job:
    """What one engine's build needs from TensorRT."""

    trt: ModuleType
    tgt: Target
    builder: object
    logger: object
    config: object
    cancel: threading.Event


def _build_one(job: _Job, comp: ExportComponent, spec: EngineSpec, folder: "_EngineFolder", opts: _Options,
               timing_cache: Optional[Path], force: bool) -> BuildResult:
    name, trt, tgt = comp.name, job.trt, job.tgt
    plan = folder.out / f"{name}.plan"
    key_fields = {
        "onnx_sha256": comp.sha256,  # verified against the file by read_export_folder
        "onnx_data_sha256": comp.data_sha256,
        "spec_hash": spec_hash(spec),
        "precision": comp.precision,
        "builder": {"name": tgt.module, "version": str(trt.__version__)},
        "options": opts.as_json(),
    }
    key = cache_key(key_fields)
    old = folder.manifest["engines"].get(name)
    if not force and old and old["cache_key"] == key and name not in folder.damaged:
        log.info("%s: up to date (%s)", name, folder.out / old["file"])
        return _result(name, UP_TO_DATE, folder.out / old["file"], spec, old)
    if old and not force:
        reason = "inputs or options changed" if old["cache_key"] != key else folder.damaged[name]
        log.info("%s: rebuilding (%s)", name, reason)

    t0 = time.perf_counter()
    serialized = run_cancellable(lambda: _serialize(job, comp, spec, opts, timing_cache), job.cancel)
    seconds = round(time.perf_counter() - t0, 3)
    if bytes(memoryview(serialized)[: len(tgt.plan_magic)]) != tgt.plan_magic:
        log.warning("%s: the plan does not start with %r; verify_engine_folder will reject it", name, tgt.plan_magic)
    entry = {
        "file": plan.name,
        **key_fields,
        "profile": profile_json(spec),
        "compute_capabilities": list(opts.compute_capabilities),
        "cache_key": key,
        "build_seconds": seconds,
        "plan_bytes": serialized.nbytes,
        "plan_sha256": hashlib.sha256(memoryview(serialized)).hexdigest(),
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if opts.refit:  # the LoRA map and base weights, staged under a leftover name and committed with the plan
        stage = temp_path(folder.out / name, suffix="")
        stage.mkdir()
        try:
            entry.update(write_lora_files(comp, stage))
            folder.commit(name, serialized, entry, stage)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    else:
        folder.commit(name, serialized, entry)
    log.info("%s: built %s (%.1f MB) in %.1f s", name, plan, entry["plan_bytes"] / 1e6, seconds)
    return _result(name, BUILT, plan, spec, entry)


def _serialize(job: _Job, comp: ExportComponent, spec: EngineSpec, opts: _Options, timing_cache: Optional[Path]):
    """Parse, check and build one plan (runs in the build's worker thread); the serialized plan."""
    trt, tgt = job.trt, job.tgt
    network, parser = parse_onnx(trt, job.builder, tgt.network_flags(trt), comp.onnx, job.logger)
    check_network(trt, network, spec, comp.onnx)
    _configure(trt, tgt, job.builder, job.config, network, spec, opts, timing_cache)
    if opts.refit:
        _mark_refittable(trt, job.config, network, refittable_weights(comp), comp)
    log.info("%s: building %s plan with %s %s", comp.name, comp.precision, tgt.module, trt.__version__)
    serialized = job.builder.build_serialized_network(network, job.config)
    if serialized is None:
        if job.cancel.is_set():
            raise KeyboardInterrupt  # the waiting thread has raised its own already; this one is dropped
        raise EngineBuildError(
            f"engines: {tgt.module} returned no plan for {comp.onnx} (see the builder log above); "
            "try a larger --workspace-gib, a narrower profile, or --opt-level 3"
        )
    del parser  # the network's weights are no longer needed
    if timing_cache is not None:
        write_bytes_atomic(timing_cache, bytes(job.config.get_timing_cache().serialize()))
    return serialized


def _configure(trt: ModuleType, tgt: Target, builder, config, network, spec: EngineSpec, opts: _Options, timing_cache) -> None:
    if opts.opt_level is not None:
        config.builder_optimization_level = opts.opt_level
    if opts.workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.workspace_gib * (1 << 30)))
    if opts.refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    tgt.set_tf32(trt, config, opts.tf32)
    if timing_cache is not None:
        # TensorRT only (Target.uses_timing_cache); TensorRT-RTX makes these calls no-ops.
        blob = Path(timing_cache).read_bytes() if Path(timing_cache).is_file() else b""
        cache = config.create_timing_cache(blob)
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            raise TimingCacheError(
                f"engines: {spec.name}: {tgt.module} refused the timing cache {timing_cache} (written on another GPU or "
                f"{tgt.module} version, or damaged); pass another --timing-cache path, or delete this one to start anew"
            )
    dynamic = {network.get_input(i).name for i in range(network.num_inputs) if -1 in tuple(network.get_input(i).shape)}
    prof = builder.create_optimization_profile()
    shapes = {name: shapes for name, shapes in trt_profile(spec).items() if name in dynamic}
    for name, (lo, opt, hi) in shapes.items():
        prof.set_shape(name, lo, opt, hi)
    if config.add_optimization_profile(prof) < 0:
        raise EngineBuildError(
            f"engines: {spec.name}: {tgt.module} refused the optimisation profile {shapes} (see its log above: every "
            "input needs min <= opt <= max within the graph's fixed dims); rebuild with another --size/--batch"
        )


def _mark_refittable(trt: ModuleType, config, network, names: list, comp: ExportComponent) -> None:
    """Only the LoRA map's weights refittable (REFIT_INDIVIDUAL): the other layers keep their fusions. Builders
    without that flag (TensorRT < 10) make every weight refittable (REFIT)."""
    individual = getattr(trt.BuilderFlag, "REFIT_INDIVIDUAL", None)
    if individual is None:
        config.set_flag(trt.BuilderFlag.REFIT)
        return
    config.set_flag(individual)
    refused = [name for name in names if not network.mark_weights_refittable(name)]
    if refused:
        raise EngineBuildError(f"engines: {comp.onnx}: the network has no weights named {refused[:5]} (of "
                               f"{len(names)} in its LoRA map); the map and the graph disagree: re-export")


def _result(name: str, status: str, plan: Path, spec: EngineSpec, entry: dict) -> BuildResult:
    # The profile from the spec keeps its input order (the manifest's JSON is key-sorted).
    return BuildResult(name, status, plan, entry["precision"], profile_json(spec), entry["plan_bytes"], entry["build_seconds"])


def _old_manifest(out: Path, force: bool) -> Optional[dict]:
    """The engine folder's checked manifest, or None (no folder yet; or, with --force, a
    malformed manifest, which the build then replaces without deleting anything it names)."""
    try:
        return read_engine_manifest(out)
    except ManifestError as err:
        if force:
            log.warning("%s; --force: rebuilding %s from scratch", err, out)
            return None
        raise type(err)(f"engines: {err}; rebuild the folder from scratch with --force, or choose another --out") from None


class _EngineFolder:
    """The engine folder being built: its manifest in memory and the commits that change it.

    Until the first commit the folder is exactly as the last build left it. Each commit
    copies the assets (once), renames the new plan into place, writes the manifest and only
    then removes plans the manifest no longer names (entries built for another profile,
    model or builder), all with SIGINT/SIGTERM held back."""

    def __init__(self, out: Path, old: Optional[dict], tgt: Target, trt: ModuleType, export: ExportFolder,
                 profile: Profile, specs: dict):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        clean_leftovers(out)
        self.manifest = new_engine_manifest(tgt.name, export.model_dims, profile, export.runtime)
        self.assets = export_assets(export.root, export.assets)  # relative path -> source file
        self.stale: set = set()  # plan files of dropped entries, removed after the next commit
        builder = {"name": tgt.module, "version": str(trt.__version__)}
        for name, entry in (old or {"engines": {}})["engines"].items():
            if name in specs and entry["spec_hash"] == spec_hash(specs[name]) and entry["builder"] == builder:
                self.manifest["engines"][name] = entry
            else:
                log.warning("%s: dropping %s, built for another profile, model or builder", name, out / entry["file"])
                self.stale.update([entry["file"], *lora_file_hashes(entry)])
        self.damaged = damaged_plans(out, self.manifest)  # kept entries whose plan no longer matches
        self.committed = False

    def commit(self, name: Optional[str] = None, plan=None, entry: Optional[dict] = None,
               lora_stage: Optional[Path] = None) -> None:
        """Make one new complete state: the plan of ``name`` (if given), its LoRA files staged in ``lora_stage``,
        and the manifest."""
        if name is None and self.committed:
            return
        with deferred_interrupts():
            if not self.committed:
                self.manifest["assets"] = copy_assets(self.assets, self.out)
            if name is not None:
                old = self.manifest["engines"].get(name)
                self.stale.update(lora_file_hashes(old) if old else ())  # kept only if the new entry names them
                for rel in lora_file_hashes(entry) if lora_stage is not None else ():
                    os.replace(lora_stage / rel, self.out / rel)
                with atomic_path(self.out / entry["file"]) as tmp:
                    with open(tmp, "wb") as f:
                        f.write(plan)
                self.manifest["engines"][name] = entry
                self.damaged.pop(name, None)
            write_json_atomic(self.out / MANIFEST, self.manifest)
            named = {rel for e in self.manifest["engines"].values() for rel in (e["file"], *lora_file_hashes(e))}
            for rel in sorted(self.stale - named):
                if rel.endswith(BUILT_FILES):  # only what builds write; the path was checked to stay inside
                    (self.out / rel).unlink(missing_ok=True)
            self.stale.clear()
            self.committed = True
