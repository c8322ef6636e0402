"""ONNX graphs -> TensorRT / TensorRT-RTX plans, with a content-addressed cache.

One call builds the requested components of an export folder into an engine
folder. An engine is rebuilt only when its cache key changes: the ONNX file
hashes, the spec hash (model dims + profile), the precision, the builder name
and version, and the build options. The manifest is rewritten after every
engine, so an interrupted build keeps the engines it finished.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Optional, Sequence

from kolors_trt.runtime.trt_logger import trt_logger
from kolors_trt.runtime.spec import COMPONENTS, DEFAULT_PROFILE, EngineSpec, Profile, engine_specs, spec_hash, trt_profile

from .errors import EngineBuildError, ExportFolderError
from .manifest import (
    ASSET_DIRS,
    OPTIONAL_ASSET_DIRS,
    MANIFEST,
    ExportComponent,
    cache_key,
    new_engine_manifest,
    plan_problems,
    profile_json,
    read_engine_manifest,
    read_export_folder,
    sha256_file,
    write_json_atomic,
)
from .network import check_network, parse_onnx
from .targets import Target, default_target_name, get_target

log = logging.getLogger(__name__)

BUILT, UP_TO_DATE = "built", "up-to-date"


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
    refit: bool
    tf32: bool
    compute_capabilities: tuple

    def as_json(self) -> dict:
        return {
            "opt_level": self.opt_level,
            "workspace_gib": self.workspace_gib,
            "refit": self.refit,
            "tf32": self.tf32,
            "compute_capabilities": list(self.compute_capabilities),
        }


def build_engines(
    onnx_dir: Path,
    out_dir: Path,
    target: Optional[str] = None,
    profile: Profile = DEFAULT_PROFILE,
    components: Sequence[str] = COMPONENTS,
    opt_level: Optional[int] = None,
    timing_cache: Optional[Path] = None,
    workspace_gib: Optional[float] = None,
    refit_unet: bool = False,
    force: bool = False,
    compute_capabilities: Optional[Sequence[str]] = None,
) -> list[BuildResult]:
    """Build ``components`` of the export folder ``onnx_dir`` into ``out_dir``.

    target: "tensorrt" | "tensorrt-rtx" | None (TensorRT with a GPU, else TensorRT-RTX).
    opt_level / workspace_gib: None keeps the builder's default.
    timing_cache: file read before and written after each build (TensorRT only).
    refit_unet: make the UNet plan refittable (weight swaps, e.g. LoRA).
    compute_capabilities: TensorRT-RTX AOT targets like ("SM86", "SM89"); None = its portable default.
    """
    from tqdm.auto import tqdm

    tgt = get_target(target or default_target_name())
    trt = tgt.load()
    tgt.check_host()
    if refit_unet and "unet" in components:
        tgt.check_refit()
    export = read_export_folder(Path(onnx_dir))
    missing = [c for c in components if c not in export.components]
    if missing:
        raise ExportFolderError(
            f"engines: {export.root / MANIFEST} has no {missing} (it has {sorted(export.components)}); "
            "export them first or pass --components"
        )
    specs = engine_specs(export.model_dims, profile)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = _start_manifest(out, tgt, trt, export.model_dims, profile, specs, export.runtime)
    _copy_assets(export.root, out)
    if timing_cache is not None and not tgt.uses_timing_cache:
        log.warning("target %s ignores the timing cache %s (no effect on its plans; it would need a GPU)", tgt.name, timing_cache)
        timing_cache = None

    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    results = []
    for name in tqdm(list(components), desc="engines", unit="engine", disable=len(components) < 2):
        comp = export.components[name]
        config = builder.create_builder_config()
        ccs = tuple(tgt.set_compute_capabilities(trt, config, compute_capabilities))
        # TensorRT allows TF32 by default. Only the fp32 VAE may use it; elsewhere it is
        # cleared, so fp16 graphs keep their fp32 islands exact and a component exported
        # at fp32 for accuracy gets fp32 math.
        tf32 = name == "vae_decoder" and comp.precision == "fp32"
        opts = _Options(opt_level, workspace_gib, refit_unet and name == "unet", tf32, ccs)
        results.append(_build_one(trt, tgt, builder, logger, config, comp, specs[name], out, manifest, opts, timing_cache, force))
        write_json_atomic(out / MANIFEST, manifest)
    return results


def _build_one(
    trt: ModuleType,
    tgt: Target,
    builder,
    logger,
    config,
    comp: ExportComponent,
    spec: EngineSpec,
    out: Path,
    manifest: dict,
    opts: _Options,
    timing_cache: Optional[Path],
    force: bool,
) -> BuildResult:
    name = comp.name
    plan = out / f"{name}.plan"
    key_fields = {
        "onnx_sha256": sha256_file(comp.onnx),
        "onnx_data_sha256": sha256_file(comp.data) if comp.data else None,
        "spec_hash": spec_hash(spec),
        "precision": comp.precision,
        "builder": {"name": tgt.module, "version": str(trt.__version__)},
        "options": opts.as_json(),
    }
    key = cache_key(key_fields)
    old = manifest["engines"].get(name)
    if not force and old and old.get("cache_key") == key and not plan_problems(out, name, old):
        log.info("%s: up to date (%s)", name, plan)
        return _result(name, UP_TO_DATE, plan, spec, old)
    if old and not force:
        reason = "inputs or options changed" if old.get("cache_key") != key else "; ".join(plan_problems(out, name, old))
        log.info("%s: rebuilding (%s)", name, reason)

    t0 = time.perf_counter()
    network, parser = parse_onnx(trt, builder, tgt.network_flags(trt), comp.onnx, logger)
    check_network(trt, network, spec, comp.onnx)
    _configure(trt, tgt, builder, config, network, spec, opts, timing_cache)
    log.info("%s: building %s plan with %s %s", name, comp.precision, tgt.module, trt.__version__)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(
            f"engines: {tgt.module} returned no plan for {comp.onnx} (see the builder log above); "
            "try a larger --workspace-gib, a narrower profile, or --opt-level 3"
        )
    del parser  # the network's weights are no longer needed
    if timing_cache is not None:
        _save_timing_cache(config, timing_cache)
    tmp = plan.with_name(plan.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(serialized)
    os.replace(tmp, plan)
    seconds = round(time.perf_counter() - t0, 3)
    entry = {
        "file": plan.name,
        **key_fields,
        "profile": profile_json(spec),
        "compute_capabilities": list(opts.compute_capabilities),
        "cache_key": key,
        "build_seconds": seconds,
        "plan_bytes": plan.stat().st_size,
        "plan_sha256": sha256_file(plan),
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if bytes(memoryview(serialized)[: len(tgt.plan_magic)]) != tgt.plan_magic:
        log.warning("%s: the plan does not start with %r; verify_engine_folder will reject it", name, tgt.plan_magic)
    manifest["engines"][name] = entry
    log.info("%s: built %s (%.1f MB) in %.1f s", name, plan, entry["plan_bytes"] / 1e6, seconds)
    return _result(name, BUILT, plan, spec, entry)


def _configure(trt: ModuleType, tgt: Target, builder, config, network, spec: EngineSpec, opts: _Options, timing_cache) -> None:
    if opts.opt_level is not None:
        config.builder_optimization_level = opts.opt_level
    if opts.workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.workspace_gib * (1 << 30)))
    if opts.refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    tgt.set_tf32(trt, config, opts.tf32)
    if timing_cache is not None:
        # TensorRT only (Target.uses_timing_cache); not exercised on the CPU-only CI.
        blob = Path(timing_cache).read_bytes() if Path(timing_cache).is_file() else b""
        config.set_timing_cache(config.create_timing_cache(blob), ignore_mismatch=False)
    dynamic = {network.get_input(i).name for i in range(network.num_inputs) if -1 in tuple(network.get_input(i).shape)}
    prof = builder.create_optimization_profile()
    for name, (lo, opt, hi) in trt_profile(spec).items():
        if name in dynamic:
            prof.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(prof)


def _save_timing_cache(config, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    os.replace(tmp, path)


def _result(name: str, status: str, plan: Path, spec: EngineSpec, entry: dict) -> BuildResult:
    # The profile from the spec keeps its input order (the manifest's JSON is key-sorted).
    return BuildResult(name, status, plan, entry["precision"], profile_json(spec), entry["plan_bytes"], entry["build_seconds"])


def _start_manifest(out: Path, tgt: Target, trt: ModuleType, model_dims, profile: Profile, specs: dict,
                    runtime: dict) -> dict:
    """The new manifest, keeping the old entries that still fit this build (same
    builder and spec); plans of entries that do not fit are removed."""
    old = read_engine_manifest(out) or {"engines": {}}
    manifest = new_engine_manifest(tgt.name, model_dims, profile, runtime)
    for name, entry in old["engines"].items():
        fits = (
            name in specs
            and entry.get("spec_hash") == spec_hash(specs[name])
            and entry.get("builder", {}) == {"name": tgt.module, "version": str(trt.__version__)}
        )
        if fits:
            manifest["engines"][name] = entry
        else:
            stale = out / entry.get("file", f"{name}.plan")
            log.warning("%s: dropping %s, built for another profile, model or builder", name, stale)
            stale.unlink(missing_ok=True)
    return manifest


def _copy_assets(src: Path, out: Path) -> None:
    for d in ASSET_DIRS:
        if not (src / d).is_dir():
            raise ExportFolderError(
                f"engines: {src / d} is missing; the engine folder must carry it (re-run kolors-trt export)"
            )
        shutil.copytree(src / d, out / d, dirs_exist_ok=True)
    for d in OPTIONAL_ASSET_DIRS:
        if (src / d).is_dir():
            shutil.copytree(src / d, out / d, dirs_exist_ok=True)
