"""The two build targets, TensorRT and TensorRT-RTX, and every difference between them.

Nothing outside this module branches on the target. The builder code is the
same for both because TensorRT-RTX keeps TensorRT's Python API (Builder,
OnnxParser, IBuilderConfig, optimisation profiles); what differs is:

- the package (``tensorrt`` / ``tensorrt_rtx``) and its pip extra;
- where it builds: TensorRT times kernels on the local GPU, so it needs one and
  the plan is tied to that GPU's compute capability; TensorRT-RTX compiles ahead
  of time on the CPU for a set of compute capabilities (IBuilderConfig
  ``num_compute_capabilities`` / ``set_compute_capability``) and finishes the
  kernels just in time on the user's GPU;
- strong typing: TensorRT 10.12+ opts in with NetworkDefinitionCreationFlag.STRONGLY_TYPED,
  TensorRT 11 deprecates the flag (always strongly typed);
- the timing cache: TensorRT reuses it across builds; in TensorRT-RTX it has
  no effect on the plan and makes the AOT build query for a GPU (TensorRT-RTX
  1.1 release notes, "Limitations"), so it is ignored there;
- refittable plans: TensorRT-RTX 1.7 cannot build them without a GPU;
- the plan's first bytes (used by verify_engine_folder without deserialising).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Optional, Sequence

from .errors import BuilderNotInstalled, NoGpuError, TargetError

log = logging.getLogger(__name__)

# TensorRT-RTX's documented default AOT coverage when no compute capability is set
# ("CPU-Only AOT and TensorRT-RTX Engines": 8.0, 8.6, 8.9, 12.0 and later).
RTX_DEFAULT_COMPUTE_CAPABILITIES = ("SM80", "SM86", "SM89", "SM120")


@dataclass(frozen=True)
class Target:
    name: str  # CLI name: "tensorrt" | "tensorrt-rtx"
    module: str  # import name; also the "builder name" in manifests and cache keys
    pip_extra: str
    aot_on_cpu: bool  # builds without a GPU
    uses_timing_cache: bool
    # The first bytes of a serialized plan. Not a documented API: observed in
    # TensorRT (b"ftrt") and TensorRT-RTX 1.7 (b"vtrt") plans; a file that does
    # not start with it is not a plan of this builder.
    plan_magic: bytes

    @property
    def install_hint(self) -> str:
        return f"pip install 'kolors-trt[{self.pip_extra}]'"

    def installed(self) -> bool:
        return importlib.util.find_spec(self.module) is not None

    def load(self) -> ModuleType:
        """Import the builder package, or raise BuilderNotInstalled naming the pip extra."""
        try:
            return importlib.import_module(self.module)
        except ImportError as e:
            raise BuilderNotInstalled(
                f"engines: target {self.name!r} needs the Python package {self.module!r}, which does not import "
                f"({e}); install it with: {self.install_hint}"
            ) from e

    def check_host(self) -> None:
        """Raise NoGpuError when this target cannot build on this machine."""
        if not self.aot_on_cpu and not gpu_available():
            raise NoGpuError(
                f"engines: target {self.name!r} builds on an NVIDIA GPU and none was found (CUDA driver "
                "cuInit/cuDeviceGetCount); build ahead of time on the CPU with --target tensorrt-rtx "
                "(pip install 'kolors-trt[tensorrt-rtx]') or run on a GPU host"
            )

    def check_refit(self) -> None:
        """Raise NoGpuError when a refittable plan cannot be built here.

        TensorRT-RTX documents REFIT for AOT builds, but tensorrt_rtx 1.7 on a
        CPU-only host fails inside the build (Myelin "CHECK(status == CUDA_SUCCESS)"),
        with REFIT and with REFIT_INDIVIDUAL alike (1.7.1, a one-MatMul graph), so
        refuse early with a clear message instead."""
        if self.aot_on_cpu and not gpu_available():
            raise NoGpuError(
                f"engines: refittable UNet and text encoder plans (--refit, for LoRA) with target {self.name!r} need a "
                "GPU at build time (the CPU-only AOT build of a refittable plan fails in tensorrt_rtx 1.7); build on a "
                "GPU host or drop --refit"
            )

    def network_flags(self, trt: ModuleType) -> int:
        flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        if self.module == "tensorrt" and _major(trt) >= 11:
            return 0  # TensorRT 11: strongly typed is the only mode; the flag is deprecated and ignored
        if flag is None:
            if self.module == "tensorrt":
                raise BuilderNotInstalled(
                    f"engines: tensorrt {trt.__version__} has no strongly typed networks; "
                    f"precision lives in the ONNX graph, so TensorRT >= 10.12 is needed: {self.install_hint}"
                )
            return 0
        return 1 << int(flag)

    def set_compute_capabilities(self, trt: ModuleType, config, requested: Optional[Sequence[str]]) -> list[str]:
        """Apply the requested compute capabilities (TensorRT-RTX only); return what the plan targets."""
        if not self.aot_on_cpu:
            if requested:
                raise TargetError(
                    f"engines: target {self.name!r} builds for the local GPU only; --compute-capability "
                    "applies to --target tensorrt-rtx"
                )
            return [device_compute_capability() or "unknown"]
        if not requested:
            return list(RTX_DEFAULT_COMPUTE_CAPABILITIES)
        names = [normalize_compute_capability(c) for c in requested]
        config.num_compute_capabilities = len(names)
        for i, name in enumerate(names):
            cc = getattr(trt.ComputeCapability, name, None)
            if cc is None:
                known = [n for n in dir(trt.ComputeCapability) if n.startswith("SM")]
                raise TargetError(f"engines: {trt.__name__} {trt.__version__} has no compute capability {name}; "
                                  f"choose from {known}")
            if not config.set_compute_capability(cc, i):
                raise TargetError(f"engines: {trt.__name__} {trt.__version__} refused compute capability {name} (at "
                                  f"index {i}); choose another --compute-capability")
        return names

    def set_tf32(self, trt: ModuleType, config, allowed: bool) -> bool:
        """Allow or forbid TF32 for fp32 math where the builder has the flag (TensorRT
        turns it on by default); return whether it is allowed."""
        flag = getattr(trt.BuilderFlag, "TF32", None)
        if flag is None:
            return False
        if allowed:
            config.set_flag(flag)
        else:
            config.clear_flag(flag)
        return allowed


TARGETS = {
    "tensorrt": Target("tensorrt", "tensorrt", "tensorrt", aot_on_cpu=False, uses_timing_cache=True, plan_magic=b"ftrt"),
    "tensorrt-rtx": Target(
        "tensorrt-rtx", "tensorrt_rtx", "tensorrt-rtx", aot_on_cpu=True, uses_timing_cache=False, plan_magic=b"vtrt"
    ),
}
PLAN_MAGIC = {t.module: t.plan_magic for t in TARGETS.values()}  # builder name -> plan header


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise TargetError(f"engines: unknown target {name!r}; choose one of {sorted(TARGETS)}") from None


def default_target_name() -> str:
    """TensorRT when it is installed and a GPU is present, else TensorRT-RTX when
    installed; with neither, raise BuilderNotInstalled naming both extras."""
    trt, rtx = TARGETS["tensorrt"], TARGETS["tensorrt-rtx"]
    if trt.installed() and gpu_available():
        return trt.name
    if rtx.installed():
        return rtx.name
    if trt.installed():
        return trt.name  # check_host() then explains that it needs a GPU
    raise BuilderNotInstalled(
        f"engines: no engine builder is installed; install one with {rtx.install_hint} (builds on the CPU, "
        f"for RTX GPUs) or {trt.install_hint} (builds on an NVIDIA GPU)"
    )


def normalize_compute_capability(text: str) -> str:
    """"8.6", "86", "sm_86" or "SM86" -> "SM86"."""
    t = text.strip().upper().replace("SM_", "").replace("SM", "")
    if "." in t:
        major, minor = t.split(".", 1)
        t = major + minor
    if not t.isdigit():
        raise TargetError(f"engines: compute capability {text!r} is not like 8.6 or SM86; pass e.g. "
                          "--compute-capability 8.9")
    return "SM" + t


def _major(trt: ModuleType) -> int:
    return int(str(trt.__version__).split(".")[0])


@functools.lru_cache(maxsize=1)
def _cuda_driver():
    """The CUDA driver library with cuInit done, or None. Cheap: no torch, no CUDA runtime."""
    import ctypes

    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        return lib if lib.cuInit(0) == 0 else None
    return None


def gpu_available() -> bool:
    import ctypes

    lib = _cuda_driver()
    if lib is None:
        return False
    count = ctypes.c_int(0)
    return lib.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


def device_compute_capability(index: int = 0) -> Optional[str]:
    """"SM89" for GPU ``index``, or None without a GPU."""
    import ctypes

    lib = _cuda_driver()
    if lib is None:
        return None
    dev, major, minor = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
    if lib.cuDeviceGet(ctypes.byref(dev), index) != 0:
        return None
    # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76
    if lib.cuDeviceGetAttribute(ctypes.byref(major), 75, dev) or lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev):
        return None
    return f"SM{major.value}{minor.value}"
