"""The TensorRT backend's host side on the stand-in (tests/trt_standin): the GPU memory plan (plans read from a
memory map, one user-managed activation allocation for every context, the bytes by kind in stats and
Prometheus), TensorRT-RTX's runtime cache across restarts, the compute-capability rule, TensorRT's failures
surfacing as typed errors, and the Refitter the stand-in offers for weight swaps. Fixtures and how to add
tests: test_runtime_trt.py's docstring."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from kolors_trt.runtime.folder import BackendError, read_folder
from kolors_trt.runtime.pipeline import GenerationRequest
from kolors_trt.runtime.spec import COMPONENTS, DimRange, Profile
from kolors_trt.runtime.trt_plans import check_host, plan_serves

torch = pytest.importorskip("torch")

PROFILE = Profile(DimRange(1, 1, 2), DimRange(64, 64, 96), DimRange(64, 64, 96))
RTX_DEFAULT = ("SM80", "SM86", "SM89", "SM120")  # engines/targets.py RTX_DEFAULT_COMPUTE_CAPABILITIES
REQUEST = GenerationRequest("a fox", Image.new("RGB", (48, 40), (200, 60, 40)), None, 64, 64, 2, 5.0, 0.5, 3,
                            output_type="latent")


@pytest.fixture(scope="module")
def folder(standin_engines):
    return standin_engines(PROFILE)


@pytest.fixture(scope="module")
def pipe(folder, trt_pipeline):
    return trt_pipeline(folder)


def test_plans_come_from_a_memory_map_and_share_one_activation_allocation(pipe, trt_standin):
    backend = pipe._runner
    engines = {name: e.engine for name, e in pipe.engines.items()}
    assert {e.source_kind for e in engines.values()} == {"mmap"}  # no bytes copy of the plan in Python
    largest = max(e.device_memory_size_v2 for e in engines.values())
    assert largest > 0 and backend.memory.size == largest and backend.memory.ptr % 256 == 0
    strategy = trt_standin.runtime.ExecutionContextAllocationStrategy.USER_MANAGED
    for e in pipe.engines.values():
        assert e.context.strategy == strategy and e.context._memory == (backend.memory.ptr, largest)
    weights = sum(e.get_engine_stat() for e in engines.values())
    io = sum(b.numel() * b.element_size() for e in pipe.engines.values() for b in e.buffers.values())
    assert pipe.stats()["device_memory"] == {"weights": weights, "activations": largest, "io_buffers": io}


def test_the_metric_splits_weights_activations_and_io_buffers(pipe):
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from kolors_trt.serve.metrics import PipelineCollector

    registry = CollectorRegistry()
    registry.register(PipelineCollector(type("Worker", (), {"pipe": pipe})()))
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    got = {s.labels["kind"]: s.value for s in families["kolors_trt_device_memory_bytes"].samples}
    assert got == {k: float(v) for k, v in pipe.stats()["device_memory"].items()} and got["weights"] > 0


def test_tensorrt_refusals_are_typed_errors(pipe, trt_standin, caplog):
    unet = pipe.engines["unet"]
    with caplog.at_level(logging.ERROR), pytest.raises(BackendError, match="set_input_shape.*refused"):
        unet.set_shapes({"unet_batch": 6, "latent_height": 8, "latent_width": 8})  # profile: at most 4
    assert "outside the optimization profile" in caplog.text
    bare = unet._make_context(unet.engine)  # shared memory, but no tensor address set
    unet.set_shapes({"unet_batch": 2, "latent_height": 8, "latent_width": 8}, bare)
    with pytest.raises(BackendError, match="execute_async_v3 failed"):
        unet.enqueue(bare)
    assert "tensor addresses" in caplog.text
    trt = trt_standin.module("tensorrt")
    no_memory = unet.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
    for name, buf in unet.buffers.items():
        no_memory.set_tensor_address(name, buf.data_ptr())
    unet.set_shapes({"unet_batch": 2, "latent_height": 8, "latent_width": 8}, no_memory)
    with pytest.raises(BackendError, match="execute_async_v3 failed"):
        unet.enqueue(no_memory)
    assert "no device memory" in caplog.text
    assert unet.new_context() is not None and not unet.context.set_tensor_address("no_such_tensor", 1)


@pytest.mark.parametrize("targets, capability, rtx, serves", [
    (RTX_DEFAULT, (12, 0), True, True), (RTX_DEFAULT, (12, 1), True, True),  # SM120 plans serve later Blackwell
    (RTX_DEFAULT, (8, 6), True, True), (RTX_DEFAULT, (9, 0), True, False),  # an H100 refuses RTX's default set
    (RTX_DEFAULT, (10, 0), True, False), (("SM89",), (8, 9), False, True), (("SM89",), (8, 6), False, False),
    (("SM120",), (12, 1), False, False),  # TensorRT: the GPU it was built on, exactly
])
def test_which_gpus_a_plan_serves(targets, capability, rtx, serves):
    assert plan_serves(targets, capability, rtx) is serves


def test_an_rtx_folder_opens_on_later_blackwell_and_refuses_hopper(standin_engines, trt_standin):
    model = read_folder(standin_engines(PROFILE, "tensorrt-rtx", compute_capabilities=RTX_DEFAULT))
    rtx = trt_standin.module("tensorrt_rtx")
    assert check_host(model, "tensorrt-rtx", trt_standin.CpuDevice((12, 1)), rtx) is rtx
    with pytest.raises(BackendError, match="SM90.*--compute-capability SM90"):
        check_host(model, "tensorrt-rtx", trt_standin.CpuDevice((9, 0)), rtx)
    with pytest.raises(BackendError, match="built by 'tensorrt_rtx', not 'tensorrt'"):
        check_host(model, "tensorrt", trt_standin.CpuDevice(), trt_standin.module("tensorrt"))
    with pytest.raises(BackendError, match="only load in the version that built them"):
        check_host(model, "tensorrt-rtx", trt_standin.CpuDevice((12, 0)), trt_standin.module("tensorrt_rtx", "1.7"))


def test_no_gpu_is_a_typed_error(folder, trt_standin):
    class NoGpu(trt_standin.CpuDevice):
        def is_available(self):
            return False

    with pytest.raises(BackendError, match="needs an NVIDIA GPU"):
        trt_standin.open_backend(read_folder(folder), NoGpu())


def test_rtx_runtime_cache_survives_a_restart(standin_engines, trt_pipeline, tmp_path, caplog):
    folder = standin_engines(PROFILE, "tensorrt-rtx", compute_capabilities=RTX_DEFAULT)
    path = tmp_path / "cache" / "rtx.cache"
    path.parent.mkdir()

    def compilations(p):
        return sum(e.engine.jit_compilations for e in p.engines.values())

    first = trt_pipeline(folder, runtime_cache=path)
    want = first.generate_batch([REQUEST])[0].latents
    assert compilations(first) == 3 and path.is_file()  # encoders and UNet; written after the first batch
    second = trt_pipeline(folder, runtime_cache=path)
    np.testing.assert_array_equal(second.generate_batch([REQUEST])[0].latents, want)
    assert compilations(second) == 0  # every kernel came from the file
    path.write_bytes(b"written by another TensorRT-RTX")
    with caplog.at_level(logging.WARNING):
        third = trt_pipeline(folder, runtime_cache=path)
    assert "was refused" in caplog.text and compilations(third) > 0  # the constants compiled again
    np.testing.assert_array_equal(third.generate_batch([REQUEST])[0].latents, want)
    assert path.read_bytes().startswith(b'{"format"') and sorted(p.name for p in path.parent.iterdir()) == ["rtx.cache"]


def test_a_runtime_cache_path_without_a_folder_is_refused_at_open(standin_engines, trt_pipeline, tmp_path):
    from kolors_trt.runtime.errors import InputError

    folder = standin_engines(PROFILE, "tensorrt-rtx", compute_capabilities=RTX_DEFAULT)
    for path, message in [(tmp_path / "missing" / "rtx.cache", "its folder does not exist"), (tmp_path, "is a folder")]:
        with pytest.raises(InputError, match=message):
            trt_pipeline(folder, runtime_cache=path)


def test_tensorrt_ignores_a_runtime_cache(folder, trt_pipeline, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        pipe = trt_pipeline(folder, runtime_cache=tmp_path / "x.cache")
    pipe.generate_batch([REQUEST])
    assert "only TensorRT-RTX" in caplog.text and not (tmp_path / "x.cache").exists()


def test_refit_swaps_unet_weights_by_name(standin_engines, trt_pipeline, trt_standin):
    """The stand-in's Refitter on a plan built refittable: a changed weight changes the result, the original
    weight restores it; a plan built without REFIT refuses."""
    from onnx import numpy_helper

    trt = trt_standin.module("tensorrt")
    pipe = trt_pipeline(standin_engines(PROFILE, refit=True))
    engine = pipe.engines["unet"].engine
    refitter = trt.Refitter(engine, trt.Logger())
    names = refitter.get_all_weights()
    name = next(n for n in names if refitter.get_weights_prototype(n).size > 64)
    original = next(numpy_helper.to_array(i) for i in engine._model.graph.initializer if i.name == name)
    want = pipe.generate_batch([REQUEST])[0].latents
    assert refitter.set_named_weights(name, trt.Weights(np.ascontiguousarray(original * 3).ravel()))
    assert not refitter.set_named_weights(name, trt.Weights(np.zeros(3, original.dtype)))  # wrong size
    assert refitter.get_missing_weights() == [] and refitter.refit_cuda_engine()
    assert np.abs(pipe.generate_batch([REQUEST])[0].latents - want).max() > 1e-3
    flat = np.ascontiguousarray(original).ravel()
    assert refitter.set_named_weights(name, trt.Weights(trt.DataType.FLOAT, flat.ctypes.data, flat.size))
    assert refitter.refit_cuda_engine()
    np.testing.assert_allclose(pipe.generate_batch([REQUEST])[0].latents, want, rtol=1e-5, atol=1e-5)
    fixed = trt.Refitter(trt_pipeline(standin_engines(PROFILE)).engines["unet"].engine, trt.Logger())
    assert fixed.get_all_weights() == [] and not fixed.refit_cuda_engine()


def test_every_component_runs_on_its_own_plan(pipe):
    """The encoders and the VAE ran through TrtEngine._execute, the UNet through the loop."""
    pipe.generate_batch([REQUEST])
    runs = {name: pipe.engines[name].engine.runs for name in COMPONENTS}
    assert runs["text_encoder"] >= 2 and runs["image_encoder"] >= 2 and runs["unet"] >= 2


def test_a_damaged_or_foreign_plan_is_refused(folder, trt_standin, tmp_path):
    import shutil

    copy = tmp_path / "engines"
    shutil.copytree(folder, copy)
    (copy / "unet.plan").write_bytes((copy / "vae_decoder.plan").read_bytes())  # a plan of another graph
    with pytest.raises(BackendError, match="unet.plan has tensors .*the spec expects"):
        trt_standin.open_backend(read_folder(copy, verify=False))
    (copy / "unet.plan").write_bytes(b"ftrt" + bytes(64))
    with pytest.raises(BackendError, match="could not deserialize .*unet.plan"):
        trt_standin.open_backend(read_folder(copy, verify=False))
    (copy / "unet.plan").write_bytes(b"")
    with pytest.raises(BackendError, match="unet.plan is empty"):
        trt_standin.open_backend(read_folder(copy, verify=False))


def test_the_production_device_is_torch_cuda():
    from kolors_trt.runtime.device import cuda_device

    assert cuda_device() is torch.cuda


FAKE_GPU = '''
import sys

import torch

def pytest_configure(config):
    # a GPU host as the gpu tests see it: CUDA available, an H100 (SM90), no data-center TensorRT
    torch.cuda.is_available = lambda: True
    torch.cuda.get_device_capability = lambda device=None: (9, 0)
    sys.modules["tensorrt"] = None
'''


def test_gpu_tests_skip_without_tensorrt_and_where_rtx_has_no_plan(tmp_path):
    """tests/test_runtime_gpu.py on a GPU host without `tensorrt`, on an H100: every test skips (with its
    reason) before anything is exported or built, instead of failing or building an RTX plan the GPU refuses."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "fake_gpu.py").write_text(FAKE_GPU)
    tests = Path(__file__).parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "fake_gpu", "-q", "-rs", "-n", "0", "-p", "no:cacheprovider",
                          str(tests / "test_runtime_gpu.py")], cwd=tests.parent, env=env, capture_output=True,
                         text=True, timeout=300)
    out = run.stdout
    assert run.returncode == 0 and "9 skipped" in out and "passed" not in out and "failed" not in out, out[-3000:]
    assert "could not import 'tensorrt'" in out and "builds no plan for this GPU (SM90)" in out, out[-3000:]


def test_generate_cli_keeps_the_rtx_runtime_cache(standin_engines, trt_standin, tmp_path, monkeypatch, capsys):
    """`kolors-trt generate --engines DIR --runtime-cache FILE` on the stand-in (the CLI has no injection
    parameter: the device and the trt module are swapped where the backend gets them)."""
    from kolors_trt.cli import main
    from kolors_trt.runtime import backend_trt, trt_plans

    folder = standin_engines(PROFILE, "tensorrt-rtx", compute_capabilities=RTX_DEFAULT)
    monkeypatch.setattr(backend_trt, "cuda_device", lambda: trt_standin.CpuDevice((8, 6)))
    monkeypatch.setattr(trt_plans, "load_module", lambda backend: trt_standin.module(trt_standin.TRT_MODULES[backend]))
    cache, out = tmp_path / "rtx.cache", tmp_path / "out.png"
    argv = ["generate", "--engines", str(folder), "--prompt", "a fox", "--ip-scale", "0", "--out", str(out),
            "--steps", "1", "--height", "64", "--width", "64", "--seed", "1", "--no-progress", "--runtime-cache",
            str(cache)]
    assert main(argv) == 0 and out.is_file() and cache.is_file()
    assert "wrote" in capsys.readouterr().out
