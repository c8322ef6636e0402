"""Trace one wrapper to ONNX from its spec, clean the graph and save it.

The TorchScript-based exporter is used (dynamo=False): it traces the real diffusers
and ChatGLM code paths with named dynamic axes, which the torch.export-based one
cannot yet do for ChatGLM's Python-level shape logic.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from pathlib import Path

from kolors_trt.runtime import spec as S
from kolors_trt.runtime.errors import ServiceError
from kolors_trt.runtime.manifest import temp_path

logger = logging.getLogger(__name__)

OPSET = 17
TWO_GB = 2**31 - 1
# Modules whose weights exceed this take the streaming path (`stream_save`): the
# in-memory cleanup below holds the proto's weights two or three times over.
LARGE_MODULE_BYTES = 2**30
ALIGN = 4096  # external-data offsets page-aligned, so a runtime may mmap them


class ExportError(ServiceError):
    """Tracing or saving a component failed."""


def sample_inputs(spec: S.EngineSpec, values: dict, seed: int = 0) -> dict:
    """Random float32 inputs (ids, masks and positions that make sense for the text
    encoder) at the given dim values, keyed by input name."""
    import numpy as np

    rng = np.random.default_rng(seed)
    shapes = S.sample_shapes(spec, values)
    feeds = {}
    for t in spec.inputs:
        shape = shapes[t.name]
        if t.name == "input_ids":
            feeds[t.name] = rng.integers(3, 300, size=shape, dtype=np.int64)
        elif t.name == "attention_mask":
            mask = np.ones(shape, dtype=np.int64)
            for row in range(0, shape[0], 2):  # every other row left-padded, like the tokenizer
                mask[row, : shape[1] // 3 + row] = 0
            feeds[t.name] = mask
        elif t.name == "position_ids":
            mask = feeds["attention_mask"]
            feeds[t.name] = (np.cumsum(mask, axis=1) - 1).clip(min=0).astype(np.int64)
        elif t.name == "timestep":
            feeds[t.name] = np.array([rng.uniform(1, 999)], dtype=np.float32)
        elif t.name == "ip_scale":  # per row, 0 included: rows must not share one scale
            feeds[t.name] = np.resize(np.array([0.7, 0.0, 1.3, 0.4], dtype=np.float32), shape)
        elif t.name == "time_ids":
            feeds[t.name] = np.tile(np.array([1024, 1024, 0, 0, 1024, 1024], np.float32), (shape[0], 1))
        else:
            feeds[t.name] = rng.standard_normal(shape).astype(np.float32)
    if "attention_mask" in feeds:
        feeds["input_ids"] = np.where(feeds["attention_mask"] == 0, 0, feeds["input_ids"])
    return feeds


def module_bytes(module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def export_onnx(module, spec: S.EngineSpec, values: dict, path: Path, streaming: bool | None = None,
                opset: int = OPSET) -> None:
    """Trace `module` at the dims `values` and write a cleaned graph to `path`
    (with one external-data file `path.data` when it is over 2 GB).

    streaming (default: when the weights exceed LARGE_MODULE_BYTES): trace without
    constant folding, which would copy every transposed Linear weight, then
    `stream_save` the graph; peak memory stays near the module's own weights."""
    import torch

    if streaming is None:
        streaming = module_bytes(module) > LARGE_MODULE_BYTES
    feeds = sample_inputs(spec, values)
    args = tuple(torch.from_numpy(feeds[n]) for n in spec.input_names)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The exporter's own files (a graph over 2 GB is one file per tensor) go to a folder named
    # as a leftover, so that a rerun removes it if this process is killed.
    tmp = temp_path(path, suffix=".trace")
    tmp.mkdir()
    try:
        raw = tmp / f"{spec.name}.raw.onnx"
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracer warnings about Python-level shape logic
                torch.onnx.export(
                    module, args, str(raw), input_names=spec.input_names, output_names=spec.output_names,
                    dynamic_axes=S.dynamic_axes(spec), opset_version=opset, do_constant_folding=not streaming,
                    dynamo=False,
                )
        except Exception as exc:
            raise ExportError(f"export: tracing {spec.name} failed ({type(exc).__name__}: {exc})") from exc
        (stream_save if streaming else cleanup)(raw, path, spec)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def stream_save(src: Path, dst: Path, spec: S.EngineSpec) -> None:
    """Rewrite a traced graph of any size with one tensor in memory at a time.

    The proto is read without its weights (the TorchScript exporter writes a graph
    over 2 GB as one file per tensor next to it). Each initializer is then read,
    a Transpose whose only input it is gets folded into it (what the exporter's
    constant folding would have done, without a second copy of every Linear
    weight), and it is appended to `dst.data` at a page-aligned offset. Polygraphy
    folding and in-memory shape inference cannot hold a >2 GB proto; shape
    inference runs on the file instead.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    _inline_constant_attributes(graph, src.parent)
    inits = {t.name for t in graph.initializer}
    uses: dict = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    fold = {}  # initializer -> (Transpose node, perm)
    for node in graph.node:
        if node.op_type == "Transpose" and node.input[0] in inits and uses[node.input[0]] == 1 \
                and node.input[0] not in outputs:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            fold[node.input[0]] = (node, perm)
    data = dst.with_name(dst.name + ".data")
    for stale in (dst, data):
        if stale.exists():
            os.remove(stale)
    new_inits = []
    with open(data, "wb") as f:
        for init in graph.initializer:
            if init.name not in uses and init.name not in outputs:
                continue  # unused (e.g. a weight only the folded path read)
            tensor = onnx.TensorProto()
            tensor.CopyFrom(init)  # to_array loads external data into the proto: keep it off the graph
            array = numpy_helper.to_array(tensor, base_dir=str(src.parent))
            del tensor
            name = init.name
            if name in fold:
                node, perm = fold[name]
                array = np.ascontiguousarray(array.transpose(perm))  # perm None: reverse, like ONNX
                name = node.output[0]
            if array.nbytes < 1024:
                new_inits.append(numpy_helper.from_array(array, name))
                continue
            offset = f.tell()
            offset += -offset % ALIGN
            f.seek(offset)
            f.write(np.ascontiguousarray(array).tobytes())
            out = onnx.TensorProto(name=name, data_type=init.data_type, dims=array.shape)
            out.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(array.nbytes))):
                entry = out.external_data.add()
                entry.key, entry.value = key, value
            new_inits.append(out)
            del array
    folded = {node.output[0] for node, _ in fold.values()}
    nodes = [n for n in graph.node if not (n.op_type == "Transpose" and n.output[0] in folded)]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(new_inits)
    name_dims(model, spec)
    onnx.save_model(model, str(dst))
    onnx.shape_inference.infer_shapes_path(str(dst), str(dst))


def _inline_constant_attributes(graph, base_dir: Path) -> None:
    """The TorchScript exporter writes large Constant-node values (e.g. ChatGLM's
    rotary table) to files of their own too; the graph would point into the
    temporary folder. They are small next to the weights: inline them."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor

    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_location == onnx.TensorProto.EXTERNAL:
                load_external_data_for_tensor(attr.t, str(base_dir))
                attr.t.data_location = onnx.TensorProto.DEFAULT
                del attr.t.external_data[:]


def cleanup(src: Path, dst: Path, spec: S.EngineSpec) -> None:
    """onnx-graphsurgeon cleanup and toposort, polygraphy constant folding, shape
    inference, the spec's dim names on every graph input and output; saved with one
    external-data file when the graph is over 2 GB."""
    import onnx
    import onnx_graphsurgeon as gs
    from polygraphy.backend.onnx import fold_constants

    model = onnx.load(str(src), load_external_data=True)
    big = model.ByteSize() > TWO_GB if _size_known(model) else True
    graph = gs.import_onnx(model)
    graph.cleanup().toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    if not big:
        model = fold_constants(model, num_passes=2, allow_onnxruntime_shape_inference=True, error_ok=True)
        model = onnx.shape_inference.infer_shapes(model)
        graph = gs.import_onnx(model)
        graph.cleanup().toposort()
        model = gs.export_onnx(graph, do_type_check=False)
    name_dims(model, spec)
    _save(model, dst, big)
    if big:  # infer_shapes cannot hold a >2 GB proto in memory; the path variant streams it
        onnx.shape_inference.infer_shapes_path(str(dst), str(dst))


def name_dims(model, spec: S.EngineSpec) -> None:
    """Stamp the spec's names on the graph's edge dims. Shape inference may have
    written an expression (e.g. 'floor(1.0*batch)') or a number for a dynamic dim;
    the spec is the authority, and the engine builder and runtime read these."""
    edges = {v.name: v for v in list(model.graph.input) + list(model.graph.output)}
    for t in spec.inputs + spec.outputs:
        value = edges.get(t.name)
        if value is None:
            raise ExportError(f"export: {spec.name} graph has no tensor {t.name!r}; it has {sorted(edges)}")
        dims = value.type.tensor_type.shape.dim
        for dim, entry in zip(dims, t.shape):
            if isinstance(entry, int):
                dim.dim_value = entry
            else:
                dim.dim_param = S.dim_label(entry)


def _size_known(model) -> bool:
    try:
        model.ByteSize()
        return True
    except Exception:  # protobuf refuses to size messages over 2 GB
        return False


def _save(model, dst: Path, external: bool) -> None:
    import onnx

    data = dst.with_name(dst.name + ".data")
    for stale in (dst, data):
        if stale.exists():
            os.remove(stale)
    if external:
        onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, str(dst))
