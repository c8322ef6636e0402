"""ONNX -> TensorRT network, and the check of the parsed network against the spec."""

from __future__ import annotations

import logging
from pathlib import Path
from types import ModuleType

from kolors_trt.runtime.spec import EngineSpec, TensorSpec

from .errors import NetworkMismatchError, OnnxParseError

log = logging.getLogger(__name__)

# spec dtype (numpy name) -> TensorRT DataType member
_TRT_DTYPE = {"float32": "FLOAT", "float16": "HALF", "int64": "INT64", "int32": "INT32", "bool": "BOOL"}


def parse_onnx(trt: ModuleType, builder, network_flags: int, path: Path, logger):
    """Parse ``path`` (external data next to it is found by the parser) into a new
    network. Returns (network, parser): the parser owns weights the network uses,
    so keep it alive until the plan is built. Raises OnnxParseError listing every
    parser error with its node."""
    network = builder.create_network(network_flags)
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(path))
    if not ok or parser.num_errors:
        lines = [_format_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        for line in lines:
            log.error("%s: %s", path.name, line)
        raise OnnxParseError(
            f"engines: the {trt.__name__} ONNX parser rejected {path} with {len(lines)} error(s):\n  "
            + "\n  ".join(lines or ["(no error recorded)"])
            + "\nre-export the graph (kolors-trt export) or check that the builder supports these operators"
        )
    return network, parser


def _format_parser_error(err) -> str:
    node = err.node()
    name = err.node_name() or "?"
    op = err.node_operator() or "?"
    where = f"node {node} {name!r} ({op})" if node >= 0 else "graph"
    return f"{where}: [{err.code()}] {err.desc()}"


def network_io(network) -> tuple[list, list]:
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    outputs = [network.get_output(i) for i in range(network.num_outputs)]
    return inputs, outputs


def check_network(trt: ModuleType, network, spec: EngineSpec, source: Path) -> None:
    """Names, dtypes, ranks and fixed dims of the network's inputs and outputs must
    equal the spec's; raise NetworkMismatchError listing every difference."""
    inputs, outputs = network_io(network)
    problems = _compare(trt, "input", inputs, spec.inputs, spec) + _compare(trt, "output", outputs, spec.outputs, spec)
    if problems:
        raise NetworkMismatchError(
            f"engines: {source} does not match the {spec.name} contract in runtime/spec.py:\n  "
            + "\n  ".join(problems)
            + "\nre-export the graph with the current spec (kolors-trt export), or fix the export wrapper"
        )


def _compare(trt: ModuleType, kind: str, tensors: list, expected: tuple, spec: EngineSpec) -> list[str]:
    problems = []
    found = {t.name: t for t in tensors}
    for name in found.keys() - {t.name for t in expected}:
        problems.append(f"{kind} {name!r} is not in the spec (expected {kind}s {[t.name for t in expected]})")
    for ts in expected:
        t = found.get(ts.name)
        if t is None:
            problems.append(f"{kind} {ts.name!r} is missing (graph has {kind}s {sorted(found)})")
            continue
        want = getattr(trt.DataType, _TRT_DTYPE[ts.dtype])
        if t.dtype != want:
            problems.append(f"{kind} {ts.name!r} has dtype {t.dtype.name}, expected {ts.dtype} ({want.name})")
        problems += _compare_shape(kind, ts, tuple(t.shape), spec)
    return problems


def _compare_shape(kind: str, ts: TensorSpec, shape: tuple, spec: EngineSpec) -> list[str]:
    if len(shape) != len(ts.shape):
        return [f"{kind} {ts.name!r} has rank {len(shape)} {shape}, expected rank {len(ts.shape)} {ts.shape}"]
    problems = []
    for axis, (entry, size) in enumerate(zip(ts.shape, shape)):
        if size < 0:
            continue  # dynamic in the graph: the optimisation profile pins or ranges it
        if isinstance(entry, int):
            allowed = (entry, entry)
        else:
            name, factor = (entry, 1) if isinstance(entry, str) else entry
            r = spec.dims[name]
            allowed = (r.min * factor, r.max * factor)
        if allowed[0] != allowed[1] or size != allowed[0]:
            want = allowed[0] if allowed[0] == allowed[1] else f"dynamic in [{allowed[0]}, {allowed[1]}]"
            problems.append(f"{kind} {ts.name!r} axis {axis} ({entry}) is fixed to {size} in the graph, expected {want}")
    return problems
