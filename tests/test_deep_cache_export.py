"""DeepCache's split at export: the full UNet's deep feature and the shallow UNet against the DeepCache
package's own DeepCacheSDHelper (every branch, both tiny presets), the exported graphs on ONNX Runtime
at a branch whose feature is at half resolution and whose shallow blocks hold cross-attention, and
--no-deep-cache over a folder that had the split."""

from __future__ import annotations

import copy
import json
import shutil
import types

import numpy as np
import pytest
import torch

from kolors_trt.export import checkpoint as ck
from kolors_trt.export import deep_cache as D
from kolors_trt.export.components import ShallowUNetGraph, UNetGraph, attach_ip
from kolors_trt.export.exporter import Components, export_all, resolve_precisions
from kolors_trt.export.validate import run_ort
from kolors_trt.runtime import spec as S


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Many small torch calls: one intra-op thread is several times faster than two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _inputs(dims: S.ModelDims, seed: int, b: int = 2, h: int = 12, w: int = 20) -> dict:
    """UNet inputs at a latent size other than the trace's (8x8) and the validation's (12x16)."""
    g = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(b, 4, h, w, generator=g), "timestep": torch.tensor([0.0]),
            "encoder_hidden_states": torch.randn(b, 256, dims.text_hidden, generator=g),
            "text_embeds": torch.randn(b, dims.text_hidden, generator=g),
            "time_ids": torch.tensor([[8.0 * h, 8.0 * w, 0, 0, 8.0 * h, 8.0 * w]]).repeat(b, 1),
            "ip_tokens": torch.randn(b, dims.ip_tokens, dims.cross_attention_dim, generator=g),
            "ip_scale": torch.tensor([0.5, 1.2, 0.0, 0.7])[:b]}


def _helper_steps(unet, kv, branch: int, steps: list, timesteps: torch.Tensor) -> list:
    """DeepCacheSDHelper (interval 2: full, skipped) on ``unet`` with the IP processors: the noise of each step."""
    from DeepCache import DeepCacheSDHelper

    from kolors_trt.export.components import _unet_call

    unet = copy.deepcopy(unet)
    ip = attach_ip(unet, kv)
    # The helper reads the step index from pipe.scheduler.timesteps and the UNet's second argument.
    pipe = types.SimpleNamespace(unet=unet, scheduler=types.SimpleNamespace(timesteps=timesteps))
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=2, cache_branch_id=branch)
    helper.enable()
    try:
        with torch.no_grad():
            return [_unet_call(unet, ip, x["sample"], t, x["encoder_hidden_states"], x["text_embeds"], x["time_ids"],
                               x["ip_tokens"], x["ip_scale"]) for x, t in zip(steps, timesteps)]
    finally:
        helper.disable()


@pytest.mark.parametrize("preset", ["default", "alt"])
def test_split_equals_deepcache_helper_at_every_branch(store, preset):
    """For each cache_branch_id: the full graph's noise equals the helper's full step, and the shallow graph on
    that step's feature equals the helper's skipped step, exactly (fp32, same operations)."""
    paths = ck.resolve(*store.tiny(preset))
    comps = Components(paths)
    unet, kv = comps.unet, comps.kv
    blocks = len(unet.config.block_out_channels)
    timesteps = torch.tensor([911.0, 457.0])
    steps = [_inputs(comps.dims, seed) for seed in (1, 2)]
    for branch in range(D.BRANCH_LAYERS * blocks):
        split = D.split(unet.config, branch)
        dims = S.ModelDims(**{**vars(comps.dims), **D.feature_dims(unet.config, branch)})
        names = S.engine_specs(dims)[S.SHALLOW_UNET].input_names
        want = _helper_steps(unet, kv, branch, steps, timesteps)
        unet_names = S.engine_specs(dims)["unet"].input_names
        with torch.no_grad():
            full = UNetGraph(copy.deepcopy(unet), kv, split)
            noise, feature = full(*({**steps[0], "timestep": timesteps[:1]}[n] for n in unet_names))
            second = {**steps[1], "timestep": timesteps[1:], "deep_feature": feature}
            shallow = ShallowUNetGraph(copy.deepcopy(unet), kv, split, names)(*(second[n] for n in names))
            fresh = full(*(second[n] for n in unet_names))[0]
        b, _, h, w = steps[0]["sample"].shape
        stride = dims.deep_feature_stride
        assert tuple(feature.shape) == (b, dims.deep_feature_channels, h // stride, w // stride), branch
        torch.testing.assert_close(noise, want[0], rtol=0, atol=0)
        torch.testing.assert_close(shallow, want[1], rtol=0, atol=0)
        # the reused feature matters: a full step on the second input differs
        assert (fresh - want[1]).abs().max() > 1e-3, branch
        # the shallow graph takes the text and IP inputs exactly when its blocks hold cross-attention
        assert ("encoder_hidden_states" in names) == bool(dims.deep_feature_cross_attention), branch


def test_branch_outside_the_unet_is_refused(tiny):
    config = ck.read_config(ck.resolve(*tiny).unet)  # 3 blocks: branches 0..8
    for branch in (-1, 9, 1.5, True):
        with pytest.raises(D.DeepCacheError, match="0 to 8"):
            D.split(config, branch)


def test_export_at_a_deep_branch_then_without_the_split(tmp_path, tiny, onnx_fp32):
    """Re-export the UNet of a copy of the shared folder at branch 4 (feature at half resolution, cross-attention
    in the shallow blocks): the ONNX graphs reproduce the helper's two steps at another size; then with
    --no-deep-cache: the shallow graph and the unet's feature output leave the folder and its manifest."""
    folder = tmp_path / "onnx"
    shutil.copytree(onnx_fp32, folder)
    kolors, ip = tiny
    results = export_all(kolors, ip, folder, resolve_precisions("fp32"), ("unet",), progress=False,
                         deep_cache_branch=4)
    assert [r.component for r in results] == ["unet", "unet_shallow"]
    manifest = json.loads((folder / "manifest.json").read_text())
    dims = S.model_dims_from_json(manifest["model_dims"])
    assert (dims.deep_cache_branch, dims.deep_feature_stride, dims.deep_feature_cross_attention) == (4, 2, 1)
    specs = S.engine_specs(dims)
    comps = Components(ck.resolve(kolors, ip))
    timesteps = torch.tensor([911.0, 457.0])
    steps = [_inputs(comps.dims, seed, b=3, h=16, w=8) for seed in (3, 4)]
    want = _helper_steps(comps.unet, comps.kv, 4, steps, timesteps)
    feeds = [{k: v.numpy() for k, v in {**x, "timestep": t.reshape(1)}.items()} for x, t in zip(steps, timesteps)]
    first = run_ort(folder / "unet.onnx", feeds[0])
    assert first["deep_feature"].shape == (3, dims.deep_feature_channels, 8, 4)
    shallow = {n: v for n, v in {**feeds[1], "deep_feature": first["deep_feature"]}.items()
               if n in specs[S.SHALLOW_UNET].input_names}
    second = run_ort(folder / "unet_shallow.onnx", shallow)["noise_pred"]
    np.testing.assert_allclose(first["noise_pred"], want[0].numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(second, want[1].numpy(), atol=1e-4, rtol=1e-4)

    export_all(kolors, ip, folder, resolve_precisions("fp32"), ("unet",), progress=False, deep_cache_branch=None)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert S.SHALLOW_UNET not in manifest["components"] and not (folder / "unet_shallow.onnx").exists()
    assert manifest["model_dims"]["deep_feature_channels"] == 0
    import onnx

    assert [o.name for o in onnx.load(str(folder / "unet.onnx")).graph.output] == ["noise_pred"]
    # the other graphs were kept, and the folder still verifies
    from kolors_trt.runtime.artifacts import read_export_folder

    assert sorted(read_export_folder(folder).components) == sorted(S.COMPONENTS)


def test_spec_of_the_split():
    """The unet outputs the feature and the shallow graph takes it, at latent / stride; its text and IP inputs only
    with cross-attention; shapes checked from the latent dims; TensorRT profiles scaled alike."""
    profile = S.Profile(S.DimRange(1, 1, 2), S.DimRange(512, 1024, 1024), S.DimRange(768, 1024, 1344))
    plain = S.engine_specs(S.ModelDims(), profile)
    assert S.SHALLOW_UNET not in plain and plain["unet"].output_names == ["noise_pred"]
    dims = S.ModelDims(deep_cache_branch=4, deep_feature_channels=640, deep_feature_stride=2,
                       deep_feature_cross_attention=1)
    specs = S.engine_specs(dims, profile)
    assert specs["unet"].output_names == ["noise_pred", "deep_feature"]
    shallow = specs[S.SHALLOW_UNET]
    assert shallow.input_names == plain["unet"].input_names + ["deep_feature"]
    assert S.trt_profile(shallow)["deep_feature"] == ((1, 640, 32, 48), (2, 640, 64, 64), (4, 640, 64, 84))
    assert S.dynamic_axes(shallow)["deep_feature"] == {0: "unet_batch", 2: "latent_height/2", 3: "latent_width/2"}
    feeds = {t.name: np.zeros(S.shape_of(t, {"unet_batch": 2, "latent_height": 96, "latent_width": 128}), np.float32)
             for t in shallow.inputs}
    assert S.check_feeds(shallow, feeds) == {"unet_batch": 2, "latent_height": 96, "latent_width": 128}
    feeds["deep_feature"] = np.zeros((2, 640, 96, 64), np.float32)
    with pytest.raises(S.SpecError, match="'deep_feature' axis 2 is 96, expected latent_height/2 = 48"):
        S.check_feeds(shallow, feeds)
    no_cross = S.engine_specs(S.ModelDims(deep_cache_branch=0, deep_feature_channels=320), profile)[S.SHALLOW_UNET]
    assert no_cross.input_names == ["sample", "timestep", "text_embeds", "time_ids", "deep_feature"]
