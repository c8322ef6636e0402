"""Checkpoint layouts, the tiny writer's on-disk round trip, IP weights formats and
every bad input: one clear error naming the path."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from kolors_trt.export import checkpoint as ck
from kolors_trt.export import ip_weights
from kolors_trt.export.exporter import PrecisionError, resolve_precisions
from kolors_trt.export.tiny import IP_WEIGHT_NAME, write_tiny


@pytest.fixture()
def copy_tiny(tiny, tmp_path):
    kolors, ip = tiny
    shutil.copytree(kolors, tmp_path / "kolors")
    shutil.copytree(ip, tmp_path / "ip")
    return tmp_path / "kolors", tmp_path / "ip"


def test_tiny_is_deterministic_and_loads_like_diffusers(tiny, tmp_path):
    from diffusers import UNet2DConditionModel

    kolors, ip = tiny
    again_kolors, again_ip = write_tiny(tmp_path / "again")
    for rel in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                "text_encoder/model.safetensors"):
        assert (kolors / rel).read_bytes() == (again_kolors / rel).read_bytes(), rel
    # the sentencepiece proto records its training paths; the vocabulary is what must repeat
    import sentencepiece as spm

    a, b = (spm.SentencePieceProcessor(model_file=str(k / "tokenizer" / "tokenizer.model")) for k in (kolors, again_kolors))
    assert [(a.id_to_piece(i), a.get_score(i)) for i in range(a.vocab_size())] == \
           [(b.id_to_piece(i), b.get_score(i)) for i in range(b.vocab_size())]
    ours = ck.load_unet(ck.resolve(kolors, ip)).state_dict()
    theirs = UNet2DConditionModel.from_pretrained(kolors / "unet").state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    # RMSNorm weights must not be left as torch.empty: all finite, near one
    te = ck.load_text_encoder(ck.resolve(kolors, ip))
    norms = [p for n, p in te.named_parameters() if "layernorm" in n]
    assert norms and all(torch.isfinite(p).all() and (p - 1).abs().max() < 1 for p in norms)


def test_original_kolors_layout_tokenizer_in_text_encoder(copy_tiny):
    kolors, ip = copy_tiny
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.move(kolors / "tokenizer" / name, kolors / "text_encoder" / name)
    shutil.rmtree(kolors / "tokenizer")
    (kolors / "model_index.json").unlink()
    paths = ck.resolve(kolors, ip)
    assert paths.tokenizer == kolors / "text_encoder"


def test_ip_safetensors_equals_bin(copy_tiny):
    from safetensors.torch import save_file

    kolors, ip = copy_tiny
    state = ip_weights.load_original(ip / IP_WEIGHT_NAME)
    flat = {f"{group}.{k}": v.contiguous() for group in state for k, v in state[group].items()}
    save_file(flat, str(ip / "ip_adapter_plus_general.safetensors"))
    (ip / IP_WEIGHT_NAME).unlink()
    paths = ck.resolve(kolors, ip)
    assert paths.ip_weights.suffix == ".safetensors"
    again = ip_weights.load_original(paths.ip_weights)
    for group in state:
        assert set(again[group]) == set(state[group])
        assert all(torch.equal(again[group][k], state[group][k]) for k in state[group])


def test_ip_round_trip(tiny):
    kolors, ip = tiny
    unet = ck.load_unet(ck.resolve(kolors, ip))
    state = ip_weights.load_original(ip / IP_WEIGHT_NAME)
    n = len(ip_weights.cross_attention_layers(unet))
    kwargs, resampler_state, kv = ip_weights.convert(state, n)
    assert kwargs["depth"] == 4 and kwargs["num_queries"] == 16 and kwargs["heads"] * 64 == kwargs["hidden_dims"]
    back = ip_weights.to_original_format(resampler_state, kv)
    for group in state:
        assert set(back[group]) == set(state[group])
        assert all(torch.equal(back[group][k], state[group][k]) for k in state[group])


@pytest.mark.parametrize("breakage, message", [
    ("missing_weights_dir", "is not a folder"),
    ("missing_ip_dir", "--ip-adapter"),
    ("missing_unet", "unet"),
    ("missing_tokenizer", "tokenizer.model"),
    ("missing_scheduler", "scheduler_config.json"),
    ("missing_ip_file", "ip_adapter_plus_general"),
])
def test_layout_errors_name_the_path(copy_tiny, tmp_path, breakage, message):
    kolors, ip = copy_tiny
    if breakage == "missing_weights_dir":
        kolors = tmp_path / "nowhere"
    elif breakage == "missing_ip_dir":
        ip = tmp_path / "nowhere"
    elif breakage == "missing_unet":
        shutil.rmtree(kolors / "unet")
    elif breakage == "missing_tokenizer":
        (kolors / "tokenizer" / "tokenizer.model").unlink()
    elif breakage == "missing_scheduler":
        shutil.rmtree(kolors / "scheduler")
    elif breakage == "missing_ip_file":
        (ip / IP_WEIGHT_NAME).unlink()
    with pytest.raises(ck.CheckpointError, match=message):
        ck.resolve(kolors, ip)


def test_corrupt_unet_weights(copy_tiny):
    kolors, ip = copy_tiny
    f = kolors / "unet" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ck.CheckpointError, match="UNet.*unet"):
        ck.load_unet(ck.resolve(kolors, ip))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "pickle_object"])
def test_corrupt_ip_file(copy_tiny, damage):
    kolors, ip = copy_tiny
    f = ip / IP_WEIGHT_NAME
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:5000])
    elif damage == "garbage":
        f.write_bytes(b"not a weights file" * 100)
    else:  # an arbitrary object: weights_only loading must refuse to unpickle it
        torch.save({"image_proj": {}, "ip_adapter": {}, "x": slice(1, 2, 3)}, f)
    paths = ck.resolve(kolors, ip)
    with pytest.raises(ck.CheckpointError, match=str(f.name)):
        ck.load_ip_adapter(paths, ck.load_unet(paths))


@pytest.mark.parametrize("edit, message", [
    ("drop_resampler_key", "image_proj keys differ"),
    ("extra_resampler_key", "unexpected"),
    ("drop_ip_pair", "cross-attention layers"),
    ("extra_ip_pair", "cross-attention layers"),
    ("flat_dict", "two state dicts"),
])
def test_wrong_ip_key_sets(copy_tiny, edit, message):
    kolors, ip = copy_tiny
    f = ip / IP_WEIGHT_NAME
    state = torch.load(f, weights_only=True)
    if edit == "drop_resampler_key":
        del state["image_proj"]["layers.2.0.to_kv.weight"]
    elif edit == "extra_resampler_key":
        state["image_proj"]["layers.0.0.extra.weight"] = torch.zeros(1)
    elif edit == "drop_ip_pair":
        last = max(int(k.split(".")[0]) for k in state["ip_adapter"])
        del state["ip_adapter"][f"{last}.to_k_ip.weight"], state["ip_adapter"][f"{last}.to_v_ip.weight"]
    elif edit == "extra_ip_pair":
        state["ip_adapter"]["999.to_k_ip.weight"] = torch.zeros(1)
    else:
        state = state["image_proj"]
    torch.save(state, f)
    paths = ck.resolve(kolors, ip)
    with pytest.raises(ck.CheckpointError, match=message):
        ck.load_ip_adapter(paths, ck.load_unet(paths))


def test_precision_settings():
    assert resolve_precisions("fp16") == {"text_encoder": "fp16", "image_encoder": "fp16", "unet": "fp16",
                                          "vae_decoder": "fp32", "unet_shallow": "fp16"}
    # the shallow UNet takes the unet's feature: it follows the unet's precision, and cannot be set alone
    assert resolve_precisions("fp32", {"unet": "fp16"})["unet_shallow"] == "fp16"
    with pytest.raises(PrecisionError):
        resolve_precisions("bf16")
    with pytest.raises(PrecisionError):
        resolve_precisions("fp16", {"vae": "fp16"})
    with pytest.raises(PrecisionError, match="takes the unet's precision"):
        resolve_precisions("fp16", {"unet_shallow": "fp32"})


def test_cli_reports_errors_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kolors_trt", "export", "--weights", str(tmp_path / "x"),
                           "--ip-adapter", str(tmp_path), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "kolors-trt export: error: checkpoint: --weights" in proc.stderr
    assert "Traceback" not in proc.stderr
