"""`kolors-trt generate`: one request on an engine folder or an export folder.

    kolors-trt generate --engines out/engines --image ref.png --prompt "..." --out out.png
    kolors-trt generate --onnx out/onnx --image ref.png --prompt "..." --out out.png --steps 4
    kolors-trt generate ... --scheduler dpmpp_2m_karras --steps 25 --guidance-interval 0.28:5.42
    kolors-trt generate --onnx out/onnx ... --lora style.safetensors:0.8 --lora detail.safetensors
    kolors-trt generate ... --deep-cache-interval 3

Defaults of the sampling arguments are the model folder's manifest
(``runtime.defaults``): the parser leaves them unset. Several images go to
OUT-0.png, OUT-1.png, ...; every PNG carries its generation parameters as text
chunks. (`bench` lives in the top-level package: its diffusers baseline is no
runtime dependency.)
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from .errors import InputError
from .folder import BACKENDS, Limits
from .samplers import SAMPLERS

logger = logging.getLogger(__name__)


class OutputPathError(InputError):
    """The output path is a folder or cannot be written; found before any engine runs."""


def add_limit_arguments(p: argparse.ArgumentParser) -> None:
    """--max-size / --max-batch: what an export folder (ONNX Runtime) accepts on this host."""
    d = Limits()
    p.add_argument("--max-size", type=int, default=d.max_side, metavar="PX",
                   help=f"export folders: largest image side accepted (default {d.max_side}); engine folders use "
                        "their build profile")
    p.add_argument("--max-batch", type=int, default=d.max_batch, metavar="N",
                   help=f"export folders: most images per UNet batch (default {d.max_batch})")


def add_runtime_cache_argument(p: argparse.ArgumentParser) -> None:
    """--runtime-cache FILE: TensorRT-RTX's just-in-time kernels across runs (generate, bench)."""
    p.add_argument("--runtime-cache", metavar="FILE", default=None,
                   help="TensorRT-RTX: file keeping the kernels it compiles at run time, so a restart does not compile "
                        "them again (read at start, written after the first request of each new shape)")


def interval(text: str) -> tuple[float, float]:
    """--guidance-interval LOW:HIGH -> (low, high); the runtime checks the values (request.guidance_interval)."""
    low, sep, high = text.partition(":")
    try:
        if not sep:
            raise ValueError(text)
        return float(low), float(high)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW:HIGH in sigma units (e.g. 0.28:5.42), got {text!r}") from None


def add_sampler_arguments(p: argparse.ArgumentParser, several: bool = False) -> None:
    """--scheduler / --guidance-interval / --deep-cache-interval: the sampler, where classifier-free guidance
    applies, and DeepCache's interval (``several``: bench takes a list)."""
    p.add_argument("--scheduler", choices=list(SAMPLERS), default=None,
                   help="sampler, built from the folder's scheduler config as diffusers' from_config "
                        "(default: the manifest's, else euler)")
    p.add_argument("--guidance-interval", type=interval, default=None, metavar="LOW:HIGH",
                   help="guidance only at steps whose sigma is in (LOW, HIGH]; the other steps skip the "
                        "unconditional UNet row (Kynkaanniemi et al. 2024 use 0.28:5.42 for SD-XL)")
    p.add_argument("--deep-cache-interval", type=int, default=None, metavar="N", nargs="+" if several else None,
                   help="DeepCache: the full UNet every N steps, the shallow UNet on the cached deep feature between "
                        "(default 1: off; needs an export with its shallow UNet)"
                        + ("; several values: one configuration each" if several else ""))


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--engines", metavar="DIR", help="engine folder (kolors-trt build)")
    src.add_argument("--onnx", metavar="DIR", help="export folder (kolors-trt export), run on ONNX Runtime")
    p.add_argument("--image", help="reference image for the IP-Adapter (required unless --ip-scale 0)")
    p.add_argument("--prompt", required=True, help="text prompt")
    p.add_argument("--negative-prompt", default=None, help='negative prompt (default: "", encoded as diffusers does)')
    p.add_argument("--out", required=True, help="output PNG; with --num-images N: OUT-0.png ... OUT-(N-1).png")
    p.add_argument("--seed", type=int, default=None, help="seed of the CPU torch generator diffusers uses (default: random)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the manifest's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the manifest's)")
    p.add_argument("--ip-scale", type=float, default=None, help="IP-Adapter scale (default: the manifest's)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the manifest's)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the manifest's)")
    p.add_argument("--num-images", type=int, default=1, help="images for the prompt (default 1)")
    add_sampler_arguments(p)
    p.add_argument("--lora", action="append", type=lora_argument, default=[], metavar="PATH[:WEIGHT]",
                   help="a LoRA .safetensors (diffusers, PEFT or kohya) and its weight (default 1.0); repeatable")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="default: onnxruntime for --onnx, the build target for --engines")
    p.add_argument("--cache-dir", default=None, help="folder caching IP tokens across runs (.npy per reference image)")
    add_runtime_cache_argument(p)
    p.add_argument("--no-verify", action="store_true", help="skip hashing the graphs/plans against the manifest at load")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_limit_arguments(p)


def lora_argument(text: str) -> tuple[str, float]:
    """PATH[:WEIGHT] -> (path, weight); a suffix that is not a number belongs to the path."""
    path, sep, weight = text.rpartition(":")
    if sep and path:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return text, 1.0


def load_loras(pipe, loras: list) -> dict:
    """Load each --lora under its file stem (made unique); the request's {name: weight}."""
    chosen = {}
    for path, weight in loras:
        stem = Path(path).stem
        name, i = stem, 2
        while name in pipe.lora.adapters:
            name, i = f"{stem}_{i}", i + 1
        chosen[pipe.load_lora_weights(path, adapter_name=name)] = weight
    return chosen


def output_paths(out: str | Path, count: int) -> list[Path]:
    """OUT.png, or OUT-0.png ... for several images; OutputPathError when OUT is a folder or unwritable."""
    if str(out).endswith(("/", os.sep)) or Path(out).is_dir():
        raise OutputPathError(f"--out {out}: is a folder; give a file name, e.g. {Path(out) / 'out.png'}")
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    existing = next((p for p in (parent, *parent.parents) if p.exists()), Path("."))
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise OutputPathError(f"--out {out}: cannot write into {existing} (not a writable folder); choose another path")
    if out.suffix.lower() != ".png":
        out = out.with_suffix(out.suffix + ".png") if out.suffix else out.with_suffix(".png")
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


def run_generate(args) -> int:
    from .pipeline import Pipeline
    from .postprocess import save_png

    folder = args.engines or args.onnx
    paths = output_paths(args.out, args.num_images)  # checked before the engines load and run
    pipe = Pipeline.load(folder, backend=args.backend, cache_dir=args.cache_dir, verify=not args.no_verify,
                         limits=Limits(args.max_size, args.max_batch), runtime_cache=args.runtime_cache)
    loras = load_loras(pipe, args.lora)
    result = pipe.generate(
        args.prompt,
        ip_adapter_image=args.image,
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        ip_adapter_scale=args.ip_scale,
        seed=args.seed,
        num_images_per_prompt=args.num_images,
        scheduler=args.scheduler,
        guidance_interval=args.guidance_interval,
        loras=loras,
        deep_cache_interval=args.deep_cache_interval,
        progress=not args.no_progress,
    )
    params = dict(result.parameters, image=args.image)
    for i, (image, path) in enumerate(zip(result.images, paths)):
        save_png(image, path, dict(params, index=i))
        print(f"wrote {path} ({image.width}x{image.height}, seed {params['seed']})")
    stats = pipe.stats()
    print("engine runs: " + ", ".join(f"{k} {v}" for k, v in stats["engine_runs"].items())
          + "; UNet rows: " + ", ".join(f"{k} {v}" for k, v in stats["unet_rows"].items()))
    return 0


def add_subcommands(subparsers) -> None:
    """Register `generate` on the kolors-trt CLI."""
    p = subparsers.add_parser("generate", help="generate images on an engine folder or an export folder")
    add_generate_arguments(p)
    p.set_defaults(run=run_generate)


__all__ = ["OutputPathError", "add_generate_arguments", "add_limit_arguments", "add_runtime_cache_argument",
           "add_sampler_arguments", "add_subcommands", "interval", "load_loras", "lora_argument", "output_paths",
           "run_generate"]
