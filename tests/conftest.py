"""Shared fixtures: tiny checkpoints of the real architectures and their exports, and the TensorRT
stand-in (tests/trt_standin) with engine folders and Pipelines on it.

Session-scoped and built on demand: a test that needs an fp16 export of the
alternative preset pays for it once per run. The 8-bit exports (calibration and an
8-bit trace: the costliest fixtures) are built once per run and shared by the
pytest-xdist workers.

The TensorRT backend on the CPU (see tests/test_runtime_trt.py):

    trt_standin                      the stand-in package (runtime.module, cuda.CpuDevice, open_backend)
    standin_engines(profile, target="tensorrt", refit=False)
                                     an engine folder of the fp32 export whose plans the stand-in reads
                                     (built once per session and arguments)
    trt_pipeline(folder, cuda_graph=None, device=None, runtime_cache=None)
                                     a Pipeline whose backend is the real TrtBackend on the stand-in
"""

from __future__ import annotations

import logging
import os
import shutil

import pytest

from kolors_trt.runtime.spec import ALL_COMPONENTS, COMPONENTS


def pytest_configure(config):
    """Under pytest-xdist, torch gets the cores divided among the workers: two workers of two threads
    each on two cores spin-wait for each other, which costs CPU time and wall time alike."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def pytest_collection_modifyitems(config, items):
    """GPU tests need an NVIDIA GPU (and TensorRT for engines): skipped without one."""
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# The 8-bit exports' calibration in tests: 2 prompts x 3 steps at 64x64 (NVIDIA's recipe, the default,
# is 32 or 128 prompts x 20 steps at 1024x1024); 2 held-out prompts measure the error.
QUICK_CALIBRATION = {"count": 2, "steps": 3, "size": (64, 64), "batch": 2}


class _Store:
    def __init__(self, root, shared):
        self.root = root
        self.shared = shared  # seen by every xdist worker of this run
        self.cache = {}

    def tiny(self, preset: str = "default"):
        key = ("tiny", preset)
        if key not in self.cache:
            from kolors_trt.export.tiny import write_tiny

            self.cache[key] = write_tiny(self.root / f"tiny-{preset}", preset)
        return self.cache[key]

    def export(self, preset: str = "default", precision: str = "fp32"):
        key = ("export", preset, precision)
        if key not in self.cache:
            from kolors_trt.export.exporter import export_all, resolve_precisions

            kolors, ip = self.tiny(preset)
            out = self.root / f"onnx-{preset}-{precision}"
            results = export_all(kolors, ip, out, resolve_precisions(precision), COMPONENTS, progress=False)
            self.cache[key] = (out, results)
        return self.cache[key]

    @staticmethod
    def calibration(precision: str):
        from kolors_trt.export.calibration import calibration

        c = QUICK_CALIBRATION
        return calibration(precision, None, c["count"], c["steps"], c["size"], c["batch"])

    def quantized(self, precision: str):
        """Export folder of the default tiny checkpoint with the UNet at int8 or fp8 (calibration(precision)):
        int8 exports every component; fp8 adds the UNet to a copy of the fp16 export (--components unet),
        calibrated in the pipeline of that folder's graphs. Built once per run by the first worker that asks
        (a file lock per precision). A worker that finds the one it asks for being built builds the other
        meanwhile, unless someone does: the two build in parallel."""
        key = ("quantized", precision)
        if key not in self.cache:
            from filelock import FileLock, Timeout

            locks = {p: FileLock(f"{self.shared / f'quantized-{p}'}.lock") for p in ("int8", "fp8")}
            try:
                locks[precision].acquire(timeout=0)
            except Timeout:
                other = "fp8" if precision == "int8" else "int8"
                try:
                    with locks[other].acquire(timeout=0):
                        self._build_quantized(other)
                except Timeout:
                    pass  # being built too
                locks[precision].acquire()
            try:
                self.cache[key] = self._build_quantized(precision)
            finally:
                locks[precision].release()
        return self.cache[key]

    def _build_quantized(self, precision: str):
        """The folder of quantized(precision), exported unless there (the caller holds its lock); renamed
        into place when complete, so that a folder there is whole."""
        from kolors_trt.export.exporter import export_all, resolve_precisions

        out = self.shared / f"quantized-{precision}"
        if out.is_dir():
            return out
        kolors, ip = self.tiny("default")
        building = out.with_name(out.name + ".building")
        shutil.rmtree(building, ignore_errors=True)  # what a killed worker left
        components = COMPONENTS
        if precision == "fp8":
            shutil.copytree(self.export("default", "fp16")[0], building)
            components = ("unet",)
        export_all(kolors, ip, building, resolve_precisions("fp16", {"unet": precision}), components, progress=False,
                   calibration=self.calibration(precision))
        building.rename(out)
        return out


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    logging.getLogger("kolors_trt").setLevel(logging.WARNING)
    base = tmp_path_factory.getbasetemp()
    # xdist workers' temporary roots are folders of the run's own (pytest-xdist's "execute once" recipe)
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    return _Store(tmp_path_factory.mktemp("kolors"), shared)


@pytest.fixture(scope="session")
def tiny(store):
    """(kolors_root, ip_root) of the default tiny checkpoint."""
    return store.tiny("default")


@pytest.fixture(scope="session")
def kolors_reference(tiny):
    """diffusers' KolorsPipeline + load_ip_adapter (CLIP preprocessing with PIL, as the reference used) on the
    tiny checkpoint, loaded once per session. Tests that swap its scheduler put the original back."""
    from diffusers import KolorsPipeline
    from transformers import CLIPVisionModelWithProjection
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    kolors, ip = tiny
    pipe = KolorsPipeline.from_pretrained(
        kolors,
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(ip / "image_encoder"),
        feature_extractor=CLIPImageProcessorPil.from_pretrained(ip / "image_encoder"),
    )
    pipe.load_ip_adapter(str(ip), subfolder="", weight_name="ip_adapter_plus_general.bin", image_encoder_folder=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def onnx_fp32(store):
    """Export folder of the default tiny checkpoint, every component fp32."""
    return store.export("default", "fp32")[0]


def engine_folder(onnx_folder, out, profile, target: str = "tensorrt", plans: str = "onnx", refit: bool = False,
                  compute_capabilities=("SM89",)):
    """An engine folder for the runtime's checks without a GPU: the export folder's manifest data, a
    build profile, and as "plans" the ONNX graphs themselves (plans="onnx": a test opens them with
    ONNX Runtime in place of TensorRT), the TensorRT stand-in's plans (plans="standin": the graphs
    with their build profile; with ``refit`` the UNet and text encoder refittable, with the LoRA map and
    base weights the build writes beside them) or short fake plan bytes (plans="fake")."""
    import json
    import shutil

    from kolors_trt.engines.lora import write_lora_files
    from kolors_trt.engines.manifest import new_engine_manifest, profile_json
    from kolors_trt.runtime.artifacts import read_export_folder
    from kolors_trt.runtime.hashing import sha256_file
    from kolors_trt.runtime.lora_map import LORA_COMPONENTS
    from kolors_trt.runtime.spec import engine_specs, model_dims_from_json, spec_hash, trt_profile

    export = json.loads((onnx_folder / "manifest.json").read_text())
    dims = model_dims_from_json(export["model_dims"])
    specs = engine_specs(dims, profile)
    out.mkdir(parents=True)
    for asset in ("tokenizer", "scheduler", "image_processor"):
        shutil.copytree(onnx_folder / asset, out / asset)
    manifest = new_engine_manifest(target, dims, profile, export["runtime"])
    module = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}[target]
    for name in [n for n in ALL_COMPONENTS if n in export["components"]]:  # unet_shallow where exported
        plan = out / f"{name}.plan"
        if plans == "onnx":
            shutil.copy(onnx_folder / f"{name}.onnx", plan)
        elif plans == "standin":
            profile_shapes = {k: [list(s) for s in v] for k, v in trt_profile(specs[name]).items()}
            plan.write_bytes(load_standin().build_plan((onnx_folder / f"{name}.onnx").read_bytes(), profile_shapes,
                                                       module, refit and name in LORA_COMPONENTS))
        else:
            plan.write_bytes(b"ftrt" + name.encode())
        manifest["engines"][name] = {
            "file": plan.name, "plan_sha256": sha256_file(plan), "plan_bytes": plan.stat().st_size,
            "precision": "fp32", "spec_hash": spec_hash(specs[name]), "cache_key": "0" * 32,
            "builder": {"name": module, "version": "0.0"}, "profile": profile_json(specs[name]),
            "build_seconds": 0.0, "compute_capabilities": list(compute_capabilities),
            "onnx_sha256": export["components"][name]["sha256"]}
        if refit and name in LORA_COMPONENTS:  # what kolors-trt build --refit writes beside the plan
            manifest["engines"][name].update(write_lora_files(read_export_folder(onnx_folder).components[name], out))
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def load_standin():
    """The tests/trt_standin package (the tests folder is on pytest's pythonpath)."""
    import trt_standin

    return trt_standin


@pytest.fixture(scope="session")
def trt_standin():
    """The TensorRT and CUDA stand-in package (tests/trt_standin)."""
    return load_standin()


@pytest.fixture(scope="session")
def standin_engines(onnx_fp32, tmp_path_factory):
    """standin_engines(profile, target="tensorrt", refit=False) -> an engine folder of the fp32 export with the
    stand-in's plans, built once per session and arguments. Treat it as read-only."""
    built: dict = {}

    def make(profile, target: str = "tensorrt", refit: bool = False, compute_capabilities=("SM89",)):
        key = (profile, target, refit, tuple(compute_capabilities))
        if key not in built:
            out = tmp_path_factory.mktemp("standin-engines") / "engines"
            built[key] = engine_folder(onnx_fp32, out, profile, target, plans="standin", refit=refit,
                                       compute_capabilities=compute_capabilities)
        return built[key]

    return make


@pytest.fixture(scope="session")
def trt_pipeline(trt_standin):
    """trt_pipeline(folder, cuda_graph=None, device=None, runtime_cache=None) -> a Pipeline on the real TrtBackend
    with the stand-in TensorRT module and a CPU device (trt_standin.CpuDevice() unless given)."""
    from kolors_trt.runtime.folder import read_folder
    from kolors_trt.runtime.pipeline import Pipeline

    def open_pipeline(folder, cuda_graph=None, device=None, runtime_cache=None):
        model = read_folder(folder)
        backend = trt_standin.open_backend(model, device, cuda_graph, runtime_cache)
        return Pipeline.on_backend(model, backend)

    return open_pipeline


@pytest.fixture(scope="session")
def make_engine_folder():
    """engine_folder(onnx_folder, out, profile, target="tensorrt", plans="onnx" | "standin" | "fake")."""
    return engine_folder


@pytest.fixture(scope="session")
def onnx_fp16(store):
    """Export folder of the default tiny checkpoint at the default precisions (VAE fp32)."""
    return store.export("default", "fp16")[0]
