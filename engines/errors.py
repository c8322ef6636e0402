"""Typed errors of the engines stage. Each names the file or tensor, what was
expected, what was found, and what to do."""

from __future__ import annotations


class BuilderNotInstalled(RuntimeError):
    """The TensorRT (or TensorRT-RTX) Python package of a target is missing."""


class NoGpuError(RuntimeError):
    """A target that builds on the GPU was asked to build without one."""


class ExportFolderError(ValueError):
    """The export folder (the build's input) is missing a file or is inconsistent."""


class OnnxParseError(RuntimeError):
    """The TensorRT ONNX parser rejected a graph; the message lists every parser error."""


class NetworkMismatchError(ValueError):
    """A parsed network's inputs/outputs differ from the engine spec (runtime/spec.py)."""


class EngineBuildError(RuntimeError):
    """The builder returned no plan."""


class EngineFolderError(ValueError):
    """An engine folder failed verification; the message lists every problem."""
