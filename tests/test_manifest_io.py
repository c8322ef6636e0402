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
