"""Calibrate and check an 8-bit UNet in the toolkit's own pipeline.

The pipeline (runtime.Pipeline on ONNX Runtime) runs the graphs this export just wrote
for the text encoder, image encoder and VAE, with the UNet being quantized in place of
the UNet graph (``TorchUNet``), so the quantizers see exactly the inputs the runtime
gives a UNet: prompts through the real tokenizer and text encoder, the empty negative
under CFG, Euler-scaled latents at the calibration size.

    calibration prompts  -> calibrate (export/quantize.py)
    held-out prompts     -> UNet inputs and outputs recorded from the fp32 module, then
                            the quantized graph on the same inputs (per-step error), and
                            the image against the fp16 UNet graph's image (PSNR)

The prompt set is a text file, one prompt a line (``#`` comments); the built-in one is
NVIDIA's SDXL calibration set (calibration_prompts.txt). Calibration takes the first
``count`` prompts, the check the next ``holdout``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import resource
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from kolors_trt.runtime import spec as S
from kolors_trt.runtime.engine import Engine
from kolors_trt.runtime.errors import InputError

from .quantize import RECIPE, check_precision

logger = logging.getLogger(__name__)

BUILTIN_PROMPTS = Path(__file__).with_name("calibration_prompts.txt")
HOLDOUT = 2  # held-out prompts for the error check
SEED = 0  # request i of the calibration set has seed SEED + i; held-out prompts continue the count
# The export fails above these. Per step: the noise prediction against the fp32 module on held-out
# pipeline inputs, the max and the RMS of the difference relative to the reference's max and RMS
# (worst UNet call). Image: PSNR against the fp16 UNet graph's image, same prompts and seeds.
# Set from what random-weight UNets measure (README, "INT8 and FP8 UNets"): their noise is not
# damped the way a trained UNet's is, so the bounds catch a broken quantization (wrong scales,
# unsmoothed or unquantized layers, a graph that disagrees with the calibrated module), not a
# loss of quality, which random weights cannot show.
TOLERANCE = {"int8": {"max_rel_err": 0.5, "rms_rel_err": 0.45, "min_psnr_db": 18.0},
             "fp8": {"max_rel_err": 0.4, "rms_rel_err": 0.3, "min_psnr_db": 18.0}}


class CalibrationError(InputError):
    """The calibration settings or prompt file are unusable."""


class QuantizationError(InputError):
    """The quantized UNet is further from the fp32 UNet than the tolerance allows."""


@dataclass(frozen=True)
class Calibration:
    """What a quantized UNet is calibrated and checked on."""

    precision: str
    prompts: tuple  # the whole set
    source: str  # the file, or "built-in"
    count: int
    steps: int
    height: int
    width: int
    batch: int
    holdout: int = HOLDOUT

    @property
    def calibration_prompts(self) -> tuple:
        return self.prompts[: self.count]

    @property
    def holdout_prompts(self) -> tuple:
        return self.prompts[self.count: self.count + self.holdout]

    def sha256(self) -> str:
        """Of everything that makes the calibration: the prompts used, steps, size, batch, seeds."""
        used = {"prompts": list(self.calibration_prompts), "holdout": list(self.holdout_prompts), "seed": SEED,
                **{k: v for k, v in asdict(self).items() if k not in ("prompts", "source", "precision")}}
        return hashlib.sha256(json.dumps(used, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def as_json(self) -> dict:
        return {"source": self.source, "sha256": self.sha256(), "count": self.count, "steps": self.steps,
                "size": [self.height, self.width], "batch": self.batch, "holdout": self.holdout, "seed": SEED,
                "guidance_scale": S.SAMPLING_DEFAULTS["guidance_scale"], "ip_adapter_scale": 0.0}


def read_prompts(path: Optional[Path] = None) -> tuple:
    """The prompts of a calibration file (the built-in set when ``path`` is None)."""
    file = Path(path) if path is not None else BUILTIN_PROMPTS
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CalibrationError(f"export: cannot read the calibration prompts {file} ({err}); pass a UTF-8 text file "
                               "with one prompt a line") from None
    return tuple(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))


def calibration(precision: str, prompts_file: Optional[Path] = None, count: Optional[int] = None,
                steps: Optional[int] = None, size: Optional[tuple] = None, batch: Optional[int] = None) -> Calibration:
    """The settings for ``precision``: NVIDIA's recipe (quantize.RECIPE) where an argument is None,
    at Kolors' default size."""
    check_precision(precision)
    recipe = RECIPE[precision]
    prompts = read_prompts(prompts_file)
    count = recipe["count"] if count is None else count
    steps = recipe["steps"] if steps is None else steps
    batch = recipe["batch"] if batch is None else batch
    height, width = size or (S.SAMPLING_DEFAULTS["height"], S.SAMPLING_DEFAULTS["width"])
    for name, value in (("--calibration-count", count), ("--calibration-steps", steps), ("--calibration-batch", batch)):
        if not isinstance(value, int) or value < 1:
            raise CalibrationError(f"export: {name} must be a positive integer, found {value!r}")
    if len(prompts) < count + HOLDOUT:
        where = prompts_file or "the built-in set"
        raise CalibrationError(f"export: {where} has {len(prompts)} prompt(s); calibrating on {count} and checking on "
                               f"{HOLDOUT} held-out ones needs {count + HOLDOUT}: add prompts or lower --calibration-count")
    source = str(Path(prompts_file).resolve()) if prompts_file else "built-in"
    return Calibration(precision, prompts, source, count, steps, height, width, batch)


class TorchUNet(Engine):
    """A torch UNet module as the pipeline's UNet engine; with ``record``, every call's feeds and
    output are appended to it (conditioning arrays the loop reuses are shared, not copied)."""

    def __init__(self, spec: S.EngineSpec, module, record: Optional[list] = None):
        super().__init__(spec, Path("<torch module>"))
        self.module, self.record = module, record

    def _execute(self, feeds, values):
        import torch

        device = next(self.module.parameters()).device
        with torch.no_grad():
            out = self.module(*(torch.from_numpy(np.ascontiguousarray(feeds[n])).to(device)
                                for n in self.spec.input_names))
        out = out[0] if isinstance(out, tuple) else out  # a DeepCache unet also returns its deep feature
        result = {"noise_pred": out.float().cpu().numpy()}
        if self.record is not None:
            self.record.append((dict(feeds), result["noise_pred"]))
        return result


def requests(cal: Calibration, prompts: tuple, first_seed: int, output_type: str) -> list:
    from kolors_trt.runtime.request import GenerationRequest

    return [GenerationRequest(p, height=cal.height, width=cal.width, num_inference_steps=cal.steps,
                              ip_adapter_scale=0.0, seed=first_seed + i, output_type=output_type)
            for i, p in enumerate(prompts)]


def run(pipe, reqs: list, batch: int, desc: str) -> list:
    """The requests in pipeline batches of ``batch`` (one UNet call a step each)."""
    from tqdm import tqdm

    out = []
    chunks = [reqs[i: i + batch] for i in range(0, len(reqs), batch)]
    for chunk in tqdm(chunks, desc=desc, unit="batch", disable=len(chunks) < 2 or not logger.isEnabledFor(logging.INFO)):
        out += pipe.generate_batch(chunk)
    return out


def step_errors(graph: Path, records: list) -> dict:
    """The quantized graph on ONNX Runtime against the recorded fp32 outputs, call by call."""
    from .validate import ValidationError, run_ort_session

    session = run_ort_session(graph)
    max_rel, rms_rel, max_abs = [], [], 0.0
    for feeds, want in records:
        got = session(feeds)["noise_pred"].astype(np.float64)
        want = want.astype(np.float64)
        if not np.isfinite(got).all():
            raise ValidationError(f"unet: {graph.name} gives NaN/Inf on a recorded input (ONNX Runtime)")
        diff = got - want
        max_abs = max(max_abs, float(np.abs(diff).max()))
        max_rel.append(float(np.abs(diff).max() / (np.abs(want).max() or 1.0)))
        rms_rel.append(float(np.sqrt((diff ** 2).mean() / ((want ** 2).mean() or 1.0))))
    return {"max_rel_err": max(max_rel), "rms_rel_err": max(rms_rel), "mean_rms_rel_err": float(np.mean(rms_rel)),
            "max_abs_err": max_abs, "calls": len(records)}


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two images in [0, 1] (inf when equal)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


def peak_rss_reset() -> bool:
    """Reset this process's peak RSS (Linux: "5" to /proc/self/clear_refs) so a later
    ``peak_rss_mb`` measures one stage; False where the kernel does not offer it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def check_tolerance(precision: str, errors: dict, psnr: float) -> None:
    tol = TOLERANCE[precision]
    found = [f"{k} {errors[k]:.4g} > {tol[k]}" for k in ("max_rel_err", "rms_rel_err") if errors[k] > tol[k]]
    if psnr < tol["min_psnr_db"]:
        found.append(f"image PSNR {psnr:.2f} dB < {tol['min_psnr_db']} dB")
    if found:
        raise QuantizationError(
            f"export: the {precision} UNet is too far from the fp32 UNet on held-out inputs ({'; '.join(found)}): "
            "calibrate on more or more representative prompts (--calibration-prompts, --calibration-count), at the "
            "size you serve (--calibration-size), or export the UNet at fp16")
