"""`make gpu-check`: one command for a GPU host that settles what the CPU-only machine could not run, in one
report, within a time budget (default 8 minutes).

    python -m kolors_trt.gpu_check --out DIR [--engines DIR] [--budget-s 480]

Steps, each a subprocess given what is left of the budget (a step that does not fit is recorded as not run):

1. the ``gpu`` tests (tests/test_runtime_gpu.py, test_runtime_trt_math.py, test_engines.py): the TensorRT
   and TensorRT-RTX backends against ONNX Runtime, CUDA graphs across shapes, the runtime cache; JUnit XML;
2. the benchmark at 1024x1024, 50 steps, with and without CUDA graphs: on ``--engines DIR`` (e.g. the real
   model built by `make bench-gpu`), else on the tiny checkpoint exported and built here with
   ``--target tensorrt --static`` (a few minutes at most; its latencies measure the runtime, not Kolors).
   Each bench JSON holds every sample, load time and each engine's weights and activation need
   (``device_memory_size_v2``).

DIR/gpu-check.json is written after every step (atomically), so an interrupted run keeps what it found:
the host (GPU, compute capability, driver, TensorRT versions), each step's command, exit code, seconds and
output tail, the test outcomes and the bench results. Exit code 0 when every step ran and passed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from kolors_trt.runtime.manifest import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]  # the repository: the tests are run from there
DEFAULT_BUDGET_S = 480.0
GPU_TESTS = ("tests/test_runtime_gpu.py", "tests/test_runtime_trt_math.py", "tests/test_engines.py")
SIZE, STEPS = "1024x1024", "50"
TAIL = 4000  # characters of a step's output kept in the report


@dataclass(frozen=True)
class Step:
    name: str
    argv: tuple
    cap_s: float  # the most this step may take, if the budget has it


def plan(out: Path, engines: Optional[Path]) -> list[Step]:
    """The steps of one check (see the module docstring)."""
    kt = (sys.executable, "-m", "kolors_trt")
    steps = [Step("gpu_tests", (sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-n", "0", "-p",
                                "no:cacheprovider", f"--junitxml={out / 'gpu-tests.xml'}", *GPU_TESTS), 240)]
    if engines is None:
        engines = out / "engines-tiny"
        steps += [Step("tiny", (*kt, "tiny", str(out / "tiny")), 60),
                  Step("export", (*kt, "export", "--weights", str(out / "tiny" / "kolors"), "--ip-adapter",
                                  str(out / "tiny" / "ip"), "--out", str(out / "onnx-tiny")), 120),
                  Step("build", (*kt, "build", "--onnx", str(out / "onnx-tiny"), "--out", str(engines), "--target",
                                 "tensorrt", "--static", "--size", SIZE, "--batch", "1"), 240)]
    for graphs in ("on", "off"):
        steps.append(Step(f"bench_graphs_{graphs}", (*kt, "bench", "--engines", str(engines), "--size", SIZE,
                                                     "--steps", STEPS, "--warmup", "1", "--runs", "3", "--cuda-graph",
                                                     graphs, "--json", str(out / f"bench-graphs-{graphs}.json")), 180))
    return steps


def run_step(step: Step, seconds: float) -> dict:
    """Run one step for at most ``seconds``; its record for the report."""
    started = time.perf_counter()
    record = {"name": step.name, "argv": list(step.argv), "limit_s": round(seconds, 1)}
    try:
        proc = subprocess.run(step.argv, capture_output=True, text=True, timeout=seconds, cwd=ROOT)
        record.update(returncode=proc.returncode, timed_out=False, output_tail=(proc.stdout + proc.stderr)[-TAIL:])
    except subprocess.TimeoutExpired as err:
        output = (err.stdout or b"") + (err.stderr or b"")
        text = output.decode(errors="replace") if isinstance(output, bytes) else str(output)
        record.update(returncode=None, timed_out=True, output_tail=text[-TAIL:])
    record["seconds"] = round(time.perf_counter() - started, 1)
    return record


def junit_outcomes(path: Path) -> dict:
    """Counts and per-test outcomes (passed, failed, error, skipped, with the message) of a JUnit XML file."""
    cases, counts = [], {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    if not path.is_file():
        return {"counts": counts, "cases": cases}
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            found = case.find(kind)
            if found is not None:
                outcome = {"failure": "failed"}.get(kind, kind)
                message = (found.get("message") or found.text or "")[:500]
        counts[outcome] += 1
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome, "message": message})
    return {"counts": counts, "cases": cases}


def host_facts() -> dict:
    """The GPU and the software the answers hold for."""
    from kolors_trt.bench import environment

    facts = environment("gpu-check")
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            facts["compute_capability"] = f"SM{major}{minor}"
            facts["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    except ImportError:
        pass
    return facts


def check(out: Path, engines: Optional[Path], budget_s: float, steps: Optional[list] = None,
          host: Optional[dict] = None) -> dict:
    """Run the steps (default: ``plan``) within ``budget_s`` and write ``out/gpu-check.json`` after each; returns
    the report. ``host``: the facts of host_facts(), if already read."""
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + budget_s
    report = {"budget_s": budget_s, "host": host_facts() if host is None else host, "steps": [], "tests": None,
              "bench": {}}
    path = out / "gpu-check.json"
    write_json_atomic(path, report)
    failed = False
    for step in plan(out, engines) if steps is None else steps:
        left = deadline - time.monotonic()
        if failed or left < 5:
            reason = "an earlier step failed" if failed else "out of time"
            report["steps"].append({"name": step.name, "argv": list(step.argv), "not_run": reason})
            continue
        record = run_step(step, min(step.cap_s, left))
        report["steps"].append(record)
        # failed tests leave the benchmark its questions; without a checkpoint or engines it has none
        failed = record["returncode"] != 0 and step.name in ("tiny", "export", "build")
        if step.name == "gpu_tests":
            report["tests"] = junit_outcomes(out / "gpu-tests.xml")
        for bench in out.glob("bench-*.json"):
            report["bench"][bench.stem] = json.loads(bench.read_text())
        write_json_atomic(path, report)
    report["passed"] = all(s.get("returncode") == 0 for s in report["steps"])
    write_json_atomic(path, report)
    return report


def main(argv: Optional[list] = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m kolors_trt.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="work folder; the report is OUT/gpu-check.json")
    p.add_argument("--engines", type=Path, default=None, help="benchmark this engine folder (default: the tiny "
                   "checkpoint, built here for this GPU)")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="the whole check's time limit")
    args = p.parse_args(argv)
    facts = host_facts()
    if "gpu" not in facts:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out / "gpu-check.json", {"host": facts, "passed": False,
                                                        "error": "no NVIDIA GPU visible to torch"})
        print("gpu-check: no NVIDIA GPU visible to torch (a CUDA build of torch and a driver are needed: "
              "make setup TORCH_SPEC=torch EXTRAS=export,test,tensorrt,tensorrt-rtx,bench)", file=sys.stderr)
        return 1
    report = check(args.out, args.engines, args.budget_s, host=facts)
    for step in report["steps"]:
        state = step.get("not_run") or ("timed out" if step.get("timed_out") else f"exit {step['returncode']}")
        print(f"{step['name']:<18} {state:<22} {step.get('seconds', '')}")
    if report["tests"]:
        print("gpu tests: " + ", ".join(f"{k} {v}" for k, v in report["tests"]["counts"].items()))
    print(f"report: {args.out / 'gpu-check.json'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
