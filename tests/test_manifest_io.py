"""runtime/manifest.py: contained paths, atomic writes, typed fields and the verification stamp."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from kolors_trt.runtime.errors import InputError, KolorsTrtError
from kolors_trt.runtime.manifest import (
    ManifestError,
    PathEscapeError,
    StaleFileError,
    atomic_path,
    clean_leftovers,
    contained,
    field,
    is_leftover,
    read_json_object,
    verify_files,
    write_json_atomic,
)


@pytest.mark.parametrize("value", ["/etc/passwd", "../x.onnx", "a/../../x", "sub/../../x", "", "a\x00b", 7, None,
                                   "C:\\x.plan"])
def test_contained_refuses_paths_that_leave_the_folder(tmp_path, value):
    with pytest.raises(ManifestError) as err:
        contained(tmp_path, value, "m.json: components.unet.file")
    assert "m.json: components.unet.file" in str(err.value)
    assert isinstance(err.value, InputError) and isinstance(err.value, KolorsTrtError)


def test_contained_refuses_a_symlink_out_and_accepts_one_inside(tmp_path):
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(b"x")
    root = tmp_path / "folder"
    (root / "sub").mkdir(parents=True)
    (root / "link.onnx").symlink_to(outside)
    with pytest.raises(PathEscapeError):
        contained(root, "link.onnx", "where")
    (root / "sub" / "real.onnx").write_bytes(b"y")
    (root / "inner.onnx").symlink_to(root / "sub" / "real.onnx")
    assert contained(root, "inner.onnx", "where") == root / "inner.onnx"
    assert contained(root, "sub/real.onnx", "where") == root / "sub" / "real.onnx"


def test_atomic_path_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "manifest.json"
    write_json_atomic(target, {"a": 1})
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text('{"a": 2, "half')
            raise KeyboardInterrupt
    assert read_json_object(target) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_sigkill_mid_write_leaves_the_old_file_and_a_leftover_that_cleaning_removes(tmp_path):
    target = tmp_path / "image.png"
    target.write_bytes(b"old complete file")
    code = textwrap.dedent(f"""
        import os, sys, time
        from kolors_trt.runtime.manifest import atomic_path
        with atomic_path({str(target)!r}) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"new half")
                f.flush()
                print("writing", flush=True)
                time.sleep(30)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=20)
    finally:
        proc.kill()
    assert target.read_bytes() == b"old complete file"
    leftovers = [p for p in tmp_path.iterdir() if is_leftover(p)]
    assert len(leftovers) == 1
    assert clean_leftovers(tmp_path) == leftovers
    assert [p.name for p in tmp_path.iterdir()] == ["image.png"]


def test_field_names_the_file_and_field(tmp_path):
    data = {"components": {"unet": "not an object", "vae": {"sha256": "12", "bytes": "3"}}}
    with pytest.raises(ManifestError, match=r"m\.json: field 'components\.unet' must be an object"):
        field(data, "components.unet", "object", "m.json")
    with pytest.raises(ManifestError, match="'components.vae.sha256' must be a sha256"):
        field(data, "components.vae.sha256", "sha256", "m.json")
    with pytest.raises(ManifestError, match="'components.vae.bytes' must be an int"):
        field(data, "components.vae.bytes", "int", "m.json")
    with pytest.raises(ManifestError, match="'components.text' is missing"):
        field(data, "components.text", "object", "m.json")
    assert field(data, "components.text", "object", "m.json", default=None) is None


@pytest.mark.parametrize("content, message", [(b"\x89PNG\r\n\x1a\n\x00\xff", "binary"), (b"{oops", "not valid JSON"),
                                              (b"[1, 2]", "expected a JSON object")])
def test_read_json_object_names_the_file(tmp_path, content, message):
    path = tmp_path / "manifest.json"
    path.write_bytes(content)
    with pytest.raises(ManifestError, match=message) as err:
        read_json_object(path)
    assert str(path) in str(err.value)


def test_verify_files_hashes_once_then_trusts_the_stamp_until_a_file_changes(tmp_path):
    a, b = tmp_path / "a.plan", tmp_path / "b.plan"
    a.write_bytes(b"aaaa")
    b.write_bytes(b"bbbb")
    expected = {"a.plan": hashlib.sha256(b"aaaa").hexdigest(), "b.plan": hashlib.sha256(b"bbbb").hexdigest()}
    assert verify_files(tmp_path, expected, "m.json") == {"hashed": ["a.plan", "b.plan"], "trusted": []}
    assert verify_files(tmp_path, expected, "m.json") == {"hashed": [], "trusted": ["a.plan", "b.plan"]}
    b.write_bytes(b"bbbX")  # same size, new mtime
    os.utime(b, ns=(b.stat().st_atime_ns, b.stat().st_mtime_ns + 10**9))
    with pytest.raises(StaleFileError, match="b.plan has sha256"):
        verify_files(tmp_path, expected, "m.json")
    b.write_bytes(b"bbbb")
    os.utime(b, ns=(b.stat().st_atime_ns, b.stat().st_mtime_ns + 2 * 10**9))
    assert verify_files(tmp_path, expected, "m.json") == {"hashed": ["b.plan"], "trusted": ["a.plan"]}
    b.unlink()
    with pytest.raises(StaleFileError, match="b.plan is missing"):
        verify_files(tmp_path, expected, "m.json")


def _code_strings(path):
    """The string constants of a module that are not docstrings."""
    import ast

    tree = ast.parse(path.read_text())
    docs = {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body
            and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docs]


def test_the_manifest_format_has_one_home():
    """Only runtime/artifacts.py names the manifest file or compares a spec hash; export, build, the
    runtime's folder reader, the CLI and the server call it."""
    from pathlib import Path

    import kolors_trt

    root = Path(kolors_trt.__file__).resolve().parent.parent
    sources = [p for d in ("runtime", "engines", "export", "serve", "kolors_trt") for p in (root / d).rglob("*.py")]
    assert len(sources) > 30
    naming = sorted(str(p.relative_to(root)) for p in sources if "manifest.json" in _code_strings(p))
    assert naming == ["runtime/artifacts.py"]
    comparing = sorted(str(p.relative_to(root)) for p in sources if '["spec_hash"] != spec_hash(' in p.read_text())
    assert comparing == ["runtime/artifacts.py"]


def test_read_manifest_and_its_format(tmp_path, onnx_fp32):
    import json

    from kolors_trt.runtime.artifacts import (
        EngineFolderError,
        engine_specs_of,
        manifest_format,
        read_export_folder,
        read_manifest,
        spec_mismatches,
    )
    from kolors_trt.runtime.spec import DEFAULT_PROFILE, EXPORT_FORMAT, to_json

    assert manifest_format(tmp_path) is None and read_manifest(tmp_path) == {}
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 3}))
    assert manifest_format(tmp_path) == "3"
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ManifestError, match="manifest.json"):
        manifest_format(tmp_path)
    assert manifest_format(onnx_fp32) == EXPORT_FORMAT
    m = read_manifest(onnx_fp32)
    assert m == read_export_folder(onnx_fp32).manifest and m["runtime"]["vae_scaling_factor"] > 0
    with pytest.raises(EngineFolderError, match="model_dims/profile"):
        engine_specs_of({"model_dims": {}, "profile": {}}, tmp_path / "manifest.json")
    specs = engine_specs_of({"model_dims": m["model_dims"], "profile": to_json(DEFAULT_PROFILE)}, tmp_path)
    entries = {name: {"spec_hash": "x"} for name in specs}
    found = spec_mismatches({"engines": {**entries, "other": {"spec_hash": "y"}}}, specs)
    assert sorted(found) == sorted(specs) and all("another kolors-trt version or profile" in v for v in found.values())
