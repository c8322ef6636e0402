"""LoRA adapters on a Pipeline: loaded once, switched per request without a rebuild.

The state of a Pipeline's LoRAs lives here (``Pipeline.lora``); the pipeline only asks it
to resolve a request's ``loras`` and to apply a set before an engine runs.

- **Adapters** are read by lora_files.py, checked against the folder's LoRA maps (every
  module must exist, every shape fit: otherwise a typed error names the key, the expected
  and the found shapes) and kept as immutable float32 (down, up, scale) layers with the
  file's sha256. A failed load changes nothing.
- **Sets.** A request names ``{adapter: weight}`` (None: the default set of
  ``set_adapters``). Per component the set becomes a key: the sorted (sha256, weight) of
  its adapters that touch that component, or None for the base weights. Requests with the
  same UNet key share a UNet batch; prompt embeddings are cached per text-encoder key.
- **Applying** (``apply``) asks the component's engine to use the key's weights
  (``Engine.use_weights``). Fused weights are always ``base + sum(weight * scale * up @ down)``
  in float32 from the map's base bytes, cast to the stored dtype, in the key's order: so
  switching A -> B -> A, or back to none, gives the same bits as the first time, never a
  delta on a delta. ONNX Runtime keeps a small LRU of sessions with fused initializers;
  TensorRT refits in place.
- ``lora_dir``: adapters by file stem (``<dir>/<name>.safetensors``), loaded and hashed on
  first use; a name is a plain stem and its file must resolve inside the folder.

Thread-safe: adapters and the default set are guarded by a lock; ``apply`` runs under the
pipeline's engine lock.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from .engine import UNKNOWN_WEIGHTS
from .folder import ModelFolder
from .hashing import sha256_file
from .lora_files import LoraError, LoraLayer, check_values, parse_layers, read_peft_config, read_safetensors, weight_files
from .lora_map import LORA_COMPONENTS, LoraMap, LoraUnavailableError, read_lora_map

logger = logging.getLogger(__name__)

DEFAULT_MAX_FILE_BYTES = 2 << 30  # a LoRA file larger than this is refused (Kolors LoRAs are 10-900 MB)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# One request's adapters, resolved: ((Adapter, weight), ...) sorted by name, zero weights dropped.
LoraSet = tuple


@dataclass(frozen=True, eq=False)
class Adapter:
    name: str
    source: str  # the file(s) it was read from
    sha256: str
    layers: dict  # component -> {module: LoraLayer}

    def info(self) -> dict:
        ranks = [layer.rank for c in self.layers.values() for layer in c.values()]
        return {"id": self.name, "object": "lora", "sha256": self.sha256, "source": self.source,
                "components": {c: len(m) for c, m in self.layers.items() if m}, "rank": max(ranks, default=0)}


def _sha256(files: Sequence[Path]) -> str:
    """The adapter's identity: its weight files and the PEFT configs that scale them (lora_alpha, r)."""
    if len(files) == 1:
        return sha256_file(files[0])
    import hashlib

    return hashlib.sha256("".join(sha256_file(f) for f in files).encode()).hexdigest()


def _unavailable(component: str, lora_map: Optional[LoraMap]) -> str:
    if lora_map is None:
        return (f"this folder has no LoRA map for its {component} (an export folder written before kolors-trt recorded "
                "one, or an engine folder built without --refit); re-export, or rebuild with kolors-trt build --refit")
    return f"LoRA cannot apply to the {component}: {lora_map.reason}"


def check_layer(adapter: str, layer: LoraLayer, lora_map: Optional[LoraMap]) -> None:
    """The layer fits the module it names in this model, else LoraError / LoraUnavailableError."""
    if lora_map is None or not lora_map.supported:
        raise LoraUnavailableError(f"lora {adapter}: {_unavailable(layer.component, lora_map)}")
    target = lora_map.targets.get(layer.module)
    if target is None:
        raise LoraError(f"lora {adapter}: {layer.key}: this model's {layer.component} has no module {layer.module!r}")
    want = target.module_shape
    down, up = layer.down.shape, layer.up.shape
    fits = (len(down) == len(want) and len(up) == len(want) and down[0] == up[1] and up[0] == want[0]
            and tuple(down[1:]) == tuple(want[1:]) and all(d == 1 for d in up[2:]))
    if not fits:
        makes = (up[0],) + tuple(down[1:]) if len(up) and len(down) else ()
        raise LoraError(f"lora {adapter}: {layer.key}: {layer.component} {layer.module} is {list(want)} in this model; "
                        f"the file's down {list(down)} and up {list(up)} make {list(makes)}: a LoRA made for another "
                        "model, or a damaged file")


class LoraManager:
    def __init__(self, folder: ModelFolder, engines: Mapping, lora_dir: Optional[str | Path] = None,
                 max_file_bytes: int = DEFAULT_MAX_FILE_BYTES):
        self.engines = engines
        self.maps = {c: read_lora_map(folder.root, c, folder.entries.get(c, {}), _graph_sha(folder, c))
                     for c in LORA_COMPONENTS}
        self.lora_dir = Path(lora_dir).resolve() if lora_dir is not None else None
        self.max_file_bytes = int(max_file_bytes)
        self.adapters: dict = {}
        self.default: LoraSet = ()
        self.swaps = 0
        self.swap_seconds = 0.0
        self.on_swap: Optional[Callable[[str, float], None]] = None  # (component, seconds): the server's metrics
        self._lock = threading.RLock()
        self._loading = threading.Lock()  # one first load from lora_dir at a time: N requests naming a new file read it once

    # ---- adapters ---------------------------------------------------------------------------

    def load(self, path: str | Path, weight_name: Optional[str] = None, adapter_name: Optional[str] = None) -> str:
        """Read, check and add one adapter (diffusers' load_lora_weights); returns its name. The new adapter
        becomes the default set with weight 1, as diffusers activates the adapter it just loaded."""
        with self._lock:
            name = adapter_name if adapter_name is not None else self._free_name()
            if not isinstance(name, str) or not name:
                raise LoraError(f"lora: adapter_name must be a non-empty string, found {name!r}")
            if name in self.adapters:
                raise LoraError(f"lora: adapter name {name!r} is already in use; unload_lora_weights({name!r}) first "
                                "or choose another adapter_name")
        adapter = self._read(Path(path), weight_name, name)
        with self._lock:
            if name in self.adapters:
                raise LoraError(f"lora: adapter name {name!r} was taken while {path} was read")
            self.adapters[name] = adapter
            self.default = ((adapter, 1.0),)
        logger.info("lora %s: %s (%s)", name, adapter.source, adapter.info()["components"])
        return name

    def _free_name(self) -> str:
        i = len(self.adapters)
        while f"default_{i}" in self.adapters:
            i += 1
        return f"default_{i}"

    def _read(self, path: Path, weight_name: Optional[str], name: str) -> Adapter:
        files = weight_files(path, weight_name)
        modules = {c: frozenset(m.targets) for c, m in self.maps.items() if m is not None and m.supported}
        unavailable = {c: _unavailable(c, m) for c, m in self.maps.items() if m is None or not m.supported}
        unet = self.maps.get("unet")
        per_block = unet.layers_per_block if unet is not None else 2
        layers: dict = {c: {} for c in LORA_COMPONENTS}
        for file, config in files:
            size = file.stat().st_size
            if size > self.max_file_bytes:
                raise LoraError(f"lora {name}: {file} is {size / 2**20:.1f} MiB, over the limit of "
                                f"{self.max_file_bytes / 2**20:.1f} MiB")
            tensors, metadata = read_safetensors(file)
            tensors = check_values(tensors, str(file))
            for layer in parse_layers(tensors, metadata, str(file), modules, per_block, read_peft_config(config),
                                      unavailable):
                check_layer(name, layer, self.maps.get(layer.component))
                if layer.module in layers[layer.component]:
                    raise LoraError(f"lora {name}: {layer.component} {layer.module} appears twice ({layer.key})")
                layers[layer.component][layer.module] = layer
        if not any(layers.values()):
            raise LoraError(f"lora {name}: {path} holds no LoRA weights")
        source = ", ".join(f.name for f, _ in files)
        return Adapter(name, source, _sha256([p for pair in files for p in pair if p is not None]), layers)

    def adapter(self, name: str) -> Adapter:
        """A loaded adapter; with lora_dir, ``<lora_dir>/<name>.safetensors`` is loaded on first use."""
        if not isinstance(name, str):
            raise LoraError(f"lora: adapter names are strings, found {name!r}")
        with self._lock:
            if name in self.adapters:
                return self.adapters[name]
        if self.lora_dir is None:
            raise LoraError(f"lora: unknown adapter {name!r}; loaded: {sorted(self.adapters)} (load_lora_weights)")
        if not _NAME.match(name) or ".." in name:
            raise LoraError(f"lora: {name!r} is not an adapter name (letters, digits, '.', '_', '-'; a file stem in "
                            "the LoRA folder)")
        file = self.lora_dir / f"{name}.safetensors"
        if not file.is_file() or file.resolve().parent != self.lora_dir:
            raise LoraError(f"lora: unknown adapter {name!r}: no {name}.safetensors in the LoRA folder (GET /v1/loras "
                            "lists them)")
        with self._loading:
            with self._lock:
                if name in self.adapters:  # loaded by a request that held the loading lock first
                    return self.adapters[name]
            adapter = self._read(file, None, name)
            with self._lock:
                return self.adapters.setdefault(name, adapter)

    def unload(self, adapter_name: Optional[str] = None) -> None:
        """Remove one adapter, or all (None); sets using it fall back to the base weights."""
        with self._lock:
            if adapter_name is not None and adapter_name not in self.adapters:
                raise LoraError(f"lora: unknown adapter {adapter_name!r}; loaded: {sorted(self.adapters)}")
            gone = [self.adapters.pop(adapter_name)] if adapter_name is not None else list(self.adapters.values())
            if adapter_name is None:
                self.adapters.clear()
            self.default = tuple((a, w) for a, w in self.default if a not in gone)
            live = {a.sha256 for a in self.adapters.values()}
        dropped = {a.sha256 for a in gone} - live
        for c in LORA_COMPONENTS:
            self.engines[c].drop_weights(lambda key: any(sha in dropped for sha, _ in key))

    def set_adapters(self, adapter_names: str | Sequence[str], adapter_weights=None) -> None:
        """The adapters (and weights, default 1.0) of requests that name none, as diffusers' set_adapters."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        weights = adapter_weights if isinstance(adapter_weights, (list, tuple)) else [adapter_weights] * len(names)
        if len(weights) != len(names):
            raise LoraError(f"lora: {len(names)} adapter names and {len(weights)} weights")
        resolved = self.resolve({n: (1.0 if w is None else w) for n, w in zip(names, weights)})
        with self._lock:
            self.default = resolved

    def list(self) -> list[dict]:
        """Loaded adapters, then the LoRA folder's files not loaded yet (``"loaded": False``)."""
        with self._lock:
            items = [dict(a.info(), loaded=True) for a in self.adapters.values()]
        known = {i["id"] for i in items}
        if self.lora_dir is not None and self.lora_dir.is_dir():
            for file in sorted(self.lora_dir.glob("*.safetensors")):
                if file.stem not in known and _NAME.match(file.stem) and file.resolve().parent == self.lora_dir:
                    items.append({"id": file.stem, "object": "lora", "loaded": False, "source": file.name})
        return items

    # ---- sets -------------------------------------------------------------------------------

    def resolve(self, loras) -> LoraSet:
        """A request's ``loras`` ({name: weight}; None: the default set; an already resolved set passes)."""
        if loras is None:
            with self._lock:
                return self.default
        if isinstance(loras, tuple) and all(isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], Adapter)
                                            and type(item[1]) is float for item in loras):
            return loras  # resolved already (a LoraSet)
        if not isinstance(loras, Mapping):
            raise LoraError(f"lora: loras must be a mapping of adapter name to weight, found {type(loras).__name__}")
        out = []
        for name, weight in loras.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise LoraError(f"lora: the weight of {name!r} must be a finite number, found {weight!r}")
            adapter = self.adapter(name)
            if weight != 0:
                out.append((adapter, float(weight)))
        return tuple(sorted(out, key=lambda aw: aw[0].name))

    @staticmethod
    def key(lora_set: LoraSet, component: str) -> Optional[tuple]:
        """The component's weights key of a set: sorted (sha256, weight) of the adapters touching it, or None."""
        key = tuple(sorted((a.sha256, w) for a, w in lora_set if a.layers.get(component)))
        return key or None

    @staticmethod
    def names(lora_set: LoraSet) -> dict:
        return {a.name: w for a, w in lora_set}

    def applied(self, component: str) -> Optional[tuple]:
        return self.engines[component].weights_key

    def apply(self, component: str, lora_set: LoraSet) -> bool:
        """Make the component's engine run with the set's weights (under the pipeline's engine lock); True when
        its weights changed. Counted in ``swaps`` and ``swap_seconds``."""
        key = self.key(lora_set, component)
        engine = self.engines[component]
        if key == engine.weights_key:
            return False
        start = time.perf_counter()
        engine.use_weights(key, lambda restore: self._fused(component, lora_set, restore))
        seconds = time.perf_counter() - start
        self.swaps += 1
        self.swap_seconds += seconds
        logger.info("lora: %s now runs %s (%.3f s)", component, self.names(lora_set) or "its base weights", seconds)
        if self.on_swap is not None:
            self.on_swap(component, seconds)
        return True

    def _fused(self, component: str, lora_set: LoraSet, restore: Optional[tuple]) -> dict:
        """{initializer: fused weight} for the modules the set touches, plus the base weight of each module
        ``restore`` (the key applied before) touched and the set does not (a refit must put those back)."""
        lora_map = self.maps[component]
        key = self.key(lora_set, component) or ()
        by_sha = {a.sha256: a for a, _ in lora_set}
        parts: dict = {}
        for sha, weight in key:  # the key's order: the same key always sums in the same order
            for module, layer in by_sha[sha].layers[component].items():
                parts.setdefault(module, []).append((layer, weight))
        arrays = {}
        for module, layers in parts.items():
            t = lora_map.targets[module]
            arrays[t.initializer] = fuse(t.base(), t, layers)
        for sha, _ in (((None, None),) if restore == UNKNOWN_WEIGHTS else restore or ()):
            adapter = next((a for a in self.adapters.values() if a.sha256 == sha), by_sha.get(sha))
            for module in (adapter.layers[component] if adapter is not None else lora_map.targets):
                t = lora_map.targets[module]  # an adapter unloaded since (or unknown weights): every mapped weight
                if t.initializer not in arrays:
                    arrays[t.initializer] = np.array(t.base())
        return arrays


class LoraLoaderMixin:
    """diffusers' LoRA methods on a Pipeline (whose state is ``self.lora``, a LoraManager)."""

    lora: LoraManager

    def load_lora_weights(self, path_or_dir: str | Path, weight_name: Optional[str] = None,
                          adapter_name: Optional[str] = None) -> str:
        """Load a LoRA (.safetensors: diffusers / PEFT / kohya) and make it the default set at weight 1, as diffusers
        does; returns its name (default ``default_<n>``). Raises LoraError and changes nothing on a bad file."""
        return self.lora.load(path_or_dir, weight_name, adapter_name)

    def unload_lora_weights(self, adapter_name: Optional[str] = None) -> None:
        """Forget one adapter, or every adapter (None)."""
        self.lora.unload(adapter_name)

    def set_adapters(self, adapter_names: str | Sequence[str], adapter_weights=None) -> None:
        """The adapters (weights default 1.0) of requests that pass no ``loras``; [] for none."""
        self.lora.set_adapters(adapter_names, adapter_weights)

    def get_active_adapters(self) -> list[str]:
        return list(self.lora.names(self.lora.default))


def fuse(base: np.ndarray, target, layers: Sequence[tuple]) -> np.ndarray:
    """``base`` (as stored: dtype, layout, scale of ``target``) + sum(weight * scale * up @ down) over ``layers``
    ((LoraLayer, weight), in order), computed in float32 and cast back to the stored dtype. A transposed target
    gets ``down^T @ up^T``: the product lands in the stored layout, with no strided pass over the weight."""
    fused = np.array(base, dtype=np.float32)  # a copy: the base bytes are never written
    for layer, weight in layers:
        up, down = layer.up.reshape(layer.up.shape[0], -1), layer.down.reshape(layer.rank, -1)
        product = down.T @ up.T if target.transpose else up @ down
        product *= np.float32(weight * layer.scale * target.scale)
        fused += product.reshape(fused.shape)
    return fused.astype(target.dtype)


def _graph_sha(folder: ModelFolder, component: str) -> Optional[str]:
    entry = folder.entries.get(component, {})
    return entry.get("sha256") if folder.kind == "onnx" else entry.get("onnx_sha256")


__all__ = ["Adapter", "DEFAULT_MAX_FILE_BYTES", "LoraError", "LoraLoaderMixin", "LoraManager", "LoraSet", "LoraUnavailableError",
           "check_layer", "fuse"]
