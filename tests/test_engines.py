"""engines/: AOT builds with TensorRT-RTX on the CPU of tiny graphs that follow the spec.

The graphs are small torch modules with the exact input/output names, dtypes
and ranks of engine_specs(); fp16 components compute in fp16 inside and cast
at the edges, as the real export does.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import warnings
from pathlib import Path

import pytest

from kolors_trt.engines import targets
from kolors_trt.runtime.trt_logger import trt_logger
from kolors_trt.engines.builder import BUILT, UP_TO_DATE, build_engines
from kolors_trt.engines.cli import add_build_arguments, profile_from_args, run_build
from kolors_trt.engines.errors import BuilderNotInstalled, NetworkMismatchError, NoGpuError, OnnxParseError
from kolors_trt.runtime.artifacts import EngineFolderError
from kolors_trt.engines.manifest import profile_json, sha256_file, verify_engine_folder
from kolors_trt.runtime.spec import (
    ALL_COMPONENTS,
    COMPONENTS,
    DEFAULT_PRECISION,
    EXPORT_FORMAT,
    EXPORT_VERSION,
    DimRange,
    ModelDims,
    Profile,
    dim_values,
    dynamic_axes,
    engine_specs,
    sample_shapes,
    spec_hash,
    to_json,
    trt_profile,
)

pytest.importorskip("tensorrt_rtx")
torch = pytest.importorskip("torch")

DIMS = ModelDims(text_hidden=32, image_size=336, ip_tokens=16, cross_attention_dim=32)
PROFILE = Profile(DimRange(1, 1, 2), DimRange(256, 256, 512), DimRange(256, 384, 512))
STATIC = Profile.static(1, 256, 256)
RTX = "tensorrt-rtx"


# ---- tiny graphs following the spec ------------------------------------------------------------


def _modules(seed: int) -> dict:
    nn, F = torch.nn, torch.nn.functional
    torch.manual_seed(seed)
    H, T, D = DIMS.text_hidden, DIMS.ip_tokens, DIMS.cross_attention_dim

    class TextEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos, self.proj = nn.Embedding(64, H), nn.Embedding(DIMS.text_length, H), nn.Linear(H, H)

        def forward(self, input_ids, attention_mask, position_ids):
            h = (self.tok(input_ids) * attention_mask.unsqueeze(-1) + self.pos(position_ids)).half()
            h = self.proj(h)  # [B, 256, H] fp16
            return h.float(), h[:, -1].float()

    class ImageEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(3 * 8 * 8, T * D)

        def forward(self, pixel_values):
            x = F.adaptive_avg_pool2d(pixel_values.half(), 8).flatten(1)  # [B, 192]
            return self.proj(x).reshape(-1, T, D).float()

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.ctx = nn.Conv2d(4, 4, 3, padding=1), nn.Linear(H, 4)

        def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, ip_tokens, ip_scale):
            ctx = encoder_hidden_states.mean(1) + text_embeds + time_ids.sum(-1, keepdim=True)
            ctx = ctx + ip_scale[:, None] * ip_tokens.mean(1)  # [2B, H] (cross_attention_dim == text_hidden here)
            out = self.conv(sample.half()) + self.ctx(ctx.half())[:, :, None, None] + timestep.half()
            return out.float()  # [2B, 4, h, w]

    class VaeDecoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 3, 1)

        def forward(self, latents):
            return F.interpolate(self.conv(latents), scale_factor=DIMS.vae_scale, mode="nearest")  # [B, 3, 8h, 8w]

    mods = {"text_encoder": TextEncoder(), "image_encoder": ImageEncoder(), "unet": UNet(), "vae_decoder": VaeDecoder()}
    for name, m in mods.items():
        m.eval()
        if DEFAULT_PRECISION[name] == "fp16":
            m.half()
            if name == "text_encoder":
                m.tok.float(), m.pos.float()  # embeddings gather in fp32, then cast
    return mods


def _export(name: str, module, path: Path, rename: dict | None = None) -> None:
    spec = engine_specs(DIMS, PROFILE)[name]
    shapes = sample_shapes(spec, dim_values(spec, "min"))
    args = tuple(
        torch.zeros(shapes[t.name], dtype=torch.int64) if t.dtype == "int64" else torch.rand(shapes[t.name])
        for t in spec.inputs
    )
    rename = rename or {}
    names = lambda ts: [rename.get(t.name, t.name) for t in ts]  # noqa: E731
    axes = {rename.get(k, k): v for k, v in dynamic_axes(spec).items()}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(
            module, args, str(path), input_names=names(spec.inputs), output_names=names(spec.outputs),
            dynamic_axes=axes, opset_version=17, dynamo=False,
        )


def _write_export_folder(root: Path, seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    comps = {}
    for name, module in _modules(seed).items():
        _export(name, module, root / f"{name}.onnx")
        comps[name] = {"file": f"{name}.onnx", "precision": DEFAULT_PRECISION[name], "sha256": sha256_file(root / f"{name}.onnx")}
    (root / "manifest.json").write_text(json.dumps({"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "model_dims": to_json(DIMS),
                                                    "runtime": {"vae_scaling_factor": 0.13025}, "components": comps}))
    (root / "tokenizer").mkdir(exist_ok=True)
    (root / "tokenizer" / "tokenizer.model").write_bytes(b"tiny")
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "EulerDiscreteScheduler"}')
    return root


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory) -> Path:
    return _write_export_folder(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def built(onnx_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("engines")
    return out, build_engines(onnx_dir, out, target=RTX, profile=PROFILE)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rehash(root: Path, name: str) -> None:
    """Record a replaced graph's sha256 in the export manifest, as a re-export would."""
    m = json.loads((root / "manifest.json").read_text())
    m["components"][name]["sha256"] = sha256_file(root / f"{name}.onnx")
    (root / "manifest.json").write_text(json.dumps(m))


# ---- builds ---------------------------------------------------------------------------------


def test_dynamic_build_writes_a_complete_engine_folder(built, onnx_dir):
    out, results = built
    assert [r.component for r in results] == list(COMPONENTS)
    assert all(r.status == BUILT for r in results)
    m = verify_engine_folder(out)
    assert m["target"] == RTX and m["model_dims"] == to_json(DIMS) and m["profile"] == to_json(PROFILE)
    specs = engine_specs(DIMS, PROFILE)
    import tensorrt_rtx

    for name in COMPONENTS:
        e, plan = m["engines"][name], out / f"{name}.plan"
        assert e["spec_hash"] == spec_hash(specs[name])
        assert e["profile"] == profile_json(specs[name])
        assert {k: tuple(tuple(v[c]) for c in ("min", "opt", "max")) for k, v in e["profile"].items()} == trt_profile(specs[name])
        assert e["precision"] == DEFAULT_PRECISION[name]
        assert e["builder"] == {"name": "tensorrt_rtx", "version": tensorrt_rtx.__version__}
        assert e["compute_capabilities"] == list(targets.RTX_DEFAULT_COMPUTE_CAPABILITIES)
        assert e["plan_bytes"] == plan.stat().st_size > 0 and e["plan_sha256"] == sha256_file(plan)
        assert e["onnx_sha256"] == sha256_file(onnx_dir / f"{name}.onnx") and e["onnx_data_sha256"] is None
        assert e["build_seconds"] > 0 and len(e["cache_key"]) == 32
        assert e["options"]["tf32"] == (name == "vae_decoder") and e["options"]["refit"] is False
    unet = m["engines"]["unet"]["profile"]
    assert unet["sample"] == {"min": [1, 4, 32, 32], "opt": [2, 4, 32, 48], "max": [4, 4, 64, 64]}
    assert unet["encoder_hidden_states"]["max"] == [4, 256, 32]
    assert (out / "tokenizer" / "tokenizer.model").read_bytes() == b"tiny"
    assert (out / "scheduler" / "scheduler_config.json").is_file()


@pytest.mark.parametrize("precision, allowed", [("fp32", True), ("fp16", False)])
def test_tf32_only_for_the_fp32_vae(built, precision, allowed):
    """TensorRT allows TF32 by default: the builder must clear it except for the fp32 VAE."""
    import tensorrt_rtx as trt

    config = trt.Builder(trt_logger(trt)).create_builder_config()
    assert config.get_flag(trt.BuilderFlag.TF32)  # the default this guards against
    targets.get_target(RTX).set_tf32(trt, config, allowed)
    assert config.get_flag(trt.BuilderFlag.TF32) is allowed
    m = verify_engine_folder(built[0])
    assert {n: e["options"]["tf32"] for n, e in m["engines"].items()} == {
        "text_encoder": False, "image_encoder": False, "unet": False, "vae_decoder": True}


def test_parsed_network_io_equals_the_spec(onnx_dir):
    import tensorrt_rtx as trt

    from kolors_trt.engines.network import check_network, network_io, parse_onnx

    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    flags = targets.get_target(RTX).network_flags(trt)
    for name, spec in engine_specs(DIMS, PROFILE).items():
        network, _parser = parse_onnx(trt, builder, flags, onnx_dir / f"{name}.onnx", logger)
        check_network(trt, network, spec, onnx_dir / f"{name}.onnx")
        inputs, outputs = network_io(network)
        for tensors, expected in ((inputs, spec.inputs), (outputs, spec.outputs)):
            assert [t.name for t in tensors] == [t.name for t in expected]
            assert [t.dtype.name for t in tensors] == [{"float32": "FLOAT", "int64": "INT64"}[t.dtype] for t in expected]
            assert [len(t.shape) for t in tensors] == [len(t.shape) for t in expected]
            for t, ts in zip(tensors, expected):
                for size, entry in zip(t.shape, ts.shape):
                    assert size == entry if isinstance(entry, int) else size == -1


def _configure_vae(onnx_dir, monkeypatch, profile=None, config_wrapper=None, timing_cache=None):
    """builder._configure on the real TensorRT-RTX builder and the VAE graph."""
    import tensorrt_rtx as trt

    from kolors_trt.engines import builder as B
    from kolors_trt.engines.network import parse_onnx

    logger = trt_logger(trt)
    tb = trt.Builder(logger)
    tgt = targets.get_target(RTX)
    network, _parser = parse_onnx(trt, tb, tgt.network_flags(trt), onnx_dir / "vae_decoder.onnx", logger)
    spec = engine_specs(DIMS, PROFILE)["vae_decoder"]
    if profile is not None:
        monkeypatch.setattr(B, "trt_profile", lambda spec: profile)
    config = tb.create_builder_config()
    opts = B._Options(None, None, False, True, ())
    B._configure(trt, tgt, tb, config if config_wrapper is None else config_wrapper(config), network, spec, opts,
                 timing_cache)
    return config


def test_a_refused_optimisation_profile_is_a_build_error(onnx_dir, monkeypatch):
    from kolors_trt.engines.errors import EngineBuildError

    _configure_vae(onnx_dir, monkeypatch)  # the spec's own profile is accepted
    backwards = {"latents": ((1, 4, 16, 16), (1, 4, 8, 8), (1, 4, 4, 4))}  # max < min: TensorRT returns -1
    with pytest.raises(EngineBuildError, match="vae_decoder: tensorrt_rtx refused the optimisation profile"):
        _configure_vae(onnx_dir, monkeypatch, profile=backwards)


def test_a_refused_timing_cache_is_a_typed_error(onnx_dir, monkeypatch, tmp_path):
    """IBuilderConfig.set_timing_cache returns False for a cache of another GPU (TensorRT-RTX makes it a no-op
    that returns True, so the refusal is played by a config that answers as TensorRT does)."""
    from kolors_trt.engines.errors import TimingCacheError

    class OtherGpuCache:
        def __init__(self, config):
            self.config = config

        def __getattr__(self, name):
            return getattr(self.config, name)

        def set_timing_cache(self, cache, ignore_mismatch):
            return False

    path = tmp_path / "timing.cache"
    path.write_bytes(b"from another GPU")
    _configure_vae(onnx_dir, monkeypatch, timing_cache=path)  # accepted as it is
    with pytest.raises(TimingCacheError, match="refused the timing cache .*timing.cache"):
        _configure_vae(onnx_dir, monkeypatch, config_wrapper=OtherGpuCache, timing_cache=path)


def test_static_build(onnx_dir, tmp_path):
    results = build_engines(onnx_dir, tmp_path / "static", target=RTX, profile=STATIC, components=["unet", "vae_decoder"])
    assert [r.status for r in results] == [BUILT, BUILT]
    m = verify_engine_folder(tmp_path / "static")
    assert sorted(m["engines"]) == ["unet", "vae_decoder"]
    for shapes in m["engines"]["vae_decoder"]["profile"].values():
        assert shapes["min"] == shapes["opt"] == shapes["max"]
    # A static profile is exactly the CFG batch (2 x 1 image) at one size: what CUDA graphs need.
    for shapes in m["engines"]["unet"]["profile"].values():
        assert shapes["min"] == shapes["opt"] == shapes["max"]
    assert m["engines"]["unet"]["profile"]["sample"]["opt"] == [2, 4, 32, 32]
    assert m["engines"]["vae_decoder"]["profile"]["latents"]["opt"] == [1, 4, 32, 32]


def test_second_build_is_up_to_date_and_one_changed_graph_rebuilds_one_engine(built, onnx_dir, tmp_path, caplog):
    out = _copy(built[0], tmp_path / "engines")
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.plan")}
    with caplog.at_level(logging.INFO, logger="kolors_trt.engines"):
        again = build_engines(onnx_dir, out, target=RTX, profile=PROFILE)
    assert [r.status for r in again] == [UP_TO_DATE] * 4
    assert caplog.text.count("up to date") == 4
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.plan")} == stamps

    src = _copy(onnx_dir, tmp_path / "export")
    _export("vae_decoder", _modules(seed=1)["vae_decoder"], src / "vae_decoder.onnx")
    _rehash(src, "vae_decoder")
    third = build_engines(src, out, target=RTX, profile=PROFILE)
    assert {r.component: r.status for r in third} == {
        "text_encoder": UP_TO_DATE, "image_encoder": UP_TO_DATE, "unet": UP_TO_DATE, "vae_decoder": BUILT
    }
    verify_engine_folder(out)
    # Build options are part of the key.
    fourth = build_engines(src, out, target=RTX, profile=PROFILE, opt_level=0, components=["unet"])
    assert [r.status for r in fourth] == [BUILT]
    assert json.loads((out / "manifest.json").read_text())["engines"]["unet"]["options"]["opt_level"] == 0


def test_a_new_profile_drops_engines_built_for_the_old_one(built, onnx_dir, tmp_path):
    out = _copy(built[0], tmp_path / "engines")
    build_engines(onnx_dir, out, target=RTX, profile=STATIC, components=["vae_decoder"])
    m = verify_engine_folder(out)
    # The encoders run at batch 1 whatever the profile, so their engines stay.
    assert sorted(m["engines"]) == ["image_encoder", "text_encoder", "vae_decoder"]
    assert not (out / "unet.plan").exists()


# ---- verification ---------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "foreign", "flipped", "manifest", "missing", "assets"])
def test_verify_detects_a_damaged_engine_folder(built, tmp_path, damage):
    out = _copy(built[0], tmp_path / "engines")
    plan, mpath = out / "unet.plan", out / "manifest.json"
    data = plan.read_bytes()
    if damage == "truncated":
        plan.write_bytes(data[: len(data) // 2])
    elif damage == "foreign":  # same size, another file's bytes
        plan.write_bytes((b"\x08\x07\x12\x07pytorch" * len(data))[: len(data)])
    elif damage == "flipped":  # valid header and size, one byte changed
        plan.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    elif damage == "manifest":
        m = json.loads(mpath.read_text())
        m["engines"]["unet"]["plan_sha256"] = "0" * 64
        mpath.write_text(json.dumps(m))
    elif damage == "missing":
        plan.unlink()
    else:
        shutil.rmtree(out / "tokenizer")
    with pytest.raises(EngineFolderError) as e:
        verify_engine_folder(out)
    assert ("tokenizer" if damage == "assets" else "unet") in str(e.value)


def test_verify_detects_a_manifest_for_another_profile(built, tmp_path):
    out = _copy(built[0], tmp_path / "engines")
    m = json.loads((out / "manifest.json").read_text())
    m["profile"]["batch"]["max"] = 8
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineFolderError, match="spec_hash"):
        verify_engine_folder(out)


def test_a_damaged_plan_is_rebuilt(built, onnx_dir, tmp_path):
    out = _copy(built[0], tmp_path / "engines")
    (out / "image_encoder.plan").write_bytes(b"vtrt")
    results = build_engines(onnx_dir, out, target=RTX, profile=PROFILE)
    assert [r.component for r in results if r.status == BUILT] == ["image_encoder"]
    verify_engine_folder(out)


# ---- errors ---------------------------------------------------------------------------------


def test_missing_builder_names_the_pip_extra(onnx_dir, tmp_path, monkeypatch):
    def no_module(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(targets.importlib, "import_module", no_module)
    with pytest.raises(BuilderNotInstalled, match=r"pip install 'kolors-trt\[tensorrt-rtx\]'"):
        build_engines(onnx_dir, tmp_path / "e", target=RTX, profile=PROFILE)
    monkeypatch.setattr(targets.Target, "installed", lambda self: False)
    with pytest.raises(BuilderNotInstalled, match=r"kolors-trt\[tensorrt-rtx\].*kolors-trt\[tensorrt\]"):
        targets.default_target_name()


def test_tensorrt_without_gpu_suggests_rtx(monkeypatch):
    monkeypatch.setattr(targets, "gpu_available", lambda: False)
    with pytest.raises(NoGpuError, match="--target tensorrt-rtx"):
        targets.get_target("tensorrt").check_host()
    targets.get_target(RTX).check_host()  # AOT: no GPU needed
    monkeypatch.setattr(targets.Target, "installed", lambda self: self.name == RTX)
    assert targets.default_target_name() == RTX


@pytest.mark.skipif(targets.gpu_available(), reason="checks the CPU-only refusal")
def test_refit_with_rtx_on_cpu_is_refused_early(onnx_dir, tmp_path):
    with pytest.raises(NoGpuError, match="--refit"):
        build_engines(onnx_dir, tmp_path / "e", target=RTX, profile=PROFILE, refit=True)


@pytest.mark.gpu
@pytest.mark.skipif(not targets.gpu_available(), reason="needs an NVIDIA GPU")
def test_refit_builds_the_lora_components_with_their_maps(onnx_fp16, tmp_path):
    from kolors_trt.engines.manifest import verify_engine_folder
    from kolors_trt.runtime.spec import DimRange, Profile

    out = tmp_path / "engines"
    profile = Profile(DimRange(1, 1, 2), DimRange(64, 64, 128), DimRange(64, 96, 128))
    results = build_engines(onnx_fp16, out, target=RTX, profile=profile, refit=True, components=["unet", "text_encoder"])
    assert sorted(r.component for r in results if r.status == BUILT) == ["text_encoder", "unet"]
    engines = verify_engine_folder(out)["engines"]
    for name in ("unet", "text_encoder"):
        assert engines[name]["options"]["refit"] == "lora-map"
        assert (out / engines[name]["lora_map"]).is_file() and (out / engines[name]["lora_base"]).is_file()


def test_refittable_weights_come_from_the_lora_map(onnx_dir, onnx_fp16):
    from kolors_trt.engines.errors import EngineBuildError
    from kolors_trt.engines.lora import refittable_weights
    from kolors_trt.runtime.artifacts import read_export_folder

    with pytest.raises(EngineBuildError, match="has no LoRA map"):
        refittable_weights(read_export_folder(onnx_dir).components["unet"])
    unet = read_export_folder(onnx_fp16).components["unet"]
    targets = json.loads(unet.lora_map.read_text())["targets"]
    assert refittable_weights(unet) == sorted(t["initializer"] for t in targets.values())


def test_wrong_input_name_is_a_network_mismatch(onnx_dir, tmp_path):
    src = _copy(onnx_dir, tmp_path / "export")
    _export("vae_decoder", _modules(0)["vae_decoder"], src / "vae_decoder.onnx", rename={"latents": "latent"})
    _rehash(src, "vae_decoder")
    with pytest.raises(NetworkMismatchError, match=r"input 'latents' is missing") as e:
        build_engines(src, tmp_path / "e", target=RTX, profile=PROFILE, components=["vae_decoder"])
    assert "'latent' is not in the spec" in str(e.value)


def test_graph_fixed_where_the_spec_is_dynamic_is_a_mismatch(onnx_dir, tmp_path):
    src = _copy(onnx_dir, tmp_path / "export")
    spec = engine_specs(DIMS, PROFILE)["vae_decoder"]
    with torch.no_grad(), warnings.catch_warnings():  # no dynamic axes: batch and latent size fixed
        warnings.simplefilter("ignore")
        torch.onnx.export(_modules(0)["vae_decoder"], (torch.rand(1, 4, 32, 32),), str(src / "vae_decoder.onnx"),
                          input_names=spec.input_names, output_names=spec.output_names, dynamo=False)
    _rehash(src, "vae_decoder")
    with pytest.raises(NetworkMismatchError, match=r"input 'latents' axis 2 \(latent_height\) is fixed to 32"):
        build_engines(src, tmp_path / "e", target=RTX, profile=PROFILE, components=["vae_decoder"])


def test_unparseable_graph_lists_parser_errors(onnx_dir, tmp_path, caplog):
    import onnx
    from onnx import TensorProto, helper

    src = _copy(onnx_dir, tmp_path / "export")
    node = helper.make_node("NoSuchOp", ["latents"], ["image"], name="bogus_node", domain="kolors.test")
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("latents", TensorProto.FLOAT, ["batch", 4, "h", "w"])],
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, "H", "W"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("kolors.test", 1)])
    onnx.save(model, src / "vae_decoder.onnx")
    _rehash(src, "vae_decoder")
    with caplog.at_level(logging.ERROR), pytest.raises(OnnxParseError, match="bogus_node"):
        build_engines(src, tmp_path / "e", target=RTX, profile=PROFILE, components=["vae_decoder"])
    assert "bogus_node" in caplog.text


# ---- CLI ------------------------------------------------------------------------------------


def _args(argv):
    return add_build_arguments(argparse.ArgumentParser()).parse_args(argv)


def test_cli_profiles():
    base = ["--onnx", "x", "--out", "y"]
    assert profile_from_args(_args(base)) == Profile.from_sizes(
        ((1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344))
    )
    p = profile_from_args(_args(base + ["--batch", "1:2:3", "--size", "768x1024", "--size", "1024x768"]))
    assert p == Profile(DimRange(1, 2, 3), DimRange(768, 768, 1024), DimRange(768, 1024, 1024))
    assert profile_from_args(_args(base + ["--static", "--batch", "2", "--size", "832x1216"])) == Profile.static(2, 832, 1216)
    p = profile_from_args(_args(base + ["--size-range", "512x512:1536x1536"]))
    assert p.height == DimRange(512, 1024, 1536) and p.width == DimRange(512, 1024, 1536)


def test_cli_build_then_up_to_date(onnx_dir, tmp_path, capsys):
    base = ["--onnx", str(onnx_dir), "--out", str(tmp_path / "e"), "--target", RTX, "--static", "--batch", "1",
            "--components", "vae_decoder", "--opt-level", "0", "--workspace-gib", "1"]
    argv = base + ["--size", "256x256"]
    assert run_build(_args(argv)) == 0
    first = capsys.readouterr().out
    assert "vae_decoder" in first and "built" in first and "static 1x4x32x32" in first
    assert run_build(_args(argv)) == 0
    assert "up-to-date" in capsys.readouterr().out
    # every failure is typed and reaches the one CLI handler: one line on stderr, exit 1
    from kolors_trt.cli import main

    for argv, message in [(base + ["--size", "250x256"], "multiple of 32"),
                          (base + ["--size", "256x256", "--size", "512x512"], "--static builds one shape"),
                          (["--onnx", str(tmp_path / "nowhere"), "--out", str(tmp_path / "e2"), "--target", RTX],
                           "manifest.json is missing"),
                          (base + ["--size", "256x256", "--compute-capability", "eight"], "is not like 8.6")]:
        assert main(["build", *argv]) == 1
        err = capsys.readouterr().err
        assert err.startswith("kolors-trt build: error: ") and message in err and err.count("\n") == 1, err


def test_target_errors_are_typed():
    from kolors_trt.engines.errors import TargetError
    from kolors_trt.runtime.errors import InputError

    with pytest.raises(TargetError, match="unknown target 'cuda'"):
        targets.get_target("cuda")
    with pytest.raises(TargetError, match="is not like 8.6"):
        targets.normalize_compute_capability("sm_x")
    with pytest.raises(TargetError, match="--compute-capability applies to --target tensorrt-rtx"):
        targets.get_target("tensorrt").set_compute_capabilities(None, None, ["8.9"])
    assert issubclass(TargetError, InputError)


# ---- with the real exporter ---------------------------------------------------------------


@pytest.mark.slow
def test_real_export_of_the_tiny_checkpoint_builds(tmp_path):
    """kolors_trt.export's graphs of the tiny checkpoint parse, match the spec and build (about 20 s), DeepCache's
    shallow UNet among them."""
    pytest.importorskip("diffusers")
    from kolors_trt.export.exporter import export_all, resolve_precisions
    from kolors_trt.export.tiny import write_tiny

    weights, ip = write_tiny(tmp_path / "ckpt")
    export_all(weights, ip, tmp_path / "onnx", resolve_precisions(), progress=False)
    results = build_engines(tmp_path / "onnx", tmp_path / "engines", target=RTX, profile=STATIC)
    assert [(r.component, r.status) for r in results] == [(name, BUILT) for name in ALL_COMPONENTS]
    m = verify_engine_folder(tmp_path / "engines")
    exported = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    assert m["model_dims"] == exported["model_dims"]
    for name, e in m["engines"].items():
        assert e["precision"] == exported["components"][name]["precision"]
        assert e["onnx_sha256"] == exported["components"][name]["sha256"]
        assert e["onnx_data_sha256"] == exported["components"][name].get("external_data_sha256")


# ---- GPU ------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not targets.gpu_available(), reason="needs an NVIDIA GPU")
def test_tensorrt_build_on_gpu(onnx_dir, tmp_path):
    pytest.importorskip("tensorrt")
    cache = tmp_path / "timing.cache"
    results = build_engines(onnx_dir, tmp_path / "e", target="tensorrt", profile=PROFILE, timing_cache=cache)
    assert all(r.status == BUILT for r in results) and cache.stat().st_size > 0
    m = verify_engine_folder(tmp_path / "e")
    assert m["engines"]["unet"]["compute_capabilities"] == [targets.device_compute_capability()]
    assert os.path.getsize(tmp_path / "e" / "unet.plan") == m["engines"]["unet"]["plan_bytes"]
