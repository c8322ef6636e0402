"""The one TensorRT logger of a process: forwards TensorRT's messages to `logging`.

TensorRT keeps the first ILogger a builder or runtime registers in a process and
ignores later ones (with a warning), so the builder and the runtime share this one,
one per package (tensorrt, tensorrt_rtx), kept alive for the process.

A Ctrl-C that arrives while the main thread is inside TensorRT surfaces as a
KeyboardInterrupt in the next Python callback, often this logger, and TensorRT
catches and drops it ("Exception caught in log()"). The logger hands it back to
the main thread instead (``_thread.interrupt_main`` with the same signal), to be
raised when the TensorRT call returns. Best effort: Python may raise it again on
entry to a later callback, outside any handler. The engine build therefore runs
TensorRT in a worker thread, where no signal handler runs (kolors_trt.engines.interrupt).
"""

from __future__ import annotations

import _thread
import functools
import logging
import signal
from types import ModuleType


@functools.lru_cache(maxsize=None)
def trt_logger(trt: ModuleType):
    levels = {
        trt.ILogger.Severity.INTERNAL_ERROR: logging.CRITICAL,
        trt.ILogger.Severity.ERROR: logging.ERROR,
        trt.ILogger.Severity.WARNING: logging.WARNING,
        trt.ILogger.Severity.INFO: logging.DEBUG,  # TensorRT's INFO is chatty
        trt.ILogger.Severity.VERBOSE: logging.DEBUG,
    }
    log = logging.getLogger(f"{__name__}.{trt.__name__}")

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            try:
                level = levels.get(severity, logging.INFO)
                if "has Int64 binding" in msg:
                    level = logging.DEBUG  # token ids are int64 by contract (runtime/spec.py); not news
                log.log(level, "%s", msg)
            except KeyboardInterrupt as exc:  # TensorRT would drop it: re-deliver after the call returns
                _thread.interrupt_main(getattr(exc, "signum", signal.SIGINT))

    return _Logger()
