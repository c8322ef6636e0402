"""The local Ray instance of `kolors-trt serve --ray` (no --address): its folder and its processes.

Everything of the instance lives in one fresh temporary folder: Ray's session (sockets, logs), its auth
token (Ray would write ~/.ray/auth_token) and the replicas' shared IP-token cache. Its processes are found
by that folder, never by name, so other Ray instances on the host are never touched. Linux's /proc is how;
elsewhere none are found and Ray's own shutdown is all there is. No ray import here.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from .config import ConfigError

# Ray keeps AF_UNIX sockets at <temp>/session_<date>_<time>_<us>_<pid>/sockets/plasma_store, up to 84
# characters past the base with our folder, and such paths end at 107 bytes: the base must be short.
RAY_TEMP_BASE_CHARS = 23
RAY_TEMP_PREFIX = "kolors-ray-"
RAY_EXIT_WAIT_S = 10.0  # after ray.shutdown(): how long the local instance's processes get to exit
RAY_CORE = ("gcs_server", "raylet")


def ray_temp_dir() -> Path:
    """A fresh folder for a local Ray instance under a base short enough for Ray's socket paths."""
    for base in (tempfile.gettempdir(), "/tmp"):
        if len(base) <= RAY_TEMP_BASE_CHARS and os.path.isdir(base) and os.access(base, os.W_OK):
            return Path(tempfile.mkdtemp(prefix=RAY_TEMP_PREFIX, dir=base))
    raise ConfigError(f"serve --ray: the temporary folder {tempfile.gettempdir()} is longer than "
                      f"{RAY_TEMP_BASE_CHARS} characters (Ray's socket paths end at 107 bytes) and /tmp cannot be "
                      "used; set TMPDIR to a short folder")


def ray_environment(folder: Path) -> dict:
    """Environment of a local Ray instance whose state stays in ``folder``: its auth token file there (Ray
    would write ~/.ray/auth_token), no usage reports. Every process of the instance inherits it."""
    token = folder / "auth_token"
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}


def processes_of(folder: Path) -> list:
    """Pids of the local Ray instance in ``folder`` (this process aside): processes whose command line or
    environment names the folder (its token path is inherited by every process Ray starts) or that hold a file
    in it open (Ray's agents retitle themselves, which wipes both; they keep their logs open)."""
    found, needle = [], str(folder).encode()
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if int(entry.name) == os.getpid():
                continue
            if needle in (entry / "cmdline").read_bytes() or needle in (entry / "environ").read_bytes() or any(
                    os.readlink(fd).startswith(str(folder)) for fd in (entry / "fd").iterdir()):
                found.append(int(entry.name))
        except (OSError, ValueError):  # gone meanwhile, or not ours to read
            continue
    return found


def end_processes(folder: Path, wait_s: float) -> list:
    """Wait up to ``wait_s`` for the local instance's processes to exit, then SIGKILL those left; their pids."""
    end = time.monotonic() + wait_s
    while processes_of(folder) and time.monotonic() < end:
        time.sleep(0.1)
    left = processes_of(folder)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return left


def core_processes(folder: Path) -> list:
    """Pids of the local instance's gcs_server and raylet: without them nothing of it can be stopped cleanly."""
    core = []
    for pid in processes_of(folder):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() in RAY_CORE:
                core.append(pid)
        except OSError:
            continue
    return core


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def watch_core(folder: Path, core: list, done: threading.Event) -> None:
    """While the local instance is in use: if its gcs_server or raylet ends (SIGTERM to the whole process group,
    as systemd's default KillMode or `timeout` send; the OOM killer), no Ray call can succeed any more (the next
    one blocks for 60 s, then Ray aborts the process). End its other processes, remove its folder and exit 1."""
    while not done.wait(0.5):
        if not all(running(pid) for pid in core):
            print("kolors-trt serve: error: the local Ray instance's gcs_server or raylet ended; ending its other "
                  "processes (to stop the server, signal this process only: e.g. systemd KillMode=mixed)",
                  file=sys.stderr, flush=True)
            end_processes(folder, 0.0)
            shutil.rmtree(folder, ignore_errors=True)
            os._exit(1)  # the main thread may be blocked inside Ray for a minute: nothing left to wait for


def free_port(host: str) -> int:
    """A port free on ``host`` now (Ray's proxy is given a number; it cannot report one it picked)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


__all__ = ["RAY_EXIT_WAIT_S", "core_processes", "end_processes", "free_port", "processes_of", "ray_environment",
           "ray_temp_dir", "running", "watch_core"]
