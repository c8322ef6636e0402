"""Check an exported graph on ONNX Runtime (CPU) against its fp32 PyTorch module.

Checks run in a fixed order and stop at the first failure: output names, named
dims of every input and output, output shapes, values. Errors are measured as
max |ort - torch| and that maximum relative to max |torch| (rel err). Any element
outside |ort - torch| <= atol + rtol * |torch| (the spec's tolerance for the graph's
precision) is an error, not a warning.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from kolors_trt.runtime import spec as S
from kolors_trt.runtime.errors import InputError

logger = logging.getLogger(__name__)


class ValidationError(InputError):
    """An exported graph does not match its PyTorch module or its spec."""


@dataclass
class Parity:
    component: str
    precision: str
    max_abs_err: float
    rel_err: float
    seconds: float
    dims: dict


def check_signature(spec: S.EngineSpec, model) -> None:
    """Input/output names, ranks, fixed sizes and dynamic dim names equal the spec."""
    def dims_of(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    for kind, wanted, found in (("input", spec.inputs, model.graph.input), ("output", spec.outputs, model.graph.output)):
        names = [v.name for v in found]
        if names != [t.name for t in wanted]:
            raise ValidationError(f"{spec.name}: graph {kind}s are {names}, the spec says {[t.name for t in wanted]}")
        for t, v in zip(wanted, found):
            dims = dims_of(v)
            if len(dims) != len(t.shape):
                raise ValidationError(f"{spec.name}: {kind} {t.name!r} has rank {len(dims)}, the spec says {t.shape}")
            for axis, (entry, dim) in enumerate(zip(t.shape, dims)):
                if dim != S.dim_label(entry):
                    raise ValidationError(f"{spec.name}: {kind} {t.name!r} axis {axis} is {dim!r}, "
                                          f"the spec says {entry!r}")


def run_ort(path: Path, feeds: dict, threads: int = 0) -> dict:
    return run_ort_session(path, threads)(feeds)


def run_ort_session(path: Path, threads: int = 0):
    """One CPU session of the graph at ``path``, as a function of the feeds returning {output: array}."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return lambda feeds: dict(zip(names, session.run(names, feeds)))


def compare(spec: S.EngineSpec, precision: str, ref: dict, got: dict, values: dict) -> tuple[float, float]:
    """Shapes then values of every output; returns the worst (max_abs_err, rel_err)."""
    import numpy as np

    atol, rtol = spec.tolerance[precision]
    worst_abs = worst_rel = 0.0
    for t in spec.outputs:
        want_shape = S.shape_of(t, values)
        if tuple(got[t.name].shape) != want_shape:
            raise ValidationError(f"{spec.name}: output {t.name!r} has shape {tuple(got[t.name].shape)}, "
                                  f"expected {want_shape} at dims {values}")
        r, g = ref[t.name].astype(np.float64), got[t.name].astype(np.float64)
        if not np.isfinite(g).all():
            raise ValidationError(f"{spec.name} ({precision}): output {t.name!r} has NaN/Inf on ONNX Runtime")
        err = float(np.abs(r - g).max())
        scale = float(np.abs(r).max()) or 1.0
        worst_abs, worst_rel = max(worst_abs, err), max(worst_rel, err / scale)
        excess = np.abs(r - g) - (atol + rtol * np.abs(r))
        if (excess > 0).any():
            i = np.unravel_index(int(excess.argmax()), excess.shape)
            raise ValidationError(
                f"{spec.name} ({precision}): output {t.name!r} differs from PyTorch beyond atol {atol:g} + "
                f"rtol {rtol:g}: at {tuple(int(x) for x in i)} ONNX Runtime gives {g[i]:.6g}, PyTorch {r[i]:.6g} "
                f"(max abs err {err:.3g}, rel err {err / scale:.3g}, dims {values})"
            )
    return worst_abs, worst_rel


def validate(spec: S.EngineSpec, precision: str, path: Path, reference, values: dict, feeds: dict) -> Parity:
    """Run the graph at `values` and compare it with `reference` (the fp32 module)."""
    import onnx
    import torch

    start = time.perf_counter()
    check_signature(spec, onnx.load(str(path), load_external_data=False))
    with torch.no_grad():
        outs = reference(*(torch.from_numpy(feeds[n]) for n in spec.input_names))
    outs = outs if isinstance(outs, tuple) else (outs,)
    ref = {n: o.numpy() for n, o in zip(spec.output_names, outs)}
    got = run_ort(path, feeds)
    if set(got) != set(spec.output_names):
        raise ValidationError(f"{spec.name}: graph outputs {sorted(got)} != spec {spec.output_names}")
    abs_err, rel_err = compare(spec, precision, ref, got, values)
    return Parity(spec.name, precision, abs_err, rel_err, time.perf_counter() - start, dict(values))
