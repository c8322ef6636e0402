"""The LoRA map of an exported graph: for every weight a LoRA can change, which ONNX
initializer holds it, how, and where its bytes lie.

A LoRA adds ``weight * scale * up @ down`` to a module's weight. The runtime does that
without torch, diffusers or onnx, on whatever the export and its graph cleanup made of
the weight: the TorchScript exporter turns a Linear on 3-D input into ``MatMul(x, W^T)``
with the transpose folded into a new initializer (``onnx::MatMul_123``), keeps ``W`` for a
``Gemm`` on 2-D input, and polygraphy's folding renames again. So names cannot be
trusted; contents can. At export time every candidate module's weight is fingerprinted
(in the graph's dtype) and every initializer of the same size is fingerprinted as
stored and, for matrices, transposed. Random and trained weights are unique, so each
module must match exactly one initializer: a module with no match, or with several
(two modules sharing one tensor, which a delta on one would also change), fails the
export rather than writing a map that applies a LoRA wrong.

The map (``{component}.lora.json`` beside the graph, written atomically, its sha256 in
the manifest entry)::

    {"format": "kolors-trt-lora-map", "version": 1, "component": "unet",
     "precision": "fp16", "graph_sha256": "...", "supported": true, "reason": null,
     "targets": {"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": {
         "kind": "linear", "module_shape": [out, in],
         "initializer": "onnx::MatMul_1234", "transpose": true, "scale": 1.0,
         "dtype": "float16", "shape": [in, out], "file": "unet.onnx", "offset": 81920}}}

``transpose``: the initializer holds ``W^T``; ``scale``: it holds ``scale * W``;
``file``/``offset``: its raw little-endian bytes (the graph file itself for inline
tensors, found by walking the protobuf; the external-data file otherwise), so the
runtime reads the base weight with a memory map. Module names are diffusers' (UNet)
and ChatGLM's (``encoder.layers.0.self_attention.query_key_value``), the names LoRA
files use. A graph whose weights are not plain fp16/fp32 (a quantized UNet) gets a map
with ``supported: false`` and the reason, which the runtime reports when a LoRA asks
for that component.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
from pathlib import Path
from typing import Iterator, Optional

from kolors_trt.runtime.hashing import sha256_file
from kolors_trt.runtime.manifest import write_json_atomic

from .onnx_export import ExportError

logger = logging.getLogger(__name__)

MAP_FORMAT = "kolors-trt-lora-map"
MAP_VERSION = 1
LORA_COMPONENTS = ("unet", "text_encoder")
PLAIN_PRECISIONS = ("fp16", "fp32")


def map_file(component: str) -> str:
    return f"{component}.lora.json"


def lora_modules(graph_module, component: str) -> dict:
    """{module name: module} of every weight a LoRA may target in one export wrapper: the UNet's
    Linear and Conv2d layers (diffusers names; the IP-Adapter's own projections excluded: no LoRA
    format addresses them), ChatGLM's Linear layers in its encoder."""
    from torch import nn

    if component == "unet":
        root, kinds = graph_module.unet, (nn.Linear, nn.Conv2d)
        keep = lambda name: ".processor." not in name  # noqa: E731  (IP processors are submodules)
    elif component == "text_encoder":
        root, kinds = graph_module.model, (nn.Linear,)
        keep = lambda name: name.startswith("encoder.")  # noqa: E731  (output_layer is not in the graph)
    else:
        raise KeyError(component)
    return {name: m for name, m in root.named_modules() if isinstance(m, kinds) and keep(name)}


def _digest(array) -> bytes:
    return hashlib.blake2b(array.tobytes(), digest_size=20).digest()


def fingerprints(graph_module, component: str) -> dict:
    """{(digest, shape, dtype): (module name, kind)} of the weights in the graph's dtype; refuses two
    modules with the same weight (one initializer would hold both)."""
    from torch import nn

    found: dict = {}
    for name, module in lora_modules(graph_module, component).items():
        w = module.weight.detach().cpu().contiguous().numpy()
        key = (_digest(w), tuple(w.shape), str(w.dtype))
        if key in found:
            raise ExportError(f"export: {component} modules {found[key][0]!r} and {name!r} hold the same weight; "
                              "a LoRA on one would change both, so no LoRA map can be written for this checkpoint")
        found[key] = (name, "conv" if isinstance(module, nn.Conv2d) else "linear")
    return found


def unsupported_map(component: str, precision: str, graph: Path, reason: str) -> dict:
    return {"format": MAP_FORMAT, "version": MAP_VERSION, "component": component, "precision": precision,
            "graph_sha256": sha256_file(graph), "supported": False, "reason": reason, "targets": {}}


def build_lora_map(prints: dict, graph: Path, component: str, precision: str) -> dict:
    """Match ``prints`` (``fingerprints`` of the module that was exported) to the initializers of the
    saved graph ``graph``; ExportError unless every module matches exactly one initializer."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = Path(graph)
    model = onnx.load(str(graph), load_external_data=False)
    sizes = {(int(np.prod(shape)), dtype) for _, shape, dtype in prints}
    inline = None
    hits: dict = {}
    for init in model.graph.initializer:
        count = int(np.prod(init.dims)) if len(init.dims) else 1
        dtype = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16"}.get(init.data_type)
        if dtype is None or (count, dtype) not in sizes or len(init.dims) not in (2, 4):
            continue
        tensor = onnx.TensorProto()
        tensor.CopyFrom(init)  # to_array loads external data into the proto it is given
        array = numpy_helper.to_array(tensor, base_dir=str(graph.parent))
        del tensor
        layouts = [(array, False)] + ([(np.ascontiguousarray(array.T), True)] if array.ndim == 2 else [])
        for candidate, transposed in layouts:
            key = (_digest(candidate), tuple(candidate.shape), str(candidate.dtype))
            if key not in prints:
                continue
            if init.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in init.external_data}
                where = (info["location"], int(info.get("offset", 0)))
            else:
                inline = inline if inline is not None else inline_offsets(graph)
                where = (graph.name, inline.get(init.name))
            hits.setdefault(key, []).append((init.name, transposed, array.dtype, array.shape, _digest(array), where))
    targets, digests, missing, ambiguous = {}, {}, [], []
    for key, (name, kind) in prints.items():
        found = hits.get(key, [])
        if len(found) != 1:
            (missing if not found else ambiguous).append(name)
            continue
        init_name, transposed, dtype, shape, digest, (file, offset) = found[0]
        if offset is None:
            raise ExportError(f"export: {graph.name}: initializer {init_name!r} ({name}) keeps its values in typed "
                              "fields, not raw bytes; the LoRA map needs raw bytes (re-export)")
        targets[name] = {"kind": kind, "module_shape": list(key[1]), "initializer": init_name,
                         "transpose": transposed, "scale": 1.0, "dtype": str(dtype),
                         "shape": list(shape), "file": file, "offset": offset}
        digests[name] = digest
    if missing or ambiguous:
        raise ExportError(
            f"export: the LoRA map of {graph.name} is incomplete: {len(missing)} module weight(s) found in no "
            f"initializer ({', '.join(sorted(missing)[:5])}{'...' if len(missing) > 5 else ''}) and {len(ambiguous)} "
            f"in several ({', '.join(sorted(ambiguous)[:5])}); the graph cleanup changed these weights")
    _check_bytes(graph.parent, targets, digests)
    logger.info("%s: LoRA map of %d weights", graph.name, len(targets))
    return {"format": MAP_FORMAT, "version": MAP_VERSION, "component": component, "precision": precision,
            "graph_sha256": sha256_file(graph), "supported": True, "reason": None,
            "targets": dict(sorted(targets.items()))}


def _check_bytes(folder: Path, targets: dict, stored_digests: dict) -> None:
    """Each recorded (file, offset) holds exactly the initializer's bytes: what the runtime will read."""
    import numpy as np

    for name, t in targets.items():
        path = folder / t["file"]
        nbytes = int(np.prod(t["shape"])) * np.dtype(t["dtype"]).itemsize
        if t["offset"] + nbytes > path.stat().st_size:
            raise ExportError(f"export: LoRA map: {name} at {t['file']}@{t['offset']} runs past the end of the file")
        stored = np.memmap(path, dtype=t["dtype"], mode="r", offset=t["offset"], shape=tuple(t["shape"]))
        if _digest(np.asarray(stored)) != stored_digests[name]:
            raise ExportError(f"export: LoRA map: the bytes at {t['file']}@{t['offset']} are not {name}'s weight")
        del stored


def write_lora_map(folder: Path, component: str, data: dict) -> Path:
    return write_json_atomic(Path(folder) / map_file(component), data)


# ---- raw_data offsets of inline initializers: a walk over the protobuf wire format ----------------


def _varint(buf, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def _fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field of the message in buf[start:end]."""
    i = start
    while i < end:
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, i = _varint(buf, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            n, i = _varint(buf, i)
            yield number, i, i + n
            i += n
        else:
            raise ExportError(f"export: unexpected protobuf wire type {wire} while reading initializer offsets")


def inline_offsets(graph: Path) -> dict:
    """{initializer name: byte offset of its raw_data in the .onnx file} (ModelProto.graph = 7,
    GraphProto.initializer = 5, TensorProto.name = 8, raw_data = 9)."""
    offsets: dict = {}
    with open(graph, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        for number, start, end in _fields(buf, 0, len(buf)):
            if number != 7:
                continue
            for field, t_start, t_end in _fields(buf, start, end):
                if field != 5:
                    continue
                name: Optional[str] = None
                raw = None
                for tf, s, e in _fields(buf, t_start, t_end):
                    if tf == 8:
                        name = bytes(buf[s:e]).decode()
                    elif tf == 9:
                        raw = s
                if name is not None and raw is not None:
                    offsets[name] = raw
    return offsets
