"""Export stage: graph wrappers against diffusers, ONNX graphs against PyTorch on
ONNX Runtime at shapes other than the trace sample, both tiny presets, fp32 and fp16."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kolors_trt.export import checkpoint as ck
from kolors_trt.export.components import ImageEncoderGraph, TextEncoderGraph, UNetGraph, VaeDecoderGraph
from kolors_trt.export.exporter import Components, check_dims, export_dims, sha256_file
from kolors_trt.export.onnx_export import sample_inputs
from kolors_trt.export.validate import run_ort
from kolors_trt.runtime import spec as S

PROMPTS = ["一只可爱的小狗在奔跑", "a photo of a cat among flowers, looking at the camera", "",
           "穿着黑色T恤衫，上面中文绿色大字写着“可图”。 high quality"]


@pytest.fixture(scope="module")
def ref_pipe(tiny):
    """diffusers' KolorsPipeline + load_ip_adapter on the tiny checkpoint: the reference."""
    from diffusers import KolorsPipeline
    from transformers import CLIPVisionModelWithProjection

    kolors, ip = tiny
    encoder = CLIPVisionModelWithProjection.from_pretrained(ip / "image_encoder")
    pipe = KolorsPipeline.from_pretrained(kolors, image_encoder=encoder)
    pipe.load_ip_adapter(str(ip), subfolder="", weight_name="ip_adapter_plus_general.bin", image_encoder_folder=None)
    return pipe


@pytest.fixture(scope="module")
def comps(tiny):
    return Components(ck.resolve(*tiny), S.DEFAULT_DEEP_CACHE_BRANCH)


def _close(got, want, atol, rtol):
    got, want = (x.detach().numpy() if isinstance(x, torch.Tensor) else x for x in (got, want))
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=atol, rtol=rtol)


# ---- wrappers against the diffusers pipeline (fp32 torch) ---------------------------------------


@pytest.mark.parametrize("batch", [1, 2, 4])
def test_text_wrapper_equals_encode_prompt(ref_pipe, comps, batch):
    prompts = PROMPTS[:batch]
    want, _, want_pooled, _ = ref_pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    t = ref_pipe.tokenizer(prompts, padding="max_length", max_length=256, truncation=True, return_tensors="pt")
    with torch.no_grad():
        got, pooled = TextEncoderGraph(comps.text_encoder)(t["input_ids"], t["attention_mask"], t["position_ids"])
    _close(got, want, 1e-5, 1e-5)
    _close(pooled, want_pooled, 1e-5, 1e-5)


def test_text_wrapper_unpadded_rows_take_the_causal_path(comps):
    """A full-length row: the model's own forward takes its is_causal branch (no mask);
    the wrapper always passes the mask as data, and must agree."""
    ids = torch.randint(3, 300, (2, 256))
    mask, pos = torch.ones_like(ids), torch.arange(256).repeat(2, 1)
    with torch.no_grad():
        ref = comps.text_encoder(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
        got, pooled = TextEncoderGraph(comps.text_encoder)(ids, mask, pos)
    _close(got, ref.hidden_states[-2].permute(1, 0, 2), 1e-5, 1e-5)
    _close(pooled, ref.hidden_states[-1][-1], 1e-5, 1e-5)


def test_image_wrapper_equals_diffusers_ip_path(ref_pipe, comps):
    x = torch.randn(3, 3, 336, 336)
    with torch.no_grad():
        hidden = ref_pipe.image_encoder(x, output_hidden_states=True).hidden_states[-2]
        want = ref_pipe.unet.encoder_hid_proj.image_projection_layers[0](hidden)
        got = ImageEncoderGraph(comps.clip, comps.resampler)(x)
    _close(got, want, 1e-5, 1e-5)


def test_ip_conversion_equals_load_ip_adapter(ref_pipe, comps):
    """Our original-key conversion gives the weights diffusers' loader installs."""
    theirs = ref_pipe.unet.encoder_hid_proj.image_projection_layers[0].state_dict()
    ours = comps.resampler.state_dict()
    assert set(theirs) == set(ours)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=0)
    # after load_ip_adapter, attn_processors also lists the resampler's own attentions
    procs = [p for p in ref_pipe.unet.attn_processors.values() if hasattr(p, "to_k_ip")]
    assert len(procs) == len(comps.kv)
    for proc, (k, v) in zip(procs, comps.kv):
        torch.testing.assert_close(proc.to_k_ip[0].weight, k, rtol=0, atol=0)
        torch.testing.assert_close(proc.to_v_ip[0].weight, v, rtol=0, atol=0)


def unet_inputs(comps, seed: int, b: int, h: int, w: int, t: float) -> tuple:
    """Random UNet inputs at latents h x w (time ids of that size), and CLIP hidden states for the resampler."""
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(b, 4, h, w, generator=gen)
    text = torch.randn(b, 256, comps.dims.text_hidden, generator=gen)
    pooled = torch.randn(b, comps.dims.text_hidden, generator=gen)
    time_ids = torch.tensor([[8.0 * h, 8.0 * w, 0.0, 0.0, 8.0 * h, 8.0 * w]]).repeat(b, 1)
    hidden = torch.randn(b, 577, comps.clip.config.hidden_size, generator=gen)
    return sample, torch.tensor(t), text, pooled, time_ids, hidden


def diffusers_unet(ref_pipe, sample, t, text, pooled, time_ids, hidden):
    """diffusers' UNet after load_ip_adapter: the resampler inside, at the pipe's current IP scale."""
    return ref_pipe.unet(sample, t, encoder_hidden_states=text, added_cond_kwargs={
        "text_embeds": pooled, "time_ids": time_ids, "image_embeds": [hidden[:, None]]}, return_dict=False)[0]


@pytest.mark.parametrize("scale", [0.0, 0.5, 1.3])
def test_unet_wrapper_equals_diffusers_ip_unet(ref_pipe, comps, scale):
    """UNetGraph(ip_tokens, ip_scale) == diffusers' UNet after load_ip_adapter with the
    resampler inside and set_ip_adapter_scale, on [uncond, cond] batches."""
    ref_pipe.set_ip_adapter_scale(scale)
    sample, t, text, pooled, time_ids, hidden = unet_inputs(comps, 3, 4, 12, 8, 757.0)
    with torch.no_grad():
        want = diffusers_unet(ref_pipe, sample, t, text, pooled, time_ids, hidden)
        graph = UNetGraph(comps.unet, comps.kv)
        got = graph(sample, t.reshape(1), text, pooled, time_ids, comps.resampler(hidden), torch.tensor([scale]))
    _close(got, want, 1e-5, 1e-4)


def test_unet_wrapper_scales_each_row_by_its_own_ip_scale(ref_pipe, comps):
    """ip_scale [B]: row i of one batched call equals diffusers' UNet at set_ip_adapter_scale(scale[i])."""
    scales = [0.0, 0.5, 1.3, 0.5]
    b = len(scales)
    sample, t, text, pooled, time_ids, hidden = unet_inputs(comps, 5, b, 8, 12, 411.0)
    with torch.no_grad():
        graph = UNetGraph(comps.unet, comps.kv)
        got = graph(sample, t.reshape(1), text, pooled, time_ids, comps.resampler(hidden), torch.tensor(scales))
        for row, scale in enumerate(scales):
            ref_pipe.set_ip_adapter_scale(scale)
            want = diffusers_unet(ref_pipe, sample, t, text, pooled, time_ids, hidden)
            _close(got[row], want[row], 1e-5, 1e-4)
        uniform = graph(sample, t.reshape(1), text, pooled, time_ids, comps.resampler(hidden), torch.full((b,), 0.5))
    # rows at 0.5 agree with an all-0.5 batch; rows at 0 and 1.3 do not: no scale leaks across rows
    _close(got[[1, 3]], uniform[[1, 3]], 1e-6, 1e-6)
    assert (got[[0, 2]] - uniform[[0, 2]]).abs().amax() > 1e-3


def test_vae_wrapper_equals_decode(ref_pipe, comps):
    z = torch.randn(2, 4, 8, 12)
    with torch.no_grad():
        _close(VaeDecoderGraph(comps.vae)(z), ref_pipe.vae.decode(z, return_dict=False)[0], 1e-6, 1e-6)


# ---- ONNX graphs on ONNX Runtime -----------------------------------------------------------------


def _reference(comps, name):
    return comps.graph(name, "fp32")


def _parity(comps, folder, name, precision, values, seed):
    spec = S.engine_specs(comps.dims)[name]
    feeds = sample_inputs(spec, values, seed=seed)
    got = run_ort(folder / f"{name}.onnx", feeds)
    with torch.no_grad():
        outs = _reference(comps, name)(*(torch.from_numpy(feeds[n]) for n in spec.input_names))
    outs = outs if isinstance(outs, tuple) else (outs,)
    atol, rtol = spec.tolerance[precision]
    for t, want in zip(spec.outputs, outs):
        assert got[t.name].shape == S.shape_of(t, values)
        _close(got[t.name], want.numpy(), atol, rtol)


SHAPES = [  # (batch, unet_batch, latent_h, latent_w) in units of the UNet's latent multiple
    (1, 2, 2, 2), (2, 4, 3, 4), (4, 8, 4, 3),
]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", S.ALL_COMPONENTS)
def test_onnx_parity_default_preset(store, comps, precision, shape, name):
    folder = store.export("default", precision)[0]
    m = comps.dims.latent_multiple
    b, ub, lh, lw = shape
    values = {"batch": b, "unet_batch": ub, "latent_height": lh * m, "latent_width": lw * m}
    prec = json.loads((folder / "manifest.json").read_text())["components"][name]["precision"]
    _parity(comps, folder, name, prec, values, seed=10 + b)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_onnx_parity_alt_preset(store, precision):
    """Another width and depth everywhere: nothing may assume the default tiny sizes."""
    kolors, ip = store.tiny("alt")
    comps = Components(ck.resolve(kolors, ip), S.DEFAULT_DEEP_CACHE_BRANCH)
    assert comps.dims.text_hidden == 96 and comps.dims.cross_attention_dim == 96
    folder, results = store.export("alt", precision)
    names = ["text_encoder", "image_encoder", "unet", "unet_shallow", "vae_decoder"]  # the shallow UNet after its unet
    assert [r.component for r in results] == names
    m = comps.dims.latent_multiple
    for name, result in zip(names, results):
        values = {"batch": 3, "unet_batch": 2, "latent_height": 5 * m, "latent_width": 2 * m}
        _parity(comps, folder, name, result.precision, values, seed=7)


def test_text_graph_equals_encode_prompt_on_ort(ref_pipe, onnx_fp32):
    """The graph against the pipeline itself, with padded and unpadded rows."""
    long = "一只可爱的小狗在奔跑 " * 60  # over 256 tokens: no padding at all
    prompts = [PROMPTS[0], long, PROMPTS[2]]
    want, _, want_pooled, _ = ref_pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    t = ref_pipe.tokenizer(prompts, padding="max_length", max_length=256, truncation=True, return_tensors="np")
    assert t["attention_mask"][1].all() and not t["attention_mask"][0].all()
    got = run_ort(onnx_fp32 / "text_encoder.onnx", {k: t[k].astype(np.int64) for k in
                                                    ("input_ids", "attention_mask", "position_ids")})
    _close(got["prompt_embeds"], want, 1e-4, 1e-4)
    _close(got["pooled"], want_pooled, 1e-4, 1e-4)


def test_manifest_and_assets(store, comps):
    folder, results = store.export("default", "fp16")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format"] == "kolors-trt/export"
    assert manifest["model_dims"] == S.to_json(comps.dims)
    assert manifest["runtime"]["vae_scaling_factor"] == pytest.approx(0.13025)
    assert manifest["runtime"]["force_zeros_for_empty_prompt"] is False
    for r in results:
        entry = manifest["components"][r.component]
        assert entry["precision"] == S.DEFAULT_PRECISION[r.component]
        assert entry["sha256"] == sha256_file(folder / entry["file"])
        assert entry["validation"]["max_abs_err"] == r.parity.max_abs_err
        assert entry["validation"]["dims"] == check_dims(comps.dims) != export_dims(comps.dims)
    assert (folder / "tokenizer" / "tokenizer.model").is_file()
    # What a reader verifies and what "up to date" compares: asset hashes, the checkpoint's fingerprint.
    assert manifest["assets"] == {rel: sha256_file(folder / rel) for rel in manifest["assets"]}
    assert "tokenizer/tokenizer.model" in manifest["assets"] and "scheduler/scheduler_config.json" in manifest["assets"]
    assert {e["checkpoint"] for e in manifest["components"].values()} == {ck.fingerprint(comps.paths)}
    assert not [p for p in folder.iterdir() if ".kt-tmp-" in p.name]  # no staging folder left behind
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["num_train_timesteps"] == 1100
    assert (folder / "image_processor" / "preprocessor_config.json").is_file()


def test_fp16_graph_keeps_fp32_islands(onnx_fp16):
    """ChatGLM's RMSNorm computes its variance in fp32: the fp16 graph keeps those casts,
    and every weight matrix is fp16 (no fp32 promotion around the attention mask)."""
    import onnx

    model = onnx.load(str(onnx_fp16 / "text_encoder.onnx"))
    to_fp32 = {n.output[0] for n in model.graph.node if n.op_type == "Cast"
               and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in n.attribute)}
    pows = [n for n in model.graph.node if n.op_type == "Pow"]
    # every RMSNorm (two per layer, plus the final one) squares an fp32 cast of its input
    assert len(pows) >= 2 * 2 and all(p.input[0] in to_fp32 for p in pows)
    weights = {i.data_type for i in model.graph.initializer if len(i.dims) >= 2}
    assert weights == {onnx.TensorProto.FLOAT16}


def test_external_data_file(tmp_path, onnx_fp32):
    """Graphs over 2 GB are written with one external-data file; ORT loads it."""
    import onnx

    from kolors_trt.export.onnx_export import _save

    model = onnx.load(str(onnx_fp32 / "vae_decoder.onnx"))
    _save(model, tmp_path / "vae_decoder.onnx", external=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae_decoder.onnx", "vae_decoder.onnx.data"]
    assert (tmp_path / "vae_decoder.onnx").stat().st_size < 200_000
    feeds = {"latents": np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)}
    _close(run_ort(tmp_path / "vae_decoder.onnx", feeds)["image"],
           run_ort(onnx_fp32 / "vae_decoder.onnx", feeds)["image"], 0, 0)
