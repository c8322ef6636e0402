"""Stopping a build on Ctrl-C or SIGTERM, and keeping a folder's commit whole.

A Python signal handler runs only in the main thread, between bytecodes. While
``build_serialized_network`` runs, the main thread is inside TensorRT's C++ code:
the KeyboardInterrupt surfaces in the next Python callback (the logger), where
TensorRT catches and drops it ("Exception caught in log()"), and the build runs
on. So the parse and build run in a worker thread (TensorRT releases the GIL)
while the main thread waits in short, interruptible joins. On an interrupt the
main thread sets a flag that a TensorRT ``IProgressMonitor`` reads:
``step_complete`` returning False cancels the build at its next step (documented
for TensorRT 10+ and TensorRT-RTX 1.x; tensorrt_rtx 1.7 reports "BuildCanceled").
A step can be long (the tiny UNet spends 7 of its 8 s in one), so the main thread
waits only ``GRACE_S`` for the worker and then lets the interrupt go on; nothing
of the build has reached the folder by then (plans are written after the build).

Holding SIGINT and SIGTERM back while a folder commits is runtime/manifest.py's
``deferred_interrupts``.
"""

from __future__ import annotations

import logging
import threading
from types import ModuleType
from typing import Callable, TypeVar

log = logging.getLogger(__name__)

GRACE_S = 3.0  # how long an interrupted build may take to reach its next step
_POLL_S = 0.2
T = TypeVar("T")


def progress_monitor(trt: ModuleType, cancel: threading.Event):
    """An IProgressMonitor that cancels the build once ``cancel`` is set, or None when the
    TensorRT package has none (before TensorRT 10). Keep it alive as long as the config."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class _Monitor(base):
        def __init__(self):
            base.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            log.debug("build phase %r (%d steps, in %r)", phase_name, num_steps, parent_phase)

        def step_complete(self, phase_name, step):
            return not cancel.is_set()

        def phase_finish(self, phase_name):
            pass

    return _Monitor()


def run_cancellable(work: Callable[[], T], cancel: threading.Event, name: str = "kolors-trt-build") -> T:
    """``work()`` in a worker thread; the caller's thread waits and stays interruptible.

    On KeyboardInterrupt (SIGTERM raises a subclass in the CLI) ``cancel`` is set, the
    worker gets ``GRACE_S`` to return, and the interrupt is re-raised. A worker still in
    a long native step after that is left running: the thread is not a daemon, so an
    embedding program waits for it at exit; the CLI leaves at once (kolors_trt/cli.py)."""
    box: dict = {}

    def target():
        try:
            box["value"] = work()
        except BaseException as exc:  # handed to the waiting thread, re-raised there
            box["error"] = exc

    thread = threading.Thread(target=target, name=name)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(_POLL_S)
    except KeyboardInterrupt:
        cancel.set()
        thread.join(GRACE_S)
        if thread.is_alive():
            log.info("the builder is inside a long step; not waiting for it to notice the cancel")
        raise
    if "error" in box:
        raise box["error"]
    return box["value"]
