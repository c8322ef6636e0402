"""`kolors-trt` (also `python -m kolors_trt`): one command, a subcommand per job.

    tiny      write a random-weight checkpoint of the real architectures
    export    checkpoint -> validated ONNX graphs + manifest
    build     ONNX graphs -> TensorRT / TensorRT-RTX engines
    generate  run the pipeline on an engine or ONNX folder
    bench     latency benchmark, optionally against diffusers

Each subcommand imports its stage only when it runs: `generate` on a production
host never loads the export stack.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from kolors_trt.runtime import spec as S


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
    from kolors_trt.export.exporter import export_all, resolve_precisions
    from kolors_trt.runtime.table import markdown_table

    precisions = resolve_precisions(args.precision, dict(args.component_precision or []))
    results = export_all(Path(args.weights), Path(args.ip_adapter), Path(args.out), precisions,
                         tuple(args.components or S.COMPONENTS))
    rows = [[r.component, r.precision, r.parity.max_abs_err, r.parity.rel_err, round(r.export_seconds, 2),
             round(r.parity.seconds, 2), round(r.bytes / 1e6, 2), round(r.peak_rss_mb)] for r in results]
    print(markdown_table(["component", "precision", "max abs err", "rel err", "export s", "validate s", "MB",
                          "peak RSS MB"], rows))
    print(f"validated {len(results)} graph(s) on ONNX Runtime against the fp32 PyTorch modules; wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kolors-trt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tiny", help="write a tiny random-weight Kolors + IP-Adapter-Plus checkpoint")
    p.add_argument("out", help="output folder; gets kolors/ and ip/")
    p.add_argument("--preset", default="default", choices=["default", "alt"], help="model sizes (default: default)")
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
                   help="per-component override, e.g. vae_decoder=fp16 or text_encoder=fp32 (repeatable)")
    p.add_argument("--components", nargs="+", choices=S.COMPONENTS, help="export only these")
    p.set_defaults(run=_export)

    try:
        from kolors_trt.engines import cli as engines_cli
    except ImportError:  # the engines stage is optional on a runtime-only install
        engines_cli = None
    if engines_cli is not None:
        p = sub.add_parser("build", help="build TensorRT / TensorRT-RTX engines from an export folder")
        engines_cli.add_build_arguments(p)
        p.set_defaults(run=engines_cli.run_build)

    try:
        from kolors_trt.runtime import cli as runtime_cli
    except ImportError:
        runtime_cli = None
    if runtime_cli is not None:
        runtime_cli.add_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except (ValueError, RuntimeError, OSError) as exc:  # typed errors carry the whole message
        logging.getLogger("kolors_trt").debug("failed", exc_info=True)
        print(f"kolors-trt {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
