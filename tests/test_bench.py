"""The latency benchmark on the tiny default (ONNX Runtime, CPU): it completes, the
JSON holds every field with positive numbers, the diffusers ratio comes from the
same run's samples, and the plot is a PNG. No timing thresholds."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from kolors_trt import bench as B


@pytest.fixture(scope="module")
def bench_run(onnx_fp32, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "kolors_trt", "bench", "--onnx", str(onnx_fp32), "--size", "64x96", "--steps", "2",
           "--warmup", "1", "--runs", "3", "--baseline", "diffusers", "--json", str(out / "bench.json"),
           "--plot", str(out / "bench.png")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, json.loads((out / "bench.json").read_text()), out / "bench.png"


def test_json_has_every_field_with_positive_numbers(bench_run):
    _, result, _ = bench_run
    assert result["config"] == {"height": 64, "width": 96, "steps": 2, "warmup": 1, "runs": 3,
                                "guidance_scale": 5.0, "ip_adapter_scale": 0.5, "seed": 0}
    env = result["environment"]
    assert env["backend"] == "onnxruntime" and env["onnxruntime"] and env["torch"] and env["cpu"]
    assert result["clock"]["kolors-trt"] == "perf_counter"
    for who in ("kolors-trt", "diffusers"):
        samples = result[who]["samples"]
        for stage in ("text_encoder", "image_encoder", "denoise_step", "vae_decoder", "end_to_end"):
            assert len(samples[stage]) == 3 and all(x > 0 for x in samples[stage]), (who, stage)
        summary = result[who]["summary"]
        assert summary["images_per_second"] > 0
        e2e = summary["end_to_end"]
        assert 0 < e2e["p50"] <= e2e["p90"] <= e2e["p99"]
    assert all(x > 0 for x in result["kolors-trt"]["samples"]["image_cached"])
    assert result["peak_rss_mb"] > 0
    assert set(result["engine_bytes"]) == {"text_encoder", "image_encoder", "unet", "vae_decoder", "unet_shallow"}
    assert all(v > 0 for v in result["engine_bytes"].values())


def test_ratio_is_computed_from_the_same_run(bench_run):
    _, result, _ = bench_run
    for stage, ratio in result["speedup_vs_diffusers"].items():
        ours = np.mean(result["kolors-trt"]["samples"][stage])
        theirs = np.mean(result["diffusers"]["samples"][stage])
        assert ratio == pytest.approx(theirs / ours, rel=1e-9)
    assert "end_to_end" in result["speedup_vs_diffusers"]


def test_request_accounting(bench_run):
    """Each measured request ran the text and image encoders once (new prompt, new
    image) and the cached path never did; host time is what the stages leave."""
    _, result, _ = bench_run
    runs = result["stats"]["engine_runs"]
    requests = 1 + 3
    assert runs["text_encoder"] == 1 + requests  # the empty negative at load + one per request
    assert runs["image_encoder"] == 1 + requests  # the zero image at load + one per new image
    assert runs["unet"] == 2 * requests and runs["vae_decoder"] == requests
    s = result["kolors-trt"]["samples"]
    for i in range(3):
        parts = s["text_encoder"][i] + s["image_encoder"][i] + 2 * s["denoise_step"][i] + s["vae_decoder"][i]
        assert s["host"][i] == pytest.approx(s["end_to_end"][i] - parts, abs=1e-9)


def test_markdown_and_plot(bench_run):
    stdout, _, png = bench_run
    assert "| stage" in stdout and "speed-up" in stdout and "perf_counter" in stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(png) as im:
        assert im.size[0] > 100 and im.size[1] > 100


def test_bad_settings():
    with pytest.raises(B.BenchError):
        B.BenchConfig(64, 64, steps=0, warmup=0, runs=1)
    with pytest.raises(B.BenchError):
        B.BenchConfig(64, 64, steps=2, warmup=0, runs=0)


def test_batch_throughput_against_one_at_a_time(onnx_fp32, tmp_path):
    """bench --batch N: both modes in the same run, the ratio from its samples, the UNet run counts prove
    that generate_batch ran one UNet batch per step and one-at-a-time N."""
    out = tmp_path / "batch.json"
    cmd = [sys.executable, "-m", "kolors_trt", "bench", "--onnx", str(onnx_fp32), "--size", "64x64", "--steps", "2",
           "--warmup", "1", "--runs", "2", "--batch", "3", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["config"]["batch"] == 3 and result["environment"]["backend"] == "onnxruntime"
    s = result["summary"]
    assert s["one_at_a_time"]["unet_runs"] == 2 * 3 * 2 and s["generate_batch"]["unet_runs"] == 2 * 2
    for mode in ("one_at_a_time", "generate_batch"):
        wall = result["samples"][mode]["wall"]
        assert len(wall) == 2 and len(result["samples"][mode]["completion"]) == 6
        assert s[mode]["images_per_second"] == pytest.approx(3 / np.mean(wall), rel=1e-9)
    assert result["throughput_ratio"] == pytest.approx(
        s["generate_batch"]["images_per_second"] / s["one_at_a_time"]["images_per_second"], rel=1e-9)
    assert "throughput ratio" in proc.stdout and "| generate batch" in proc.stdout
    bad = subprocess.run(cmd[:-2] + ["--batch", "9"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "more than one UNet batch" in bad.stderr


def test_samplers_against_the_euler_default(onnx_fp32, tmp_path):
    """bench --scheduler --steps --guidance-interval: the default (euler at the manifest's 50 steps), the sampler,
    and the sampler with the interval in one run; rows per image from the pipeline's counter agree with the
    sampler's sigmas, the speed-up comes from the run's own samples."""
    from kolors_trt.runtime.pipeline import Pipeline

    out = tmp_path / "samplers.json"
    cmd = [sys.executable, "-m", "kolors_trt", "bench", "--onnx", str(onnx_fp32), "--size", "64x64", "--steps", "6",
           "--warmup", "0", "--runs", "2", "--scheduler", "dpmpp_2m_karras", "--guidance-interval", "0.28:5.42",
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    labels = ["euler 50", "dpmpp_2m_karras 6", "dpmpp_2m_karras 6, guidance in (0.28, 5.42]"]
    assert list(result["summary"]) == labels and result["environment"]["backend"] == "onnxruntime"
    sigmas = Pipeline.load(onnx_fp32).samplers.tables("dpmpp_2m_karras", 6).sigmas[:6]
    guided = int(((sigmas > 0.28) & (sigmas <= 5.42)).sum())
    assert 0 < guided < 6
    rows = [result["summary"][label]["unet_rows_per_image"] for label in labels]
    assert rows == [100, 12, 6 + guided] and result["summary"][labels[2]]["guided_steps"] == guided
    for label in labels:
        wall = result["samples"][label]["wall"]
        assert len(wall) == 2 and all(w > d > 0 for w, d in zip(wall, result["samples"][label]["denoise"]))
        assert result["speedup_vs_default"][label] == pytest.approx(
            np.mean(result["samples"]["euler 50"]["wall"]) / np.mean(wall), rel=1e-9)
    assert "| dpmpp_2m_karras 6, guidance in (0.28, 5.42] |" in proc.stdout
    bad = subprocess.run(cmd[:-2] + ["--batch", "2"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "neither --batch" in bad.stderr


def test_deep_cache_intervals_against_the_default(onnx_fp32, tmp_path):
    """bench --deep-cache-interval 2 3: the default (euler 50, no DeepCache) and each interval at --steps in one
    run; rows per image per graph from the pipeline's counters."""
    out = tmp_path / "deep_cache.json"
    cmd = [sys.executable, "-m", "kolors_trt", "bench", "--onnx", str(onnx_fp32), "--size", "64x64", "--steps", "6",
           "--warmup", "0", "--runs", "2", "--deep-cache-interval", "2", "3", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    labels = ["euler 50", "euler 6", "euler 6, DeepCache 2", "euler 6, DeepCache 3"]
    assert list(result["summary"]) == labels
    per_graph = [result["summary"][label]["unet_rows_per_graph"] for label in labels]
    assert per_graph == [{"unet": 100, "unet_shallow": 0}, {"unet": 12, "unet_shallow": 0},
                         {"unet": 6, "unet_shallow": 6}, {"unet": 4, "unet_shallow": 8}]
    assert [result["summary"][label]["deep_cache_interval"] for label in labels] == [1, 1, 2, 3]
    for label in labels:
        assert result["speedup_vs_default"][label] == pytest.approx(
            np.mean(result["samples"]["euler 50"]["wall"]) / np.mean(result["samples"][label]["wall"]), rel=1e-9)
    assert re.search(r"\| euler 6, DeepCache 3 +\| 4 \+ 8 +\|", proc.stdout)
    bad = subprocess.run(cmd[:-2] + ["--unet-graphs"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "--unet-graphs" in bad.stderr


def test_unet_graphs_time_each_graph_on_the_same_step(onnx_fp32, tmp_path):
    """bench --unet-graphs: every UNet graph of the folder (the full one with its deep-feature output, DeepCache's
    shallow one) timed on one CFG step at the requested size; the ratio from the run's own samples."""
    out = tmp_path / "graphs.json"
    cmd = [sys.executable, "-m", "kolors_trt", "bench", "--onnx", str(onnx_fp32), "--size", "64x96", "--warmup", "1",
           "--runs", "3", "--unet-graphs", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["dims"] == {"unet_batch": 2, "latent_height": 8, "latent_width": 12}
    assert result["outputs"] == {"unet": ["noise_pred", "deep_feature"], "unet_shallow": ["noise_pred"]}
    for name, samples in result["samples"].items():
        assert len(samples) == 3 and result["summary"][name]["mean"] == pytest.approx(np.mean(samples) * 1e3)
    assert result["full_over"]["unet_shallow"] == pytest.approx(
        result["summary"]["unet"]["mean"] / result["summary"]["unet_shallow"]["mean"])
    assert "| unet_shallow" in proc.stdout
