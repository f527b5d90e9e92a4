"""The benchmark programs' --quick modes: the same code paths as the real
runs, as smoke tests with no speed assertions (speed is measured by the
programs themselves, never by tests)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(
    bool(os.environ.get("ASYNCGRPC_SKIP_BENCH_SMOKE")),
    reason="benchmark smoke runs disabled by ASYNCGRPC_SKIP_BENCH_SMOKE")


def run(script: str, *args: str, timeout: float = 120) -> str:
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args],
                            cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_case_study_quick(tmp_path):
    out = run("case_study.py", "--quick", "--out", str(tmp_path / "case_study.png"))
    assert "asyncgrpc" in out and "skipped" not in out.lower().split("asyncgrpc")[-1][:200]
    assert (tmp_path / "case_study.png").stat().st_size > 0


def test_cpu_bound_quick():
    out = run("cpu_bound.py", "--quick")
    assert "asyncgrpc.server()" in out
    for lane in ("inline", "thread", "process"):
        assert lane in out


def test_bridge_counters_quick():
    out = run("bridge_counters.py", "--quick", "--levels", "1,10")
    assert "eventfd_writes" in out


def test_run_py_quick(tmp_path):
    """The side-by-side runner's smoke mode: builds the C load generator,
    serves the echo service on asyncgrpc and grpc.aio, checks every reply."""
    out = run("run.py", "--quick", "--servers", "asyncgrpc,grpc_aio", "--no-plots",
              "--out", str(tmp_path), timeout=180)
    assert "asyncgrpc" in out and "grpc_aio" in out
    assert (tmp_path / "results.json").exists()
