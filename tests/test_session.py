"""`_SparsitySession`, the engine glue both framework adapters drive: its schedule and what it leaves on the
training thread."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from sparsity_callbacks import SparsityConfig
from sparsity_callbacks.session import _SparsitySession


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))


def _expected_schedule(steps, n, freeze_after=None, last=None):
    """Steps that measure, by the rule `on_optimizer_step` documents: a multiple of ``n`` reached or passed
    since the previous call (``step % n == 0`` when the step did not advance), the discovery step and the
    last one."""
    measured, previous, frozen = [], 0, False
    for step in steps:
        due = step // n > previous // n if previous < step else step % n == 0
        discover = freeze_after is not None and not frozen and step >= freeze_after
        frozen = frozen or discover
        if due or discover or step == last:
            measured.append(step)
        previous = step
    return measured


@pytest.mark.parametrize("seed", range(6))
def test_measures_at_the_documented_steps_whatever_the_step_sequence(seed):
    """The quiet-step shortcut (an integer compare) measures at exactly the steps of the documented rule:
    steps advancing by 1 or more (Lightning's manual optimization), repeated and going back (a restart)."""
    rng = random.Random(seed)
    n = rng.choice([1, 2, 3, 5, 10])
    steps, step = [], 0
    for _ in range(80):
        step = max(1, step + rng.choice([1, 1, 1, 2, 3, 0, -2]))
        steps.append(step)
    model = _model()
    session = _SparsitySession(SparsityConfig(log_to_mlflow=False), is_rank_zero=True, default_every_n_steps=n)
    session.start(model, [], 0)
    measured = []
    for i, s in enumerate(steps):
        with torch.no_grad():
            model[0].weight[i % 5, i % 6] += 1.0
        if session.on_optimizer_step(s, last=i == len(steps) - 1) is not None:
            measured.append(s)
    assert measured == _expected_schedule(steps, n, last=steps[-1])
    assert session.last_measurement.step == steps[-1]


@pytest.mark.slow
def test_discovery_between_measurements_and_the_optimizer_state_bytes_the_step_after(mlflow_local):
    """``freeze_after_steps`` off the measuring cadence still discovers at that step, and the optimizer
    state bytes of an optimizer that had no state when freezing (plain SGD) are logged at the next step,
    which is not a measuring one (both bypass the quiet-step shortcut)."""
    from mlflow import MlflowClient

    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    config = SparsityConfig(freeze_mask="discover", freeze_after_steps=7, every_n_steps=5, log_artifacts=False)
    session = _SparsitySession(config, is_rank_zero=True, default_every_n_steps=5)
    session.start(model, [optimizer], 0)
    measured, frozen_at = [], None
    for step in range(1, 13):
        model(torch.ones(2, 6)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        if session.on_optimizer_step(step) is not None:
            measured.append(step)
        if frozen_at is None and session.freezer is not None:
            frozen_at = step
    session.end(12)
    assert measured == [5, 7, 10] and frozen_at == 7
    client = MlflowClient()
    assert [m.step for m in client.get_metric_history(session.logged_run_id, "sparsity/frozen_fraction")] == [7]
    assert [m.step for m in client.get_metric_history(session.logged_run_id, "sparsity/optimizer_state_bytes")] == [8]


@pytest.mark.slow
def test_the_metric_dict_is_built_on_the_sink_thread_not_the_training_thread(mlflow_local, monkeypatch):
    """A measurement's per-layer / per-module metric dict is built by the MLflow sink's worker: the training
    thread pays the measurement and the queue put. The values that arrive are the measurement's own."""
    from mlflow import MlflowClient

    from sparsity_callbacks.measurement import Measurement

    threads: list[str] = []
    to_metrics = Measurement.to_metrics

    def recording(self, per_tensor=False):
        threads.append(threading.current_thread().name)
        return to_metrics(self, per_tensor)

    monkeypatch.setattr(Measurement, "to_metrics", recording)
    model = _model()
    session = _SparsitySession(SparsityConfig(log_artifacts=False), is_rank_zero=True, default_every_n_steps=2)
    session.start(model, [], 0)
    for step in range(1, 7):
        with torch.no_grad():
            model[1].weight[step % 3, 0] += 1.0
        session.on_optimizer_step(step)
    final = session.last_measurement
    session.end(6)
    assert threads and set(threads) == {"MLflowSink-worker"}
    history = MlflowClient().get_metric_history(session.logged_run_id, "sparsity/changed_fraction_by_module/1")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [2, 4, 6]
    assert to_metrics(final)["sparsity/changed_fraction_by_module/1"] == max(history, key=lambda m: m.step).value


_COLD_PROCESS = """
import json, os, sys, tempfile, threading
import torch
from sparsity_callbacks import SparsityConfig
from sparsity_callbacks.session import _SparsitySession

tempfile.tempdir = sys.argv[1]
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
session = _SparsitySession(SparsityConfig(), is_rank_zero=True, default_every_n_steps=1)
assert "matplotlib" not in sys.modules
session.start(model, [], 0)
warm_up = [t for t in threading.enumerate() if t.name == "sparsity-plots-warm-up"]
warm_up[0].join()
assert "matplotlib" in sys.modules
with torch.no_grad():
    model[0].weight[0, 0] += 1.0
session.on_optimizer_step(1)
session.end(1)
print(json.dumps([session.logged_run_id, os.listdir(sys.argv[1])]))
"""


@pytest.mark.slow
def test_plots_warm_up_during_training_and_every_artifact_is_logged(mlflow_local, tmp_path):
    """In a fresh process, matplotlib's import and font set-up run on a background thread from train start
    (not at train end, where they cost ~0.5 s); every artifact still reaches MLflow, and the folder the
    artifacts were written to is gone (the sink uploads its own links)."""
    import json
    import os
    import subprocess
    import sys

    from mlflow import MlflowClient

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_local, "PYTHONPATH": repo}
    done = subprocess.run(
        [sys.executable, "-c", _COLD_PROCESS, str(scratch)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run_id, left = json.loads(done.stdout.strip().splitlines()[-1])
    assert not any("sparsity_artifacts_" in name for name in left), left
    artifacts = {a.path for a in MlflowClient(mlflow_local).list_artifacts(run_id, "sparsity")}
    assert artifacts == {
        "sparsity/mask.safetensors",
        "sparsity/report.json",
        "sparsity/heatmap.png",
        "sparsity/curves.png",
    }


@pytest.mark.slow
def test_artifacts_started_at_the_last_step_are_redone_when_training_ends_at_another_step(mlflow_local, tmp_path):
    """The artifacts started in the background at a step called ``last`` are replaced when the end comes at
    a later step (its final measurement is another): the logged report is the final one."""
    import json

    from mlflow import MlflowClient

    model = _model()
    session = _SparsitySession(SparsityConfig(), is_rank_zero=True, default_every_n_steps=2)
    session.start(model, [], 0)
    for step in range(1, 5):
        with torch.no_grad():
            model[0].weight[step, 0] += 1.0
        session.on_optimizer_step(step, last=step == 4)
    with torch.no_grad():
        model[0].weight[0, 0] += 1.0
    session.end(5)
    local = MlflowClient().download_artifacts(session.logged_run_id, "sparsity", str(tmp_path / "artifacts"))
    with open(f"{local}/report.json") as f:
        report = json.load(f)
    assert report["step"] == 5 and [point["step"] for point in report["history"]] == [2, 4, 5]
    assert report["changed"] == 5  # 4 elements by step 4, one more after it
    assert not [t for t in threading.enumerate() if t.name == "sparsity-artifacts"]  # the discarded writer ended
