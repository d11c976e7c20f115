"""The benchmark scripts run: `benchmarks/gpu.py` refuses cleanly without CUDA and its CPU dry run
exercises the measure and freeze sections (figures are not checked: timings belong in benchmarks/)."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys

import pytest
import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_GPU = os.path.join(_ROOT, "benchmarks", "gpu.py")


pytestmark = pytest.mark.slow  # runs the benchmark scripts in subprocesses


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": _ROOT, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, _GPU, *args], capture_output=True, text=True, timeout=600, env=env, cwd=_ROOT
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_script_without_cuda_exits_2_and_says_why(monkeypatch, capsys):
    # in this process (it stops before measuring anything): the script as __main__, its exit code from sys.exit
    monkeypatch.setattr(sys, "argv", [_GPU])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(_GPU, run_name="__main__")
    captured = capsys.readouterr()
    assert stop.value.code == 2, captured.err
    assert "CUDA is not available" in captured.err and "--device cpu --small" in captured.err
    assert "| measure |" not in captured.out


@pytest.mark.slow
def test_gpu_script_cpu_dry_run_prints_one_table():
    result = _run("--device", "cpu", "--small", "--params", "200000", "--sections", "measure,freeze")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert lines[0] == "| section | what | result |"
    assert any(line.startswith("| measure | default config") for line in lines)
    assert "| freeze | 3 optimizers x 2 variants | 6/6 bit-identical |" in lines


def test_freeze_memory_script_prints_the_table(monkeypatch, capsys):
    """The script as __main__ in this process; its memory runs are still fresh subprocesses of the script
    (peak RSS per configuration), which is where a broken script-mode import would show."""
    script = os.path.join(_ROOT, "benchmarks", "freeze_memory.py")
    monkeypatch.setenv("PYTHONPATH", _ROOT)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = ["--width", "64", "--layers", "2", "--rows", "8", "--repeats", "1", "--warmup", "0", "--densities", "0.2"]
    monkeypatch.setattr(sys, "argv", [script, *args])
    runpy.run_path(script, run_name="__main__")
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 20% |")]
    assert [row.split(" | ")[1] for row in rows] == ["dense", "compact"]
    assert "x dense)" in rows[1]


def test_measure_script_prints_one_ratio_per_configuration(monkeypatch, capsys):
    script = os.path.join(_ROOT, "benchmarks", "measure.py")
    configs = "default_eager,bf16_eager,lowbyte"
    monkeypatch.setattr(sys, "argv", [script, "--params", "100000", "--repeats", "1", "--configs", configs])
    runpy.run_path(script, run_name="__main__")
    rows = [line for line in capsys.readouterr().out.splitlines() if "x memcpy" in line]
    assert len(rows) == 3
    assert "eager, mode=exact" in rows[0] and "low-byte detector" in rows[2]
    assert "2.000 B/param host" in rows[1]  # the bf16 reference: 2 bytes per element
