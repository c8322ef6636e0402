"""Reading and writing the toolkit's folders: atomic writes, contained paths,
typed manifest fields and a verification stamp. Export, engines, runtime and
serve all go through this module.

- **Atomic.** Every file is written under a temporary name in its own folder
  (``.{name}.kt-tmp-{pid}-{token}{suffix}``) and renamed into place, so a reader
  sees the old file or the new one, never half of one. ``clean_leftovers``
  removes what an interrupted run left behind; ``deferred_interrupts`` keeps
  SIGINT and SIGTERM out of a commit of several files and their manifest.
- **Contained.** A path read from a manifest is relative, has no ``..`` and
  resolves (symlinks followed) inside its folder, or the folder is refused.
- **Typed.** A manifest error names the file and the field, what was expected
  and what was found.
- **Verified once.** Hashing a 19 GB engine folder on every start is too slow:
  ``verify_files`` keeps ``.verified.json`` (size, mtime, sha256 per file) beside
  the manifest and re-hashes only files whose size or mtime changed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import threading
from pathlib import Path, PurePosixPath
from typing import Iterator, Mapping, Optional

from .errors import InputError
from .hashing import sha256_file

logger = logging.getLogger(__name__)

STAMP = ".verified.json"
TMP_MARK = ".kt-tmp-"
_SHA256 = re.compile(r"[0-9a-f]{64}")


class FolderError(InputError):
    """A path is not a usable export or engine folder."""


class ManifestError(FolderError):
    """A manifest is missing, unreadable or has a field of the wrong kind; names the file and the field."""


class PathEscapeError(ManifestError):
    """A path in a manifest is absolute, climbs out with '..', or resolves outside its folder."""


class StaleFileError(ManifestError):
    """A file differs from the hash its manifest records."""


# ---- atomic writes ----------------------------------------------------------------------------


def temp_path(path: Path, suffix: Optional[str] = None) -> Path:
    """A fresh temporary name beside ``path`` (unique per process and call), ending in ``suffix``
    (default: the path's own suffix, so writers that pick a format by suffix keep working)."""
    path = Path(path)
    suffix = path.suffix if suffix is None else suffix
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: Optional[str] = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds, flush it and rename it
    onto ``path``; when it raises (KeyboardInterrupt included), delete it."""
    path = Path(path)
    tmp = temp_path(path, suffix)
    try:
        yield tmp
        if tmp.is_file():
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            if tmp.is_dir():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def write_json_atomic(path: str | Path, data: object) -> Path:
    text = json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
    return write_bytes_atomic(path, text.encode())


def is_leftover(path: Path) -> bool:
    """A temporary file or folder of an interrupted write."""
    return TMP_MARK in Path(path).name


def clean_leftovers(folder: str | Path) -> list[Path]:
    """Remove temporary files and folders an interrupted run left in ``folder`` (not below it)."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if not is_leftover(entry):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError as err:
            logger.warning("cannot remove the leftover %s (%s)", entry, err)
            continue
        removed.append(entry)
    if removed:
        logger.info("%s: removed %d leftover(s) of an interrupted run", folder, len(removed))
    return removed


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends and deliver them then, so a commit of
    several files and a manifest is never cut in two by an interrupt. SIGKILL cannot be
    held: a folder cut by it is refused by its hashes (see artifacts.py).

    The Python handlers are swapped for a recorder rather than the signals masked: the
    kernel hands a masked process signal to any other thread (torch, ONNX Runtime and
    TensorRT start several), and Python runs its handler in the main thread regardless."""
    if threading.current_thread() is not threading.main_thread():
        yield  # Python runs handlers in the main thread only: nothing can interrupt this one
        return
    held: list = []
    saved = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        current = signal.getsignal(signum)
        if current is None or current == signal.SIG_IGN:
            continue  # set outside Python, or ignored: leave it alone
        saved[signum] = signal.signal(signum, lambda n, _frame: held.append(n))
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
        if held:
            signal.raise_signal(held[0])  # the restored handler runs now (KeyboardInterrupt, or the default)


# ---- contained paths -------------------------------------------------------------------------


def contained(root: str | Path, value: object, where: str) -> Path:
    """``root / value`` for a relative path ``value`` that stays inside ``root``; ``where`` names the
    file and field for the error ("out/manifest.json: components.unet.file")."""
    if not isinstance(value, str) or not value or "\x00" in value:
        raise ManifestError(f"{where}: expected a relative file name, found {value!r}")
    pure = PurePosixPath(value.replace("\\", "/"))
    if pure.is_absolute() or Path(value).is_absolute() or re.match(r"^[A-Za-z]:", value):
        raise PathEscapeError(f"{where}: {value!r} is an absolute path; a folder's files must be named relative "
                              "to it: rewrite the folder with kolors-trt export / build")
    if ".." in pure.parts:
        raise PathEscapeError(f"{where}: {value!r} climbs out of the folder with '..'; refusing the folder")
    root = Path(root)
    path = root / Path(*pure.parts)
    real_root = root.resolve()
    real = path.resolve()
    if real != real_root and real_root not in real.parents:
        raise PathEscapeError(f"{where}: {value!r} resolves to {real}, outside {real_root} (a symlink leaves the "
                              "folder); refusing the folder")
    return path


# ---- typed manifest fields ---------------------------------------------------------------------


def read_json_object(path: str | Path) -> dict:
    """A JSON object from ``path``; ManifestError naming the file when it is missing, binary or not an object."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
        data = json.loads(text)
    except FileNotFoundError:
        raise ManifestError(f"{path}: missing") from None
    except IsADirectoryError:
        raise ManifestError(f"{path}: is a folder, expected a JSON file") from None
    except UnicodeDecodeError:
        raise ManifestError(f"{path}: not text (binary content); expected a JSON manifest") from None
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path}: not valid JSON ({err})") from None
    except OSError as err:
        raise ManifestError(f"{path}: unreadable ({err})") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


_KINDS = {"object": dict, "string": str, "list": list, "bool": bool}


def is_sha256(value) -> bool:
    """A lower-case hex sha256 digest."""
    return isinstance(value, str) and bool(_SHA256.fullmatch(value))


def field(data: Mapping, dotted: str, kind: str, where: str | Path, default=...):
    """``data["a"]["b"]`` for ``dotted`` "a.b", checked to be of ``kind`` ("object", "string", "list",
    "bool", "number", "int", "sha256"); ``default`` when absent, if given. ``where`` is the file."""
    node = data
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            if default is not ...:
                return default
            raise ManifestError(f"{where}: field {dotted!r} is missing")
        node = node[part]
    ok = {
        "number": isinstance(node, (int, float)) and not isinstance(node, bool),
        "int": isinstance(node, int) and not isinstance(node, bool),
        "sha256": is_sha256(node),
    }.get(kind)
    if ok is None:
        ok = isinstance(node, _KINDS[kind])
    if not ok:
        shown = repr(node) if len(repr(node)) < 80 else f"a {type(node).__name__}"
        article = "an" if kind[0] in "aeiou" else "a"
        raise ManifestError(f"{where}: field {dotted!r} must be {article} {kind}, found {shown}")
    return node


# ---- verification with a stamp -----------------------------------------------------------------


def _read_stamp(root: Path) -> dict:
    try:
        stamp = json.loads((root / STAMP).read_text())
        return stamp.get("files", {}) if isinstance(stamp, dict) and isinstance(stamp.get("files"), dict) else {}
    except (OSError, ValueError):
        return {}


def verify_files(root: str | Path, expected: Mapping[str, str], where: str | Path) -> dict:
    """Check that each file ``root/rel`` has sha256 ``expected[rel]``; raise StaleFileError naming the
    first that differs. Files whose size and mtime match the stamp of an earlier check are not
    re-hashed. Returns {"hashed": [...], "trusted": [...]}."""
    root = Path(root)
    stamp = _read_stamp(root)
    fresh, hashed, trusted = {}, [], []
    for rel, want in expected.items():
        path = root / rel
        try:
            st = path.stat()
        except OSError:
            raise StaleFileError(f"{where}: {rel} is missing; re-run kolors-trt export / build") from None
        seen = stamp.get(rel)
        key = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": want}
        if isinstance(seen, dict) and seen == key:
            trusted.append(rel)
            fresh[rel] = key
            continue
        found = sha256_file(path)
        hashed.append(rel)
        if found != want:
            raise StaleFileError(
                f"{where}: {rel} has sha256 {found[:16]}..., the manifest records {want[:16]}...; the file was "
                "changed after the manifest was written: re-run kolors-trt export / build for this folder"
            )
        fresh[rel] = key
    if hashed and fresh != stamp:
        try:
            write_json_atomic(root / STAMP, {"version": 1, "files": fresh})
        except OSError as err:  # a read-only deployment: verify every time
            logger.info("%s: cannot keep the verification stamp (%s)", root, err)
    return {"hashed": hashed, "trusted": trusted}


__all__ = [
    "FolderError",
    "ManifestError",
    "PathEscapeError",
    "STAMP",
    "StaleFileError",
    "atomic_path",
    "clean_leftovers",
    "contained",
    "deferred_interrupts",
    "field",
    "is_leftover",
    "is_sha256",
    "read_json_object",
    "temp_path",
    "verify_files",
    "write_bytes_atomic",
    "write_json_atomic",
]
