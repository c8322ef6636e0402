"""The README's examples run as written: the runtime's Python example and the quick start's generate
command, from a folder laid out as `make engines` leaves it (out/onnx), on the CPU."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

README = Path(__file__).resolve().parent.parent / "README.md"

pytestmark = pytest.mark.slow


def section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


@pytest.fixture
def workdir(onnx_fp16, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "onnx").symlink_to(onnx_fp16)  # `make engines` exports fp16 graphs (VAE fp32) there
    return tmp_path


def test_runtime_python_example(workdir):
    (code,) = re.findall(r"```python\n(.*?)```", section("Runtime"), re.S)[:1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[1, 2]" in proc.stdout and "'unet': 30" in proc.stdout, proc.stdout
    # 80 rows with guidance at every step, then 10 + 3, then DeepCache: 2 x 4 full, 2 x 6 shallow
    assert "{'unet': 101, 'unet_shallow': 12}" in proc.stdout, proc.stdout
    with Image.open(workdir / "out.png") as im:
        assert im.size == (256, 256) and "prompt" in im.text


def test_quick_start_generate_command(workdir):
    block = next(b for b in re.findall(r"```sh\n(.*?)```", section("Quick start"), re.S) if "kolors-trt generate" in b)
    command = block[block.index("kolors-trt generate"):].split("#", 1)[0].replace("\\\n", " ").split()
    kolors_trt = Path(sys.executable).with_name("kolors-trt")
    proc = subprocess.run([str(kolors_trt), *command[1:]], cwd=workdir, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote dog.png (256x256, seed 1)" in proc.stdout
