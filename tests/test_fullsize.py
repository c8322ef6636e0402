"""The scale mechanics of the full-size dry run, checked on tiny models: the
meta-device configs at the real sizes, the streaming fp16 writer (sharded text
encoder with an index) and the streaming external-data export path."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from kolors_trt.export import checkpoint as ck
from kolors_trt.export import fullsize, fullsize_check, tiny
from kolors_trt.runtime import spec as S


@pytest.fixture(scope="module")
def streamed(tmp_path_factory):
    """The tiny preset written by the streaming writer, the text encoder in shards."""
    out = tmp_path_factory.mktemp("streamed")
    kolors, ip = fullsize.write_streaming(out, tiny.TINY, vocab=640, resampler_hidden=64 * tiny.TINY.resampler_heads,
                                          shard_bytes=60_000, unet_sample_size=32, vae_sample_size=64)
    return ck.resolve(kolors, ip)


def test_full_size_configs_match_kolors():
    import torch
    from diffusers.models.attention import BasicTransformerBlock

    from kolors_trt.export.ip_weights import cross_attention_layers

    cfg, gen = fullsize.FULL, torch.Generator()
    with torch.device("meta"):
        te = tiny.build_text_encoder(cfg, fullsize.FULL_VOCAB, gen)
        unet = tiny.build_unet(cfg, cfg.text_hidden)
        vae = tiny.build_vae(cfg)
        clip = tiny.build_image_encoder(cfg)
        resampler = fullsize.build_resampler(cfg, fullsize.FULL_RESAMPLER_HIDDEN)

    def count(m):
        return sum(p.numel() for p in m.parameters())

    assert te.encoder.layers[0].self_attention.query_key_value.weight.shape == (4608, 4096)
    assert te.encoder.layers[0].mlp.dense_h_to_4h.weight.shape == (2 * 13696, 4096)
    assert te.embedding.word_embeddings.weight.shape == (65024, 4096) and len(te.encoder.layers) == 28
    assert 6.1e9 < count(te) < 6.3e9
    assert 2.5e9 < count(unet) < 2.65e9  # KOLORS.md: 2.58 B
    assert unet.encoder_hid_proj.weight.shape == (2048, 4096)
    assert unet.add_embedding.linear_1.in_features == 5632
    assert sum(isinstance(m, BasicTransformerBlock) for m in unet.modules()) == 70
    assert len(cross_attention_layers(unet)) == 70
    assert 83e6 < count(vae) < 84.5e6  # the decoder and encoder: 83.7 M
    assert clip.config.num_hidden_layers == 24 and clip.config.hidden_size == 1024
    assert clip.vision_model.embeddings.position_embedding.weight.shape == (577, 1024)
    assert resampler.layers[0].attn.to_q.weight.shape == (768, 2048)
    assert resampler.latents.shape == (1, 16, 2048) and resampler.proj_out.out_features == 2048


def test_streaming_writer_layout_and_sharded_load(streamed):
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open

    folder = streamed.text_encoder
    index = json.loads((folder / "model.safetensors.index.fp16.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((folder / s).is_file() for s in shards)
    assert ck._variant(folder) == "fp16" and ck._variant(streamed.unet) == "fp16"
    model = ck.load_text_encoder(streamed, "float16")
    state = model.state_dict()
    assert set(index["weight_map"]) == set(state)
    total = 0
    for shard in shards:
        with safe_open(str(folder / shard), framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                assert t.dtype == torch.float16
                assert torch.equal(t, state[key]), key
                total += t.numel() * 2
    assert total == index["metadata"]["total_size"]
    # norms near one (ChatGLM leaves them torch.empty), the rotary table exact
    assert abs(float(model.encoder.final_layernorm.weight.float().mean()) - 1) < 0.1
    dim = model.rotary_pos_emb.dim
    assert torch.allclose(model.rotary_pos_emb.inv_freq.float(),
                          1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim), rtol=1e-3)
    unet = UNet2DConditionModel.from_pretrained(streamed.unet, variant="fp16", torch_dtype=torch.float16)
    resampler, kv = ck.load_ip_adapter(streamed, unet)
    assert len(kv) == 11 and resampler.latents.shape == (1, 16, 64)
    assert ck.load_image_encoder(streamed).vision_model.embeddings.patch_embedding.weight.dtype == torch.float32


@pytest.mark.parametrize("name", ["text_encoder", "unet"])
def test_streaming_export_matches_in_memory_export(streamed, tmp_path, name):
    import onnx

    from kolors_trt.export.onnx_export import ALIGN, export_onnx, sample_inputs
    from kolors_trt.export.validate import run_ort

    dims = ck.model_dims(streamed)
    spec = S.engine_specs(dims)[name]
    graph = fullsize_check.load_graph(streamed, name, "float32")
    values = {"batch": 1, "unet_batch": 2, "latent_height": 8, "latent_width": 8}
    plain, streaming = tmp_path / "plain.onnx", tmp_path / "streaming.onnx"
    export_onnx(graph, spec, values, plain, streaming=False)
    export_onnx(graph, spec, values, streaming, streaming=True)

    model = onnx.load(str(streaming), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and {e.value for t in external for e in t.external_data if e.key == "location"} == {
        "streaming.onnx.data"}
    assert all(int(e.value) % ALIGN == 0 for t in external for e in t.external_data if e.key == "offset")
    inits = {t.name for t in model.graph.initializer}
    assert not [n for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in inits]
    assert [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim][0] == spec.inputs[0].shape[0]

    check = {"batch": 2, "unet_batch": 4, "latent_height": 12, "latent_width": 16}
    feeds = sample_inputs(spec, check, seed=3)
    want, got = run_ort(plain, feeds), run_ort(streaming, feeds)
    lean = fullsize_check.run_ort_lean(streaming, feeds)
    for key in want:
        scale = float(np.abs(want[key]).max())
        assert np.abs(want[key] - got[key]).max() <= 1e-5 * scale, key
        assert np.abs(want[key] - lean[key]).max() <= 1e-5 * scale, key
    assert math.prod(got[spec.output_names[0]].shape) == math.prod(S.shape_of(spec.outputs[0], check))
