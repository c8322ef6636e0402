"""A live `kolors-trt serve` process for the server's tests: started on 127.0.0.1 with a free port (--port 0;
the port is read from the server's own "listening on" line), waited for until ready, and always ended
(SIGTERM, then SIGKILL) by the fixture that made it. Every wait is bounded in time.

Not a test module (no test_ prefix): the serve tests load it by path, tests/ being no package.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Optional

import httpx
from prometheus_client.parser import text_string_to_metric_families

LISTENING = re.compile(r"listening on (http://127\.0\.0\.1:\d+)")


class LiveServer:
    def __init__(self, folder, *args: str, key: Optional[str] = None, env: Optional[dict] = None):
        self.command = [sys.executable, "-m", "kolors_trt", "serve", "--onnx", str(folder), "--host", "127.0.0.1",
                        "--port", "0", *args]
        self.key = key
        inherited = {k: v for k, v in os.environ.items() if k != "KOLORS_TRT_API_KEY"}  # a key only when asked
        self.env = {**inherited, **(env or {})}
        self.lines: list = []
        self.url = None
        self.proc: Optional[subprocess.Popen] = None

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def start(self, timeout: float = 90.0) -> "LiveServer":
        self.proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=self.env, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()
        end = time.monotonic() + timeout
        while time.monotonic() < end and self.proc.poll() is None:
            found = [LISTENING.search(line) for line in self.lines]
            if any(found) and any(line.startswith("ready:") for line in self.lines):
                self.url = next(m.group(1) for m in found if m)
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the server did not become ready in {timeout} s:\n{self.output}")

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30.0) -> Optional[int]:
        """SIGTERM and wait; SIGKILL (the whole session) if it is still there. The exit status, or None."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode

    def client(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout)

    def openai(self, max_retries: int = 0, timeout: float = 60.0):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=self.key or "none", max_retries=max_retries,
                      timeout=timeout)

    def metrics(self) -> dict:
        """{(sample name, sorted labels): value} from GET /metrics, parsed by prometheus_client."""
        text = httpx.get(f"{self.url}/metrics", headers=self.headers, timeout=10).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}


def concurrently(calls: list, timeout: float = 60) -> list:
    """Run the calls on threads at once; each one's result, or the exception it raised."""
    results = [None] * len(calls)

    def run(i):
        try:
            results[i] = calls[i]()
        except Exception as err:  # noqa: BLE001 - the test inspects what each call ended with
            results[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return results


def sample(metrics: dict, name: str, **labels) -> float:
    """One sample's value (0 when absent)."""
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def total(metrics: dict, name: str, **labels) -> float:
    """The sum over the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in metrics.items() if n == name and want <= set(ls))


def png(seed: int, size=(70, 50)) -> bytes:
    """A random RGB PNG of ``size`` (width, height): a reference image."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB").save(buffer, "PNG")
    return buffer.getvalue()


def decode(b64_json: str):
    """An answer's b64_json as a PIL image."""
    import base64
    import io

    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64_json)))


def max_diff(got, want) -> int:
    """The largest 8-bit difference of two images of one size."""
    import numpy as np

    assert got.size == want.size
    return int(np.abs(np.asarray(got.convert("RGB"), int) - np.asarray(want, int)).max())
