"""The runtime's reader of a component's LoRA map (written by export/lora_map.py, which
documents the format): for each module a LoRA may change, the initializer that holds its
weight, how (transposed, scaled, dtype) and where its base bytes lie in the folder.

A map is read strictly: format and version, the graph it was made for (its sha256 must be
the component's, so a map never outlives its graph), every file path contained in the
folder and every (offset, size) inside its file. Base weights are read through a memory
map, in the stored dtype and layout, and never modified: every fused weight is computed
from them, which is what makes switching adapters exact.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .artifacts import MANIFEST
from .lora_files import LoraUnavailableError
from .manifest import ManifestError, contained, read_json_object

logger = logging.getLogger(__name__)

MAP_FORMAT = "kolors-trt-lora-map"
MAP_VERSION = 1
LORA_COMPONENTS = ("unet", "text_encoder")
_DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class Target:
    """Where one module's weight lives: ``initializer`` holds ``scale * W`` (``W^T`` when ``transpose``)."""

    module: str
    kind: str  # "linear" | "conv"
    module_shape: tuple  # [out, in] or [out, in, kh, kw]
    initializer: str
    transpose: bool
    scale: float
    dtype: str
    shape: tuple  # as stored
    file: Path
    offset: int

    def base(self) -> np.ndarray:
        """The stored base weight (read-only memory map)."""
        return np.memmap(self.file, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)


@dataclass(frozen=True)
class LoraMap:
    component: str
    supported: bool
    reason: Optional[str]
    targets: dict  # module -> Target

    @property
    def layers_per_block(self) -> int:
        """The UNet's layers per down block (resnets in down_blocks.0), for SGM-named kohya files."""
        resnets = {name.split(".")[3] for name in self.targets if name.startswith("down_blocks.0.resnets.")}
        return max(len(resnets), 1)


def read_lora_map(root: Path, component: str, entry: dict, graph_sha256: Optional[str]) -> Optional[LoraMap]:
    """The map a manifest entry names (``lora_map``), or None when it names none (a folder exported before
    LoRA maps). ``graph_sha256``: the sha256 of the graph the component runs (or was built from)."""
    rel = entry.get("lora_map")
    if rel is None:
        return None
    where = f"{root / MANIFEST}: {component}.lora_map"
    path = contained(root, rel, where)
    m = read_json_object(path)
    if m.get("format") != MAP_FORMAT or m.get("version") != MAP_VERSION or m.get("component") != component:
        raise ManifestError(f"{path}: not a version-{MAP_VERSION} LoRA map of {component} (format "
                            f"{str(m.get('format'))[:60]!r}, version {m.get('version')!r}); re-export")
    if graph_sha256 is not None and m.get("graph_sha256") != graph_sha256:
        raise ManifestError(f"{path}: made for another {component} graph (sha256 {str(m.get('graph_sha256'))[:16]}..., "
                            f"the folder's is {graph_sha256[:16]}...); re-export")
    if not m.get("supported"):
        return LoraMap(component, False, str(m.get("reason") or "the map says LoRA is not supported"), {})
    targets = {}
    sizes: dict = {}
    raw = m.get("targets")
    if not isinstance(raw, dict):
        raise ManifestError(f"{path}: field 'targets' must be an object")
    for module, t in raw.items():
        try:
            file = contained(root, t["file"], f"{path}: targets.{module}.file")
            target = Target(module, str(t["kind"]), tuple(int(v) for v in t["module_shape"]), str(t["initializer"]),
                            bool(t["transpose"]), float(t["scale"]), str(t["dtype"]), tuple(int(v) for v in t["shape"]),
                            file, int(t["offset"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ManifestError(f"{path}: targets.{module} is malformed ({err!r}); re-export") from None
        if target.dtype not in _DTYPES or target.kind not in ("linear", "conv"):
            raise ManifestError(f"{path}: targets.{module}: dtype {target.dtype!r} / kind {target.kind!r} unsupported")
        want = target.module_shape[::-1] if target.transpose else target.module_shape
        end = target.offset + int(np.prod(target.shape)) * np.dtype(target.dtype).itemsize
        if tuple(want) != target.shape or target.offset < 0:
            raise ManifestError(f"{path}: targets.{module}: stored shape {target.shape} does not fit {target.module_shape}")
        if file not in sizes:
            sizes[file] = file.stat().st_size if file.is_file() else -1
        if end > sizes[file]:
            raise ManifestError(f"{path}: targets.{module} lies past the end of {file.name}; re-export")
        targets[module] = target
    return LoraMap(component, True, None, targets)


__all__ = ["LORA_COMPONENTS", "LoraMap", "LoraUnavailableError", "Target", "read_lora_map"]
