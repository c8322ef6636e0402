"""INT8 and FP8 UNets by NVIDIA's SDXL recipe: ModelOpt fake-quantizes the torch module,
the toolkit's pipeline calibrates it (export/calibration.py), and one trace writes the
graph with QuantizeLinear/DequantizeLinear (Q/DQ) pairs, weights stored 8-bit.

Why the torch module and not the ONNX graph: ModelOpt's ONNX-level PTQ
(``modelopt.onnx.quantization.quantize``) keeps ONNX Runtime calibration sessions of
the whole graph, about 10x the graph in memory (a 435 M-parameter UNet of real widths:
411 s and 17.7-19.6 GB; the 2.6 B UNet would need on the order of 100 GB), while
torch-level calibration holds the module once plus one step's activations (README,
"INT8 and FP8 UNets"). NVIDIA calibrates the torch module too, on a GPU, and exports once.

The recipe, and where each choice comes from:

- which layers: every Conv2d and Linear ("quantization level 3") except those whose
  name matches ``SKIP``: TensorRT demo/Diffusion ``utils_modelopt.filter_func`` (time
  and added-condition embeddings, conv_in/conv_out, conv_shortcut, transformer
  proj_out), and the IP-Adapter's to_k_ip/to_v_ip here: they run on 16 tokens
  (no measurable time) and their input is the reference image, which a prompt set
  does not calibrate. Attention matmuls stay unquantized (ModelOpt's diffusers
  example without --quantize-mha; our IP attention is two SDPAs, not TensorRT's
  fused-MHA pattern).
- INT8 (demo ``get_int8_config``, ModelOpt ``build_sdxl_8bit_engine.sh``): Linear by
  SmoothQuant alpha 0.8 (weights per output channel, activations per tensor after
  smoothing); Conv2d weights per output channel, inputs per tensor from the
  per-step "min-mean" percentile calibrator (``PercentileCalibrator`` below);
  32 prompts x 20 steps.
- FP8 (demo ``SD_FP8_FP16_DEFAULT_CONFIG``): E4M3 per tensor, max calibration;
  128 prompts x 20 steps. Exported by the demo's own workaround
  (``generate_fp8_scales`` + ModelOpt's ``convert_zp_fp8``): the FP8 amax is rescaled
  so that the INT8 exporter writes the FP8 scale amax/448, and the zero points then
  become FLOAT8E4M3FN, which makes standard ONNX FP8 Q/DQ (opset 19).
- fp16 everywhere else, like the fp16 UNet graph.

Sources: github.com/NVIDIA/TensorRT demo/Diffusion/demo_diffusion/utils_modelopt.py,
pipeline/diffusion_pipeline.py (``_calibrate_and_save_model``, ``_get_quantized_model``);
github.com/NVIDIA/TensorRT-Model-Optimizer examples/diffusers/quantization/
(quantize.py, config.py, utils.py, onnx_utils/).
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import re
import warnings
from pathlib import Path

from kolors_trt.runtime.spec import QUANTIZED_PRECISIONS

logger = logging.getLogger(__name__)

QUANTIZED = QUANTIZED_PRECISIONS
OPSET_8BIT = 19  # the first opset whose QuantizeLinear takes a FLOAT8E4M3FN zero point
SKIP = re.compile(r".*(time_emb_proj|time_embedding|conv_in|conv_out|conv_shortcut|add_embedding|pos_embed|"
                  r"time_text_embed|context_embedder|norm_out|proj_out|to_k_ip|to_v_ip).*")
FP8_MAX = 448.0  # largest E4M3 value
# NVIDIA's calibration settings per format (build_sdxl_8bit_engine.sh), at Kolors' default size.
RECIPE = {
    "int8": {"algorithm": "smoothquant", "alpha": 0.8, "conv_inputs": "percentile", "percentile": 1.0,
             "collect_method": "min-mean", "count": 32, "steps": 20, "batch": 2},
    "fp8": {"algorithm": "max", "count": 128, "steps": 20, "batch": 2},
}
RECIPE_NAME = "nvidia-sdxl-level3"  # demo/Diffusion's quantization level 3: Conv2d + Linear, no MHA


# Measured on this machine (README "INT8 and FP8 UNets"): torch-level INT8 calibration of the mid-size
# UNet of real widths (export/tiny.py MID, with its IP layers: 463 M parameters, 1.77 GB in fp32)
# peaked at 2.64 GB RSS; ONNX-level PTQ of the 435 M UNet at 17.7-19.6 GB.
MEASURED_MID = {"torch_params": 463_464_644, "torch_peak_rss_mb": 2641,
                "onnx_params": 434_628_804, "onnx_ptq_peak_rss_mb": (17_700, 19_600), "onnx_ptq_seconds": 411}


def calibration_projection(params: int) -> dict:
    """Peak RSS of calibrating a UNet of ``params`` parameters on the CPU (fp32), scaled from the mid-size
    measurements by the parameter count (the module dominates; activations of one step come on top and
    grow with the calibration size, which the mid-size run kept small)."""
    m = MEASURED_MID
    return {"params": params, "fp32_weights_gb": round(4 * params / 1e9, 2),
            "torch_level_peak_gb": round(m["torch_peak_rss_mb"] * params / m["torch_params"] / 1024, 1),
            "onnx_level_peak_gb": [round(v * params / m["onnx_params"] / 1024, 1) for v in m["onnx_ptq_peak_rss_mb"]]}


def check_precision(precision: str) -> None:
    if precision not in QUANTIZED:
        raise ValueError(f"quantize: precision {precision!r} is not one of {QUANTIZED}")


def quantized_layers(module) -> list[str]:
    """Names of the Conv2d and Linear layers the recipe quantizes in ``module``."""
    import torch

    return [name for name, m in module.named_modules()
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and not SKIP.match(name)]


@functools.lru_cache(maxsize=1)
def percentile_calibrator():
    """The demo's PercentileCalibrator (utils_modelopt.py), a ModelOpt MaxCalibrator that keeps
    one amax per denoising step (call i is step i mod total_step) and, with "min-mean", takes
    the minimum over the first ``percentile`` of the steps of the per-step mean amax."""
    import torch

    with _quiet():
        from modelopt.torch.quantization import utils as quant_utils
        from modelopt.torch.quantization.calib.max import MaxCalibrator

    class PercentileCalibrator(MaxCalibrator):
        def __init__(self, num_bits=8, axis=None, unsigned=False, track_amax=False, percentile=1.0,
                     total_step=20, collect_method="min-mean"):
            super().__init__(num_bits, axis, unsigned, track_amax)
            self.percentile, self.total_step, self.collect_method = percentile, total_step, collect_method
            self.data, self.i = {}, 0

        def collect(self, x):
            amax = quant_utils.reduce_amax(x, axis=None).detach()
            step = self.i % self.total_step
            if step not in self.data:
                self.data[step] = amax
            elif self.collect_method == "global_min":
                self.data[step] = torch.min(self.data[step], amax)
            elif self.collect_method in ("min-max", "mean-max"):
                self.data[step] = torch.max(self.data[step], amax)
            else:
                self.data[step] = self.data[step] + amax
            self.i += 1

        def compute_amax(self):
            seen = sorted(self.data)[: max(1, int(len(self.data) * self.percentile))]
            calls = max(1, self.i // max(1, len(self.data)))  # calls per step, for the mean
            values = [self.data[s] / calls if self.collect_method == "min-mean" else self.data[s] for s in seen]
            stacked = torch.stack([v.reshape(()) for v in values])
            self._calib_amax = stacked.mean() if self.collect_method == "mean-max" else stacked.min()
            return self._calib_amax

        def reset(self):
            super().reset()
            self.data, self.i = {}, 0

    return PercentileCalibrator


def quant_config(module, precision: str, steps: int) -> dict:
    """The ModelOpt config of the recipe for ``module`` (one entry per quantized layer)."""
    import torch

    check_precision(precision)
    recipe = RECIPE[precision]
    cfg: dict = {"*output_quantizer": {"enable": False}, "default": {"enable": False}}
    bits = 8 if precision == "int8" else (4, 3)
    for name in quantized_layers(module):
        layer = module.get_submodule(name)
        cfg[f"{name}.weight_quantizer"] = {"num_bits": bits, "axis": 0 if precision == "int8" else None}
        if precision == "fp8":
            cfg[f"{name}.input_quantizer"] = {"num_bits": bits, "axis": None}
        elif isinstance(layer, torch.nn.Linear):
            cfg[f"{name}.input_quantizer"] = {"num_bits": 8, "axis": -1}  # per channel until smoothed
        else:
            options = {"num_bits": 8, "axis": None, "percentile": recipe["percentile"], "total_step": steps,
                       "collect_method": recipe["collect_method"]}
            cfg[f"{name}.input_quantizer"] = {"num_bits": 8, "axis": None,
                                              "calibrator": (percentile_calibrator(), (), options)}
    for entry in cfg.values():  # Q/DQ in the fp16 body's dtype (ModelOpt set_quant_config_attr, "Half")
        if "num_bits" in entry:
            entry["trt_high_precision_dtype"] = "Half"
    algorithm = {"method": "smoothquant", "alpha": recipe["alpha"]} if precision == "int8" else "max"
    return {"quant_cfg": cfg, "algorithm": algorithm}


def quantize_module(module, precision: str, steps: int, forward_loop) -> int:
    """Insert the recipe's quantizers into ``module`` (in place), calibrate them with
    ``forward_loop(module)`` and make the module exportable; returns how many layers are quantized."""
    import torch

    with _quiet():
        import modelopt.torch.quantization as mtq

        config = quant_config(module, precision, steps)
        mtq.quantize(module, config, forward_loop)
        mtq.disable_quantizer(module, lambda name: SKIP.match(name) is not None)
    count = 0
    for name, m in module.named_modules():
        if not isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) or not hasattr(m, "input_quantizer"):
            continue
        if not m.input_quantizer.is_enabled:
            continue
        count += 1
        if precision == "fp8":  # demo generate_fp8_scales: the INT8 exporter then writes scale amax / 448
            for q in (m.input_quantizer, m.weight_quantizer):
                q._num_bits = 8
                q._amax = q._amax * (127 / FP8_MAX)
    return count


@contextlib.contextmanager
def _quiet():
    """ModelOpt's prints ("Inserted 767 quantizers"), its warnings about layers the recipe leaves
    uncalibrated and about untested transformers versions: shown only at INFO (kolors-trt -v)."""
    if logging.getLogger("kolors_trt").isEnabledFor(logging.INFO):
        yield
        return
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def store_weights_8bit(path: Path, precision: str) -> dict:
    """Rewrite the graph at ``path`` so that each weight's QuantizeLinear is applied ahead of time:
    the initializer becomes the 8-bit tensor the DequantizeLinear reads (a quarter of the fp32
    bytes, half of the fp16). For FP8, every Q/DQ zero point becomes FLOAT8E4M3FN (ModelOpt's
    convert_zp_fp8). One external-data file ``path.data`` when the graph is over 2 GB.
    Returns {"weights": n, "activations": n} Q/DQ counts."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from .onnx_export import TWO_GB, _save

    check_precision(precision)
    base = Path(path).parent
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    fold = [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] in inits and consumers[n.input[0]] == 1]
    zero_points = {n.input[2] for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2}

    def load(name):
        return numpy_helper.to_array(inits[name], base_dir=str(base))

    replaced, total = {}, 0
    for node in fold:
        weight, scale = load(node.input[0]).astype(np.float32), load(node.input[1]).astype(np.float32)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if scale.ndim == 1 and scale.size > 1:
            shape = [1] * weight.ndim
            shape[axis] = scale.size
            scale = scale.reshape(shape)
        if precision == "int8":
            q = np.clip(np.rint(weight / scale), -128, 127).astype(np.int8)  # rint: round half to even, as ONNX
            tensor = numpy_helper.from_array(q, node.output[0])
        else:
            q = np.clip(weight / scale, -FP8_MAX, FP8_MAX)  # ONNX QuantizeLinear saturates to E4M3's range
            tensor = onnx.helper.make_tensor(node.output[0], onnx.TensorProto.FLOAT8E4M3FN, q.shape,
                                             _e4m3_bytes(q), raw=True)
        replaced[node.output[0]] = tensor
        total += q.nbytes
    kept = []
    for t in graph.initializer:
        if any(t.name == n.input[0] for n in fold):
            continue
        array = numpy_helper.to_array(t, base_dir=str(base))
        if t.name in zero_points and precision == "fp8":
            kept.append(onnx.helper.make_tensor(t.name, onnx.TensorProto.FLOAT8E4M3FN, array.shape,
                                                _e4m3_bytes(np.zeros(array.shape, np.float32)), raw=True))
        else:
            kept.append(numpy_helper.from_array(array, t.name))
        total += array.nbytes
    if precision == "fp8":  # shape inference typed the Q outputs int8; ONNX Runtime and TensorRT re-infer them
        del graph.value_info[:]
    nodes = [n for n in graph.node if n not in fold]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + list(replaced.values()))
    data = Path(path).with_name(Path(path).name + ".data")
    data.unlink(missing_ok=True)
    _save(model, Path(path), total > TWO_GB)
    activations = sum(1 for n in graph.node if n.op_type == "QuantizeLinear")
    return {"weights": len(fold), "activations": activations}


def _e4m3_bytes(values) -> bytes:
    """float32 values -> FLOAT8E4M3FN bytes, rounded to nearest even (ml_dtypes, an onnx dependency)."""
    import ml_dtypes
    import numpy as np

    return np.asarray(values, np.float32).astype(ml_dtypes.float8_e4m3fn).tobytes()


def qdq_layers(model) -> dict:
    """{layer: "conv" | "matmul"} of the layers whose weight and input both pass through a
    DequantizeLinear in an ONNX model (names from the exporter's /unet/... node names)."""
    producers = {o: n for n in model.graph.node for o in n.output}

    def through_dq(name, depth=3):
        node = producers.get(name)
        while node is not None and depth:
            if node.op_type == "DequantizeLinear":
                return True
            if node.op_type not in ("Transpose", "Reshape", "Cast"):
                return False
            node, depth = producers.get(node.input[0]), depth - 1
        return False

    out = {}
    for node in model.graph.node:
        if node.op_type in ("Conv", "MatMul", "Gemm") and len(node.input) > 1 \
                and through_dq(node.input[0]) and through_dq(node.input[1]):
            layer = node.name.rsplit("/", 1)[0].strip("/").replace("/", ".")
            out[layer] = "conv" if node.op_type == "Conv" else "matmul"
    return out
