"""`kolors-trt build`: the argument parser and the command. The defaults of the
build live here (and in runtime/spec.py), nowhere else."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from kolors_trt.runtime.spec import ALL_COMPONENTS, KOLORS_SIZES, DimRange, Profile, SpecError, parse_size

log = logging.getLogger(__name__)

DEFAULT_BATCH = "1:1:4"


def add_build_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = parser
    p.add_argument("--onnx", type=Path, required=True, help="export folder (kolors-trt export output)")
    p.add_argument("--out", type=Path, required=True, help="engine folder to write (plans, tokenizer, scheduler, manifest)")
    p.add_argument(
        "--target",
        choices=("tensorrt", "tensorrt-rtx"),
        default=None,
        help="builder; default: tensorrt when it is installed and a GPU is present, else tensorrt-rtx (AOT on the CPU)",
    )
    p.add_argument("--batch", default=DEFAULT_BATCH, metavar="MIN:OPT:MAX", help=f"images per request (default {DEFAULT_BATCH}; N = N:N:N)")
    p.add_argument(
        "--size",
        action="append",
        default=None,
        metavar="HxW",
        help="an image size to cover (repeatable; the first is the optimum); default: Kolors' sizes "
        + ", ".join(f"{h}x{w}" for h, w in KOLORS_SIZES),
    )
    p.add_argument("--size-range", default=None, metavar="HMINxWMIN:HMAXxWMAX", help="cover every size in a range instead")
    p.add_argument("--static", action="store_true", help="one fixed shape: the optimum batch and the first size")
    p.add_argument("--opt-level", type=int, default=None, choices=range(6), metavar="0-5", help="builder optimisation level (default: the builder's, 3)")
    p.add_argument("--timing-cache", type=Path, default=None, help="timing cache file, read and updated (tensorrt only)")
    p.add_argument("--workspace-gib", type=float, default=None, help="builder workspace limit in GiB (default: the builder's)")
    p.add_argument("--refit", action="store_true",
                   help="make the UNet and text encoder plans refittable for LoRA (their LoRA maps' weights; the base "
                        "values are written beside them, about their size again)")
    p.add_argument(
        "--compute-capability",
        action="append",
        default=None,
        metavar="SM",
        help="tensorrt-rtx AOT target, e.g. 8.6 or SM89 (repeatable; default: the builder's portable set)",
    )
    p.add_argument("--drop-unsupported-targets", action="store_true",
                   help="build an FP8 UNet for the compute capabilities 8.9+ of the set only (default: refuse a set "
                        "with older ones); the manifest lists what the plan covers")
    p.add_argument("--components", nargs="+", choices=ALL_COMPONENTS, default=None,
                   help="engines to build (default: every graph of the export folder)")
    p.add_argument("--force", action="store_true",
                   help="rebuild even when an engine is up to date; also replaces a malformed engine manifest in --out")
    return p


def _parse_batch(text: str) -> DimRange:
    try:
        parts = [int(p) for p in text.split(":")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3:
        raise SpecError(f"--batch {text!r} is not MIN:OPT:MAX or N, e.g. 1:1:4")
    return DimRange(*parts)


def profile_from_args(args: argparse.Namespace) -> Profile:
    """The build profile from --batch, --size, --size-range and --static."""
    batch = _parse_batch(args.batch)
    sizes = [parse_size(s) for s in args.size] if args.size else None
    if args.static:
        if args.size_range or (sizes and len(sizes) > 1):
            raise SpecError("--static builds one shape: give at most one --size and no --size-range")
        h, w = (sizes or KOLORS_SIZES)[0]
        return Profile.static(batch.opt, h, w)
    if args.size_range:
        try:
            lo, hi = (parse_size(t) for t in args.size_range.split(":"))
        except ValueError:
            raise SpecError(f"--size-range {args.size_range!r} is not HMINxWMIN:HMAXxWMAX") from None
        opt = sizes[0] if sizes else tuple(min(max(v, a), b) for v, a, b in zip(KOLORS_SIZES[0], lo, hi))
        return Profile(batch, DimRange(lo[0], opt[0], hi[0]), DimRange(lo[1], opt[1], hi[1]))
    return Profile.from_sizes(sizes or KOLORS_SIZES, batch)


def _profile_text(profile: dict) -> str:
    """The range of the first dynamic input, e.g. "1x4x96x96 .. 4x4x168x168"."""
    for shapes in profile.values():
        if shapes["min"] != shapes["max"]:
            return f"{'x'.join(map(str, shapes['min']))} .. {'x'.join(map(str, shapes['max']))}"
    first = next(iter(profile.values()))
    return "static " + "x".join(map(str, first["opt"]))


def print_summary(results, out=None) -> None:
    from kolors_trt.runtime.table import markdown_table

    rows = [[r.component, r.precision, _profile_text(r.profile), round(r.plan_bytes / 1e6, 1),
             round(r.build_seconds, 1), r.status] for r in results]
    print(markdown_table(["engine", "precision", "profile (first input)", "size MB", "build s", "status"], rows),
          file=out or sys.stdout)


def run_build(args: argparse.Namespace) -> int:
    """Run `kolors-trt build`; 0 on success. Failures are typed (KolorsTrtError: bad arguments, a missing builder,
    no GPU, a refused graph or profile) and reach the one handler of kolors_trt/cli.py: one line, exit 1."""
    from .builder import build_engines

    results = build_engines(
        onnx_dir=args.onnx,
        out_dir=args.out,
        target=args.target,
        profile=profile_from_args(args),
        components=args.components,
        opt_level=args.opt_level,
        timing_cache=args.timing_cache,
        workspace_gib=args.workspace_gib,
        refit=args.refit,
        force=args.force,
        compute_capabilities=args.compute_capability,
        drop_unsupported_targets=args.drop_unsupported_targets,
    )
    print_summary(results)
    if all(r.status == "up-to-date" for r in results):
        print(f"{args.out}: all engines up to date")
    return 0
