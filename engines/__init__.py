"""kolors_trt.engines: ONNX graphs -> TensorRT / TensorRT-RTX plans in a verified engine folder.

    build_engines(onnx_dir, out_dir, target, profile, components, ...) -> list[BuildResult]
    verify_engine_folder(folder) -> manifest dict (raises EngineFolderError)
    (the export and engine folders are read by kolors_trt.runtime.artifacts: typed, contained, verified)
    cli.add_build_arguments(parser), cli.run_build(args) -> int   (`kolors-trt build`)

Importing this package does not import TensorRT; a build does.
"""

from .builder import BuildResult, build_engines
from .manifest import verify_engine_folder

__all__ = ["BuildResult", "build_engines", "verify_engine_folder"]
