"""LoRA files and bad input, without running an engine: kohya SGM names against diffusers' own conversion
at Kolors' real layout, bf16 against torch, every refusal typed and naming the key, and a failed load
that changes nothing. The adapters are checked against the tiny fp32 export's LoRA maps."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kolors_trt.runtime.folder import read_folder
from kolors_trt.runtime.lora import LoraError, LoraManager, check_layer
from kolors_trt.runtime.lora_files import LoraLayer, read_safetensors, sgm_to_diffusers
from kolors_trt.runtime.lora_map import LoraMap, LoraUnavailableError

import lora_support as support

TO_Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # [64, 64] in the default tiny UNet
CONV = "down_blocks.0.resnets.0.conv1"  # [32, 32, 3, 3]


@pytest.fixture(scope="module")
def manager(onnx_fp32):
    return LoraManager(read_folder(onnx_fp32), engines={})


def peft_file(path: Path, tensors: dict) -> Path:
    save_file({k: torch.as_tensor(v).contiguous() for k, v in tensors.items()}, str(path))
    return path


def good(rank: int = 2) -> dict:
    g = torch.Generator().manual_seed(0)
    return {f"unet.{TO_Q}.lora_A.weight": torch.randn(rank, 64, generator=g),
            f"unet.{TO_Q}.lora_B.weight": torch.randn(64, rank, generator=g)}


def unchanged(manager: LoraManager):
    return dict(manager.adapters), manager.default


def test_kohya_sgm_names_map_as_diffusers_maps_them():
    """Every module of Kolors' real UNet in SGM's kohya naming -> diffusers' module, as diffusers'
    _maybe_map_sgm_blocks_to_diffusers + _convert_unet_lora_key + convert_unet_state_dict_to_peft place it."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers, \
        _maybe_map_sgm_blocks_to_diffusers
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    from kolors_trt.export.fullsize import FULL
    from kolors_trt.export.tiny import build_unet

    with torch.device("meta"):
        unet = build_unet(FULL, 4096)
    modules = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    attention = [n for n in modules if ".attentions." in n]
    assert len(attention) == 70 * 10 + 11 * 2  # 70 transformer blocks of 10 linears, 11 proj_in/proj_out pairs
    placed = 0
    for module in modules:
        name = support.kohya_name(module, FULL.unet_layers, sgm=True)
        assert sgm_to_diffusers(name[len("lora_unet_"):], FULL.unet_layers) == module.replace(".", "_")
        state = {f"{name}.lora_down.weight": torch.zeros(1), f"{name}.lora_up.weight": torch.zeros(1)}
        try:
            state = _maybe_map_sgm_blocks_to_diffusers(state, unet.config)
            converted, _ = _convert_non_diffusers_lora_to_diffusers(state)
        except ValueError:
            assert ".attentions." not in module  # diffusers places every attention module
            continue
        key = next(iter(convert_unet_state_dict_to_peft({k[len("unet."):]: v for k, v in converted.items()})))
        if key.rpartition(".lora_")[0] in modules:
            assert key.rpartition(".lora_")[0] == module
            placed += 1
    assert placed >= len(attention)


def test_bf16_reads_as_torch_converts(tmp_path):
    t = torch.randn(5, 7).to(torch.bfloat16)
    save_file({"x": t, "y": torch.ones(3, dtype=torch.float16)}, str(tmp_path / "m.safetensors"))
    tensors, _ = read_safetensors(tmp_path / "m.safetensors")
    np.testing.assert_array_equal(tensors["x"], t.float().numpy())
    assert tensors["y"].dtype == np.float16


def test_scale_and_layout(manager, tmp_path):
    """alpha / rank from diffusers' metadata; a conv LoRA's down and up keep their 4-D shapes."""
    import json

    g = torch.Generator().manual_seed(1)
    tensors = {**good(4), f"unet.{CONV}.lora_A.weight": torch.randn(4, 32, 3, 3, generator=g),
               f"unet.{CONV}.lora_B.weight": torch.randn(32, 4, 1, 1, generator=g)}
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 6, "unet.alpha_pattern": {"conv1": 2}})}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "s.safetensors"), metadata=meta)
    name = manager.load(tmp_path / "s.safetensors", adapter_name="scaled")
    try:
        layers = manager.adapters[name].layers["unet"]
        assert layers[TO_Q].scale == pytest.approx(6 / 4) and layers[CONV].scale == pytest.approx(2 / 4)
        assert layers[CONV].down.shape == (4, 32, 3, 3)
    finally:
        manager.adapters.pop(name)
        manager.default = ()


@pytest.mark.parametrize("case, tensors, match", [
    ("non-finite", {f"unet.{TO_Q}.lora_A.weight": torch.full((2, 64), math.nan),
                    f"unet.{TO_Q}.lora_B.weight": torch.ones(64, 2)}, rf"'unet\.{TO_Q}\.lora_A\.weight' holds NaN"),
    ("shape", {f"unet.{TO_Q}.lora_A.weight": torch.ones(2, 48), f"unet.{TO_Q}.lora_B.weight": torch.ones(64, 2)},
     r"lora_A\.weight: unet .*to_q is \[64, 64\] in this model; the file's down \[2, 48\] and up \[64, 2\] make \[64, 48\]"),
    ("unplaceable", {"unet.no_such_block.to_q.lora_A.weight": torch.ones(2, 64),
                     "unet.no_such_block.to_q.lora_B.weight": torch.ones(64, 2)},
     r"cannot place key 'unet\.no_such_block\.to_q\.lora_A\.weight'"),
    ("not lora", {"unet.conv_in.weight": torch.ones(2, 2)}, r"cannot place key 'unet\.conv_in\.weight'"),
    ("half pair", {f"unet.{TO_Q}.lora_A.weight": torch.ones(2, 64)}, r"has no matching up weight"),
    ("dora", {**good(), f"unet.{TO_Q}.lora_magnitude_vector": torch.ones(64)}, r"DoRA"),
    ("integer", {f"unet.{TO_Q}.lora_A.weight": torch.ones(2, 64, dtype=torch.int32),
                 f"unet.{TO_Q}.lora_B.weight": torch.ones(64, 2)}, r"dtype int32, expected floating point"),
    ("kohya te2", {"lora_te2_text_model_x.lora_down.weight": torch.ones(2, 4),
                   "lora_te2_text_model_x.lora_up.weight": torch.ones(4, 2)}, r"second text encoder"),
])
def test_bad_files_are_refused_and_change_nothing(manager, tmp_path, case, tensors, match):
    before = unchanged(manager)
    path = peft_file(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(LoraError, match=match):
        manager.load(path, adapter_name="bad")
    assert unchanged(manager) == before


def test_files_that_are_not_safetensors(manager, tmp_path):
    before = unchanged(manager)
    pickled = tmp_path / "x.bin"
    torch.save(good(), pickled)
    with pytest.raises(LoraError, match=r"only \.safetensors files are read"):
        manager.load(pickled)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(LoraError, match="not a readable .safetensors file"):
        manager.load(tmp_path / "junk.safetensors")
    with pytest.raises(LoraError, match="does not exist"):
        manager.load(tmp_path / "missing.safetensors")
    with pytest.raises(LoraError, match="holds neither"):
        manager.load(tmp_path)
    assert unchanged(manager) == before


def test_size_limit(onnx_fp32, tmp_path):
    m = LoraManager(read_folder(onnx_fp32), engines={}, max_file_bytes=1000)
    path = peft_file(tmp_path / "big.safetensors", good(8))
    with pytest.raises(LoraError, match=r"MiB, over the limit of"):
        m.load(path)
    assert m.adapters == {}


def test_names_and_weights(manager, tmp_path):
    path = peft_file(tmp_path / "ok.safetensors", good())
    before = unchanged(manager)
    name = manager.load(path, adapter_name="ok")
    try:
        assert manager.default == ((manager.adapters["ok"], 1.0),)  # diffusers activates the adapter it loaded
        with pytest.raises(LoraError, match="already in use"):
            manager.load(path, adapter_name="ok")
        with pytest.raises(LoraError, match="unknown adapter 'nope'"):
            manager.resolve({"nope": 1.0})
        for weight in (math.inf, math.nan, "1", True, None):
            with pytest.raises(LoraError, match="must be a finite number"):
                manager.resolve({"ok": weight})
        for value in (["ok"], (("ok", 1.0),), ((manager.adapters["ok"], 1),)):  # only a resolved set passes as a tuple
            with pytest.raises(LoraError, match="must be a mapping"):
                manager.resolve(value)
        resolved = manager.resolve({"ok": 0.5})
        assert manager.resolve(resolved) is resolved
        assert manager.resolve({"ok": 0}) == ()  # weight 0 is the base model
        assert manager.key(manager.resolve({"ok": 0.5}), "unet") == ((manager.adapters["ok"].sha256, 0.5),)
        assert manager.key(manager.resolve({"ok": 0.5}), "text_encoder") is None
    finally:
        manager.adapters.pop(name)
        manager.default = before[1]


def test_lora_dir_names_stay_inside(onnx_fp32, tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    peft_file(folder / "style.safetensors", good())
    outside = peft_file(tmp_path / "secret.safetensors", good())
    os.symlink(outside, folder / "escape.safetensors")
    m = LoraManager(read_folder(onnx_fp32), engines={}, lora_dir=folder)
    assert [(i["id"], i["loaded"]) for i in m.list()] == [("style", False)]  # the escaping link is not listed
    for name, match in (("../secret", "not an adapter name"), ("/etc/passwd", "not an adapter name"),
                        ("escape", "unknown adapter 'escape'"), ("absent", "unknown adapter 'absent'")):
        with pytest.raises(LoraError, match=match):
            m.resolve({name: 1.0})
    ((adapter, weight),) = m.resolve({"style": 0.5})  # loaded and hashed on first use
    assert adapter.name == "style" and weight == 0.5 and len(adapter.sha256) == 64
    assert [(i["id"], i["loaded"]) for i in m.list()] == [("style", True)]



def test_concurrent_first_uses_read_the_file_once(onnx_fp32, tmp_path):
    """Requests naming a file not yet loaded, at once: one reads it (bounded memory), all get that adapter."""
    import threading

    folder = tmp_path / "loras"
    folder.mkdir()
    peft_file(folder / "style.safetensors", good())
    m = LoraManager(read_folder(onnx_fp32), engines={}, lora_dir=folder)
    reads, real_read, start = [], m._read, threading.Barrier(4)

    def counted(*args):
        reads.append(args[-1])
        return real_read(*args)

    m._read = counted
    got = []

    def use():
        start.wait(timeout=30)
        got.append(m.adapter("style"))

    threads = [threading.Thread(target=use) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert reads == ["style"] and len(got) == 4 and all(a is got[0] for a in got)

def test_components_without_a_usable_map():
    layer = LoraLayer("unet", TO_Q, np.ones((2, 64), np.float32), np.ones((64, 2), np.float32), 1.0, "k")
    with pytest.raises(LoraUnavailableError, match="no LoRA map for its unet"):
        check_layer("x", layer, None)
    quantized = LoraMap("unet", False, "the unet graph is int8: its weights are not plain fp16/fp32 tensors", {})
    with pytest.raises(LoraUnavailableError, match="cannot apply to the unet: the unet graph is int8"):
        check_layer("x", layer, quantized)
