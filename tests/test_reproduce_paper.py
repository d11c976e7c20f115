"""``examples/reproduce_paper.py`` on the tiny model built in code (1-2 steps per run): all parts together and
each alone write the JSON tables and one MLflow run per training run, against MLflow's local store."""

from __future__ import annotations

import importlib.util
import json
import os
import runpy
import sys

import pytest
from mlflow import MlflowClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "reproduce_paper.py")

pytestmark = pytest.mark.slow  # twelve real TRL training runs


def _load():
    spec = importlib.util.spec_from_file_location("example_reproduce_paper", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _runs(uri: str) -> dict[str, object]:
    """Finished MLflow runs by run name."""
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return {r.info.run_name: r for r in runs}


def test_all_parts_write_the_tables_and_one_mlflow_run_per_training_run(mlflow_local, tmp_path):
    module = _load()
    out = tmp_path / "results.json"
    options = module.Options(steps=1, recovery_steps=2, tiny=True, out=str(out), output_dir=str(tmp_path / "runs"))
    module.main("abcd", options)
    data = json.loads(out.read_text())
    assert {"a", "b", "c", "d", "total_seconds", "load_average_start", "load_average_end"} <= set(data)

    # (a) 4 algorithms x 2 bases; bf16 changes are a subset of fp32 changes, the bf16 base is all bf16 values
    assert len(data["a"]) == 8
    for label, row in data["a"].items():
        assert 0 < row["changed_fraction_bf16"] <= row["changed_fraction_fp32"] <= 1, label
        assert row["update_sparsity_bf16"] == pytest.approx(1 - row["changed_fraction_bf16"])
        expected = 1.0 if label.endswith("from bf16 base") else pytest.approx(0.0, abs=0.05)  # random fp32 init
        assert row["reference_representable_fraction_bf16"] == expected, label
    a = data["a"]
    assert (
        a["grpo lr=1e-05 from bf16 base"]["changed_fraction_bf16"]
        > a["grpo lr=1e-06 from bf16 base"]["changed_fraction_bf16"]
    )

    # (b) overlaps of real masks, with both chance baselines
    for row in data["b"].values():
        assert 0 <= row["overlap_ab"] <= 1 and 0 <= row["chance_magnitude_matched"] <= 1
        assert row["chance_uniform"] == pytest.approx(row["density_b"])

    # (c) the masked runs froze everything outside their mask bit for bit, logged a reward every step
    c = data["c"]
    assert set(c) == {"full", "discovered mask", "random mask, same density", "base, untrained"}
    assert c["full"]["identical_exact"] == 1.0 and c["full"]["trained_fraction"] == 1.0
    assert c["discovered mask"]["changed_outside_trained_mask"] == 0
    assert c["random mask, same density"]["changed_outside_trained_mask"] == 0
    density = c["discovered mask"]["trained_fraction"]
    assert 0 < density < 1 and c["random mask, same density"]["trained_fraction"] == pytest.approx(density, abs=0.01)
    for label in ("discovered mask", "random mask, same density", "base, untrained"):
        row = c[label]
        assert row["identical_exact"] <= row["identical_within_1e-5"] <= row["identical_within_1e-4"] <= 1, label
        assert row["identical_exact"] < 1, label  # the full run moved weights these did not
    runs = _runs(mlflow_local)
    for label in ("full", "discovered mask", "random mask, same density"):
        row = c[label]
        assert len(row["reward_curve"]) == 2 and set(row["reward_terms"]) == {"target_word_reward"}
        run = next(r for r in runs.values() if r.info.run_id == row["mlflow_run_id"])
        history = MlflowClient(mlflow_local).get_metric_history(run.info.run_id, "reward")
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(row["reward_curve"])
        if label != "full":
            assert run.data.metrics["recovery/identical_within_1e-5"] == pytest.approx(row["identical_within_1e-5"])
    full_run = next(r for r in runs.values() if r.info.run_id == c["full"]["mlflow_run_id"])
    # the discovered mask is the full run's ever-changed bf16 mask, as its own MLflow run reported it
    assert density == pytest.approx(full_run.data.metrics["sparsity/ever_changed_fraction"])

    # (d) first, middle and last of the tiny model's 4 layers, 7 matrices each
    assert data["rank_layers"] == [0, 2, 3]
    for row in data["d"].values():
        assert row["tensors"] == 21 and 0 < row["min_relative_rank"] <= row["mean_relative_rank"] <= 1

    # the README tables render from the JSON: one per part, every part (c) row
    tables = module.markdown_tables(data).splitlines()
    assert sum(line.startswith("|---") for line in tables) == 4
    assert sum(line.startswith(f"| {label} |") for line in tables for label in c) == 4

    # one MLflow run per distinct training run: a 8, b 1 more (seed 1), c 3 (2-step runs); d reuses a's
    assert len(runs) == 12
    assert all("sparsity/changed_fraction" in r.data.metrics for r in runs.values())


@pytest.mark.parametrize(("part", "runs"), [("c", 3), ("d", 2)])
def test_each_part_runs_alone_from_the_command_line(mlflow_local, tmp_path, monkeypatch, capsys, part, runs):
    """Only what the part needs is trained: part c its three recovery runs, part d the GRPO and SFT runs. The
    script runs as ``__main__`` with these arguments in this process (its command line parsed as from a shell;
    the interpreter start and the TRL imports, seconds, already paid)."""
    out = tmp_path / "part.json"
    argv = ["--tiny", "--parts", part, "--steps", "1", "--recovery-steps", "2", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", [SCRIPT, *argv])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_local)
    runpy.run_path(SCRIPT, run_name="__main__")
    data = json.loads(out.read_text())
    assert part in data and not {"a", "b", "c", "d"} - {part} & set(data)
    assert f"({part})" in capsys.readouterr().out
    assert len(_runs(mlflow_local)) == runs


def test_unknown_part_is_refused_with_the_choices_before_anything_loads():
    with pytest.raises(ValueError, match=r"parts takes letters from 'abcd' \(e\.g\. 'a' or 'bc'\), got 'ax'"):
        _load().main("ax")
