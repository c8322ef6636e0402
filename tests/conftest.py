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


@pytest.fixture(scope="session")
def onnx_fp16(store):
    """Export folder of the default tiny checkpoint at the default precisions (VAE fp32)."""
    return store.export("default", "fp16")[0]
