"""Fault suite, build stage: `kolors-trt build` interrupted (SIGINT, SIGTERM, SIGKILL) at two
points over an existing engine folder; tampered and foreign export folders as its input;
tampered, hostile and foreign engine folders as its output.

The interrupt tests run a real `python -m kolors_trt build` subprocess (TensorRT-RTX, ahead
of time on the CPU) on the tiny default's export folder into a copy of an engine folder
built earlier at another profile, signal it while the UNet builds, and check: exit 130
within seconds with one line (SIGINT/SIGTERM), the folder in its last committed state (the
old one, or the old one plus the engines finished before the signal), every plan verifying,
no leftovers (after SIGKILL: after a rerun), a file outside the folder untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from kolors_trt.cli import main
from kolors_trt.engines.builder import build_engines
from kolors_trt.engines.manifest import verify_engine_folder
from kolors_trt.runtime.manifest import PathEscapeError
from kolors_trt.runtime.spec import Profile

pytest.importorskip("tensorrt_rtx")

import faults

RTX = "tensorrt-rtx"
STATIC = ("--static", "--size", "256x256", "--batch", "1")


@pytest.fixture(scope="module")
def engines(onnx_fp32, tmp_path_factory):
    """An engine folder of the tiny default: text encoder and VAE at a static 256x256 profile."""
    out = tmp_path_factory.mktemp("faults-engines") / "engines"
    build_engines(onnx_fp32, out, target=RTX, profile=Profile.static(1, 256, 256),
                  components=["text_encoder", "vae_decoder"])
    return out


@pytest.fixture
def folder(engines, tmp_path):
    """A copy of that engine folder, and a sentinel beside it."""
    return faults.copy_folder(engines, tmp_path, "engines")


def _build(onnx, out, *extra):
    return ("build", "--onnx", onnx, "--out", out, "--target", RTX, *extra)


# ---- interrupts ------------------------------------------------------------------------------


@pytest.mark.parametrize("signum, first", [
    (signal.SIGINT, "unet"),  # no engine finished: the old folder, byte for byte
    (signal.SIGTERM, "unet"),
    (signal.SIGINT, "vae_decoder"),  # the VAE rebuilt for the new profile and committed, then the UNet
])
def test_interrupted_build_keeps_the_last_committed_state(onnx_fp32, folder, signum, first):
    out, manifest, sentinel = folder
    components = ["unet"] if first == "unet" else ["vae_decoder", "unet"]
    cmd = faults.Command("-v", *_build(onnx_fp32, out, "--components", *components))  # the default (dynamic) profile
    cmd.wait_for_line("unet: building")
    seconds = cmd.signal(signum)
    faults.assert_interrupted(cmd, signum, seconds, "build", out)
    assert faults.leftovers(out) == []
    m = verify_engine_folder(out)  # every plan and asset against the manifest
    if first == "unet":
        assert (out / "manifest.json").read_bytes() == manifest
    else:
        assert sorted(m["engines"]) == ["text_encoder", "vae_decoder"]
        assert m["engines"]["vae_decoder"]["profile"]["latents"]["min"] != m["engines"]["vae_decoder"]["profile"]["latents"]["max"]
    assert not (out / "unet.plan").exists()
    assert sentinel.untouched()


def test_killed_build_keeps_the_old_folder_and_a_rerun_removes_leftovers(onnx_fp32, folder):
    out, manifest, sentinel = folder
    cmd = faults.Command("-v", *_build(onnx_fp32, out, "--components", "unet"))
    cmd.wait_for_line("unet: building")
    cmd.signal(signal.SIGKILL)
    assert cmd.proc.returncode == -signal.SIGKILL
    assert (out / "manifest.json").read_bytes() == manifest
    verify_engine_folder(out)
    # A plan is written under a temporary name only inside the commit, a window too short
    # to hit reliably with a signal: place the file a kill there would leave.
    (out / ".unet.plan.kt-tmp-99999-deadbeef.plan").write_bytes(b"vtrt half a plan")
    again = faults.run(*_build(onnx_fp32, out, *STATIC, "--components", "text_encoder"))
    assert again.proc.returncode == 0, again.stderr
    assert "up-to-date" in again.out
    assert faults.leftovers(out) == []
    assert (out / "manifest.json").read_bytes() == manifest
    assert sentinel.untouched()


# ---- export folders build must refuse -----------------------------------------------------------


def _tamper_export(root: Path, sentinel: Path, damage: str) -> None:
    mpath = root / "manifest.json"
    m = json.loads(mpath.read_text())
    unet = m["components"]["unet"]
    if damage == "graph_bytes":
        data = bytearray((root / "vae_decoder.onnx").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (root / "vae_decoder.onnx").write_bytes(bytes(data))
        return
    if damage == "external_data":  # the graph with its weights in an external-data file, then one byte changed
        import onnx

        from kolors_trt.export.folder import graph_fields
        from kolors_trt.export.onnx_export import _save

        _save(onnx.load(str(root / "vae_decoder.onnx")), root / "vae_decoder.onnx", external=True)
        m["components"]["vae_decoder"].update(graph_fields(root, "vae_decoder"))
        with open(root / "vae_decoder.onnx.data", "r+b") as f:
            f.seek(64)
            f.write(b"\x00\x01\x02\x03")
    elif damage == "asset":
        (root / "tokenizer" / "tokenizer.model").write_bytes(b"another tokenizer")
        return
    elif damage == "absolute":
        unet["file"] = str(sentinel)
    elif damage == "dotdot":
        unet["file"] = "../sentinel.txt"
    elif damage == "symlink":
        (root / "unet.onnx").unlink()
        (root / "unet.onnx").symlink_to(sentinel)
    elif damage == "asset_dotdot":
        m["assets"]["tokenizer/.."] = "0" * 64
    elif damage == "data_dotdot":
        unet.update(external_data="../sentinel.txt", external_data_sha256="0" * 64)
    elif damage == "missing_sha256":
        del unet["sha256"]
    elif damage == "string_entry":
        m["components"]["unet"] = "unet.onnx"
    elif damage == "constant":
        m["runtime"]["vae_scaling_factor"] = "0.13025"
    elif damage == "dims":
        m["model_dims"]["text_hidden"] = "64"
    elif damage == "version":
        m["version"] = 1
    if damage == "binary":
        mpath.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    else:
        mpath.write_text(json.dumps(m))


@pytest.mark.parametrize("damage, message", [
    ("graph_bytes", "vae_decoder.onnx has sha256"),
    ("external_data", "vae_decoder.onnx.data has sha256"),
    ("asset", "tokenizer/tokenizer.model has sha256"),
    ("absolute", "components.unet.file: '/"),
    ("dotdot", "components.unet.file: '../sentinel.txt' climbs out of the folder"),
    ("symlink", "components.unet.file: 'unet.onnx' resolves to"),
    ("data_dotdot", "components.unet.external_data: '../sentinel.txt' climbs out"),
    ("asset_dotdot", "assets: 'tokenizer/..' climbs out of the folder"),
    ("missing_sha256", "field 'components.unet.sha256' is missing"),
    ("string_entry", "field 'components.unet' must be an object, found 'unet.onnx'"),
    ("constant", "field 'runtime.vae_scaling_factor' must be a number, found '0.13025'"),
    ("dims", "field 'model_dims.text_hidden' must be an int"),
    ("version", "export version 1, older than this kolors-trt's 2"),
    ("binary", "not text (binary content)"),
])
def test_build_refuses_a_tampered_export_folder(onnx_fp32, tmp_path, capsys, damage, message):
    src = tmp_path / "onnx"
    shutil.copytree(onnx_fp32, src)
    sentinel = faults.Sentinel(tmp_path / "sentinel.txt")
    _tamper_export(src, sentinel.path, damage)
    assert main(list(map(str, _build(src, tmp_path / "engines", *STATIC)))) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("kolors-trt build: error: ")
    assert str(src / "manifest.json") in err and message in err
    if damage == "version":
        assert "re-export" in err
    assert not (tmp_path / "engines").exists()  # refused before the output folder is made
    assert sentinel.untouched()


# ---- engine folders build must refuse (or, with --force, replace) --------------------------------


def _tamper_engines(out: Path, sentinel: Path, damage: str) -> None:
    mpath = out / "manifest.json"
    m = json.loads(mpath.read_text())
    vae = m["engines"]["vae_decoder"]
    # Another spec hash makes the entry one that the build drops (and whose plan it used to delete).
    vae["spec_hash"] = "another profile"
    if damage == "absolute":
        vae["file"] = str(sentinel)
    elif damage == "dotdot":
        vae["file"] = "../sentinel.txt"
    elif damage == "symlink":
        (out / "vae_decoder.plan").unlink()
        (out / "vae_decoder.plan").symlink_to(sentinel)
    elif damage == "missing_sha256":
        del vae["plan_sha256"]
    elif damage == "string_entry":
        m["engines"]["vae_decoder"] = "vae_decoder.plan"
    if damage == "binary":
        mpath.write_bytes(bytes(range(256)))
    elif damage == "export_manifest":
        mpath.write_text(json.dumps({"format": "kolors-trt/export", "version": 2, "components": {}}))
    else:
        mpath.write_text(json.dumps(m))


@pytest.mark.parametrize("damage, message", [
    ("absolute", "engines.vae_decoder.file: '/"),
    ("dotdot", "engines.vae_decoder.file: '../sentinel.txt' climbs out of the folder"),
    ("symlink", "engines.vae_decoder.file: 'vae_decoder.plan' resolves to"),
    ("missing_sha256", "field 'engines.vae_decoder.plan_sha256' is missing"),
    ("string_entry", "field 'engines.vae_decoder' must be an object"),
    ("binary", "not text (binary content)"),
    ("export_manifest", "is not an engine folder written by kolors-trt build; choose another --out"),
])
def test_build_refuses_a_hostile_or_foreign_engine_folder(onnx_fp32, folder, capsys, damage, message):
    """The fault: an entry naming a file outside the folder had the build delete that file."""
    out, _, sentinel = folder
    _tamper_engines(out, sentinel.path, damage)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(list(map(str, _build(onnx_fp32, out, *STATIC, "--components", "text_encoder")))) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(out / "manifest.json") in err and message in err
    if damage not in ("binary", "export_manifest"):
        assert err.endswith("rebuild the folder from scratch with --force, or choose another --out")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing written, nothing removed
    assert sentinel.untouched()
    if damage in ("absolute", "dotdot", "symlink"):
        with pytest.raises(PathEscapeError):
            verify_engine_folder(out)


def test_force_replaces_a_hostile_engine_manifest_and_deletes_nothing_it_names(onnx_fp32, folder, capsys):
    out, _, sentinel = folder
    _tamper_engines(out, sentinel.path, "dotdot")
    assert main(list(map(str, _build(onnx_fp32, out, *STATIC, "--components", "text_encoder", "--force")))) == 0
    m = verify_engine_folder(out)
    assert sorted(m["engines"]) == ["text_encoder"]
    assert (out / "vae_decoder.plan").is_file()  # an orphan now; the old manifest named it wrongly, so it stays
    assert sentinel.untouched()
    assert os.path.isfile(sentinel.path)
