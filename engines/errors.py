"""Typed errors of the engines stage. Each names the file or tensor, what was
expected, what was found, and what to do."""

from __future__ import annotations

from kolors_trt.runtime.errors import InputError, ServiceError


class BuilderNotInstalled(ServiceError):
    """The TensorRT (or TensorRT-RTX) Python package of a target is missing."""


class NoGpuError(ServiceError):
    """A target that builds on the GPU was asked to build without one."""


class OnnxParseError(ServiceError):
    """The TensorRT ONNX parser rejected a graph; the message lists every parser error."""


class NetworkMismatchError(InputError):
    """A parsed network's inputs/outputs differ from the engine spec (runtime/spec.py)."""


class EngineBuildError(ServiceError):
    """The builder returned no plan, or refused the build's optimisation profile."""


class TargetError(InputError):
    """A target, compute capability or build option the chosen builder does not offer."""


class TimingCacheError(InputError):
    """A timing cache file TensorRT refuses (written on another GPU or TensorRT version)."""


# EngineFolderError and ExportFolderError live with the folder readers, in kolors_trt.runtime.artifacts.
