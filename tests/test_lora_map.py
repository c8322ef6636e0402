"""The export's LoRA maps against the torch modules they were made from: every LoRA-able weight of the
UNet and ChatGLM is found, in the right initializer, layout and bytes, at both precisions (every export,
the alt preset's included, fails if its map is incomplete); a weight shared by two modules or changed by
the graph cleanup fails the export; a map that differs from its manifest hash is refused at load."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from kolors_trt.export.lora_map import build_lora_map, fingerprints, lora_modules
from kolors_trt.export.onnx_export import ExportError
from kolors_trt.runtime.folder import StaleArtifactError, read_folder


def torch_weights(kolors, component: str) -> dict:
    """{module name: fp32 weight} of the checkpoint's LoRA-able modules, read with diffusers."""
    if component == "unet":
        from diffusers import UNet2DConditionModel

        model = UNet2DConditionModel.from_pretrained(kolors / "unet")
        kinds, keep = (torch.nn.Linear, torch.nn.Conv2d), lambda n: True
    else:
        from diffusers.pipelines.kolors.text_encoder import ChatGLMModel

        model = ChatGLMModel.from_pretrained(kolors / "text_encoder")
        kinds, keep = (torch.nn.Linear,), lambda n: n.startswith("encoder.")
    return {n: m.weight.detach().numpy() for n, m in model.named_modules() if isinstance(m, kinds) and keep(n)}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("preset", ["default"])  # the alt preset's exports build their maps too (test_export)
def test_map_holds_every_weight_where_it_says(store, preset, precision):
    kolors, _ = store.tiny(preset)
    folder = store.export(preset, precision)[0]
    manifest = json.loads((folder / "manifest.json").read_text())
    for component in ("unet", "text_encoder"):
        entry = manifest["components"][component]
        m = json.loads((folder / entry["lora_map"]).read_text())
        assert m["supported"] and m["graph_sha256"] == entry["sha256"] and m["precision"] == precision
        want = torch_weights(kolors, component)
        assert set(m["targets"]) == set(want)
        dtype = np.float16 if precision == "fp16" else np.float32
        layouts = set()
        for module, t in m["targets"].items():
            stored = np.memmap(folder / t["file"], dtype=t["dtype"], mode="r", offset=t["offset"], shape=tuple(t["shape"]))
            weight = want[module].astype(dtype)
            np.testing.assert_array_equal(stored.T if t["transpose"] else stored, weight, err_msg=module)
            assert t["module_shape"] == list(weight.shape) and t["scale"] == 1.0
            layouts.add(t["transpose"])
        if component == "unet":
            assert layouts == {True, False}  # MatMul (W^T) and Gemm / Conv (W) initializers both occur


class Two(torch.nn.Module):
    def __init__(self, same: bool):
        super().__init__()
        self.unet = torch.nn.Module()
        self.unet.a = torch.nn.Linear(8, 8, bias=False)
        self.unet.b = torch.nn.Linear(8, 8, bias=False)
        if same:
            self.unet.b.weight.data.copy_(self.unet.a.weight.data)

    def forward(self, x):
        return self.unet.b(self.unet.a(x).relu())


def test_a_weight_two_modules_share_fails_the_export():
    with pytest.raises(ExportError, match="'a' and 'b' hold the same weight"):
        fingerprints(Two(same=True), "unet")


def test_a_weight_the_graph_does_not_hold_fails_the_export(tmp_path):
    module = Two(same=False)
    prints = fingerprints(module, "unet")
    assert set(name for name, _ in prints.values()) == set(lora_modules(module, "unet")) == {"a", "b"}
    path = tmp_path / "two.onnx"
    torch.onnx.export(module, (torch.randn(2, 8),), str(path), dynamo=False)
    assert set(build_lora_map(prints, path, "unet", "fp32")["targets"]) == {"a", "b"}
    with torch.no_grad():
        module.unet.b.weight.mul_(2)  # as if the cleanup had folded a scale into it
    with pytest.raises(ExportError, match=r"incomplete: 1 module weight\(s\) found in no initializer \(b\)"):
        build_lora_map(fingerprints(module, "unet"), path, "unet", "fp32")


def test_a_changed_map_is_refused_at_load(onnx_fp32, tmp_path):
    folder = tmp_path / "onnx"
    shutil.copytree(onnx_fp32, folder)
    path = folder / "unet.lora.json"
    m = json.loads(path.read_text())
    first = next(iter(m["targets"]))
    m["targets"][first]["offset"] += 4
    path.write_text(json.dumps(m))
    with pytest.raises(StaleArtifactError, match="unet.lora.json"):
        read_folder(folder)


def test_engine_folder_lora_files_are_verified(standin_engines, onnx_fp32, tmp_path):
    """A --refit engine folder carries each LoRA component's map and base weights with their sha256 (written by
    engines/lora.py); the base values are the export's, and a changed file is refused by both readers."""
    from kolors_trt.engines.manifest import EngineFolderError, verify_engine_folder
    from kolors_trt.runtime.artifacts import read_engine_manifest
    from kolors_trt.runtime.lora import LoraManager
    from kolors_trt.runtime.spec import DimRange, Profile

    built = standin_engines(Profile(DimRange(1, 1, 2), DimRange(64, 64, 128), DimRange(64, 96, 128)), refit=True)
    folder = tmp_path / "engines"
    shutil.copytree(built, folder)
    manifest = read_engine_manifest(folder)
    assert {n for n, e in manifest["engines"].items() if "lora_map" in e} == {"unet", "text_encoder"}
    maps = LoraManager(read_folder(folder), engines={}).maps
    exported = LoraManager(read_folder(onnx_fp32), engines={}).maps
    for component, m in maps.items():
        assert m.supported and all(t.file.name == f"{component}.lora.bin" for t in m.targets.values())
        assert set(m.targets) == set(exported[component].targets)
        for module, t in m.targets.items():
            np.testing.assert_array_equal(t.base(), exported[component].targets[module].base())
    bin_file = folder / manifest["engines"]["unet"]["lora_base"]
    data = bytearray(bin_file.read_bytes())
    data[-1] ^= 0xFF
    bin_file.write_bytes(bytes(data))
    with pytest.raises(StaleArtifactError, match="unet.lora.bin"):
        read_folder(folder)
    with pytest.raises(EngineFolderError, match="unet: LoRA file unet.lora.bin is missing or differs"):
        verify_engine_folder(folder)  # (it also reports the stand-in's plans, which lack TensorRT's header)
