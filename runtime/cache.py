"""Caches of the runtime: prompt embeddings (memory LRU) and IP tokens (memory
LRU plus an optional folder of ``.npy`` files that survives restarts).

IP tokens are keyed by the sha256 of the image encoder's exact input (the
preprocessed ``pixel_values`` bytes and shape) together with the identity of
the encoder (its graph or plan sha256). Hashing the preprocessed pixels rather
than the file bytes means: the same picture re-encoded, re-saved with other
metadata or passed as a PIL image hits the cache; EXIF orientation, alpha
compositing and the resize are already applied, so two inputs share a key
exactly when the encoder would see the same tensor; and a disk folder shared by
two models never mixes their tokens. Its cost is one decode and resize per
request (milliseconds), far below one encoder run.

Files are plain ``.npy`` read with ``allow_pickle=False`` and checked before use
(an ndarray of the expected dtype and shape, all finite); a damaged, truncated,
foreign or non-finite file is logged, deleted and counted as a miss, so the value
is recomputed and the file rewritten. Each file is written under a temporary name
unique to its writer and renamed into place (manifest.atomic_path), so threads and
processes sharing a folder never read half a file.

The folder can be bounded (``max_bytes``): after each write the oldest files go
first, by last use (a disk hit refreshes the file's mtime), until the ``.npy``
files fit. The folder is read at each write, so processes sharing it (a server's
replicas) keep it bounded together; a server whose clients upload references
cannot grow it without bound.

Both caches lock themselves: one Pipeline may serve several threads.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Hashable, Optional

import numpy as np

from .errors import InputError
from .manifest import atomic_path

logger = logging.getLogger(__name__)

DEFAULT_PROMPT_ITEMS = 64
DEFAULT_IP_ITEMS = 64


class CacheError(InputError):
    """A cache folder cannot be used."""


@dataclass
class CacheStats:
    hits: int = 0  # memory hits
    disk_hits: int = 0
    misses: int = 0
    stores: int = 0
    evictions: int = 0  # files deleted to keep the folder within its bound

    def as_dict(self) -> dict:
        return {"hits": self.hits, "disk_hits": self.disk_hits, "misses": self.misses, "stores": self.stores,
                "evictions": self.evictions}


class LRUCache:
    """A bounded mapping that forgets the least recently used entry."""

    def __init__(self, max_items: int):
        if max_items < 0:
            raise CacheError(f"cache: max_items must be >= 0, found {max_items}")
        self.max_items = int(max_items)
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def get(self, key: Hashable, count_miss: bool = True):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.stats.hits += 1
                return self._items[key]
            if count_miss:
                self.stats.misses += 1
            return None

    def put(self, key: Hashable, value) -> None:
        with self._lock:
            self.stats.stores += 1
        self.insert(key, value)

    def insert(self, key: Hashable, value) -> None:
        """Store without counting (a value promoted from disk)."""
        if self.max_items == 0:
            return
        with self._lock:
            self._items[key] = read_only(value)
            self._items.move_to_end(key)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def count(self, name: str) -> None:
        with self._lock:
            setattr(self.stats, name, getattr(self.stats, name) + 1)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


def read_only(value):
    """Freeze cached arrays (alone or in a tuple): callers share them, none may write."""
    for array in value if isinstance(value, tuple) else (value,):
        if isinstance(array, np.ndarray):
            array.setflags(write=False)
    return value


def content_key(namespace: str, array: np.ndarray) -> str:
    """sha256 over a namespace (the encoder's identity), the array's dtype, shape and bytes."""
    a = np.ascontiguousarray(array)
    h = hashlib.sha256()
    h.update(namespace.encode())
    h.update(f"|{a.dtype.str}|{a.shape}|".encode())
    h.update(a.tobytes())
    return h.hexdigest()


class ArrayCache:
    """Memory LRU of float32 arrays by string key, backed by ``folder/{key}.npy`` when a folder is given.
    ``shape``: the shape every value has (files of another shape are discarded). ``max_bytes``: the most the
    folder's files may hold (None: no bound); the least recently used go first."""

    def __init__(self, max_items: int = DEFAULT_IP_ITEMS, folder: Optional[str | Path] = None,
                 shape: Optional[tuple] = None, max_bytes: Optional[int] = None):
        if max_bytes is not None and max_bytes < 0:
            raise CacheError(f"cache: max_bytes must be >= 0, found {max_bytes}")
        self.memory = LRUCache(max_items)
        self.shape = None if shape is None else tuple(shape)
        self.max_bytes = max_bytes
        self.folder = Path(folder) if folder is not None else None
        if self.folder is not None:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise CacheError(f"cache: cannot create the cache folder {self.folder} ({err}); pass a writable folder") from err
            if not os.access(self.folder, os.W_OK):
                raise CacheError(f"cache: the cache folder {self.folder} is not writable; pass a writable folder")

    @property
    def stats(self) -> CacheStats:
        return self.memory.stats

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.npy"

    def problem(self, value) -> Optional[str]:
        """Why a value read from disk cannot be used, or None."""
        if not isinstance(value, np.ndarray):
            return f"holds a {type(value).__name__}, not one array (.npz or another format)"
        if value.dtype != np.float32:
            return f"has dtype {value.dtype}, expected float32"
        if self.shape is not None and value.shape != self.shape:
            return f"has shape {value.shape}, expected {self.shape}"
        if not np.isfinite(value).all():
            return "holds NaN or Inf"
        return None

    def _load(self, path: Path) -> Optional[np.ndarray]:
        """The checked array of a cache file; a bad file is deleted (None)."""
        try:
            value = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            reason = f"is unreadable ({err})"
        else:
            reason = self.problem(value)
            if reason is None:
                return value
            if hasattr(value, "close"):  # an NpzFile holds its file open
                value.close()
        logger.warning("cache: %s %s; deleting it and recomputing", path, reason)
        with contextlib.suppress(OSError):
            path.unlink()
        return None

    def contains(self, key: str) -> bool:
        """Whether ``key`` is in memory or on disk (not counted; a disk file is checked when read)."""
        return key in self.memory or (self.folder is not None and self._path(key).is_file())

    def get(self, key: str) -> Optional[np.ndarray]:
        value = self.memory.get(key, count_miss=False)
        if value is not None:
            return value
        if self.folder is not None and self._path(key).is_file():
            value = self._load(self._path(key))
            if value is not None:
                with contextlib.suppress(OSError):  # last use: the bound evicts by mtime
                    os.utime(self._path(key))
                self.memory.count("disk_hits")
                self.memory.insert(key, value)
                return value
        self.memory.count("misses")
        return None

    def put(self, key: str, value: np.ndarray) -> None:
        self.memory.put(key, value)
        if self.folder is None:
            return
        path = self._path(key)
        try:
            with atomic_path(path) as tmp:  # a name unique to this writer, renamed into place
                np.save(tmp, np.ascontiguousarray(value), allow_pickle=False)
        except OSError as err:
            logger.warning("cache: cannot write %s (%s); keeping the value in memory only", path, err)
            return
        if self.max_bytes is not None:
            self._evict(keep=path)

    def _evict(self, keep: Path) -> None:
        """Delete the least recently used files (oldest mtime) until the folder's ``.npy`` files fit max_bytes;
        ``keep`` (the file just written) stays."""
        files = []
        with contextlib.suppress(OSError), os.scandir(self.folder) as entries:
            for entry in entries:
                if entry.name.endswith(".npy"):
                    with contextlib.suppress(OSError):  # another process may delete it meanwhile
                        info = entry.stat(follow_symlinks=False)
                        files.append((info.st_mtime_ns, entry.name, info.st_size))
        total = sum(size for _, _, size in files)
        for _, name, size in sorted(files):
            if total <= self.max_bytes:
                break
            if name == keep.name:
                continue
            with contextlib.suppress(FileNotFoundError):
                (self.folder / name).unlink()
                self.memory.count("evictions")
            total -= size


__all__ = ["ArrayCache", "CacheError", "CacheStats", "LRUCache", "content_key", "DEFAULT_IP_ITEMS", "DEFAULT_PROMPT_ITEMS"]
