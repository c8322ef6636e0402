"""`make gpu-check` (kolors_trt/gpu_check.py) on the CPU: its GPU steps cannot run here, so these check the
parts that decide what the report says: the plan of steps, the time budget, a failed or timed-out step,
the test outcomes read from a real pytest run's JUnit XML, the report written after each step, and the
refusal without a GPU."""

from __future__ import annotations

import json
import sys
import textwrap

from kolors_trt import gpu_check
from kolors_trt.gpu_check import Step

TESTS = textwrap.dedent('''
    import pytest

    def test_ok():
        pass

    def test_broken():
        assert 1 == 2, "one is not two"

    def test_later():
        pytest.skip("needs a GPU")
''')


def python(code: str) -> tuple:
    return (sys.executable, "-c", code)


def test_the_plan_builds_the_tiny_model_unless_engines_are_given(tmp_path):
    names = [s.name for s in gpu_check.plan(tmp_path, None)]
    assert names == ["gpu_tests", "tiny", "export", "build", "bench_graphs_on", "bench_graphs_off"]
    steps = gpu_check.plan(tmp_path, tmp_path / "engines")
    assert [s.name for s in steps] == ["gpu_tests", "bench_graphs_on", "bench_graphs_off"]
    bench = steps[1].argv
    assert bench[bench.index("--size") + 1] == "1024x1024" and bench[bench.index("--steps") + 1] == "50"
    assert bench[bench.index("--engines") + 1] == str(tmp_path / "engines")
    assert "gpu" in steps[0].argv and any(a.endswith("gpu-tests.xml") for a in steps[0].argv)


def test_a_check_records_tests_failures_and_the_budget(tmp_path):
    out = tmp_path / "check"
    out.mkdir()
    (tmp_path / "test_sample.py").write_text(TESTS)
    steps = [
        Step("gpu_tests", (sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0",
                           f"--junitxml={out / 'gpu-tests.xml'}", str(tmp_path / "test_sample.py")), 120),
        Step("bench_graphs_on", python("import json, sys; json.dump({'p50': 1.5}, open(sys.argv[1], 'w'))") + (
            str(out / "bench-graphs-on.json"),), 60),
        Step("build", python("import time; time.sleep(30)"), 1),  # over its cap: timed out
        Step("bench_graphs_off", python("pass"), 60),  # not run: the build failed
    ]
    report = gpu_check.check(out, None, budget_s=300, steps=steps)
    assert json.loads((out / "gpu-check.json").read_text()) == report
    assert report["tests"]["counts"] == {"passed": 1, "failed": 1, "error": 0, "skipped": 1}
    broken = next(c for c in report["tests"]["cases"] if c["test"].endswith("test_broken"))
    assert broken["outcome"] == "failed" and "one is not two" in broken["message"]
    tests, bench, build, last = report["steps"]
    assert tests["returncode"] == 1 and bench["returncode"] == 0 and report["bench"]["bench-graphs-on"] == {"p50": 1.5}
    assert build["timed_out"] and build["returncode"] is None and build["seconds"] < 10
    assert last["not_run"] == "an earlier step failed" and report["passed"] is False
    assert "host" in report and report["host"]["python"]


def test_steps_beyond_the_budget_are_not_run(tmp_path):
    steps = [Step("a", python("import time; time.sleep(2)"), 60), Step("b", python("pass"), 60)]
    report = gpu_check.check(tmp_path, None, budget_s=6, steps=steps, host={"python": "3"})
    assert report["steps"][0]["returncode"] == 0 and report["steps"][1]["not_run"] == "out of time"


def test_without_a_gpu_it_says_so(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path)]) == 1
    assert "no NVIDIA GPU" in capsys.readouterr().err
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert report["passed"] is False and report["error"].startswith("no NVIDIA GPU")
