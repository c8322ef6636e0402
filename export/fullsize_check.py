"""`make fullsize-check`: the real Kolors sizes through export, validation and the
TensorRT-RTX build, one component per process, with measured time, memory and bytes.

    python -m kolors_trt.export.fullsize_check check --out DIR [--components ...]

Writes (once) random fp16 weights at the real sizes (export/fullsize.py) under
DIR/ckpt, then per component in its own process: export + validate into DIR/onnx,
build into DIR/engines; DIR/fullsize-check.{md,json} after every step. Each step
is watched: its own memory (anonymous RSS) above --rss-cap-mb, or its time above
--build-timeout, stops it, and the table says so.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .fullsize import write_streaming
from .tiny import IP_WEIGHT_NAME

logger = logging.getLogger(__name__)


# Validation dims: small enough for fp16 torch and ONNX Runtime on a CPU, not the trace's
# (export_dims: latents 8x8), non-square, CFG batch for the UNet.
CHECK_VALUES = {"batch": 1, "unet_batch": 2, "latent_height": 16, "latent_width": 24}


def load_graph(paths, name: str, dtype: str):
    """One component's graph wrapper, loaded alone at `dtype` (no fp32 copy)."""
    import torch
    from diffusers import UNet2DConditionModel

    from . import checkpoint as ck
    from .components import ImageEncoderGraph, TextEncoderGraph, UNetGraph, VaeDecoderGraph

    if name == "text_encoder":
        return TextEncoderGraph(ck.load_text_encoder(paths, dtype)).eval()
    if name == "vae_decoder":
        return VaeDecoderGraph(ck.load_vae(paths, dtype)).eval()
    if name == "unet":
        unet = ck.load_unet(paths, dtype)
        return UNetGraph(unet, ck.load_ip_adapter(paths, unet)[1]).eval()
    with torch.device("meta"):  # only its cross-attention count is needed to read the IP weights
        unet = UNet2DConditionModel.from_config(ck.read_config(paths.unet))
    resampler = ck.load_ip_adapter(paths, unet)[0].to(getattr(torch, dtype))
    return ImageEncoderGraph(ck.load_image_encoder(paths, dtype), resampler).eval()


def run_ort_lean(path: Path, feeds: dict) -> dict:
    """ONNX Runtime on the CPU with as few copies of the weights as it allows.

    ONNX Runtime reads external data into its own memory: instead every external
    initializer is handed over as an OrtValue on a copy-on-write memmap of the
    page-aligned data file (add_external_initializers, no copy). No arena, no
    prepacking, no graph optimisation. What remains is the CPU provider's lack of
    fp16 kernels for most ops: its InsertCastTransformer stores fp32 copies of the
    fp16 weights at session creation, whatever the optimisation level, so an fp16
    graph costs about twice its weights in anonymous memory (UNet: 12 GB for 5.8).
    """
    import numpy as np
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.enable_cpu_mem_arena = False
    opts.enable_mem_pattern = False
    opts.add_session_config_entry("session.disable_prepacking", "1")
    model = onnx.load(str(path), load_external_data=False)
    names, values, keep = [], [], []
    for init in model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in init.external_data}
        array = np.memmap(Path(path).parent / info["location"], mode="c", offset=int(info.get("offset", 0)),
                          dtype=onnx.helper.tensor_dtype_to_np_dtype(init.data_type), shape=tuple(init.dims))
        keep.append(array)
        names.append(init.name)
        values.append(ort.OrtValue.ortvalue_from_numpy(array))
    if names:
        opts.add_external_initializers(names, values)
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    out_names = [o.name for o in session.get_outputs()]
    return dict(zip(out_names, session.run(out_names, feeds)))


def export_component(weights: Path, ip_adapter: Path, out: Path, name: str) -> dict:
    """Export one component at its default precision, then validate it on ONNX
    Runtime in a child process against the same torch module (fp16 graph vs fp16
    module: an fp32 reference of the 6 B text encoder would need 25 GB). The
    reference outputs are computed here and saved; the module dies with this
    process before ONNX Runtime loads the graph, so the two never share memory."""
    import resource
    import time

    import numpy as np
    import torch

    from kolors_trt.runtime import spec as S

    from . import checkpoint as ck
    from .exporter import export_dims, quiet_libraries
    from .onnx_export import export_onnx, sample_inputs

    quiet_libraries()
    paths = ck.resolve(weights, ip_adapter)
    dims = ck.model_dims(paths)
    spec, precision = S.engine_specs(dims)[name], S.DEFAULT_PRECISION[name]
    t0 = time.perf_counter()
    graph = load_graph(paths, name, "float16" if precision == "fp16" else "float32")
    load_s = time.perf_counter() - t0
    feeds = sample_inputs(spec, CHECK_VALUES, seed=1)
    t0 = time.perf_counter()
    with torch.no_grad():
        ref = graph(*(torch.from_numpy(feeds[n]) for n in spec.input_names))
    ref = {n: o.numpy() for n, o in zip(spec.output_names, ref if isinstance(ref, tuple) else (ref,))}
    ref_s = time.perf_counter() - t0
    file = Path(out) / f"{name}.onnx"
    t0 = time.perf_counter()
    export_onnx(graph, spec, export_dims(dims), file)
    export_s = time.perf_counter() - t0
    ref_file = Path(out) / f"{name}.reference.npz"
    np.savez(ref_file, **{f"feed.{k}": v for k, v in feeds.items()}, **{f"ref.{k}": v for k, v in ref.items()})
    data = file.with_name(file.name + ".data")
    result = {
        "component": name, "precision": precision, "load_s": round(load_s, 1), "torch_ref_s": round(ref_s, 1),
        "export_s": round(export_s, 1),
        "export_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "onnx_bytes": file.stat().st_size, "external_data": data.name if data.exists() else None,
        "external_data_bytes": data.stat().st_size if data.exists() else 0,
        "validation_dims": CHECK_VALUES, "reference": f"{precision} torch module",
    }
    (Path(out) / f"{name}.export.json").write_text(json.dumps(result))  # kept if validation fails
    del graph
    v = _child(["validate", str(weights), str(ip_adapter), str(out), name], Path(out) / f"{name}.validate.json", None)
    if v.get("stopped_at_rss_cap"):  # measured how far it got; check() validates a slice instead
        result.update(validate_stopped_at_rss_cap=True, validate_peak_rss_mb=v["peak_rss_mb"],
                      validate_peak_anon_rss_mb=v["peak_anon_rss_mb"], validate_s=v["wall_s"])
        return result
    if v.get("exit") != 0 or "rel_err" not in v:
        why = f"stopped above {RSS_CAP_MB} MB" if v.get("stopped_at_rss_cap") else f"exit {v.get('exit')}"
        raise RuntimeError(f"fullsize: validating {file} failed ({why}, peak RSS {v.get('peak_rss_mb')} MB); "
                           "see the log above")
    result.update(validate_s=v["validate_s"], validate_peak_rss_mb=v["peak_rss_mb"],
                  validate_peak_anon_rss_mb=v["peak_anon_rss_mb"], max_abs_err=v["max_abs_err"],
                  rel_err=v["rel_err"])
    ref_file.unlink()
    return result


def validate_component(weights: Path, ip_adapter: Path, out: Path, name: str) -> dict:
    """ONNX Runtime on `out/name.onnx` against the saved reference outputs."""
    import time

    import numpy as np
    import onnx

    from kolors_trt.runtime import spec as S

    from . import checkpoint as ck
    from .validate import check_signature, compare

    spec = S.engine_specs(ck.model_dims(ck.resolve(weights, ip_adapter)))[name]
    file = Path(out) / f"{name}.onnx"
    saved = np.load(Path(out) / f"{name}.reference.npz")
    feeds = {k[5:]: saved[k] for k in saved.files if k.startswith("feed.")}
    ref = {k[4:]: saved[k] for k in saved.files if k.startswith("ref.")}
    t0 = time.perf_counter()
    check_signature(spec, onnx.load(str(file), load_external_data=False))
    got = run_ort_lean(file, feeds)
    abs_err, rel_err = compare(spec, S.DEFAULT_PRECISION[name], ref, got, CHECK_VALUES)
    return {"validate_s": round(time.perf_counter() - t0, 1), "max_abs_err": abs_err, "rel_err": rel_err}


def validate_text_encoder_slice(weights: Path, ip_adapter: Path, out: Path, layers: int = 2) -> dict:
    """The fp16 text encoder cut to its first `layers` layers, at the real widths,
    through the same streaming export and lean ONNX Runtime as the full graph.

    The full graph cannot be checked on ONNX Runtime's CPU provider in 24 GB: it has
    no fp16 kernels for most ops and turns the 12 GB of fp16 weights into fp32
    initializers (InsertCastTransformer), ~25 GB before the first run."""
    import time

    import torch
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, ChatGLMModel

    from kolors_trt.runtime import spec as S

    from . import checkpoint as ck
    from .components import TextEncoderGraph
    from .exporter import export_dims, quiet_libraries
    from .onnx_export import export_onnx, sample_inputs
    from .validate import compare

    quiet_libraries()
    paths = ck.resolve(weights, ip_adapter)
    dims = ck.model_dims(paths)
    config = ChatGLMConfig.from_pretrained(paths.text_encoder)
    config.num_layers = layers
    model = ChatGLMModel.from_pretrained(paths.text_encoder, config=config, torch_dtype=torch.float16,
                                         variant=ck._variant(paths.text_encoder)).eval()
    graph, spec = TextEncoderGraph(model).eval(), S.engine_specs(dims)["text_encoder"]
    feeds = sample_inputs(spec, CHECK_VALUES, seed=1)
    with torch.no_grad():
        ref = dict(zip(spec.output_names, (o.numpy() for o in graph(*(torch.from_numpy(feeds[n])
                                                                       for n in spec.input_names)))))
    file = Path(out) / "slice" / "text_encoder.onnx"
    t0 = time.perf_counter()
    export_onnx(graph, spec, export_dims(dims), file, streaming=True)
    got = run_ort_lean(file, feeds)
    abs_err, rel_err = compare(spec, "fp16", ref, got, CHECK_VALUES)
    return {"slice_layers": layers, "slice_max_abs_err": abs_err, "slice_rel_err": rel_err,
            "slice_s": round(time.perf_counter() - t0, 1)}


def build_component(onnx_dir: Path, engines: Path, name: str) -> dict:
    """TensorRT-RTX AOT build (CPU) of one component with the default profile."""
    from kolors_trt.engines.builder import build_engines

    (r,) = build_engines(onnx_dir, engines, target="tensorrt-rtx", components=[name], force=True)
    return {"build_s": r.build_seconds, "engine_bytes": r.plan_bytes}


def write_export_manifest(weights: Path, ip_adapter: Path, out: Path, results: list) -> None:
    """The export folder's manifest (what `kolors-trt build` and the runtime read) and
    its assets, without loading any model: Components would hold all four in fp32."""
    from . import checkpoint as ck
    from .exporter import runtime_constants
    from .folder import graph_fields, write_manifest
    from .onnx_export import OPSET

    paths = ck.resolve(weights, ip_adapter)
    dims = ck.model_dims(paths)
    fingerprint = ck.fingerprint(paths)
    comps = {}
    for r in results:
        if "onnx_bytes" not in r:
            continue
        name = r["component"]
        comps[name] = {
            **graph_fields(out, name), "precision": r["precision"], "opset": OPSET, "checkpoint": fingerprint,
            "validation": {"max_abs_err": r.get("max_abs_err"), "rel_err": r.get("rel_err"),
                           "dims": r["validation_dims"], "reference": r["reference"]},
        }
    write_manifest(Path(out), paths, dims, runtime_constants(paths, dims), comps)


# Default memory guard per step (--rss-cap-mb), below a 24 GB machine's RAM so that a
# step that would not fit is stopped and reported rather than swapping or being
# killed. Anonymous memory only: pages of an mmapped weights file count in RSS but
# the kernel can drop them.
RSS_CAP_MB = 17_000


def _memory_mb(pid: int) -> tuple[float, float]:
    """(VmHWM, RssAnon) of a live process in MB: its own peak RSS so far (wait4's
    ru_maxrss also counts the parent's peak at the spawn) and its anonymous memory."""
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "RssAnon"):
                    fields[key] = int(rest.split()[0]) / 1024
    except OSError:
        pass
    return fields.get("VmHWM", 0.0), fields.get("RssAnon", 0.0)


def _child(argv: list, result: Path, timeout: float | None) -> dict:
    """Run `python -m kolors_trt.export.fullsize_check <argv>` at nice 19, stopped past
    `timeout` seconds or RSS_CAP_MB of its own memory; its own peak RSS comes from wait4 (per
    child, unlike RUSAGE_CHILDREN's running maximum)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    result.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(["nice", "-n", "19", sys.executable, "-m", "kolors_trt.export.fullsize_check", *argv, "--result", str(result)])
    deadline = None if timeout is None else t0 + timeout
    timed_out = over_cap = False
    peak_anon = peak_rss = 0.0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if deadline and time.perf_counter() > deadline and not timed_out:
            proc.send_signal(signal.SIGKILL)
            timed_out = True
        hwm, anon = _memory_mb(proc.pid)
        peak_anon, peak_rss = max(peak_anon, anon), max(peak_rss, hwm)
        if anon > RSS_CAP_MB and not over_cap:
            proc.send_signal(signal.SIGKILL)
            over_cap = True
        time.sleep(0.5)
    out = json.loads(result.read_text()) if result.is_file() else {}
    out.update(wall_s=round(time.perf_counter() - t0, 1), peak_rss_mb=round(peak_rss or usage.ru_maxrss / 1024),
               exit=os.waitstatus_to_exitcode(status), timed_out=timed_out,
               stopped_at_rss_cap=over_cap, peak_anon_rss_mb=round(peak_anon))
    return out


def check(root: Path, components: tuple, build_timeout: float | None, skip_build: tuple = (),
          build_only: bool = False) -> dict:
    """Write (once) the full-size checkpoint under root/ckpt, then per component in
    its own process: export + validate into root/onnx, build into root/engines.
    Writes root/fullsize-check.{json,md} after every step."""
    root = Path(root)
    kolors, ip, onnx_dir = root / "ckpt" / "kolors", root / "ckpt" / "ip", root / "onnx"
    onnx_dir.mkdir(parents=True, exist_ok=True)
    rows = json.loads((root / "fullsize-check.json").read_text()) if (root / "fullsize-check.json").is_file() else {}
    if not (ip / IP_WEIGHT_NAME).is_file():
        rows["checkpoint"] = _child(["write", str(root / "ckpt")], root / "write.json", None)
    for name in components:
        row = rows.get(name, {}) if build_only else {}
        if "onnx_bytes" not in row:
            row = {"component": name}
            exp = _child(["export", str(kolors), str(ip), str(onnx_dir), name], root / f"{name}.export.json", None)
            row.update({k: v for k, v in exp.items() if k not in ("wall_s", "exit", "timed_out", "peak_rss_mb",
                                                                   "peak_anon_rss_mb", "stopped_at_rss_cap")},
                       export_wall_s=exp["wall_s"], export_exit=exp["exit"],
                       export_peak_anon_rss_mb=exp.get("peak_anon_rss_mb"))
            rows[name] = row
            _report(root, rows)
            if exp["exit"] != 0:
                continue
            if name == "text_encoder" and "rel_err" not in row:
                sl = _child(["validate-slice", str(kolors), str(ip), str(onnx_dir)], root / "slice.json", None)
                row.update({k: v for k, v in sl.items() if k.startswith("slice_")}, slice_peak_rss_mb=sl["peak_rss_mb"])
                _report(root, rows)
        write_export_manifest(kolors, ip, onnx_dir, [r for r in rows.values() if "onnx_bytes" in r])
        if name in skip_build:
            continue
        b = _child(["build", str(onnx_dir), str(root / "engines"), name], root / f"{name}.build.json", build_timeout)
        row.update({k: v for k, v in b.items() if k in ("build_s", "engine_bytes")}, build_wall_s=b["wall_s"],
                   build_peak_rss_mb=b["peak_rss_mb"], build_peak_anon_rss_mb=b["peak_anon_rss_mb"],
                   build_exit=b["exit"], build_timed_out=b["timed_out"], build_stopped_at_rss_cap=b["stopped_at_rss_cap"])
        _report(root, rows)
    return rows


def _report(root: Path, rows: dict) -> None:
    from kolors_trt.runtime.table import markdown_table

    (root / "fullsize-check.json").write_text(json.dumps(rows, indent=2))

    def build_cell(r):
        if "build_s" in r:
            return round(r["build_s"])
        if r.get("build_stopped_at_rss_cap"):
            return f"stopped at {RSS_CAP_MB} MB after {r['build_wall_s']:.0f} s"
        if r.get("build_timed_out"):
            return f"> {r['build_wall_s']:.0f} (stopped)"
        return "failed" if "build_exit" in r else "-"

    table = []
    for name, r in rows.items():
        if name == "checkpoint":
            continue
        gb = (r.get("onnx_bytes", 0) + r.get("external_data_bytes", 0)) / 1e9
        peaks = (f"{r.get('export_peak_rss_mb', '-')} ({r.get('export_peak_anon_rss_mb', '?')}) / "
                 f"{r.get('validate_peak_rss_mb', '-')} ({r.get('validate_peak_anon_rss_mb', '?')})")
        build_peak = f"{r['build_peak_rss_mb']} ({r.get('build_peak_anon_rss_mb', '?')})" if "build_peak_rss_mb" in r else "-"
        err = f"{r['max_abs_err']:.3g} / {r['rel_err']:.3g}" if r.get("rel_err") is not None else "-"
        if r.get("validate_stopped_at_rss_cap"):
            peaks = (f"{r.get('export_peak_rss_mb', '-')} ({r.get('export_peak_anon_rss_mb', '?')}) / "
                     f"stopped at {RSS_CAP_MB} anon")
            if "slice_rel_err" in r:
                err = (f"{r['slice_max_abs_err']:.3g} / {r['slice_rel_err']:.3g} (first {r['slice_layers']} "
                       "layers; full graph: see notes)")
        shape = {"text_encoder": "batch 1 x 256 tokens", "image_encoder": "batch 1 x 336 px",
                 "unet": "batch 2 (CFG) x 16x24 latent", "vae_decoder": "batch 1 x 16x24 latent"}.get(name, "")
        table.append([name, r.get("precision", "?"), r.get("export_s", "failed"), peaks, round(gb, 2),
                      build_cell(r), build_peak, round(r["engine_bytes"] / 1e9, 2) if "engine_bytes" in r else "-",
                      err, shape])
    head = ["component", "precision", "export s", "peak RSS MB (anon) export / validate", "ONNX GB", "build s",
            "build peak RSS MB (anon)", "engine GB", "max abs / rel err vs torch", "validation shape"]
    (root / "fullsize-check.md").write_text(markdown_table(head, table) + "\n" + _quantization_note(root))


def _quantization_note(root: Path) -> str:
    """The 8-bit UNet's calibration memory at these sizes, projected (quantize.calibration_projection):
    not run here, the fp32 module alone is 10 GB and 20 steps x 32 prompts at 1024x1024 need a GPU."""
    import math

    from .checkpoint import read_config
    from .quantize import calibration_projection

    config = root / "ckpt" / "kolors" / "unet"
    if not (config / "config.json").is_file():
        return ""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(read_config(config))
    p = calibration_projection(sum(math.prod(t.shape) for t in unet.parameters()))
    lo, hi = p["onnx_level_peak_gb"]
    return (f"\n8-bit UNet (export --component-precision unet=int8|fp8), projected from the mid-size UNet "
            f"measured on this machine, not run at this size: {p['params'] / 1e9:.2f} B parameters, "
            f"{p['fp32_weights_gb']} GB fp32; torch-level calibration (the export's path) peak RSS about "
            f"{p['torch_level_peak_gb']} GB on the CPU; ONNX-level PTQ would peak near {lo}-{hi} GB.\n")


def main(argv: list | None = None) -> int:
    global RSS_CAP_MB  # --rss-cap-mb; read by _child and the report at call time
    import argparse

    from kolors_trt.runtime.spec import COMPONENTS

    p = argparse.ArgumentParser(prog="python -m kolors_trt.export.fullsize_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)
    c = sub.add_parser("check", help="write, export, validate and build everything at full size; measure")
    c.add_argument("--out", required=True, help="work folder (~60 GB free: checkpoint, graphs, engines)")
    c.add_argument("--components", nargs="+", choices=COMPONENTS,
                   default=["vae_decoder", "image_encoder", "unet", "text_encoder"])
    c.add_argument("--build-timeout", type=float, default=None, help="stop a build after this many seconds")
    c.add_argument("--skip-build", nargs="*", default=[], choices=COMPONENTS)
    c.add_argument("--build-only", action="store_true", help="reuse the graphs a previous check exported")
    c.add_argument("--rss-cap-mb", type=float, default=RSS_CAP_MB,
                   help=f"stop a step whose own memory passes this (default {RSS_CAP_MB}; raise it on a larger host)")
    for step, args in (("write", ["out"]), ("export", ["weights", "ip_adapter", "out", "name"]),
                       ("validate", ["weights", "ip_adapter", "out", "name"]),
                       ("validate-slice", ["weights", "ip_adapter", "out"]),
                       ("build", ["onnx", "engines", "name"])):
        s = sub.add_parser(step)
        for a in args:
            s.add_argument(a)
        s.add_argument("--result", required=True)
    a = p.parse_args(argv)
    if a.step == "check":
        RSS_CAP_MB = a.rss_cap_mb
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger(__name__).setLevel(logging.INFO)
    if a.step == "check":
        check(Path(a.out), tuple(a.components), a.build_timeout, tuple(a.skip_build), a.build_only)
        print((Path(a.out) / "fullsize-check.md").read_text())
        return 0
    if a.step == "write":
        write_streaming(Path(a.out))
        result = {}
    elif a.step == "export":
        result = export_component(Path(a.weights), Path(a.ip_adapter), Path(a.out), a.name)
    elif a.step == "validate-slice":
        result = validate_text_encoder_slice(Path(a.weights), Path(a.ip_adapter), Path(a.out))
    elif a.step == "validate":
        result = validate_component(Path(a.weights), Path(a.ip_adapter), Path(a.out), a.name)
    else:
        result = build_component(Path(a.onnx), Path(a.engines), a.name)
    Path(a.result).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
