"""LoRA in engine folders: which weights a refittable plan exposes, and their base values.

A refit must start from the base weights (never a delta on a delta), and a plan does not
give its weights back (``Refitter.get_named_weights`` returns only what was set). So a
build with ``--refit`` writes, for each component it makes refittable (the UNet and the
text encoder), the base bytes of every weight in the export's LoRA map into
``{component}.lora.bin`` (in the stored dtype and layout, page-aligned) and the map anew
as ``{component}.lora.json`` with offsets into that file; the manifest entry names both
with their sha256 (``lora_map``, ``lora_base``) and the runtime reads them like an export
folder's map. Only the mapped weights are marked refittable (``REFIT_INDIVIDUAL`` +
``INetworkDefinition.mark_weights_refittable``): the other layers keep the fusions a
refittable plan otherwise gives up. The ONNX parser names each weight by its initializer,
which is the name the map records.

Size: the base copy is about the component's weights again (the fp16 UNet ~5 GB, ChatGLM
~12 GB at Kolors' sizes), on disk; the runtime memory-maps it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

from kolors_trt.runtime.artifacts import ExportComponent
from kolors_trt.runtime.hashing import sha256_file
from kolors_trt.runtime.lora_map import LORA_COMPONENTS
from kolors_trt.runtime.manifest import atomic_path, contained, read_json_object, write_json_atomic

from .errors import EngineBuildError

ALIGN = 4096


def export_map(comp: ExportComponent) -> Optional[dict]:
    """The export's LoRA map of a component, or None (none recorded, or the component takes no LoRA)."""
    if comp.name not in LORA_COMPONENTS or comp.lora_map is None:
        return None
    return read_json_object(comp.lora_map)


def refittable_weights(comp: ExportComponent) -> list[str]:
    """The initializer names a refittable plan of ``comp`` must expose; EngineBuildError when it takes no LoRA."""
    m = export_map(comp)
    if m is None:
        raise EngineBuildError(f"engines: --refit: {comp.onnx} has no LoRA map (exported by an older kolors-trt, or "
                               f"{comp.name} takes no LoRA); re-export it")
    if not m.get("supported"):
        raise EngineBuildError(f"engines: --refit: the {comp.name} cannot take LoRA: {m.get('reason')}")
    return sorted(t["initializer"] for t in m["targets"].values())


def write_lora_files(comp: ExportComponent, out: Path) -> dict:
    """Write ``{name}.lora.bin`` and ``{name}.lora.json`` into ``out`` (atomically); the entry fields naming them."""
    import numpy as np

    m = export_map(comp)
    if m is None or not m.get("supported"):
        raise EngineBuildError(f"engines: --refit: no usable LoRA map for {comp.name}")
    out = Path(out)
    bin_name, map_name = f"{comp.name}.lora.bin", f"{comp.name}.lora.json"
    carried = copy.deepcopy(m)
    with atomic_path(out / bin_name) as tmp, open(tmp, "wb") as f:
        for module, t in sorted(m["targets"].items()):
            source = contained(comp.onnx.parent, t["file"], f"{comp.lora_map}: targets.{module}.file")
            array = np.memmap(source, dtype=t["dtype"], mode="r", offset=t["offset"], shape=tuple(t["shape"]))
            offset = f.tell()
            offset += -offset % ALIGN
            f.seek(offset)
            f.write(np.ascontiguousarray(array).tobytes())
            carried["targets"][module].update(file=bin_name, offset=offset)
            del array
    write_json_atomic(out / map_name, carried)
    return {"lora_map": map_name, "lora_map_sha256": sha256_file(out / map_name),
            "lora_base": bin_name, "lora_base_sha256": sha256_file(out / bin_name)}


__all__ = ["export_map", "refittable_weights", "write_lora_files"]
