"""Helpers of the fault suites (test_faults_*.py): a real `python -m kolors_trt` subprocess
signalled at a chosen point, and checks that a folder is clean and a file outside it untouched.

Every wait is bounded; a process that outlives its test is killed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from kolors_trt.runtime.manifest import is_leftover

# `python -m kolors_trt ARGS`, with Ctrl-C's default handler: a test runner started in the
# background (a CI job, `make test &`) ignores SIGINT, and its children inherit that.
_MAIN = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
         "runpy.run_module('kolors_trt', run_name='__main__')")
START_S = 120  # until the chosen point is reached (imports and a model load on a busy 2-core host)
STOP_S = 15  # from the signal to the exit: "within seconds", with room for a loaded host


class Command:
    """One `kolors-trt` subprocess; stderr is collected line by line."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-c", _MAIN, *map(str, args)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list = []  # stderr, line by line, as it comes
        self._out: list = []
        self._readers = [threading.Thread(target=self._read, args=(pipe, sink), daemon=True)
                         for pipe, sink in ((self.proc.stderr, self.lines), (self.proc.stdout, self._out))]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(pipe, sink: list):
        for line in pipe:
            sink.append(line.rstrip("\n"))

    def _join(self):
        for reader in self._readers:
            reader.join(5)

    @property
    def out(self) -> str:
        return "\n".join(self._out)

    def wait_for(self, ready, what: str) -> None:
        """Poll ``ready()`` until true; fail (and kill) if the process ends or START_S passes first."""
        deadline = time.monotonic() + START_S
        while not ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"never reached {what} (exit {self.proc.returncode}):\n" + "\n".join(self.lines[-20:]))
            time.sleep(0.02)

    def wait_for_line(self, text: str) -> None:
        self.wait_for(lambda: any(text in line for line in self.lines), f"a log line with {text!r}")

    def signal(self, signum: int) -> float:
        """Send ``signum``, wait for the exit; return the seconds it took."""
        start = time.monotonic()
        self.proc.send_signal(signum)
        try:
            self.proc.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running {STOP_S} s after signal {signum}:\n" + "\n".join(self.lines[-20:]))
        seconds = time.monotonic() - start
        self._join()
        return seconds

    def finish(self) -> int:
        try:
            self.proc.wait(timeout=START_S)
        finally:
            self.kill()
        self._join()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)


def run(*args: str) -> Command:
    cmd = Command(*args)
    cmd.finish()
    return cmd


def leftovers(folder: Path) -> list:
    return sorted(p.name for p in Path(folder).iterdir() if is_leftover(p))


def appeared(folder: Path, prefix: str):
    """A readiness test: an entry of ``folder`` named ``prefix``... that is a leftover (a temp name)."""
    return lambda: any(p.name.startswith(prefix) and is_leftover(p) for p in Path(folder).iterdir())


def assert_interrupted(cmd: Command, signum: int, seconds: float, command: str, folder: Path) -> None:
    """Exit 130 within seconds, the one-line message naming the folder, no traceback."""
    assert cmd.proc.returncode == 130, cmd.stderr
    assert seconds < STOP_S
    what = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted"
    message = f"kolors-trt {command}: {what}; {folder} keeps its last complete state"
    assert [line for line in cmd.lines if line.startswith(f"kolors-trt {command}:")] == [message], cmd.stderr
    assert "Traceback" not in cmd.stderr


class Sentinel:
    """A file beside the folder under test (outside it) whose bytes and mtime must not change."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.write_bytes(b"outside the folder: never to be touched\n")
        self.stat = os.stat(self.path)

    def untouched(self) -> bool:
        if not self.path.is_file():
            return False
        st = os.stat(self.path)
        return (st.st_size, st.st_mtime_ns) == (self.stat.st_size, self.stat.st_mtime_ns) and \
            self.path.read_bytes() == b"outside the folder: never to be touched\n"


def copy_folder(src: Path, tmp_path: Path, name: str) -> tuple:
    """(a copy of folder ``src`` at tmp_path/name, its manifest's bytes, a Sentinel beside it)."""
    out = Path(tmp_path) / name
    shutil.copytree(src, out)
    return out, (out / "manifest.json").read_bytes(), Sentinel(Path(tmp_path) / "sentinel.txt")
