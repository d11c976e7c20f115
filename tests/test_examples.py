"""The examples run as documented (short settings), against MLflow's local store in a temp folder."""

from __future__ import annotations

import importlib.util
import os

import pytest
from mlflow import MlflowClient

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


pytestmark = pytest.mark.slow  # runs the examples end to end


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_custom_loop_prints_fractions_and_writes_the_mask(mlflow_local, capsys):
    _load("custom_loop").main(steps=20)
    out = capsys.readouterr().out
    assert "changed bf16" in out and "update sparsity" in out
    assert os.path.exists("custom_loop_mask.safetensors")


def test_subnetwork_recovery_table_and_runs(mlflow_local, capsys):
    table = _load("subnetwork_recovery").main(steps=6)
    assert set(table) == {"full", "ever-changed (bf16)", "top 20% moved", "random 20% (control)"}
    assert table["top 20% moved"]["trained fraction"] == pytest.approx(0.2, abs=1e-3)
    assert table["full"]["same as full: exact"] == 1.0
    runs = MlflowClient(mlflow_local).search_runs(
        [e.experiment_id for e in MlflowClient(mlflow_local).search_experiments()]
    )
    assert len(runs) == 4


def test_trl_grpo_example_logs_sparsity_into_the_grpo_run(mlflow_local, tmp_path):
    callback = _load("trl_grpo").main(max_steps=2, output_dir=str(tmp_path / "out"), tiny=True)
    run = MlflowClient(mlflow_local).get_run(callback.run_id)
    assert "sparsity/ever_changed_fraction" in run.data.metrics and "train_loss" in run.data.metrics
