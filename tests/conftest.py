"""Shared fixtures: tiny checkpoints of the real architectures and their exports.

Session-scoped and built on demand: a test that needs an fp16 export of the
alternative preset pays for it once per run.
"""

from __future__ import annotations

import logging

import pytest

from kolors_trt.runtime.spec import COMPONENTS


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


class _Store:
    def __init__(self, root):
        self.root = root
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


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    logging.getLogger("kolors_trt").setLevel(logging.WARNING)
    return _Store(tmp_path_factory.mktemp("kolors"))


@pytest.fixture(scope="session")
def tiny(store):
    """(kolors_root, ip_root) of the default tiny checkpoint."""
    return store.tiny("default")


@pytest.fixture(scope="session")
def onnx_fp32(store):
    """Export folder of the default tiny checkpoint, every component fp32."""
    return store.export("default", "fp32")[0]


def engine_folder(onnx_folder, out, profile, target: str = "tensorrt", plans: str = "onnx"):
    """An engine folder for the runtime's checks without a GPU: the export folder's manifest data, a
    build profile, and as "plans" the ONNX graphs themselves (plans="onnx": a test opens them with
    ONNX Runtime in place of TensorRT) or short fake plan bytes (plans="fake")."""
    import json
    import shutil

    from kolors_trt.engines.manifest import new_engine_manifest, profile_json
    from kolors_trt.runtime.hashing import sha256_file
    from kolors_trt.runtime.spec import engine_specs, model_dims_from_json, spec_hash

    export = json.loads((onnx_folder / "manifest.json").read_text())
    dims = model_dims_from_json(export["model_dims"])
    specs = engine_specs(dims, profile)
    out.mkdir(parents=True)
    for asset in ("tokenizer", "scheduler", "image_processor"):
        shutil.copytree(onnx_folder / asset, out / asset)
    manifest = new_engine_manifest(target, dims, profile, export["runtime"])
    module = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}[target]
    for name in COMPONENTS:
        plan = out / f"{name}.plan"
        if plans == "onnx":
            shutil.copy(onnx_folder / f"{name}.onnx", plan)
        else:
            plan.write_bytes(b"ftrt" + name.encode())
        manifest["engines"][name] = {
            "file": plan.name, "plan_sha256": sha256_file(plan), "plan_bytes": plan.stat().st_size,
            "precision": "fp32", "spec_hash": spec_hash(specs[name]), "cache_key": "0" * 32,
            "builder": {"name": module, "version": "0.0"}, "profile": profile_json(specs[name]),
            "build_seconds": 0.0, "compute_capabilities": ["SM89"]}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="session")
def make_engine_folder():
    """engine_folder(onnx_folder, out, profile, target="tensorrt", plans="onnx" | "fake")."""
    return engine_folder


@pytest.fixture(scope="session")
def onnx_fp16(store):
    """Export folder of the default tiny checkpoint at the default precisions (VAE fp32)."""
    return store.export("default", "fp16")[0]
