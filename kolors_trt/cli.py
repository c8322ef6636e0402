"""`kolors-trt` (also `python -m kolors_trt`): one command, a subcommand per job.

    tiny      write a random-weight checkpoint of the real architectures
    export    checkpoint -> validated ONNX graphs + manifest
    build     ONNX graphs -> TensorRT / TensorRT-RTX engines
    generate  run the pipeline on an engine or ONNX folder
    bench     latency benchmark, optionally against diffusers
    serve     HTTP server: OpenAI's Images API, batching, metrics, health

Each subcommand imports its stage only when it runs: `generate` on a production
host never loads the export stack.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from kolors_trt.runtime import spec as S
from kolors_trt.runtime.cli import add_runtime_cache_argument


def _tiny(args) -> int:
    if args.full_size:
        from kolors_trt.export.fullsize import write_streaming

        kolors, ip = write_streaming(Path(args.out))
    else:
        from kolors_trt.export.tiny import write_tiny

        kolors, ip = write_tiny(Path(args.out), args.preset)
    print(f"wrote {kolors} (Kolors-diffusers layout) and {ip} (IP-Adapter-Plus layout)")
    return 0


def _component_precision(text: str) -> tuple[str, str]:
    name, sep, precision = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected NAME=PRECISION (e.g. unet=fp32), got {text!r}")
    return name, precision


def _export(args) -> int:
    from kolors_trt.export.exporter import UP_TO_DATE, export_all, resolve_precisions
    from kolors_trt.runtime.table import markdown_table

    precisions = resolve_precisions(args.precision, dict(args.component_precision or []))
    cal = _calibration_args(args, precisions["unet"])
    branch = None if args.no_deep_cache else args.deep_cache_branch
    results = export_all(Path(args.weights), Path(args.ip_adapter), Path(args.out), precisions,
                         tuple(args.components or S.COMPONENTS), force=args.force, calibration=cal,
                         deep_cache_branch=branch)
    if all(r.status == UP_TO_DATE for r in results):
        print(f"{args.out}: up to date (same checkpoint, precisions and export version; --force re-exports)")
        return 0
    rows = [[r.component, r.precision, r.parity.max_abs_err, r.parity.rel_err, round(r.export_seconds, 2),
             round(r.parity.seconds, 2), round(r.bytes / 1e6, 2), round(r.peak_rss_mb)] for r in results]
    print(markdown_table(["component", "precision", "max abs err", "rel err", "export s", "validate s", "MB",
                          "peak RSS MB"], rows))
    print(f"validated {len(results)} graph(s) on ONNX Runtime against the fp32 PyTorch modules; wrote {args.out}")
    if cal is not None:
        _print_quantization(Path(args.out))
    return 0


def _calibration_args(args, unet_precision: str):
    """The UNet's calibration settings from the --calibration-* flags (None for an fp16/fp32 UNet)."""
    given = [f for f in ("calibration_prompts", "calibration_count", "calibration_steps", "calibration_size",
                         "calibration_batch") if getattr(args, f) is not None]
    if unet_precision not in S.QUANTIZED_PRECISIONS:
        if given:
            from kolors_trt.export.calibration import CalibrationError

            raise CalibrationError(f"export: --{given[0].replace('_', '-')} applies to a quantized UNet "
                                   "(--component-precision unet=int8 or unet=fp8)")
        return None
    from kolors_trt.export.calibration import calibration

    prompts = Path(args.calibration_prompts) if args.calibration_prompts else None
    return calibration(unet_precision, prompts, args.calibration_count, args.calibration_steps,
                       args.calibration_size, args.calibration_batch)


def _print_quantization(out: Path) -> None:
    from kolors_trt.runtime.artifacts import read_export_folder
    from kolors_trt.runtime.table import markdown_table

    q = read_export_folder(out, verify=False).components["unet"].entry.get("quantization")
    if not q:
        return
    e, c, t = q["error"], q["calibration"], q["tolerance"]
    rows = [[q["mode"], q["recipe"]["quantized_layers"], f"{c['count']} x {c['steps']} @ {c['size'][0]}x{c['size'][1]}",
             round(c["seconds"], 1), c["peak_rss_mb"], f"{e['max_rel_err']:.3g} (<= {t['max_rel_err']})",
             f"{e['rms_rel_err']:.3g} (<= {t['rms_rel_err']})", f"{e['image_psnr_db']:.1f} (>= {t['min_psnr_db']})"]]
    print(markdown_table(["unet", "layers", "calibration prompts x steps", "calibrate s", "peak RSS MB",
                          "max rel err", "RMS rel err", "image PSNR dB vs fp16"], rows))


def _size(text: str) -> tuple[int, int]:
    try:
        return S.parse_size(text)
    except S.SpecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _bench(args) -> int:
    from kolors_trt import bench as B
    from kolors_trt.runtime.artifacts import read_manifest

    folder = Path(args.engines or args.onnx)
    manifest = read_manifest(folder)
    defaults = {**S.SAMPLING_DEFAULTS, **manifest.get("runtime", {}).get("defaults", {})}
    height, width = args.size or (defaults["height"], defaults["width"])
    steps = args.steps if args.steps is not None else defaults["num_inference_steps"]
    samplers = args.scheduler is not None or args.guidance_interval is not None or args.deep_cache_interval is not None
    if samplers and (args.batch is not None or args.baseline or args.plot or args.server or args.compare
                     or args.unet_graphs):
        raise B.BenchError("bench: --scheduler / --guidance-interval / --deep-cache-interval compare samplers and "
                           "DeepCache of kolors-trt with its Euler default; they take neither --batch, --baseline, "
                           "--plot, --server, --compare nor --unet-graphs")
    if args.server:
        from kolors_trt import loadgen

        return loadgen.run_cli(args, str(folder), height, width, steps, defaults["guidance_scale"])
    config = B.BenchConfig(height, width, steps, args.warmup, args.runs, defaults["guidance_scale"],
                           defaults["ip_adapter_scale"])
    cuda_graph = {"auto": None, "on": True, "off": False}[args.cuda_graph]
    if samplers:
        from kolors_trt import bench_samplers

        chosen = bench_samplers.variants(defaults["num_inference_steps"], args.scheduler, steps, args.guidance_interval,
                                         args.deep_cache_interval)
        result = bench_samplers.bench_samplers(folder, args.backend, config, chosen, cuda_graph)
        result["environment"] = B.environment(result["backend"])
        print(bench_samplers.markdown(result, result["environment"]))
        B.write_outputs(result, args.json, None)
        return 0
    if args.unet_graphs:
        from kolors_trt import bench_graphs

        result = bench_graphs.bench_unet_graphs(folder, args.backend, config, cuda_graph)
        result["environment"] = B.environment(result["backend"])
        print(bench_graphs.markdown(result, result["environment"]))
        B.write_outputs(result, args.json, None)
        return 0
    if args.batch is not None:
        from kolors_trt import bench_batch

        if args.baseline or args.plot:
            raise B.BenchError("bench: --batch compares batched with one-at-a-time requests of kolors-trt; it takes "
                               "neither --baseline nor --plot")

        result = bench_batch.bench_batch(folder, args.backend, config, args.batch, cuda_graph,
                                         runtime_cache=args.runtime_cache)
        result["environment"] = B.environment(result["backend"])
        print(bench_batch.markdown(result, result["environment"]))
        B.write_outputs(result, args.json, None)
        return 0
    samples, facts = B.bench_runtime(folder, args.backend, config, cuda_graph, runtime_cache=args.runtime_cache)
    baseline = None
    if args.baseline == "diffusers":
        source = manifest.get("source", {})
        weights, ip = args.weights or source.get("weights"), args.ip_adapter or source.get("ip_adapter")
        if not weights or not ip:
            raise B.BenchError(f"bench: the diffusers baseline needs the checkpoint; {folder}/manifest.json names "
                               "none, pass --weights and --ip-adapter")
        device = args.device or ("cpu" if facts["backend"] == "onnxruntime" else "cuda")
        dtype = args.baseline_dtype or ("fp32" if device == "cpu" else "fp16")
        baseline = B.bench_diffusers(Path(weights), Path(ip), config, device, dtype)
    result = B.report(config, samples, facts, baseline, B.environment(facts["backend"]))
    if args.compare:
        result["compare"] = B.compare_unet(Path(args.compare), args.backend, config, cuda_graph)
    print(B.markdown(result))
    B.write_outputs(result, args.json, args.plot)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kolors-trt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level; tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tiny", help="write a tiny random-weight Kolors + IP-Adapter-Plus checkpoint")
    p.add_argument("out", help="output folder; gets kolors/ and ip/")
    p.add_argument("--preset", default="default", choices=["default", "alt", "mid"],
                   help="model sizes (default: default; mid: a 435 M-parameter UNet of the real widths)")
    p.add_argument("--full-size", action="store_true",
                   help="the real Kolors sizes instead (random fp16 weights, ~19 GB on disk, streamed: little memory)")
    p.set_defaults(run=_tiny)

    p = sub.add_parser("export", help="export the four components to validated ONNX")
    p.add_argument("--weights", required=True, help="Kolors-diffusers root or the original weights/Kolors")
    p.add_argument("--ip-adapter", required=True, help="Kolors-IP-Adapter-Plus root")
    p.add_argument("--out", required=True, help="export folder to write")
    p.add_argument("--precision", default="fp16", choices=S.PRECISIONS,
                   help="text encoder, image encoder and UNet precision (default fp16; the VAE stays fp32)")
    p.add_argument("--component-precision", action="append", type=_component_precision, metavar="NAME=P",
                   help="per-component override, e.g. vae_decoder=fp16, text_encoder=fp32, or unet=int8 / unet=fp8 "
                        "(8-bit UNet, calibrated; see below) (repeatable)")
    p.add_argument("--components", nargs="+", choices=S.ALL_COMPONENTS,
                   help="export only these (the unet and unet_shallow go together)")
    p.add_argument("--deep-cache-branch", type=int, default=S.DEFAULT_DEEP_CACHE_BRANCH, metavar="N",
                   help="DeepCache: also export unet_shallow, the UNet without the blocks below skip branch N "
                        "(DeepCache's cache_branch_id, 3 * block + layer; default %(default)s, the outermost), and the "
                        "deep feature as an output of unet; generate --deep-cache-interval uses them (an 8-bit unet's "
                        "shallow half is fp16)")
    p.add_argument("--no-deep-cache", action="store_true", help="export the unet alone, without DeepCache's split")
    q = p.add_argument_group("8-bit UNet (--component-precision unet=int8|fp8; defaults: NVIDIA's SDXL recipe)")
    q.add_argument("--calibration-prompts", metavar="FILE",
                   help="calibration prompts, one a line (default: the built-in set, NVIDIA's SDXL calibration prompts)")
    q.add_argument("--calibration-count", type=int, metavar="N", help="prompts to calibrate on (default: int8 32, fp8 128)")
    q.add_argument("--calibration-steps", type=int, metavar="N", help="denoising steps per prompt (default 20)")
    q.add_argument("--calibration-size", type=_size, metavar="HxW", help="image size (default 1024x1024)")
    q.add_argument("--calibration-batch", type=int, metavar="N", help="prompts per pipeline call (default 2)")
    p.add_argument("--force", action="store_true",
                   help="export even when --out already holds these graphs of this checkpoint (default: skip, 'up to date')")
    p.set_defaults(run=_export)

    try:
        from kolors_trt.engines import cli as engines_cli
    except ImportError:  # the engines stage is optional on a runtime-only install
        engines_cli = None
    if engines_cli is not None:
        p = sub.add_parser("build", help="build TensorRT / TensorRT-RTX engines from an export folder")
        engines_cli.add_build_arguments(p)
        p.set_defaults(run=engines_cli.run_build)

    p = sub.add_parser("bench", help="latency benchmark per stage, optionally against diffusers")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--engines", help="engine folder (TensorRT / TensorRT-RTX)")
    src.add_argument("--onnx", help="export folder (ONNX Runtime)")
    p.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt", "tensorrt-rtx"])
    p.add_argument("--size", type=_size, help="HEIGHTxWIDTH (default: the manifest's, 1024x1024)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the manifest's, 50)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up requests, excluded (default 1)")
    p.add_argument("--runs", type=int, default=5, help="measured requests (default 5)")
    p.add_argument("--cuda-graph", choices=["auto", "on", "off"], default="auto",
                   help="TensorRT: capture each denoising step in a CUDA graph (auto: when the profile is static)")
    add_runtime_cache_argument(p)
    p.add_argument("--baseline", choices=["diffusers"], help="also run diffusers' KolorsPipeline on the same checkpoint")
    p.add_argument("--weights", help="checkpoint for the baseline (default: the manifest's source)")
    p.add_argument("--ip-adapter", help="IP-Adapter folder for the baseline (default: the manifest's source)")
    p.add_argument("--device", help="baseline device (default: cpu for ONNX Runtime, cuda for engines)")
    p.add_argument("--baseline-dtype", choices=["fp16", "fp32"], help="default fp32 on cpu, fp16 on cuda")
    p.add_argument("--batch", type=int, metavar="N",
                   help="throughput instead of latency: N requests through generate_batch against the same N one at "
                        "a time, in the same run")
    p.add_argument("--compare", metavar="FOLDER",
                   help="also run FOLDER (e.g. fp16 engines beside int8/fp8 ones) and compare the UNet step times")
    from kolors_trt.runtime.cli import add_sampler_arguments

    add_sampler_arguments(p, several=True)  # with any: against the Euler default (UNet rows, wall time)
    p.add_argument("--unet-graphs", action="store_true",
                   help="time one CFG step of each UNet graph of the folder (unet, and DeepCache's unet_shallow)")
    p.add_argument("--json", help="write every raw sample, the environment and the configuration here")
    p.add_argument("--plot", help="write a PNG of per-stage time here")
    p.add_argument("--server", metavar="URL", help="load-test a running kolors-trt serve at URL instead (the folder "
                   "then runs the same requests locally, one at a time, for the ratio)")
    p.add_argument("--concurrency", type=int, default=4, help="with --server: client threads (default 4)")
    p.add_argument("--requests", type=int, default=32, help="with --server: requests in all (default 32)")
    p.set_defaults(run=_bench)

    try:
        from kolors_trt.runtime import cli as runtime_cli
    except ImportError:
        runtime_cli = None
    if runtime_cli is not None:
        runtime_cli.add_subcommands(sub)
    try:
        from kolors_trt.serve import cli as serve_cli
    except ImportError:  # the server is optional: `pip install 'kolors-trt[serve]'`
        serve_cli = None
    if serve_cli is not None:
        serve_cli.add_subcommands(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every stage stops the same way."""

    signum = signal.SIGTERM


def _raise_terminated(signum, frame):
    raise Terminated()


def _interrupted(args, exc: KeyboardInterrupt) -> int:
    """One line, exit 130. The commands that write a folder say what state it keeps: they
    change it only by atomic commits (kolors_trt.runtime.artifacts explains why)."""
    what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
    folder = f"; {args.out} keeps its last complete state" if args.command in ("export", "build") else ""
    print(f"kolors-trt {args.command}: {what}{folder}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    worker = any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread())
    if worker or args.command == "build":
        # Leave without interpreter shutdown: a builder thread may still be inside a native step
        # that cannot be cut short (shutdown would wait for it), and a cancelled TensorRT build
        # calls back into Python while the interpreter finalizes, which aborts the process
        # ("FATAL: exception not rethrown"). The folder is consistent already.
        os._exit(130)
    return 130


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    # SIGTERM stops a command the way Ctrl-C does (unless the caller set it to be ignored).
    previous = signal.getsignal(signal.SIGTERM)
    own_term = threading.current_thread() is threading.main_thread() and previous != signal.SIG_IGN
    if own_term:
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return args.run(args)
    except KeyboardInterrupt as exc:
        return _interrupted(args, exc)
    except (ValueError, RuntimeError, OSError) as exc:  # typed errors carry the whole message
        if args.verbose:
            import traceback

            traceback.print_exc()
        print(f"kolors-trt {args.command}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if own_term:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


if __name__ == "__main__":
    raise SystemExit(main())
