"""The expected GPU memory of an engine folder at the real Kolors sizes, computed (not measured): what the
README's "GPU memory" table comes from.

    python tests/trt_standin/footprint.py --out DIR      # ~3 min, ~6 GB of RAM, ~1.6 GB of disk

- weights: the plan sizes measured by `make fullsize-check` (README, "Requirements"), passed in;
- I/O buffers: exact, from the spec (runtime/spec.py) at the profile's maximum shapes;
- activations: the stand-in's model (graph_model.activation_bytes: the peak of live intermediate tensors,
  attention fused) on graphs at the real widths and resolutions, exported here with random weights: the
  VAE decoder as it is (84 M parameters), the UNet with one transformer layer per block instead of
  (1, 2, 10) (the peak of live tensors does not depend on how many identical layers are stacked, and the
  whole UNet would take 2.6 B parameters to trace). The encoders run at batch 1 (256 tokens x 4096, 577 x
  1024 per tensor); their activations are far below the UNet's and VAE's and are not computed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import numpy as np

PLAN_GB = {"text_encoder": 12.0, "image_encoder": 0.92, "unet": 5.94, "vae_decoder": 0.20}  # fullsize-check


def export_graphs(out: Path) -> dict:
    import torch

    from kolors_trt.export.components import UNetGraph, VaeDecoderGraph
    from kolors_trt.export.fullsize import FULL
    from kolors_trt.export.ip_weights import cross_attention_layers
    from kolors_trt.export.onnx_export import export_onnx
    from kolors_trt.export.tiny import build_unet, build_vae
    from kolors_trt.runtime import spec as S

    torch.manual_seed(0)
    specs = S.engine_specs(S.ModelDims(), S.Profile(S.DimRange(1, 1, 1), S.DimRange(128, 1024, 1024),
                                                    S.DimRange(128, 1024, 1024)))
    paths = {"vae_decoder": out / "vae_decoder.onnx", "unet": out / "unet.onnx"}
    if not paths["vae_decoder"].is_file():
        export_onnx(VaeDecoderGraph(build_vae(FULL)).eval(), specs["vae_decoder"],
                    {"batch": 1, "latent_height": 16, "latent_width": 16}, paths["vae_decoder"])
    if not paths["unet"].is_file():
        unet = build_unet(dataclasses.replace(FULL, unet_transformer_layers=(1, 1, 1)), 4096)
        kv = [(torch.randn(h, 2048) * 0.02, torch.randn(h, 2048) * 0.02) for _, h in cross_attention_layers(unet)]
        export_onnx(UNetGraph(unet, kv).eval().half(), specs["unet"],
                    {"unet_batch": 2, "latent_height": 16, "latent_width": 16}, paths["unet"])
    return paths


def io_bytes(profile) -> int:
    from kolors_trt.runtime import spec as S

    total = 0
    for spec in S.engine_specs(S.ModelDims(), profile).values():
        values = S.dim_values(spec, "max")
        total += sum(int(np.prod(S.shape_of(t, values))) * (8 if t.dtype == "int64" else 4)
                     for t in spec.inputs + spec.outputs)
    return total


def main(argv=None) -> int:
    import onnx

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from trt_standin.graph_model import activation_bytes  # noqa: E402 - run as a script

    from kolors_trt.runtime import spec as S

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    paths = export_graphs(args.out)
    os.chdir(args.out)  # the UNet's weights are external data beside its graph
    unet, vae = (onnx.load(paths[n].name, load_external_data=False) for n in ("unet", "vae_decoder"))
    gib = 2 ** 30
    weights = sum(PLAN_GB.values()) * 1e9 / gib
    for label, profile in [("static 1024x1024, 1 image", S.Profile.static(1, 1024, 1024)),
                           ("default profile (up to 1344 px, 4 images)", S.DEFAULT_PROFILE)]:
        batch, side = profile.batch.max, max(profile.height.max, profile.width.max) // 8
        u = activation_bytes(unet, {"sample": (2 * batch, 4, side, side), "timestep": (1,),
                                    "encoder_hidden_states": (2 * batch, 256, 4096), "text_embeds": (2 * batch, 4096),
                                    "time_ids": (2 * batch, 6), "ip_tokens": (2 * batch, 16, 2048),
                                    "ip_scale": (2 * batch,)}) / gib
        v = activation_bytes(vae, {"latents": (batch, 4, side, side)}) / gib
        io = io_bytes(profile) / gib
        print(f"{label}: weights {weights:.2f} GiB, activations unet {u:.2f} / vae {v:.2f} -> shared {max(u, v):.2f} "
              f"GiB, I/O buffers {io:.3f} GiB, total {weights + max(u, v) + io:.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
