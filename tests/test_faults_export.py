"""Fault suite, export stage: `kolors-trt export` interrupted (SIGINT, SIGTERM, SIGKILL) at
several points over an existing export folder, and export folders that must be refused.

Each interrupt test runs a real `python -m kolors_trt export --force` subprocess of the tiny
default checkpoint into a copy of a valid export folder, signals it when a graph's staging
folder appears, and checks: exit 130 (SIGINT/SIGTERM) with one line saying the folder keeps
its last complete state; no leftovers (after SIGKILL: after a rerun); the manifest byte for
byte the old one, every file it names verifying; a file outside the folder untouched.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from kolors_trt.cli import main
from kolors_trt.runtime.artifacts import read_export_folder
from kolors_trt.export import checkpoint as ck
from kolors_trt.export import folder as F
from kolors_trt.export.exporter import resolve_precisions
from kolors_trt.runtime.manifest import write_json_atomic

import faults


@pytest.fixture
def folder(onnx_fp32, tmp_path):
    """A copy of a valid fp32 export folder of the tiny default, and a sentinel beside it."""
    return faults.copy_folder(onnx_fp32, tmp_path, "onnx")


def _export_args(tiny, out, *extra):
    kolors, ip = tiny
    return ("export", "--weights", kolors, "--ip-adapter", ip, "--out", out, "--precision", "fp32", *extra)


def _old_valid(out: Path, manifest: bytes) -> None:
    assert (out / "manifest.json").read_bytes() == manifest
    read_export_folder(out)  # every graph, data file and asset against its sha256


# ---- interrupts ------------------------------------------------------------------------------


@pytest.mark.parametrize("signum, point", [
    (signal.SIGINT, "text_encoder"),  # tracing the first graph
    (signal.SIGTERM, "text_encoder"),
    (signal.SIGINT, "image_encoder"),  # the first graph exported and validated, the second under way
])
def test_interrupted_export_keeps_the_old_folder(tiny, folder, signum, point):
    out, manifest, sentinel = folder
    cmd = faults.Command(*_export_args(tiny, out, "--force"))
    cmd.wait_for(faults.appeared(out, f".{point}."), f"the {point} staging folder")
    seconds = cmd.signal(signum)
    faults.assert_interrupted(cmd, signum, seconds, "export", out)
    assert faults.leftovers(out) == []
    _old_valid(out, manifest)
    assert sentinel.untouched()


def test_killed_export_leaves_only_leftovers_that_a_rerun_removes(tiny, folder):
    out, manifest, sentinel = folder
    cmd = faults.Command(*_export_args(tiny, out, "--force"))
    cmd.wait_for(faults.appeared(out, ".text_encoder."), "the text_encoder staging folder")
    cmd.signal(signal.SIGKILL)
    assert cmd.proc.returncode == -signal.SIGKILL
    assert faults.leftovers(out)  # the staging folder: SIGKILL runs no cleanup
    _old_valid(out, manifest)  # nothing was renamed into place
    again = faults.run(*_export_args(tiny, out))  # same checkpoint and precisions: skipped, leftovers removed
    assert again.proc.returncode == 0, again.stderr
    assert "up to date" in again.out
    assert faults.leftovers(out) == []
    _old_valid(out, manifest)
    assert sentinel.untouched()


# ---- up to date --------------------------------------------------------------------------------


def test_unchanged_checkpoint_is_up_to_date(tiny, folder, capsys):
    out, manifest, _ = folder
    assert main(list(map(str, _export_args(tiny, out)))) == 0
    assert capsys.readouterr().out.strip() == f"{out}: up to date (same checkpoint, precisions and export version; --force re-exports)"
    assert (out / "manifest.json").read_bytes() == manifest


def test_up_to_date_needs_the_same_fingerprint_precisions_and_a_verified_folder(tiny, folder, tmp_path):
    out, _, _ = folder
    kolors, ip = tiny
    fp32 = resolve_precisions("fp32")
    old, problem = F.existing_folder(out)
    fingerprint = ck.fingerprint(ck.resolve(kolors, ip))
    dims = old.model_dims
    assert problem is None and F.up_to_date(old, fingerprint, fp32, ("unet",), dims)
    assert not F.up_to_date(old, fingerprint, resolve_precisions("fp16"), ("unet",), dims)
    assert not F.up_to_date(old, "0" * 64, fp32, ("unet",), dims)
    # another DeepCache split (or none) is another unet graph; the other graphs do not depend on it
    no_split = dataclasses.replace(dims, deep_cache_branch=-1, deep_feature_channels=0)
    assert not F.up_to_date(old, fingerprint, fp32, ("unet",), no_split)
    assert F.up_to_date(old, fingerprint, fp32, ("text_encoder",), no_split)
    with open(out / "unet.onnx", "r+b") as f:  # a graph edited after the export
        f.seek(100)
        f.write(b"\x00")
    old, problem = F.existing_folder(out)
    assert old is None and "unet.onnx has sha256" in str(problem)


def test_fingerprint_follows_configs_tokenizer_and_weights(tiny, tmp_path):
    kolors, ip = (tmp_path / "kolors", tmp_path / "ip")
    shutil.copytree(tiny[0], kolors)
    shutil.copytree(tiny[1], ip)
    paths = ck.resolve(kolors, ip)
    first = ck.fingerprint(paths)
    assert ck.fingerprint(paths) == first
    weights = next(p for p in (kolors / "unet").iterdir() if p.suffix == ".safetensors")
    saved = ck.FINGERPRINT_CONTENT_BYTES
    try:  # the tiny weights are small: fingerprint them as the real (large) ones are, by size and mtime
        ck.FINGERPRINT_CONTENT_BYTES = 0
        by_stat = ck.fingerprint(paths)
        os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000))
        assert ck.fingerprint(paths) != by_stat
    finally:
        ck.FINGERPRINT_CONTENT_BYTES = saved
    tokenizer = paths.tokenizer / "tokenizer_config.json"
    tokenizer.write_text(tokenizer.read_text() + " ")
    assert ck.fingerprint(paths) != first


# ---- folders export must refuse ---------------------------------------------------------------


def _edit(out: Path, edit) -> None:
    m = json.loads((out / "manifest.json").read_text())
    edit(m)
    write_json_atomic(out / "manifest.json", m)


def test_adding_a_component_of_another_checkpoint_is_refused(store, folder, capsys):
    """The fault: --components unet from another checkpoint mixed dims and tokenizers."""
    out, manifest, sentinel = folder
    alt = store.tiny("alt")
    assert main(list(map(str, _export_args(alt, out, "--components", "vae_decoder")))) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holds graphs of another checkpoint" in err
    assert "model_dims.text_hidden" in err and "tokenizer.model sha256" in err
    assert "export all components into it (omit --components), or choose a new --out" in err
    assert (out / "manifest.json").read_bytes() == manifest and sentinel.untouched()


@pytest.mark.parametrize("damage, message", [
    ("version", "export version 1, older than"),
    ("escape", "'../sentinel.txt' climbs out of the folder"),
    ("missing_sha", "field 'components.unet.sha256' is missing"),
])
def test_adding_components_to_a_broken_or_older_folder_is_refused(tiny, folder, capsys, damage, message):
    out, _, sentinel = folder
    edits = {
        "version": lambda m: m.update(version=1),
        "escape": lambda m: m["components"]["unet"].update(file="../sentinel.txt"),
        "missing_sha": lambda m: m["components"]["unet"].pop("sha256"),
    }
    _edit(out, edits[damage])
    assert main(list(map(str, _export_args(tiny, out, "--components", "vae_decoder")))) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"kolors-trt export: error: export: cannot add vae_decoder to {out}: ") and message in err
    assert err.endswith("export all components into it (omit --components), or choose a new --out")
    assert sentinel.untouched()


@pytest.mark.parametrize("content, message", [
    (b"\x89PNG\r\n\x1a\n\x00\xff", "not text (binary content)"),
    (json.dumps({"format": "kolors-trt-engines/1", "engines": {}}).encode(), "is not an export folder (an engine folder"),
])
def test_a_folder_that_is_not_an_export_folder_is_not_written(tiny, tmp_path, capsys, content, message):
    out = tmp_path / "elsewhere"
    out.mkdir()
    (out / "manifest.json").write_bytes(content)
    assert main(list(map(str, _export_args(tiny, out)))) == 1
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]
    assert (out / "manifest.json").read_bytes() == content
