"""What the TensorRT stand-in reads from an ONNX graph besides running it: output shapes from input
shapes, and a model of the activation memory a TensorRT engine would ask for.

``activation_bytes`` is the peak, over the graph's nodes in order, of the bytes of intermediate
tensors alive at once (an intermediate is alive from the node that makes it to the last node that
reads it), with ONNX Runtime's symbolic shape inference at the given input shapes. Graph inputs,
outputs and weights are not counted: they are the caller's buffers and the engine's weights.
Attention is counted as TensorRT runs it, fused: the score tensors between the MatMul of queries and
keys and the Softmax (and the Softmax's output) are never stored. It is a model, not TensorRT's
planner: TensorRT also fuses element-wise chains into their producers (less memory) and adds scratch
space for its kernels (more).
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


def _fused_attention(nodes) -> set:
    """Tensors a fused attention never stores: MatMul(q, k) [-> Mul/Div/Add/Where/Cast ...] -> Softmax, and the
    Softmax's output."""
    producer = {out: node for node in nodes for out in node.output}
    consumers: dict = {}
    for node in nodes:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    fused = set()
    for node in nodes:
        if node.op_type != "Softmax":
            continue
        fused.update(node.output)
        name = node.input[0]
        while name in producer and consumers.get(name) == 1:
            made_by = producer[name]
            if made_by.op_type not in ("MatMul", "Mul", "Div", "Add", "Where", "Cast"):
                break
            fused.add(name)
            if made_by.op_type == "MatMul":
                break
            name = made_by.input[0]
    return fused


def activation_bytes(model, input_shapes: Mapping[str, tuple]) -> int:
    """The liveness model above for ``model`` (onnx.ModelProto) at ``input_shapes``, rounded up to 256 bytes."""
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for inp in fixed.graph.input:
        shape = input_shapes.get(inp.name)
        if shape is None:
            continue
        for dim, value in zip(inp.type.tensor_type.shape.dim, shape):
            dim.Clear()
            dim.dim_value = int(value)
    inferred = SymbolicShapeInference.infer_shapes(fixed, auto_merge=True)
    nodes = list(model.graph.node)
    boundary = {v.name for v in model.graph.input} | {v.name for v in model.graph.output} \
        | {i.name for i in model.graph.initializer} | _fused_attention(nodes)
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
