"""benchmarks/gpu_smoke.py without a GPU: it skips cleanly where there is no CUDA device, its device-independent
parts import and compute what they say, and its checks pass on the CPU (gloo, inductor's C++ backend)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_smoke.py")


def _load():
    spec = importlib.util.spec_from_file_location("gpu_smoke", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_smoke"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def _run(*args: str, cuda_visible: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if cuda_visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def test_without_cuda_it_skips_and_exits_0():
    done = _run(cuda_visible="")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "no CUDA device: skipped"


def test_device_independent_parts():
    smoke = _load()
    assert smoke.overhead_ratio(raw=10.0, pytorch=110.0, localmap=50.0) == pytest.approx(0.4)
    calls = []
    assert smoke.median_us(lambda: calls.append(1), calls=5, rounds=3, sync=lambda: None) >= 0
    assert len(calls) == 10 + 5 * 3  # warm-up, then rounds x calls
    text = smoke.table([smoke.Row("a check", True, "fine"), smoke.Row("another", False, "bad")])
    assert text.splitlines() == ["check    result  detail", "a check  ok      fine", "another  FAIL    bad"]


@pytest.mark.slow
@pytest.mark.compile
def test_checks_pass_on_the_cpu():
    done = _run("--device", "cpu", "--calls", "20", "--rounds", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("torch ") and "one-rank gloo mesh" in lines[0]
    rows = [line for line in lines[2:] if line.strip()]
    assert len(rows) == 5 and all("  ok  " in r for r in rows), done.stdout
