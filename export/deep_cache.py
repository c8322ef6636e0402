"""DeepCache's split of the UNet at a cache branch: which blocks a shallow step skips, the deep feature
that crosses the split, and the patches that make a diffusers UNet compute either side of it.

DeepCache (Ma et al., CVPR 2024; the ``DeepCache`` package's ``DeepCacheSDHelper``) numbers the skip
branches ``cache_branch_id = 3 * block + layer``. On a step it skips, these modules return what they
returned at the last full step: every down module of a block deeper than ``block``, and of ``block``
from ``layer`` on (a block's downsampler is its layer ``len(resnets)``); the mid block; every up
module of a block deeper than ``block``, and of ``block`` above ``layer`` (up blocks and their layers
are counted from the output end). ``skipped`` (runtime/deep_cache.py, shared with the runtime's LoRA
check) states that rule once, as the helper's ``is_skip_step``.

Of the values a skipped step reuses, one feeds a module that runs: the hidden state entering the first
up layer that runs, the *deep feature*. Every other reused value feeds skipped modules only (the up
layer that runs first takes its skip connection from a down layer that runs). So a shallow step is the
UNet with the skipped modules removed and that one tensor as an input, and the full step need only
output it: ``capture_feature`` hooks the full UNet, ``skip_modules`` patches a copy into the shallow one
(each skipped module returns the feature; all but the one at the split are dead and leave the graph).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

from kolors_trt.runtime.deep_cache import BRANCH_LAYERS, skipped
from kolors_trt.runtime.errors import InputError



class DeepCacheError(InputError):
    """A cache branch the UNet does not have."""


@dataclass(frozen=True)
class Split:
    """Where the shallow step resumes: ``up_index`` (in ``unet.up_blocks``) and ``resnet`` (the first of its
    layers that runs); the deep feature is the hidden state entering that layer."""

    branch: int
    up_index: int
    resnet: int


def _layers(config: Mapping, blocks: int) -> list:
    per_block = config["layers_per_block"]
    return list(per_block) if isinstance(per_block, (list, tuple)) else [per_block] * blocks


def split(config: Mapping, branch: int) -> Split:
    """The split of a UNet (its diffusers config) at DeepCache's ``cache_branch_id`` ``branch``."""
    blocks = len(config["block_out_channels"])
    if isinstance(branch, bool) or not isinstance(branch, int) or not 0 <= branch < BRANCH_LAYERS * blocks:
        raise DeepCacheError(f"export: --deep-cache-branch {branch!r} is not a branch of this UNet: DeepCache numbers "
                             f"them 3 * block + layer, 0 to {BRANCH_LAYERS * blocks - 1} for its {blocks} blocks")
    cache_block, cache_layer = divmod(branch, BRANCH_LAYERS)
    up_index = blocks - 1 - cache_block
    up_layers = list(reversed(_layers(config, blocks)))[up_index] + 1  # an up block has one layer more
    # layer k from the output end is list index up_layers - 1 - k; the first that runs is above cache_layer
    return Split(branch, up_index, max(0, up_layers - 1 - cache_layer))


def feature_dims(config: Mapping, branch: Optional[int]) -> dict:
    """ModelDims' DeepCache fields for a UNet config at ``branch`` (None: no shallow graph)."""
    if branch is None:
        return {"deep_cache_branch": -1, "deep_feature_channels": 0, "deep_feature_stride": 1,
                "deep_feature_cross_attention": 0}
    s = split(config, branch)
    channels = list(config["block_out_channels"])
    blocks = len(channels)
    cache_block, cache_layer = divmod(branch, BRANCH_LAYERS)
    # Inside up block `cache_block` every layer outputs channels[cache_block]; its input comes from the
    # block below (or the mid block), channels[cache_block + 1] (the mid block keeps channels[-1]).
    width = channels[cache_block] if s.resnet > 0 else channels[min(cache_block + 1, blocks - 1)]
    down, up = config["down_block_types"], config["up_block_types"]
    cross = (any("CrossAttn" in t for t in down[:cache_block]) or (cache_layer > 0 and "CrossAttn" in down[cache_block])
             or any("CrossAttn" in t for t in up[s.up_index:]))
    return {"deep_cache_branch": branch, "deep_feature_channels": int(width), "deep_feature_stride": 2 ** cache_block,
            "deep_feature_cross_attention": int(cross)}


class FeatureSlot:
    """The deep feature of one forward: written by the full UNet's hook, read by the shallow UNet's patches."""

    value = None


def capture_feature(unet, s: Split, slot: FeatureSlot) -> None:
    """Hook ``unet`` so that each forward leaves its deep feature in ``slot.value``."""
    block = unet.up_blocks[s.up_index]
    if s.resnet == 0:  # the up block's input
        def before(module, args, kwargs):
            slot.value = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

        block.register_forward_pre_hook(before, with_kwargs=True)
        return
    attentions = getattr(block, "attentions", None)
    source = attentions[s.resnet - 1] if attentions else block.resnets[s.resnet - 1]

    def after(module, args, output):
        slot.value = output[0] if isinstance(output, tuple) else output

    source.register_forward_hook(after)


def skip_modules(unet, s: Split, slot: FeatureSlot) -> None:
    """Patch ``unet`` (a copy: it is changed for good) into the shallow UNet of split ``s``: every module
    DeepCache skips returns ``slot.value`` (a down block also its skip outputs, an attention its tuple)."""
    branch = s.branch

    def feature(*args, **kwargs):
        return slot.value

    def attention(*args, **kwargs):
        return (slot.value,)

    def down_block(count):
        return lambda *args, **kwargs: (slot.value, (slot.value,) * count)

    def patch(module, fn):
        module.forward = fn

    for i, block in enumerate(unet.down_blocks):
        resnets, attentions = block.resnets, getattr(block, "attentions", None) or []
        samplers = list(block.downsamplers or [])
        if skipped(i, 0, "down", branch):  # DeepCache wraps a whole block as its layer 0
            patch(block, down_block(len(resnets) + len(samplers)))
            continue
        for layer, resnet in enumerate(resnets):
            if skipped(i, layer, "down", branch):
                patch(resnet, feature)
        for layer, attn in enumerate(attentions):
            if skipped(i, layer, "down", branch):
                patch(attn, attention)
        for sampler in samplers:
            if skipped(i, len(resnets), "down", branch):
                patch(sampler, feature)
    patch(unet.mid_block, feature)
    count = len(unet.up_blocks)
    for index, block in enumerate(unet.up_blocks):
        i = count - 1 - index
        if skipped(i, 0, "up", branch):
            patch(block, feature)
            continue
        layers = len(block.resnets)
        for layer, resnet in enumerate(block.resnets):
            if skipped(i, layers - 1 - layer, "up", branch):
                patch(resnet, feature)
        for layer, attn in enumerate(getattr(block, "attentions", None) or []):
            if skipped(i, layers - 1 - layer, "up", branch):
                patch(attn, attention)
