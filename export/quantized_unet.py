"""Export the UNet at int8 or fp8: calibrate in the pipeline, trace once, measure, check.

Called by the exporter after the text encoder, image encoder and VAE graphs of the same
export are staged (or, with --components unet, taken from the folder it adds to):

1. a calibration folder (a staging folder: removed at the end) holds those three graphs
   and the fp16 UNet graph, which is the reference for the image check (exported, or, when
   the folder the UNet is added to holds one of this checkpoint, linked from it);
2. the runtime's Pipeline opens it on ONNX Runtime, with the fp32 torch UNet in place of
   the UNet graph (calibration.TorchUNet);
3. held-out prompts run first: every UNet call's inputs and fp32 output are recorded;
4. the calibration prompts run with ModelOpt's quantizers inserted (quantize.py);
5. the calibrated module, cast to fp16, is traced once (opset 19), its weights stored 8-bit;
6. the graph runs on the recorded inputs (per-step error against fp32) and in the pipeline
   on the held-out prompts (image PSNR against the fp16 graph's image);
7. above the tolerance the export fails (calibration.QuantizationError).

Peak memory of step 4 is measured on its own (the kernel's peak RSS is reset before it).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from kolors_trt.runtime import spec as S

from . import folder as F
from .calibration import (
    SEED,
    TOLERANCE,
    Calibration,
    TorchUNet,
    check_tolerance,
    peak_rss_mb,
    peak_rss_reset,
    psnr_db,
    requests,
    run,
    step_errors,
)
from .onnx_export import export_onnx, module_bytes
from .quantize import OPSET_8BIT, RECIPE, RECIPE_NAME, quantize_module, store_weights_8bit

logger = logging.getLogger(__name__)

OTHERS = ("text_encoder", "image_encoder", "vae_decoder")


def _link(src: Path, dst: Path) -> None:
    """Hard link (same file system: no copy of a 12 GB text encoder), else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def calibration_folder(out: Path, comps, graphs: dict, entries: dict, paths, dims, runtime, values: dict) -> tuple:
    """An export folder of the other graphs (``graphs``: name -> folder holding {name}.onnx) and the
    fp16 UNet graph (from ``graphs["unet"]`` when given, else exported), in a staging folder of ``out``;
    returns (folder, the fp16 UNet graph's sha256)."""
    folder = F.stage_dir(out, "calibration")
    for name in (*OTHERS, "unet"):
        for file in (f"{name}.onnx", f"{name}.onnx.data", f"{name}.lora.json"):  # and the map its entry names
            if name in graphs and (Path(graphs[name]) / file).is_file():
                _link(Path(graphs[name]) / file, folder / file)
    if "unet" not in graphs:
        export_onnx(comps.graph("unet", "fp16"), S.engine_specs(dims)["unet"], values, folder / "unet.onnx")
    fp16 = {**F.graph_fields(folder, "unet"), "precision": "fp16"}
    F.write_manifest(folder, paths, dims, runtime, {**{n: entries[n] for n in OTHERS}, "unet": fp16})
    return folder, fp16["sha256"]


def export_quantized_unet(comps, cal: Calibration, out: Path, stage: Path, graphs: dict, entries: dict, paths,
                          dims, runtime, values: dict) -> dict:
    """Write ``stage/unet.onnx`` at ``cal.precision``; returns the manifest's "quantization" record
    (recipe, calibration, measured error, time and memory). Raises QuantizationError above TOLERANCE."""
    import torch

    from kolors_trt.runtime.backend_ort import OrtEngine
    from kolors_trt.runtime.pipeline import Pipeline

    precision = cal.precision
    folder, reference = calibration_folder(out, comps, graphs, entries, paths, dims, runtime, values)
    try:
        pipe = Pipeline.load(folder, backend="onnxruntime", verify=False)
        fp16_unet = pipe.engines["unet"]
        module = comps.graph("unet", "fp32")
        comps.release("unet")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        module.to(device)
        engine = pipe.engines["unet"] = TorchUNet(fp16_unet.spec, module, record=[])
        held_out = requests(cal, cal.holdout_prompts, SEED + cal.count, "latent")
        run(pipe, held_out, cal.batch, "record held-out")
        records, engine.record = engine.record, None

        calib = requests(cal, cal.calibration_prompts, SEED, "latent")
        weights_bytes = module_bytes(module)
        measured = peak_rss_reset()
        rss_before, start = peak_rss_mb(), time.perf_counter()
        layers = quantize_module(module, precision, cal.steps, lambda m: run(pipe, calib, cal.batch, "calibrate"))
        seconds, peak = time.perf_counter() - start, peak_rss_mb()
        logger.info("unet %s: calibrated %d layers on %d prompts x %d steps in %.1f s (peak RSS %.0f MB)",
                    precision, layers, cal.count, cal.steps, seconds, peak)

        file = stage / "unet.onnx"
        start = time.perf_counter()
        export_onnx(module.half().cpu(), S.engine_specs(dims)["unet"], values, file, opset=OPSET_8BIT)
        del module, engine.module
        qdq = store_weights_8bit(file, precision)
        export_seconds = time.perf_counter() - start

        errors = step_errors(file, records)
        del records
        pipe.engines["unet"] = fp16_unet
        want = run(pipe, requests(cal, cal.holdout_prompts, SEED + cal.count, "np"), cal.batch, "fp16 images")
        pipe.engines["unet"] = OrtEngine(fp16_unet.spec, file)
        got = run(pipe, requests(cal, cal.holdout_prompts, SEED + cal.count, "np"), cal.batch, "quantized images")
        psnr = min(psnr_db(a.images, b.images) for a, b in zip(want, got))
        del pipe
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    check_tolerance(precision, errors, psnr)
    return {
        "mode": precision,
        "recipe": {"name": RECIPE_NAME, **{k: v for k, v in RECIPE[precision].items() if k not in ("count", "steps", "batch")},
                   "opset": OPSET_8BIT, "quantized_layers": layers, "qdq": qdq, "tool": _modelopt_version()},
        "calibration": {**cal.as_json(), "device": device, "seconds": round(seconds, 2),
                        "peak_rss_mb": round(peak) if measured else None, "rss_before_mb": round(rss_before),
                        "module_bytes_fp32": weights_bytes, "export_seconds": round(export_seconds, 2)},
        "error": {**errors, "image_psnr_db": psnr,
                  "image_reference": ("the folder's" if "unet" in graphs else "exported") + " fp16 UNet graph, same "
                                     "prompts and seeds", "image_reference_sha256": reference,
                  "step_reference": f"fp32 PyTorch module on {errors['calls']} recorded held-out UNet calls"},
        "tolerance": dict(TOLERANCE[precision]),
    }


def _modelopt_version() -> str:
    from importlib.metadata import version

    return f"nvidia-modelopt {version('nvidia-modelopt')}"
