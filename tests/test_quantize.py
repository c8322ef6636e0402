"""8-bit UNets: the tiny default exported at unet=int8 and unet=fp8 (ModelOpt, NVIDIA's SDXL
recipe, calibrated in the toolkit's pipeline), Q/DQ only where the recipe puts them, weights
stored 8-bit, errors against the fp32 UNet within the stated tolerance, the runtime generating
from both on ONNX Runtime, TensorRT-RTX AOT builds, and the FP8 compute-capability rule."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kolors_trt.runtime.spec import Profile

pytest.importorskip("modelopt")
onnx = pytest.importorskip("onnx")

@pytest.fixture(scope="session")
def quantized(store):
    """quantized(precision) -> export folder: int8 exports every component; fp8 adds the UNet to a copy of
    the fp16 export (--components unet). Calibrated on store.calibration(precision): 2 prompts x 3 steps
    at 64x64 (conftest.QUICK_CALIBRATION), built once per run and shared by the xdist workers."""
    return store.quantized


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_qdq_only_where_the_recipe_puts_them(quantized, tiny, precision):
    from kolors_trt.export import checkpoint as ck
    from kolors_trt.export.exporter import Components
    from kolors_trt.export.quantize import qdq_layers, quantized_layers

    model = onnx.load(str(quantized(precision) / "unet.onnx"))
    expected = set(quantized_layers(Components(ck.resolve(*tiny)).graph("unet", "fp32")))
    found = qdq_layers(model)
    assert set(found) == expected  # every recipe layer, and nothing else (no attention matmul, no skipped layer)
    assert not any(s in name for name in found for s in ("conv_in", "conv_out", "time_emb", "to_k_ip", "proj_out"))
    assert {"conv", "matmul"} == set(found.values())
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") == len(expected)  # activations only: the weights' Q ran at export
    assert ops.count("DequantizeLinear") == 2 * len(expected)
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 19
    inits = {t.name: t for t in model.graph.initializer}
    want = onnx.TensorProto.INT8 if precision == "int8" else onnx.TensorProto.FLOAT8E4M3FN
    weights = [inits[n.input[0]] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(weights) == len(expected) and {w.data_type for w in weights} == {want}
    zero_points = {inits[n.input[2]].data_type for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert zero_points == {want}
    # fp16 body, float32 edges like every graph of the folder
    assert {i.type.tensor_type.elem_type for i in model.graph.input} == {onnx.TensorProto.FLOAT}
    assert onnx.TensorProto.FLOAT16 in {t.data_type for t in inits.values()}


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_manifest_records_the_quantization_and_errors_within_tolerance(quantized, store, onnx_fp16, precision):
    from kolors_trt.export.calibration import TOLERANCE
    from kolors_trt.runtime.artifacts import read_export_folder

    folder = read_export_folder(quantized(precision))  # verifies every hash: the folder is valid
    entry = folder.components["unet"].entry
    q = entry["quantization"]
    assert entry["precision"] == q["mode"] == precision and entry["opset"] == 19
    assert q["recipe"]["name"] == "nvidia-sdxl-level3" and q["recipe"]["quantized_layers"] > 0
    cal = store.calibration(precision)
    assert q["calibration"]["sha256"] == cal.sha256()
    assert (q["calibration"]["count"], q["calibration"]["steps"], q["calibration"]["size"]) == (2, 3, [64, 64])
    assert q["calibration"]["seconds"] > 0 and q["calibration"]["peak_rss_mb"] > 0
    e, tol = q["error"], TOLERANCE[precision]
    assert e["calls"] == cal.steps  # the 2 held-out prompts run as one batch: one UNet call a step
    assert 0 < e["rms_rel_err"] <= tol["rms_rel_err"] and 0 < e["max_rel_err"] <= tol["max_rel_err"]
    assert tol["min_psnr_db"] <= e["image_psnr_db"] < 99  # not identical to the fp16 image: it is 8-bit
    # The image reference: a full export (int8) exports the fp16 UNet graph; adding the UNet to an fp16 export
    # (fp8) links that folder's. The same graph byte for byte: the fp16 export's UNet.
    assert e["image_reference"].startswith("exported" if precision == "int8" else "the folder's")
    assert e["image_reference_sha256"] == read_export_folder(onnx_fp16).components["unet"].entry["sha256"]
    assert entry["validation"]["rel_err"] == e["max_rel_err"]
    assert folder.components["text_encoder"].precision == "fp16"


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_quantized_unet_is_smaller_than_fp16(quantized, onnx_fp16, precision):
    def size(folder):
        return sum(p.stat().st_size for p in folder.glob("unet.onnx*"))

    assert size(quantized(precision)) < size(onnx_fp16)


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_runtime_generates_from_the_quantized_folder(quantized, onnx_fp16, precision):
    """Pipeline on ONNX Runtime, at a size other than the calibration's: close to the fp16 folder's image."""
    from kolors_trt.export.calibration import TOLERANCE, psnr_db
    from kolors_trt.runtime.pipeline import Pipeline

    args = dict(prompt="a cat among flowers", height=96, width=64, num_inference_steps=4, seed=7, ip_adapter_scale=0.0,
                output_type="np")
    got = Pipeline.load(quantized(precision)).generate(**args).images
    want = Pipeline.load(onnx_fp16).generate(**args).images
    assert got.shape == want.shape == (1, 96, 64, 3) and np.isfinite(got).all()
    assert TOLERANCE[precision]["min_psnr_db"] <= psnr_db(got, want) < 99


def test_lora_on_a_quantized_unet_is_refused_with_the_maps_reason(quantized, tmp_path):
    """The export records that an 8-bit UNet takes no LoRA (its LoRA map says why); a UNet LoRA is refused with that
    reason and nothing loaded, while the text encoder (fp16) keeps its map."""
    import torch
    from safetensors.torch import save_file

    from kolors_trt.runtime.lora import LoraError
    from kolors_trt.runtime.pipeline import Pipeline

    folder = quantized("int8")
    unet_map = json.loads((folder / "unet.lora.json").read_text())
    assert unet_map["supported"] is False and "int8" in unet_map["reason"]
    assert json.loads((folder / "text_encoder.lora.json").read_text())["supported"] is True
    pipe = Pipeline.load(folder)
    module = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"unet.{module}.lora_A.weight": torch.ones(2, 64), f"unet.{module}.lora_B.weight": torch.ones(64, 2)},
              str(tmp_path / "style.safetensors"))
    with pytest.raises(LoraError, match="LoRA cannot apply to the unet: the unet graph is int8"):
        pipe.load_lora_weights(tmp_path / "style.safetensors", adapter_name="style")
    assert pipe.lora.adapters == {}


def test_store_weights_8bit_equals_the_qdq_it_replaces(tmp_path):
    """A weight's QuantizeLinear applied ahead of time gives ONNX Runtime's own results bit for bit."""
    from onnx import TensorProto, helper, numpy_helper

    from kolors_trt.export.quantize import store_weights_8bit
    from kolors_trt.export.validate import run_ort

    rng = np.random.default_rng(0)
    for precision in ("int8", "fp8"):
        w = (rng.standard_normal((6, 5)) * 3).astype(np.float32)
        scale = (np.abs(w).max(axis=1) / (127 if precision == "int8" else 448)).astype(np.float32)
        zp_type = TensorProto.INT8 if precision == "int8" else TensorProto.FLOAT8E4M3FN
        zp = helper.make_tensor("zp", zp_type, [6], [0] * 6)
        nodes = [helper.make_node("QuantizeLinear", ["w", "s", "zp"], ["wq"], axis=0),
                 helper.make_node("DequantizeLinear", ["wq", "s", "zp"], ["wd"], axis=0),
                 helper.make_node("MatMul", ["x", "wd"], ["y"])]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])],
                                  [numpy_helper.from_array(w, "w"), numpy_helper.from_array(scale, "s"), zp])
        path = tmp_path / f"{precision}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), path)
        x = {"x": rng.standard_normal((2, 6)).astype(np.float32)}
        before = run_ort(path, x)["y"]
        assert store_weights_8bit(path, precision) == {"weights": 1, "activations": 0}
        after = onnx.load(path)
        assert [n.op_type for n in after.graph.node] == ["DequantizeLinear", "MatMul"]
        np.testing.assert_array_equal(run_ort(path, x)["y"], before)


def test_calibration_settings(tmp_path):
    from kolors_trt.export.calibration import CalibrationError, calibration, read_prompts

    int8, fp8 = calibration("int8"), calibration("fp8")
    assert (int8.count, int8.steps, int8.height, int8.width, int8.batch) == (32, 20, 1024, 1024, 2)
    assert (fp8.count, fp8.steps) == (128, 20) and len(read_prompts()) >= 130
    assert int8.holdout_prompts == read_prompts()[32:34] and not set(int8.holdout_prompts) & set(int8.calibration_prompts)
    file = tmp_path / "prompts.txt"
    file.write_text("# mine\n一只小狗\n\na red car\na blue boat\na tree\n", encoding="utf-8")
    mine = calibration("int8", file, count=2, steps=5, size=(64, 96))
    assert mine.calibration_prompts == ("一只小狗", "a red car") and mine.holdout_prompts == ("a blue boat", "a tree")
    assert mine.sha256() != calibration("int8", file, count=2, steps=6, size=(64, 96)).sha256()
    with pytest.raises(CalibrationError, match="needs 5"):
        calibration("int8", file, count=3)
    with pytest.raises(CalibrationError, match="calibration-steps"):
        calibration("fp8", file, count=1, steps=0)
    with pytest.raises(CalibrationError, match="cannot read"):
        calibration("int8", tmp_path / "missing.txt")


def test_tolerance_is_enforced():
    from kolors_trt.export.calibration import TOLERANCE, QuantizationError, check_tolerance

    tol = TOLERANCE["int8"]
    ok = {"max_rel_err": tol["max_rel_err"] / 2, "rms_rel_err": tol["rms_rel_err"] / 2}
    check_tolerance("int8", ok, tol["min_psnr_db"] + 1)
    with pytest.raises(QuantizationError, match="rms_rel_err"):
        check_tolerance("int8", {**ok, "rms_rel_err": tol["rms_rel_err"] * 1.01}, tol["min_psnr_db"] + 1)
    with pytest.raises(QuantizationError, match="PSNR"):
        check_tolerance("int8", ok, tol["min_psnr_db"] - 0.1)


def test_cli_refuses_calibration_flags_without_a_quantized_unet(tiny, tmp_path, capsys):
    from kolors_trt.cli import main

    kolors, ip = tiny
    code = main(["export", "--weights", str(kolors), "--ip-adapter", str(ip), "--out", str(tmp_path / "o"),
                 "--calibration-count", "4"])
    assert code == 1 and "unet=int8" in capsys.readouterr().err
    code = main(["export", "--weights", str(kolors), "--ip-adapter", str(ip), "--out", str(tmp_path / "o"),
                 "--component-precision", "text_encoder=int8"])
    assert code == 1 and "unet: fp16/fp32/int8/fp8" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_quantize_extra_keeps_the_other_extras_versions(tmp_path):
    """pip resolves [quantize] with every other extra against this environment without installing,
    upgrading or downgrading onnx / onnxruntime, and without onnxruntime-gpu (modelopt[onnx] would).
    Offline (--no-index): a requirement this environment does not satisfy fails the resolution, one
    that a local wheel (PIP_FIND_LINKS) would satisfy shows in the report."""
    from importlib.metadata import PackageNotFoundError, version

    import onnxruntime

    root = Path(__file__).resolve().parents[1]
    report = tmp_path / "report.json"
    extras = "export,test,tensorrt-rtx,bench,serve,ray,quantize"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--no-index",
                           "--no-build-isolation", "--report", str(report), "-e", f"{root}[{extras}]"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    changed = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert not changed & {"onnx", "onnxruntime", "onnxruntime-gpu", "torch"}, changed
    assert onnxruntime.__version__ == version("onnxruntime")
    with pytest.raises(PackageNotFoundError):
        version("onnxruntime-gpu")
    assert version("nvidia-modelopt").startswith("0.47")


def test_export_stack_imports_no_modelopt():
    """ModelOpt (which imports transformers, diffusers and torch's compiler stack) loads only when a UNet is
    quantized: importing the CLI, the exporter, the calibration and the build imports none of it."""
    code = ("import json, sys, kolors_trt.cli, kolors_trt.export.exporter, kolors_trt.export.calibration, "
            "kolors_trt.export.quantize, kolors_trt.export.quantized_unet, kolors_trt.engines.builder, "
            "kolors_trt.engines.precision; print(json.dumps([m for m in ('modelopt', 'torch', 'diffusers') "
            "if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


# ---- engines -----------------------------------------------------------------------------------

STATIC = Profile.static(1, 64, 64)


def test_rtx_builds_int8_for_the_default_set(quantized, tmp_path):
    pytest.importorskip("tensorrt_rtx")
    from kolors_trt.engines.builder import build_engines
    from kolors_trt.engines.manifest import verify_engine_folder
    from kolors_trt.engines.targets import RTX_DEFAULT_COMPUTE_CAPABILITIES

    (r,) = build_engines(quantized("int8"), tmp_path / "e", target="tensorrt-rtx", profile=STATIC, components=["unet"])
    entry = verify_engine_folder(tmp_path / "e")["engines"]["unet"]
    assert r.precision == entry["precision"] == "int8" and r.plan_bytes > 0
    assert entry["compute_capabilities"] == list(RTX_DEFAULT_COMPUTE_CAPABILITIES)


def test_fp8_target_rule_refuses_below_sm89(quantized, tmp_path):
    """Explicit or from the default set: refused before anything is built, naming the fix."""
    pytest.importorskip("tensorrt_rtx")
    from kolors_trt.engines.builder import build_engines
    from kolors_trt.engines.precision import UnsupportedTargetError

    for ccs, where in ((None, "the default set has SM80, SM86"), (["8.6", "8.9"], "--compute-capability has SM86")):
        with pytest.raises(UnsupportedTargetError, match=where) as err:
            build_engines(quantized("fp8"), tmp_path / "e", target="tensorrt-rtx", profile=STATIC,
                          components=["unet"], compute_capabilities=ccs)
        assert "--drop-unsupported-targets" in str(err.value) and "8.9" in str(err.value)
        assert not (tmp_path / "e").exists()


def test_fp8_builds_for_the_supported_subset(quantized, tmp_path):
    """--drop-unsupported-targets on the default set: SM89 and SM120, and the manifest says exactly that."""
    pytest.importorskip("tensorrt_rtx")
    from kolors_trt.engines.builder import build_engines
    from kolors_trt.engines.manifest import verify_engine_folder

    (r,) = build_engines(quantized("fp8"), tmp_path / "e", target="tensorrt-rtx", profile=STATIC, components=["unet"],
                         drop_unsupported_targets=True)
    entry = verify_engine_folder(tmp_path / "e")["engines"]["unet"]
    assert r.precision == entry["precision"] == "fp8"
    assert entry["compute_capabilities"] == entry["options"]["compute_capabilities"] == ["SM89", "SM120"]


def test_plan_targets_rule():
    from kolors_trt.engines.precision import UnsupportedTargetError, plan_targets

    assert plan_targets("unet", "int8", ["SM75", "SM86"], True, False) == ["SM75", "SM86"]
    assert plan_targets("unet", "fp8", ["SM89", "SM90", "SM120"], True, False) == ["SM89", "SM90", "SM120"]
    assert plan_targets("unet", "fp8", ["SM80", "SM89"], True, True) == ["SM89"]
    with pytest.raises(UnsupportedTargetError, match="export the UNet at int8"):
        plan_targets("unet", "fp8", ["SM80", "SM86"], True, True)  # nothing left to build for


def test_bench_on_onnxruntime_says_qdq_timings_are_not_indicative(quantized, onnx_fp16, capsys):
    from kolors_trt.cli import main

    code = main(["bench", "--onnx", str(quantized("int8")), "--size", "64x64", "--steps", "2", "--warmup", "0",
                 "--runs", "1", "--compare", str(onnx_fp16)])
    out = capsys.readouterr().out
    assert code == 0 and "UNet step: int8" in out and ", fp16 (" in out
    assert "ONNX Runtime's timings of Q/DQ graphs are not indicative of GPU speed" in out


def test_calibration_memory_projection_scales_with_the_weights():
    from kolors_trt.export.quantize import MEASURED_MID, calibration_projection

    mid, real = calibration_projection(MEASURED_MID["onnx_params"]), calibration_projection(2_580_000_000)
    assert mid["onnx_level_peak_gb"] == [round(v / 1024, 1) for v in MEASURED_MID["onnx_ptq_peak_rss_mb"]]
    assert calibration_projection(MEASURED_MID["torch_params"])["torch_level_peak_gb"] == 2.6
    assert real["fp32_weights_gb"] == 10.32 and real["onnx_level_peak_gb"][0] > 100
    assert real["torch_level_peak_gb"] < real["onnx_level_peak_gb"][0] / 3
