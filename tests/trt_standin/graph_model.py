"""What the TensorRT stand-in reads from an ONNX graph besides running it: output shapes from input
shapes, and a model of the activation memory a TensorRT engine would ask for.

``activation_bytes`` is the peak, over the graph's nodes in order, of the bytes of intermediate
tensors alive at once (an intermediate is alive from the node that makes it to the last node that
reads it), with ONNX shape inference at the given input shapes. Graph inputs, outputs and weights are
not counted: they are the caller's buffers and the engine's weights. It is a model, not TensorRT's
planner: TensorRT fuses layers (attention among them: the scores of a fused attention are never
stored) and adds scratch space for its kernels, so the real figure is smaller for attention-heavy
graphs and may be larger for convolution-heavy ones. Tensors whose shape inference cannot resolve
count zero.
"""

from __future__ import annotations

import ast
import operator
from typing import Mapping

ALIGNMENT = 256
_OPS = {ast.Mult: operator.mul, ast.Add: operator.add, ast.Sub: operator.sub, ast.FloorDiv: operator.floordiv,
        ast.Div: operator.floordiv}


def eval_dim(dim, values: Mapping[str, int]):
    """An ONNX Runtime dim (an int, a dim name, or an expression like "latent_height*8") at ``values``;
    None when it names an unknown dim."""
    if isinstance(dim, int):
        return dim
    if dim is None:
        return None

    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in values:
                raise KeyError(node.id)
            return values[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        raise KeyError(ast.dump(node))

    try:
        return walk(ast.parse(str(dim), mode="eval"))
    except (KeyError, SyntaxError):
        return None


def _bytes_per_element(elem_type: int) -> int:
    from onnx import helper

    return helper.tensor_dtype_to_np_dtype(elem_type).itemsize


def activation_bytes(model, input_shapes: Mapping[str, tuple]) -> int:
    """The liveness model above for ``model`` (onnx.ModelProto) at ``input_shapes``, rounded up to 256 bytes."""
    import onnx
    from onnx import shape_inference

    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    del fixed.graph.initializer[:]  # shapes come from the graph's declarations; weights are not needed
    for inp in fixed.graph.input:
        shape = input_shapes.get(inp.name)
        if shape is None:
            continue
        for dim, value in zip(inp.type.tensor_type.shape.dim, shape):
            dim.Clear()
            dim.dim_value = int(value)
    for init in model.graph.initializer:  # keep their shapes known to inference without their data
        fixed.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    inferred = shape_inference.infer_shapes(fixed, data_prop=True)
    boundary = {v.name for v in model.graph.input} | {v.name for v in model.graph.output} \
        | {i.name for i in model.graph.initializer}
    sizes = {}
    for info in inferred.graph.value_info:
        t = info.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if info.name in boundary or not t.HasField("shape") or any(d is None for d in dims):
            continue
        count = 1
        for d in dims:
            count *= d
        sizes[info.name] = count * _bytes_per_element(t.elem_type)
    nodes = list(model.graph.node)
    last_use = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            last_use[name] = i
    live = peak = 0
    for i, node in enumerate(nodes):
        made = [n for n in node.output if n in sizes]
        live += sum(sizes[n] for n in made)
        peak = max(peak, live)
        for name in set(node.input) | set(made):
            if name in sizes and last_use.get(name, i) <= i:
                live -= sizes[name]
                sizes.pop(name)
    return -(-peak // ALIGNMENT) * ALIGNMENT


__all__ = ["activation_bytes", "eval_dim"]
