"""LoRA on the runtime (ONNX Runtime, fp32 graphs of the tiny checkpoint) against diffusers'
KolorsPipeline + load_ip_adapter + load_lora_weights + set_adapters: one adapter, two at once,
kohya-style files of the same weights (diffusers' and SGM's block names), a UNet + ChatGLM
adapter and Kolors' dreambooth folder layout; exact switching; batches mixing adapter sets;
a LoRA of another model refused with the base image unchanged. The diffusers reference is
loaded once for the module and every reference image is computed in one fixture.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from kolors_trt.runtime.lora import LoraError
from kolors_trt.runtime.pipeline import GenerationRequest, Pipeline
from kolors_trt.runtime.spec import DimRange, Profile

import lora_support as support
# the parity helpers: a scheduler swapped in as a diffusers user does, its dynamic-CFG callback
import kolors_parity as sampler_checks

pytestmark = pytest.mark.slow

LAYERS_PER_BLOCK = 1  # the default tiny UNet's
CASE = dict(prompt="a red fox in the snow", height=64, width=96, steps=3, guidance_scale=5.0, ip_adapter_scale=0.5,
            seed=3)
FP16_PSNR_DB = 50.0  # measured 55.9 dB with a (0.8) + b (0.5) on the tiny checkpoint; the floor of test_pipeline


def reference_image() -> Image.Image:
    rng = np.random.default_rng(5)
    return Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="module")
def loras(tiny, store, tmp_path_factory):
    """{name: path} of the test adapters (see lora_support.py)."""
    kolors, _ = tiny
    root = tmp_path_factory.mktemp("loras")
    s = support
    a = s.unet_lora(kolors / "unet", seed=1)  # attention, FF and proj linears; r 4, alpha 8 (scale 2)
    b = s.unet_lora(kolors / "unet", seed=2, targets=s.CONV_TARGETS, r=3, alpha=3, alpha_pattern={"conv1": 6})
    c_unet = s.unet_lora(kolors / "unet", seed=4, targets=["to_k", "to_v", "to_out.0"], r=2, alpha=2)
    c_model, c_text, c_config = s.text_lora(kolors / "text_encoder", seed=3)
    alt = store.tiny("alt")[0] / "unet"
    other = s.unet_lora(alt, seed=5)  # the same format, another model's layout
    # one module both models have, with another cross-attention width: 96 inputs here, 64 in the default UNet
    other_shapes = s.unet_lora(alt, seed=6, targets=r"mid_block\.attentions\.0\.transformer_blocks\.0\.attn2\.to_k")
    files = {
        "a": s.save_diffusers(root / "a", unet=a),
        "b": s.save_diffusers(root / "b", unet=b),
        "c": s.save_diffusers(root / "c", unet=c_unet, text=(c_text, c_config)),
        "a_kohya": s.save_kohya(root / "a_kohya.safetensors", a[0], 8, LAYERS_PER_BLOCK, sgm=False),
        "a_sgm": s.save_kohya(root / "a_sgm.safetensors", a[0], 8, LAYERS_PER_BLOCK, sgm=True),
        "other": s.save_diffusers(root / "other", unet=other),
        "other_shapes": s.save_diffusers(root / "other_shapes", unet=other_shapes),
    }
    # Kolors' dreambooth script: the UNet via save_lora_weights, ChatGLM as a PEFT adapter, in one folder
    dreambooth = root / "c_dreambooth"
    s.save_diffusers(dreambooth, unet=c_unet)
    c_model.save_pretrained(dreambooth)
    files["c_dreambooth"] = dreambooth
    return files


@pytest.fixture(scope="module")
def lora_reference(tiny):
    """diffusers' KolorsPipeline + load_ip_adapter; ``reference`` loads the adapters into it. A pipeline of this
    module's own: unload_lora_weights does not give the session's shared reference its bits back (measured: its
    base image changed after loading and unloading these adapters)."""
    from diffusers import KolorsPipeline
    from transformers import CLIPVisionModelWithProjection
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    kolors, ip = tiny
    pipe = KolorsPipeline.from_pretrained(
        kolors, image_encoder=CLIPVisionModelWithProjection.from_pretrained(ip / "image_encoder"),
        feature_extractor=CLIPImageProcessorPil.from_pretrained(ip / "image_encoder"))
    pipe.load_ip_adapter(str(ip), subfolder="", weight_name="ip_adapter_plus_general.bin", image_encoder_folder=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def reference(lora_reference, loras):
    """diffusers' uint8 images: {"base", "a", "a+b", "a_kohya", "a_sgm", "c"}; afterwards ``lora_reference`` holds
    adapters a, b, c, a_kohya and a_sgm."""
    import torch

    pipe = lora_reference
    pipe.set_ip_adapter_scale(CASE["ip_adapter_scale"])

    def run():
        with torch.no_grad():
            image = pipe(CASE["prompt"], ip_adapter_image=reference_image(), height=CASE["height"],
                         width=CASE["width"], num_inference_steps=CASE["steps"], guidance_scale=CASE["guidance_scale"],
                         generator=torch.Generator().manual_seed(CASE["seed"])).images[0]
        return np.asarray(image, dtype=np.int16)

    images = {"base": run()}
    for name in ("a", "b", "c", "a_kohya"):
        pipe.load_lora_weights(str(loras[name]), adapter_name=name)
    pipe.load_lora_weights(str(loras["a_sgm"]), adapter_name="a_sgm", unet_config=pipe.unet.config)
    for label, names, weights in (("a", ["a"], [0.8]), ("a+b", ["a", "b"], [0.8, 0.5]), ("a_kohya", ["a_kohya"], [0.8]),
                                  ("a_sgm", ["a_sgm"], [0.8]), ("c", ["c"], [0.7])):
        pipe.set_adapters(names, weights)
        images[label] = run()
    return images


@pytest.fixture(scope="module")
def pipe(onnx_fp32, loras):
    p = Pipeline.load(onnx_fp32)
    for name in ("a", "b", "c", "a_kohya", "a_sgm"):
        p.load_lora_weights(loras[name], adapter_name=name)
    p.set_adapters([])
    return p


def generate(pipe: Pipeline, loras, **extra) -> np.ndarray:
    g = pipe.generate(CASE["prompt"], reference_image(), height=CASE["height"], width=CASE["width"],
                      num_inference_steps=CASE["steps"], guidance_scale=CASE["guidance_scale"],
                      ip_adapter_scale=CASE["ip_adapter_scale"], seed=CASE["seed"], loras=loras, **extra)
    return np.asarray(g.images[0], dtype=np.int16)


def level_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.mark.parametrize("label, chosen", [("base", {}), ("a", {"a": 0.8}), ("a+b", {"a": 0.8, "b": 0.5}),
                                          ("a_kohya", {"a_kohya": 0.8}), ("a_sgm", {"a_sgm": 0.8}),
                                          ("c", {"c": 0.7})])
def test_image_equals_diffusers(pipe, reference, label, chosen):
    got = generate(pipe, chosen)
    assert level_diff(got, reference[label]) <= 1, f"{label}: max 8-bit difference {level_diff(got, reference[label])}"
    if label != "base":  # the adapter really changes the image
        assert level_diff(got, reference["base"]) > 30


def test_deep_cache_with_an_adapter_of_the_skipped_blocks_equals_diffusers(pipe, lora_reference, reference):
    """Adapter a (attention, FF and projection layers, all in blocks DeepCache skips at branch 0) at interval 2
    equals diffusers' adapter under DeepCacheSDHelper; adapter b (resnet convs, some in the outer block the shallow
    UNet runs with its base weights) is refused under DeepCache, before any engine runs."""
    import torch
    from DeepCache import DeepCacheSDHelper

    from kolors_trt.runtime.deep_cache import DeepCacheInputError

    lora_reference.set_adapters(["a"], [0.8])
    helper = DeepCacheSDHelper(pipe=lora_reference)
    helper.set_params(cache_interval=2, cache_branch_id=0)
    helper.enable()
    try:
        with torch.no_grad():
            want = lora_reference(CASE["prompt"], ip_adapter_image=reference_image(), height=CASE["height"],
                                  width=CASE["width"], num_inference_steps=CASE["steps"],
                                  guidance_scale=CASE["guidance_scale"],
                                  generator=torch.Generator().manual_seed(CASE["seed"])).images[0]
    finally:
        helper.disable()
        del lora_reference.unet.forward  # disable() leaves the bound method as an instance attribute
    rows = pipe.stats()["unet_rows"]["unet_shallow"]
    got = generate(pipe, {"a": 0.8}, deep_cache_interval=2)
    assert pipe.stats()["unet_rows"]["unet_shallow"] - rows == 2  # step 1 of 3, both branches
    assert level_diff(got, np.asarray(want, dtype=np.int16)) <= 1
    assert level_diff(got, reference["a"]) > 1  # the shallow step changed the image
    runs = pipe.stats()["engine_runs"]
    with pytest.raises(DeepCacheInputError, match="LoRA 'b' changes .* shallow UNet"):
        generate(pipe, {"b": 0.5}, deep_cache_interval=2)
    assert pipe.stats()["engine_runs"] == runs


def test_kohya_files_of_the_same_weights_give_the_same_image(pipe):
    want = generate(pipe, {"a": 0.8})
    assert np.array_equal(generate(pipe, {"a_kohya": 0.8}), want)
    assert np.array_equal(generate(pipe, {"a_sgm": 0.8}), want)


def test_dreambooth_folder_equals_diffusers_file(pipe, loras):
    """Kolors' dreambooth layout (UNet via save_lora_weights, ChatGLM as a PEFT adapter_model.safetensors with its
    adapter_config.json) reads as the same adapter as diffusers' single file."""
    pipe.load_lora_weights(loras["c_dreambooth"], adapter_name="c_dreambooth")
    try:
        info = {i["id"]: i for i in pipe.lora.list()}
        assert info["c_dreambooth"]["components"] == info["c"]["components"]
        assert set(info["c"]["components"]) == {"unet", "text_encoder"}
        assert np.array_equal(generate(pipe, {"c_dreambooth": 0.7}), generate(pipe, {"c": 0.7}))
    finally:
        pipe.unload_lora_weights("c_dreambooth")


def test_switching_is_exact(pipe):
    """none -> a -> b -> a -> none, recomputing every fused weight set (no cached sessions): the same bits each time."""
    for component in ("unet", "text_encoder"):
        pipe.engines[component].fused_sessions = 0
    try:
        first = {name: generate(pipe, loras) for name, loras in (("none", {}), ("a", {"a": 0.8}), ("b", {"b": 0.5}))}
        before = pipe.stats()["lora"]["swaps"]
        again_a = generate(pipe, {"a": 0.8})
        again_none = generate(pipe, {})
        assert pipe.stats()["lora"]["swaps"] - before == 2
        assert np.array_equal(again_a, first["a"]) and np.array_equal(again_none, first["none"])
        assert level_diff(first["a"], first["b"]) > 30
    finally:
        for component in ("unet", "text_encoder"):
            pipe.engines[component].fused_sessions = 2


def test_batch_mixing_adapter_sets_equals_solo_results(pipe):
    def request(seed, loras):
        return GenerationRequest(CASE["prompt"], reference_image(), None, CASE["height"], CASE["width"], CASE["steps"],
                                 CASE["guidance_scale"], CASE["ip_adapter_scale"], seed, loras=loras)

    requests = [request(1, {"a": 0.8}), request(2, {"b": 0.5}), request(3, {"a": 0.8}), request(4, {"c": 0.7}),
                request(5, {})]
    solo = [pipe.generate_batch([r])[0] for r in requests]
    pipe.generate_batch([request(9, {"b": 0.5})])  # b applied: the batch runs its b group first
    runs, swaps = pipe.stats()["engine_runs"]["unet"], pipe.stats()["lora"]["swaps"]
    batched = pipe.generate_batch(requests)
    # four UNet sets ({a}, {b}, {c}, none): four batches; the two {a} requests share one
    assert pipe.stats()["engine_runs"]["unet"] - runs == 4 * CASE["steps"]
    # UNet: b (applied, first) -> a -> c -> none; in arrival order (a, b, c, none) it would be 4. The text
    # encoder does not run: every prompt's embeddings under each set are cached from the solo runs.
    assert pipe.stats()["lora"]["swaps"] - swaps == 3
    for r, got, want in zip(requests, batched, solo):
        assert got.parameters == want.parameters and got.parameters["loras"] == r.loras
        assert np.abs(got.latents - want.latents).max() <= 1e-5 * np.abs(want.latents).max()
        assert level_diff(np.asarray(got.images[0]), np.asarray(want.images[0])) <= 1


def test_lora_with_a_sampler_and_guidance_interval_equals_diffusers(pipe, lora_reference, reference, monkeypatch):
    """a (0.8) + c (0.7: UNet and ChatGLM, the negative prompt through the adapted encoder) with dpmpp_2m_karras and
    guidance on the first 2 of 5 steps (the interval (sigma_2, sigma_0]) equals diffusers' load_lora_weights +
    set_adapters with the same scheduler and its documented dynamic-CFG callback; batched with another adapter set
    under the same sampler and interval, each request gives its solo result."""
    checks, name, steps, until = sampler_checks, "dpmpp_2m_karras", 5, 2
    case = dict(checks.one_image(steps), image=reference_image())
    s = checks.sigmas(pipe, name, steps)
    interval = (s[until], s[0])
    requests = [checks.request(case, scheduler=name, guidance_interval=interval, loras=chosen)
                for chosen in ({"a": 0.8, "c": 0.7}, {"b": 0.5})]
    solo = [pipe.generate_batch([r])[0] for r in requests]
    lora_reference.set_adapters(["a", "c"], [0.8, 0.7])
    keep, call = checks.dynamic_cfg(lora_reference, until)
    monkeypatch.setattr(lora_reference, "prepare_ip_adapter_image_embeds", keep)
    want = checks.reference(lora_reference, case, name, **call)
    checks.assert_equal_images(solo[0], *want, f"a + c, {name}, guidance on {until} of {steps} steps")
    assert solo[0].parameters["scheduler"] == name and solo[0].parameters["guidance_interval"] == list(interval)
    base = pipe.generate_batch([checks.request(case, scheduler=name, guidance_interval=interval)])[0]
    assert level_diff(np.asarray(solo[0].images[0]), np.asarray(base.images[0])) > 30
    runs = pipe.stats()["engine_runs"]["unet"]
    batched = pipe.generate_batch(requests)
    assert pipe.stats()["engine_runs"]["unet"] - runs == 2 * steps  # one loop per UNet set
    for got, want_solo in zip(batched, solo):
        assert got.parameters == want_solo.parameters
        assert np.abs(got.latents - want_solo.latents).max() <= 1e-5 * np.abs(want_solo.latents).max()


def test_lora_of_another_model_is_refused_and_nothing_changes(pipe, loras):
    base = generate(pipe, {})
    before = dict(pipe.lora.adapters), pipe.lora.default
    with pytest.raises(LoraError, match=r"other/pytorch_lora_weights.safetensors: cannot place key 'unet\.[^']+': no "
                                        r"module '[^']+' in this model's UNet"):
        pipe.load_lora_weights(loras["other"], adapter_name="other")
    with pytest.raises(LoraError) as err:
        pipe.load_lora_weights(loras["other_shapes"], adapter_name="other")
    # the key, the module's shape here and the shape the file makes
    assert "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight" in str(err.value)
    assert "is [64, 64] in this model" in str(err.value) and "make [64, 96]" in str(err.value)
    assert (dict(pipe.lora.adapters), pipe.lora.default) == before
    with pytest.raises(LoraError, match="unknown adapter 'other'"):
        generate(pipe, {"other": 1.0})
    assert np.array_equal(generate(pipe, {}), base)


def test_default_set_is_diffusers_set_adapters(pipe):
    """Requests without loras use the set_adapters set; load_lora_weights makes the new adapter that set."""
    pipe.set_adapters(["a", "b"], [0.8, 0.5])
    try:
        assert pipe.get_active_adapters() == ["a", "b"]
        assert np.array_equal(generate(pipe, None), generate(pipe, {"b": 0.5, "a": 0.8}))
    finally:
        pipe.set_adapters([])
    assert np.array_equal(generate(pipe, None), generate(pipe, {}))


def test_fp16_graphs(onnx_fp16, loras, reference):
    """Two adapters on the fp16 graphs (fp16 initializers: the delta is added in fp32, then cast)."""
    p = Pipeline.load(onnx_fp16)
    p.load_lora_weights(loras["a"], adapter_name="a")
    p.load_lora_weights(loras["b"], adapter_name="b")  # with convs
    got = generate(p, {"a": 0.8, "b": 0.5}).astype(np.float64)
    mse = np.mean((got - reference["a+b"]) ** 2)
    psnr = 10 * np.log10(255.0**2 / mse) if mse else float("inf")
    assert psnr >= FP16_PSNR_DB, f"fp16 + LoRA PSNR {psnr:.1f} dB"


HYGIENE = r"""
import json, sys
import numpy as np
from PIL import Image
import kolors_trt.runtime.pipeline as P
pipe = P.Pipeline.load(sys.argv[1])
pipe.load_lora_weights(sys.argv[2], adapter_name="x")
img = Image.fromarray(np.zeros((30, 30, 3), np.uint8))
pipe(prompt="x", ip_adapter_image=img, height=64, width=64, num_inference_steps=1, seed=0, loras={"x": 0.5})
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("diffusers", "transformers", "onnx", "torch", "peft"))
print(json.dumps([bad, pipe.stats()["lora"]["swaps"]]))
"""


def test_runtime_lora_imports_no_torch(onnx_fp32, loras):
    out = subprocess.run([sys.executable, "-c", HYGIENE, str(onnx_fp32), str(loras["c"])], capture_output=True,
                         text=True, check=True)
    bad, swaps = json.loads(out.stdout.strip().splitlines()[-1])
    assert bad == [] and swaps == 2  # UNet and text encoder


def test_cli_generate_with_loras(onnx_fp32, loras, reference, tmp_path, capsys):
    from kolors_trt.cli import main
    from kolors_trt.runtime.cli import lora_argument
    from kolors_trt.runtime.postprocess import read_png_parameters

    assert lora_argument("a/b.safetensors:0.8") == ("a/b.safetensors", 0.8)
    assert lora_argument("a/b.safetensors") == ("a/b.safetensors", 1.0)
    assert lora_argument("c:/x:y.safetensors") == ("c:/x:y.safetensors", 1.0)
    ref = tmp_path / "ref.png"
    reference_image().save(ref)
    out = tmp_path / "out.png"
    args = ["generate", "--onnx", str(onnx_fp32), "--image", str(ref), "--prompt", CASE["prompt"], "--out", str(out),
            "--seed", str(CASE["seed"]), "--steps", str(CASE["steps"]), "--height", str(CASE["height"]), "--width",
            str(CASE["width"]), "--guidance", str(CASE["guidance_scale"]), "--ip-scale", str(CASE["ip_adapter_scale"]),
            "--no-progress"]
    assert main(args + ["--lora", f"{loras['a']}:0.8", "--lora", f"{loras['b']}:0.5"]) == 0
    assert level_diff(np.asarray(Image.open(out), dtype=np.int16), reference["a+b"]) <= 1
    # both files are pytorch_lora_weights.safetensors: the second stem is made unique
    assert read_png_parameters(out)["loras"] == {"pytorch_lora_weights": 0.8, "pytorch_lora_weights_2": 0.5}
    capsys.readouterr()
    assert main(args + ["--lora", str(tmp_path / "style.bin")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "only .safetensors files are read" in err[0]


STANDIN_PROFILE = Profile(DimRange(1, 1, 2), DimRange(64, 64, 128), DimRange(64, 96, 128))


def test_tensorrt_refit_on_the_standin(pipe, loras, standin_engines, trt_pipeline):
    """The TensorRT backend's refit path (TrtEngine.use_weights: trt.Refitter set_named_weights + refit_cuda_engine)
    on the TensorRT stand-in, with the LoRA map and base weights the build writes into a --refit engine folder:
    the ONNX Runtime image for every set, and none -> a -> c -> a -> none gives the first bits again."""
    trt = trt_pipeline(standin_engines(STANDIN_PROFILE, refit=True))
    for name in ("a", "c"):
        trt.load_lora_weights(loras[name], adapter_name=name)
    order = [("none", {}), ("a", {"a": 0.8}), ("c", {"c": 0.7}), ("a", {"a": 0.8}), ("none", {})]
    first: dict = {}
    for label, chosen in order:
        got = generate(trt, chosen)
        if label in first:
            assert np.array_equal(got, first[label]), label
        else:
            first[label] = got
            assert level_diff(got, generate(pipe, chosen)) <= 1, label
    # UNet: each change; text encoder: into c only (the base embeddings are cached, so it never runs base again)
    assert trt.stats()["lora"]["swaps"] == 4 + 1
    assert level_diff(first["a"], first["none"]) > 30
    # the device loop (trt_loop.py) with another sampler and a guidance interval on the refitted UNet
    s = pipe.samplers.tables("dpmpp_2m_karras", CASE["steps"]).sigmas
    extra = dict(scheduler="dpmpp_2m_karras", guidance_interval=(float(s[1]), float(s[0])))
    got = generate(trt, {"a": 0.8, "c": 0.7}, **extra)
    assert level_diff(got, generate(pipe, {"a": 0.8, "c": 0.7}, **extra)) <= 1
    assert level_diff(got, generate(trt, {}, **extra)) > 30


def test_tensorrt_plans_not_built_refittable_refuse_lora(loras, standin_engines, trt_pipeline):
    from kolors_trt.runtime.engine import WeightSwapError

    trt = trt_pipeline(standin_engines(STANDIN_PROFILE, refit=False))
    with pytest.raises(LoraError, match="no LoRA map for its unet"):
        trt.load_lora_weights(loras["a"], adapter_name="a")
    base = generate(trt, {})
    engine = trt.engines["unet"]
    with pytest.raises(WeightSwapError, match="rebuild the engines with kolors-trt build --refit"):
        engine.use_weights(("x",), lambda restore: {})
    assert engine.weights_key is None and np.array_equal(generate(trt, {}), base)


def test_a_peft_config_is_part_of_the_adapters_identity(pipe, loras, tmp_path):
    """Two dreambooth folders with the same weights but another lora_alpha scale differently: they never share a
    fused weight set or a prompt-cache key."""
    import json
    import shutil

    other = tmp_path / "c_alpha"
    shutil.copytree(loras["c_dreambooth"], other)
    config = json.loads((other / "adapter_config.json").read_text())
    config["lora_alpha"] = config["lora_alpha"] * 2
    (other / "adapter_config.json").write_text(json.dumps(config))
    pipe.load_lora_weights(loras["c_dreambooth"], adapter_name="c_dreambooth")
    pipe.load_lora_weights(other, adapter_name="c_alpha")
    try:
        first, second = pipe.lora.adapters["c_dreambooth"], pipe.lora.adapters["c_alpha"]
        assert first.sha256 != second.sha256
        keys = [pipe.lora.key(pipe.lora.resolve({name: 0.7}), "text_encoder") for name in ("c_dreambooth", "c_alpha")]
        assert keys[0] != keys[1]
    finally:
        pipe.unload_lora_weights("c_dreambooth")
        pipe.unload_lora_weights("c_alpha")
