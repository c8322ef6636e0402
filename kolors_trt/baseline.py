"""diffusers' KolorsPipeline + load_ip_adapter on the same checkpoint: the baseline
the benchmark compares against (and the reference the tests use)."""

from __future__ import annotations

from pathlib import Path


def load_diffusers(weights: Path, ip_adapter: Path, device: str = "cpu", dtype: str = "fp32"):
    """(pipeline, torch) with the IP-Adapter-Plus weights loaded in their original format;
    set the IP scale with pipe.set_ip_adapter_scale before use."""
    import torch
    from diffusers import KolorsPipeline
    from transformers import CLIPVisionModelWithProjection

    try:
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor  # transformers 5: the PIL backend
    except ImportError:
        from transformers import CLIPImageProcessor

    from kolors_trt.export import checkpoint as ck

    paths = ck.resolve(weights, ip_adapter)
    torch_dtype = {"fp16": torch.float16, "fp32": torch.float32}[dtype]
    encoder = CLIPVisionModelWithProjection.from_pretrained(paths.image_encoder, torch_dtype=torch_dtype)
    processor = CLIPImageProcessor.from_pretrained(paths.image_encoder)
    pipe = KolorsPipeline.from_pretrained(paths.root, image_encoder=encoder, feature_extractor=processor,
                                          torch_dtype=torch_dtype)
    pipe.load_ip_adapter(str(paths.ip_root), subfolder="", weight_name=paths.ip_weights.name,
                         image_encoder_folder=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), torch
