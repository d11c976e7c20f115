"""`SparsityCallback` with real `transformers.Trainer`, TRL `GRPOTrainer` / `DPOTrainer` and real MLflow.

Every expected value is recounted independently from the model's weights (a copy of the initial weights
kept by the test, compared with ``!=``), and every MLflow value is read back with `MlflowClient`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("mlflow")

import mlflow  # noqa: E402
from datasets import Dataset  # noqa: E402
from helpers import run_in_new_process, tiny_llama, tiny_tokenizer  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from sparsity_callbacks import Mask, SparsityCallback  # noqa: E402
from sparsity_callbacks.integrations.transformers import SparsityCallback as DirectSparsityCallback  # noqa: E402
from sparsity_callbacks.session import TRACKER_FILE  # noqa: E402

ARTIFACTS = {"sparsity/mask.safetensors", "sparsity/report.json", "sparsity/heatmap.png", "sparsity/curves.png"}


# --- helpers ---------------------------------------------------------------------------------------
pytestmark = pytest.mark.slow  # real transformers/TRL trainers and an MLflow server


def _lm_dataset(n: int = 32, seq: int = 12, low: int = 4, high: int = 20, seed: int = 0) -> Dataset:
    """Random token sequences over ids [low, high): embedding rows of other ids get no gradient."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, high, (n, seq), generator=g).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def _args(output_dir, **overrides) -> TrainingArguments:
    options = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    options.update(overrides)
    return TrainingArguments(**options)


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _changed(model: torch.nn.Module, initial: dict[str, torch.Tensor], dtype: torch.dtype | None = None):
    """``{name: bool tensor}`` of elements that differ from ``initial`` (compared in ``dtype``)."""
    current = dict(model.named_parameters())
    out = {}
    for name, ref in initial.items():
        now = current[name].detach()
        out[name] = now.to(dtype) != ref.to(dtype) if dtype is not None else now != ref
    return out


def _fraction(masks: dict[str, torch.Tensor]) -> float:
    return sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _all_runs(client: MlflowClient):
    """Every run of this test: its experiment (on the shared server) or the whole local store."""
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME")
    experiments = [client.get_experiment_by_name(name)] if name else client.search_experiments()
    return client.search_runs([e.experiment_id for e in experiments if e is not None])


def _artifact_paths(client: MlflowClient, run_id: str) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id, "sparsity")}


class _StepRecorder(TrainerCallback):
    """Records the global step after every optimizer step and the steps at which the Trainer logged."""

    def __init__(self):
        self.optimizer_steps: list[int] = []
        self.logged_steps: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.optimizer_steps.append(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.logged_steps.append(state.global_step)


@pytest.fixture
def server_tracking(mlflow_server_tracking):
    """MLflow pointed at the session's real `mlflow server`, in an experiment of this test's own."""
    return mlflow_server_tracking


# --- construction ----------------------------------------------------------------------------------
def test_callback_validates_options_eagerly():
    assert SparsityCallback is DirectSparsityCallback
    with pytest.raises(ValueError, match="`mode` must be one of"):
        SparsityCallback(mode="bogus")
    with pytest.raises(TypeError, match=r"Unknown SparsityConfig option\(s\) \['bogus'\]"):
        SparsityCallback(bogus=1)
    with pytest.raises(ValueError, match="needs `freeze_after_steps`"):
        SparsityCallback(freeze_mask="discover")


# --- HF Trainer ------------------------------------------------------------------------------------
def test_trainer_logs_into_the_hf_mlflow_run_at_its_global_steps(mlflow_local, tmp_path, capsys):
    model = tiny_llama()
    initial = _trainable(model)
    callback, recorder = SparsityCallback(), _StepRecorder()
    args = _args(tmp_path / "out", max_steps=6, logging_steps=2, report_to="mlflow", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_lm_dataset(), callbacks=[callback, recorder])
    trainer.train()
    printed = capsys.readouterr().out

    client = MlflowClient(mlflow_local)
    runs = _all_runs(client)
    assert len(runs) == 1, "the sparsity metrics must go into the HF MLflowCallback's run, not a second one"
    run = runs[0]
    assert callback.run_id == run.info.run_id
    # the Trainer logged its loss at global steps 2, 4, 6: the sparsity metrics carry the same steps
    assert recorder.logged_steps == [2, 4, 6]
    assert [s for s, _ in _history(client, run.info.run_id, "loss")] == [2, 4, 6]
    for key in (
        "changed_fraction",
        "ever_changed_fraction",
        "update_sparsity",
        "changed_fraction_by_layer/layer_00",
        "changed_fraction_by_layer/layer_01",
        "changed_fraction_by_module/self_attn.q_proj",
        "changed_fraction_by_module/embed_tokens",
        "changed_fraction_by_module/lm_head",
    ):
        assert [s for s, _ in _history(client, run.info.run_id, f"sparsity/{key}")] == [2, 4, 6], key
    assert [s for s, _ in _history(client, run.info.run_id, "sparsity/churn_fraction")] == [4, 6]
    # HF's MLflowCallback saw the headline figures in `logs` too; MLflow still holds one value per step
    assert [s for s, _ in _history(client, run.info.run_id, "sparsity/changed_fraction")] == [2, 4, 6]
    assert "sparsity/tracked_elements" not in run.data.metrics  # a constant: the param below
    assert run.data.params["sparsity.tracked_elements"] == str(sum(t.numel() for t in initial.values()))

    # the Trainer's log lines (PrinterCallback) and log_history carry the headline figures at its log steps
    logged = [e for e in trainer.state.log_history if "sparsity/changed_fraction" in e]
    assert [e["step"] for e in logged] == [2, 4, 6] and all("loss" in e for e in logged)
    assert logged[-1]["sparsity/changed_fraction"] == callback.last_measurement.changed_fraction
    assert {"sparsity/ever_changed_fraction", "sparsity/update_sparsity"} <= set(logged[0])
    lines = [line for line in printed.splitlines() if "'loss'" in line]
    assert len(lines) == 3 and all("'sparsity/changed_fraction'" in line for line in lines)
    # the relays are gone from the Trainer's callback list after training
    assert [type(c).__name__ for c in trainer.callback_handler.callbacks].count("_HeadlineRelay") == 0

    # where to look: printed and kept as a run tag (a local store: the `mlflow ui` command and the page)
    page = f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}/model-metrics"
    command = f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'}"
    assert run.data.tags["sparsity.charts"] == f"{command}  # then open http://127.0.0.1:5000/{page}"
    assert command in printed and page in printed

    changed = _changed(model, initial)
    final = _history(client, run.info.run_id, "sparsity/changed_fraction")[-1][1]
    assert final == pytest.approx(_fraction(changed), abs=1e-12)
    assert 0 < final < 1  # embedding rows of unseen token ids got no gradient and no weight decay
    embed = changed["model.embed_tokens.weight"]
    assert run.data.metrics["sparsity/changed_fraction_by_module/embed_tokens"] == pytest.approx(
        embed.float().mean().item(), abs=1e-12
    )
    assert run.data.params["sparsity.tracked"] == "trainable parameters"
    assert run.data.params["sparsity.every_n_steps"] == "2"
    assert run.data.params["sparsity.resolved_mode"] == "exact"
    assert _artifact_paths(client, run.info.run_id) == ARTIFACTS


@pytest.mark.parametrize("report_to", [["tensorboard"], ["mlflow", "tensorboard"]])
def test_headline_figures_reach_every_reporter_once(report_to, mlflow_local, tmp_path):
    """TensorBoard gets the headline figures from the Trainer's `logs`, in a list with or without HF's
    MLflowCallback before it; MLflow gets each key once per step either way."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    callback = SparsityCallback(every_n_steps=2)
    args = _args(tmp_path / "out", max_steps=5, logging_steps=1, report_to=report_to)
    Trainer(model=tiny_llama(), args=args, train_dataset=_lm_dataset(), callbacks=[callback]).train()

    events = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "out") for f in fs if "tfevents" in f]
    assert len(events) == 1
    accumulator = EventAccumulator(events[0])
    accumulator.Reload()
    tag = "train/sparsity/changed_fraction"  # TensorBoardCallback puts training logs under train/
    assert tag in accumulator.Tags()["scalars"]
    # measured every 2 steps and at the last one; the figures are the ones the callback measured
    assert [e.step for e in accumulator.Scalars(tag)] == [2, 4, 5]
    final = callback.last_measurement.changed_fraction
    assert accumulator.Scalars(tag)[-1].value == pytest.approx(final, rel=1e-6)  # float32 in the event file
    assert [e.step for e in accumulator.Scalars("train/loss")] == [1, 2, 3, 4, 5]

    client = MlflowClient(mlflow_local)
    (run,) = _all_runs(client)
    for key in ("sparsity/changed_fraction", "sparsity/ever_changed_fraction", "sparsity/update_sparsity"):
        assert [s for s, _ in _history(client, run.info.run_id, key)] == [2, 4, 5], key


def test_report_to_none_gradient_accumulation_epochs_and_bf16(mlflow_local, tmp_path):
    """One run started by the sink; one measurement per optimizer step (not per micro-batch)."""
    model = tiny_llama()
    initial = _trainable(model)
    callback, recorder = SparsityCallback(), _StepRecorder()
    # 24 examples / batch 4 = 6 micro-batches per epoch, accumulated 3 at a time: 2 optimizer steps per epoch
    args = _args(tmp_path / "out", num_train_epochs=2, gradient_accumulation_steps=3, bf16=True)
    Trainer(model=model, args=args, train_dataset=_lm_dataset(n=24), callbacks=[callback, recorder]).train()

    assert recorder.optimizer_steps == [1, 2, 3, 4]
    client = MlflowClient(mlflow_local)
    runs = _all_runs(client)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id == callback.run_id and run.info.status == "FINISHED"
    history = _history(client, run.info.run_id, "sparsity/ever_changed_fraction")
    assert [s for s, _ in history] == [1, 2, 3, 4]
    assert all(a <= b for (_, a), (_, b) in zip(history, history[1:]))  # cumulative
    final = _history(client, run.info.run_id, "sparsity/changed_fraction")[-1]
    assert final == (4, pytest.approx(_fraction(_changed(model, initial)), abs=1e-12))
    assert callback.last_measurement.step == 4
    assert _artifact_paths(client, run.info.run_id) == ARTIFACTS


def test_peft_lora_tracks_only_adapters_and_logging_ratio(mlflow_local, tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    initial = _trainable(model)
    assert initial and all("lora_" in n for n in initial)
    callback = SparsityCallback()
    args = _args(tmp_path / "out", max_steps=4, logging_steps=0.5)  # a ratio: every ceil(0.5 * 4) = 2 steps
    Trainer(model=model, args=args, train_dataset=_lm_dataset(), callbacks=[callback]).train()

    assert sorted(callback.tracker.names) == sorted(initial)
    client = MlflowClient(mlflow_local)
    (run,) = _all_runs(client)
    assert "PEFT" in run.data.params["sparsity.tracked"] and "adapter" in run.data.params["sparsity.tracked"]
    history = _history(client, run.info.run_id, "sparsity/changed_fraction")
    assert [s for s, _ in history] == [2, 4]
    assert history[-1][1] == pytest.approx(_fraction(_changed(model, initial)), abs=1e-12)
    assert "sparsity/changed_fraction_by_module/self_attn.q_proj.lora_A" in run.data.metrics


def test_end_to_end_against_a_real_mlflow_server(server_tracking, tmp_path):
    """Metric history, params and artifacts through `mlflow server`; the logged mask equals the union of
    the changed elements the test saw itself at each measured step."""
    model = tiny_llama()
    initial = _trainable(model)
    ever: dict[str, torch.Tensor] = {}

    class OwnEverChanged(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % 2 == 0 or state.global_step == state.max_steps:
                for name, mask in _changed(model, initial).items():
                    ever[name] = ever[name] | mask if name in ever else mask

    callback = SparsityCallback(mlflow_experiment="ignored: HF's run is reused")
    args = _args(tmp_path / "out", max_steps=5, logging_steps=2, report_to="mlflow", weight_decay=0.0)
    Trainer(model=model, args=args, train_dataset=_lm_dataset(), callbacks=[callback, OwnEverChanged()]).train()

    client = MlflowClient(server_tracking)
    runs = _all_runs(client)
    assert len(runs) == 1 and runs[0].info.run_id == callback.run_id
    run_id = callback.run_id
    run = client.get_run(run_id)
    # measured every 2 steps, plus the final step 5 at train end
    assert [s for s, _ in _history(client, run_id, "sparsity/changed_fraction")] == [2, 4, 5]
    assert _history(client, run_id, "sparsity/ever_changed_fraction")[-1][1] == pytest.approx(_fraction(ever))
    params = run.data.params
    assert params["sparsity.mode"] == "auto" and params["sparsity.compare_dtype"] == "None"
    assert params["sparsity.tracked_elements"] == str(sum(t.numel() for t in initial.values()))
    assert _artifact_paths(client, run_id) == ARTIFACTS
    page = f"{server_tracking}/#/experiments/{run.info.experiment_id}/runs/{run_id}/model-metrics"
    assert run.data.tags["sparsity.charts"] == page  # an http server: the direct URL of the charts

    local = client.download_artifacts(run_id, "sparsity", str(tmp_path / "downloaded"))
    mask = Mask.load(os.path.join(local, "mask.safetensors"))
    assert mask.metadata["config"]["every_n_steps"] == 2  # the effective interval (logging_steps), not None
    for name, expected in ever.items():
        assert torch.equal(mask[name], expected), name
    import json

    with open(os.path.join(local, "report.json")) as f:
        report = json.load(f)
    assert report["step"] == 5
    assert report["changed"] == sum(int(m.sum()) for m in _changed(model, initial).values())


# --- TRL -------------------------------------------------------------------------------------------
def _good_word_reward(completions, **kwargs) -> list[float]:
    """Fraction of completion words that are ``w<even number>``: varies between samples, so GRPO's
    group-normalised advantages are not all zero."""
    rewards = []
    for text in completions:
        words = text if isinstance(text, str) else " ".join(m["content"] for m in text)
        words = words.split()
        rewards.append(sum(w[1:].isdigit() and int(w[1:]) % 2 == 0 for w in words) / max(1, len(words)))
    return rewards


def test_trl_grpo_trainer(mlflow_local, tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    model_dir = tmp_path / "tiny"
    base = tiny_llama()
    base.generation_config.update(pad_token_id=0, eos_token_id=1, bos_token_id=2)
    base.save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    prompts = Dataset.from_dict({"prompt": [" ".join(f"w{(3 * i + j) % 50}" for j in range(4)) for i in range(16)]})
    args = GRPOConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        learning_rate=1e-3,
        logging_steps=1,
        report_to="mlflow",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    callback, recorder = SparsityCallback(), _StepRecorder()
    trainer = GRPOTrainer(
        model=str(model_dir),
        reward_funcs=_good_word_reward,
        args=args,
        train_dataset=prompts,
        callbacks=[callback, recorder],
    )
    initial = _trainable(trainer.model)
    trainer.train()

    client = MlflowClient(mlflow_local)
    runs = _all_runs(client)
    assert len(runs) == 1 and runs[0].info.run_id == callback.run_id
    run_id = callback.run_id
    assert recorder.optimizer_steps == [1, 2]
    assert [s for s, _ in _history(client, run_id, "loss")] == [1, 2]
    assert [s for s, _ in _history(client, run_id, "sparsity/changed_fraction")] == [1, 2]
    final = _history(client, run_id, "sparsity/changed_fraction")[-1][1]
    assert final == pytest.approx(_fraction(_changed(trainer.model, initial)), abs=1e-12)
    assert final > 0
    assert _artifact_paths(client, run_id) == ARTIFACTS


def test_trl_dpo_trainer_bf16_comparison(mlflow_local, tmp_path):
    from trl import DPOConfig, DPOTrainer

    words = [f"w{i}" for i in range(40)]
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for i in range(16):
        rows["prompt"].append(f"{words[i]} {words[i + 1]} {words[i + 2]}")
        rows["chosen"].append(f" {words[i + 3]} {words[i + 4]}")
        rows["rejected"].append(f" {words[(i * 7) % 40]} {words[(i * 11) % 40]}")
    args = DPOConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        max_length=16,
        seed=0,
    )
    model = tiny_llama()
    initial = _trainable(model)
    callback = SparsityCallback(compare_dtype="bfloat16")
    trainer = DPOTrainer(
        model=model,
        ref_model=tiny_llama(),
        args=args,
        train_dataset=Dataset.from_dict(rows),
        processing_class=tiny_tokenizer(),
        callbacks=[callback],
    )
    trainer.train()

    client = MlflowClient(mlflow_local)
    runs = _all_runs(client)
    assert len(runs) == 1 and runs[0].info.run_id == callback.run_id
    history = _history(client, callback.run_id, "sparsity/changed_fraction")
    assert [s for s, _ in history] == [1, 2, 3]
    expected = _fraction(_changed(model, initial, torch.bfloat16))
    assert history[-1][1] == pytest.approx(expected, abs=1e-12)
    assert expected < _fraction(_changed(model, initial))  # sub-ulp drift does not count in bf16
    assert runs[0].data.params["sparsity.compare_dtype"] == "bfloat16"


# --- resume ----------------------------------------------------------------------------------------
def test_resume_keeps_the_original_reference_and_the_cumulative_curve(mlflow_local, tmp_path):
    model = tiny_llama()
    initial = _trainable(model)
    first = SparsityCallback()
    args = _args(tmp_path / "out1", max_steps=6, save_strategy="steps", save_steps=3, logging_steps=1)
    Trainer(model=model, args=args, train_dataset=_lm_dataset(), callbacks=[first]).train()
    checkpoint = tmp_path / "out1" / "checkpoint-3"
    assert (checkpoint / TRACKER_FILE).is_file()
    # resume from a checkpoint copied elsewhere (a new output_dir): found through `resume_from_checkpoint`
    moved = tmp_path / "elsewhere" / "ckpt"
    shutil.copytree(checkpoint, moved)
    client = MlflowClient(mlflow_local)
    first_history = _history(client, first.run_id, "sparsity/ever_changed_fraction")

    resumed_model = tiny_llama(seed=123)  # different weights: overwritten by the checkpoint's
    second = SparsityCallback()
    args = _args(tmp_path / "out2", max_steps=6, logging_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(model=resumed_model, args=args, train_dataset=_lm_dataset(), callbacks=[second]).train(
            resume_from_checkpoint=str(moved)
        )
    assert not [w for w in caught if "cumulative curve starts over" in str(w.message)]

    for name, ref in initial.items():
        assert torch.equal(second.tracker.reference(name), ref), name
    second_history = _history(client, second.run_id, "sparsity/ever_changed_fraction")
    assert [s for s, _ in second_history] == [4, 5, 6]
    at_step_3 = dict(first_history)[3]
    assert second_history[0][1] >= at_step_3 > 0  # continues, no reset to 0
    # same data order and RNG state: the resumed training ends exactly where the uninterrupted one did
    for key in ("sparsity/ever_changed_fraction", "sparsity/changed_fraction", "sparsity/churn_fraction"):
        assert _history(client, second.run_id, key) == _history(client, first.run_id, key)[-3:], key
    final = _history(client, second.run_id, "sparsity/changed_fraction")[-1][1]
    assert final == pytest.approx(_fraction(_changed(resumed_model, initial)), abs=1e-12)


# --- freeze ----------------------------------------------------------------------------------------
class _CaptureAtStep(TrainerCallback):
    """Copies the weights right after optimizer step ``step`` (after the SparsityCallback has frozen)."""

    def __init__(self, model, step):
        self.model, self.step, self.weights = model, step, None

    def on_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            self.weights = _trainable(self.model)


def test_freeze_discover_keeps_frozen_elements_bit_identical(mlflow_local, tmp_path):
    model = tiny_llama()
    initial = _trainable(model)
    callback = SparsityCallback(freeze_mask="discover", freeze_after_steps=2, compare_dtype="bfloat16")
    capture = _CaptureAtStep(model, 2)
    # AdamW with decoupled weight decay and gradient clipping would move every element without the freezer
    args = _args(tmp_path / "out", max_steps=6, logging_steps=3, weight_decay=0.1, max_grad_norm=0.5)
    Trainer(model=model, args=args, train_dataset=_lm_dataset(), callbacks=[callback, capture]).train()

    assert callback._session.freeze_source == "discover@2"
    discovered = callback._session._freeze_mask
    frozen_total = 0
    for name, at_freeze in capture.weights.items():
        now = dict(model.named_parameters())[name].detach()
        frozen = ~discovered[name]
        frozen_total += int(frozen.sum())
        assert torch.equal(now[frozen].view(torch.int32), at_freeze[frozen].view(torch.int32)), name
    assert frozen_total > 0
    # after training, every element that ever changed (tracker, and the test's own bf16 recount) is in the mask
    ever = callback.tracker.ever_changed_mask()
    mine = _changed(model, initial, torch.bfloat16)
    for name in discovered.names:
        assert not (ever[name] & ~discovered[name]).any(), name
        assert not (mine[name] & ~discovered[name]).any(), name

    client = MlflowClient(mlflow_local)
    (run,) = _all_runs(client)
    assert run.data.params["sparsity.freeze_source"] == "discover@2"
    frozen_history = _history(client, run.info.run_id, "sparsity/frozen_fraction")
    assert frozen_history == [(2, pytest.approx(frozen_total / discovered.numel()))]
    assert [s for s, _ in _history(client, run.info.run_id, "sparsity/changed_fraction")] == [2, 3, 6]
    assert "sparsity/freeze_mask.safetensors" in _artifact_paths(client, run.info.run_id)


def test_freeze_to_a_mask_from_an_earlier_mlflow_run(mlflow_local, tmp_path):
    first = SparsityCallback(compare_dtype="bfloat16")
    args = _args(tmp_path / "out1", max_steps=2)
    Trainer(model=tiny_llama(), args=args, train_dataset=_lm_dataset(), callbacks=[first]).train()
    uri = f"runs:/{first.run_id}/sparsity/mask.safetensors"

    model = tiny_llama()  # the same base weights (seed 0), so the mask's fingerprint matches
    initial = _trainable(model)
    callback = SparsityCallback(freeze_mask=uri)
    args = _args(tmp_path / "out2", max_steps=3, weight_decay=0.1)
    Trainer(model=model, args=args, train_dataset=_lm_dataset(), callbacks=[callback]).train()

    mask = Mask.load(uri)
    assert 0 < mask.density < 1
    for name, ref in initial.items():
        frozen = ~mask[name]
        now = dict(model.named_parameters())[name].detach()
        assert torch.equal(now[frozen].view(torch.int32), ref[frozen].view(torch.int32)), name
    run = MlflowClient(mlflow_local).get_run(callback.run_id)
    assert run.data.params["sparsity.freeze_source"] == uri
    assert run.data.metrics["sparsity/frozen_fraction"] == pytest.approx(1 - mask.density)

    with pytest.raises(ValueError, match="another model|does not match|signature"):
        Trainer(
            model=tiny_llama(seed=1),
            args=_args(tmp_path / "out3", max_steps=1),
            train_dataset=_lm_dataset(),
            callbacks=[SparsityCallback(freeze_mask=uri, log_to_mlflow=False)],
        ).train()


# --- outage ----------------------------------------------------------------------------------------
def test_server_outage_during_training_loses_no_metric(mlflow_server_outage, monkeypatch, tmp_path):
    """The tracking server becomes unreachable after step 2 (connections refused and reset, as when it
    crashes) and reachable again (same port, same store) at step 6: every sparsity metric of steps 1..8
    arrives, in one run."""
    from mlflow.tracking import _tracking_service, fluent

    from sparsity_callbacks.sinks.mlflow import MLflowSinkWarning

    server = mlflow_server_outage
    for name in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", f"outage-{tmp_path.name}-{os.getpid()}")  # the server is shared
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.chdir(tmp_path)
    old_uri, old_experiment = _tracking_service.utils._tracking_uri, fluent._active_experiment_id
    mlflow.set_tracking_uri(server.uri)

    class Outage(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                # everything so far delivered, so no request is in flight when the server dies (one in
                # flight would sit in MLflow's own HTTP retries instead of reporting an outage)
                assert callback._session.sink.flush(timeout=60)
                server.stop()
            elif state.global_step == 5:  # let the sink's worker find the server gone: it warns when it has
                deadline = time.monotonic() + 30
                while not _unreachable(caught) and time.monotonic() < deadline:
                    time.sleep(0.05)
            elif state.global_step == 6:
                server.start()

    def _unreachable(records) -> bool:
        return any(issubclass(w.category, MLflowSinkWarning) and "unreachable" in str(w.message) for w in records)

    model = tiny_llama()
    initial = _trainable(model)
    callback = SparsityCallback()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            Trainer(
                model=model,
                args=_args(tmp_path / "out", max_steps=8),
                train_dataset=_lm_dataset(),
                callbacks=[callback, Outage()],
            ).train()
    finally:
        mlflow.set_tracking_uri(old_uri)
        fluent._active_experiment_id = old_experiment

    assert _unreachable(caught), [str(w.message) for w in caught if issubclass(w.category, MLflowSinkWarning)]
    assert not any("could not be delivered" in str(w.message) for w in caught), [str(w.message) for w in caught]
    client = MlflowClient(server.uri)
    runs = _all_runs(client)
    assert len(runs) == 1 and runs[0].info.run_id == callback.run_id
    for key in (
        "sparsity/changed_fraction",
        "sparsity/ever_changed_fraction",
        "sparsity/changed_fraction_by_layer/layer_01",
    ):
        assert [s for s, _ in _history(client, callback.run_id, key)] == list(range(1, 9)), key
    expected = [(int(row["step"]), row["changed_fraction"]) for row in callback.tracker.history]
    assert _history(client, callback.run_id, "sparsity/changed_fraction") == expected
    final = _history(client, callback.run_id, "sparsity/changed_fraction")[-1][1]
    assert final == pytest.approx(_fraction(_changed(model, initial)), abs=1e-12)
    assert _artifact_paths(client, callback.run_id) == ARTIFACTS


class _ConvertAtStep(TrainerCallback):
    """Converts the model to ``dtype`` after optimizer step ``step`` (after the SparsityCallback froze)."""

    def __init__(self, model, step, dtype):
        self.model, self.step, self.dtype, self.weights = model, step, dtype, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.weights = _trainable(self.model)
            self.model.to(self.dtype)


def test_dtype_change_after_freezing_never_corrupts_frozen_weights(tmp_path):
    model = tiny_llama()
    callback = SparsityCallback(  # dense freezing re-freezes (compact state stores nothing: nothing to warn about)
        freeze_mask="discover",
        freeze_after_steps=2,
        compare_dtype="bfloat16",
        log_to_mlflow=False,
        mode="exact",
        compact_optimizer_state=False,
    )
    convert = _ConvertAtStep(model, 2, torch.float64)
    # weight decay moves every element in float64: without the freezer no frozen element would keep its bits
    args = _args(tmp_path / "out", max_steps=5, optim="sgd", weight_decay=0.1)
    with pytest.warns(UserWarning, match=r"frozen parameter\(s\) changed dtype after freezing began"):
        Trainer(model=model, args=args, train_dataset=_lm_dataset(), callbacks=[callback, convert]).train()

    mask = callback._session._freeze_mask
    frozen_total = 0
    for name, at_convert in convert.weights.items():
        now = dict(model.named_parameters())[name].detach()
        assert now.dtype == torch.float64 and now.isfinite().all(), name
        frozen = ~mask[name]
        frozen_total += int(frozen.sum())
        assert torch.equal(now[frozen].view(torch.int64), at_convert.double()[frozen].view(torch.int64)), name
    assert frozen_total > 0


class _SinkAttempts(TrainerCallback):
    """Records, in its ``on_train_end``, the failed delivery attempts of the SparsityCallback's MLflow sink.
    Placed before the SparsityCallback it finds the sink; a second one placed after it reads the sink the
    first found (the session may be gone by then): the difference is what the end of training tried."""

    def __init__(self, callback, first=None):
        self.callback, self.first, self.sink, self.failed = callback, first, None, None

    def on_train_end(self, args, state, control, **kwargs):
        self.sink = self.first.sink if self.first is not None else self.callback._session.sink
        self.failed = self.sink._failed_attempts


def test_train_end_wait_is_bounded_when_mlflow_is_down_from_the_start(tmp_path, mlflow_dead_server):
    callback = SparsityCallback(mlflow_end_timeout_s=20.0, log_artifacts=False)  # the MLflow wait, not plots
    before = _SinkAttempts(callback)
    after = _SinkAttempts(callback, first=before)
    args = _args(tmp_path / "out", max_steps=3)
    Trainer(model=tiny_llama(), args=args, train_dataset=_lm_dataset(), callbacks=[before, callback, after]).train()
    # the server is refused at once: one more failed attempt ends the wait, instead of retrying every 2 s
    # until the 20 s timeout
    assert after.failed - before.failed == 1 and not before.sink._worker.is_alive()
    # Nothing is lost: every measured value is in the fallback file (the "unreachable" warning is asserted in
    # test_mlflow_sink.py, away from the trainer's threads).
    (fallback,) = tmp_path.glob("sparsity_mlflow_fallback_*.jsonl")
    records = [json.loads(line) for line in fallback.read_text().splitlines()[1:]]
    logged = {row[0] for r in records if r["type"] == "metrics" for row in r["metrics"]}
    assert "sparsity/changed_fraction" in logged, sorted(logged)


def _killed_training(out: str, report_to: str) -> None:
    """The training of `test_resume_after_sigkill_continues_in_the_same_mlflow_run`, in a new process: it saves
    a checkpoint every 2 steps and SIGKILLs its own process at step 3, after what was measured reached MLflow."""
    import signal

    sparsity = SparsityCallback()

    class KillAtStep3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                sparsity._session.sink.flush(60)  # what was measured so far reached MLflow; then die like a crash
                os.kill(os.getpid(), signal.SIGKILL)

    args = _args(out, max_steps=6, save_strategy="steps", save_steps=2, report_to=report_to)
    Trainer(model=tiny_llama(), args=args, train_dataset=_lm_dataset(), callbacks=[sparsity, KillAtStep3()]).train()


@pytest.mark.parametrize("report_to", ["none", "mlflow"])
def test_resume_after_sigkill_continues_in_the_same_mlflow_run(mlflow_local, tmp_path, report_to):
    import signal

    from mlflow.entities import ViewType

    out = tmp_path / "out"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_local}
    log = tmp_path / "killed.log"
    code = run_in_new_process(_killed_training, str(out), report_to, timeout=600, env=env, cwd=tmp_path, log=log)
    assert code == -signal.SIGKILL, log.read_text()[-2000:]
    client = MlflowClient(mlflow_local)
    (crashed,) = _all_runs(client)
    assert crashed.info.status == "RUNNING"  # nobody finished it

    resumed = SparsityCallback()
    args = _args(out, max_steps=6, save_strategy="steps", save_steps=2, report_to=report_to)
    Trainer(model=tiny_llama(), args=args, train_dataset=_lm_dataset(), callbacks=[resumed]).train(
        resume_from_checkpoint=str(out / "checkpoint-2")
    )

    (run,) = _all_runs(client)  # one run for the whole training
    assert run.info.run_id == crashed.info.run_id == resumed.run_id
    assert run.info.status == "FINISHED"
    steps = {s for s, _ in _history(client, run.info.run_id, "sparsity/changed_fraction")}
    assert steps == {1, 2, 3, 4, 5, 6}
    if report_to == "mlflow":  # HF's own loss continues in it too; the empty run HF opened on resume is deleted
        assert {s for s, _ in _history(client, run.info.run_id, "loss")} >= {1, 2, 3, 4, 5, 6}
        (extra,) = client.search_runs([run.info.experiment_id], run_view_type=ViewType.DELETED_ONLY)
        assert not extra.data.metrics


def test_two_sparsity_callbacks_logging_to_mlflow_are_refused(tmp_path):
    args = _args(tmp_path / "out", max_steps=1)
    callbacks = [SparsityCallback(), SparsityCallback(compare_dtype="bfloat16")]
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=_lm_dataset(), callbacks=callbacks)
    with pytest.raises(ValueError, match=r"2 SparsityCallbacks that log to MLflow are attached to one trainer"):
        trainer.train()


def test_train_end_artifacts_are_written_while_the_trainer_saves_its_final_checkpoint(
    mlflow_local, tmp_path, monkeypatch
):
    """At the last step the callback starts writing the mask, report and plots on a background thread, so they
    overlap what the Trainer does before its train-end event (here its final checkpoint save); train end only
    queues them. Every artifact reaches MLflow and describes the final step."""
    import threading

    from sparsity_callbacks import plots

    threads: list[str] = []
    save_heatmap = plots.save_heatmap

    def recording(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return save_heatmap(*args, **kwargs)

    monkeypatch.setattr(plots, "save_heatmap", recording)
    callback = SparsityCallback(every_n_steps=2)
    args = _args(tmp_path / "out", max_steps=5, save_strategy="steps", save_steps=100)
    Trainer(model=tiny_llama(), args=args, train_dataset=_lm_dataset(), callbacks=[callback]).train()
    assert threads == ["sparsity-artifacts"]
    assert os.path.isfile(tmp_path / "out" / "checkpoint-5" / TRACKER_FILE)  # the final checkpoint, meanwhile
    client = MlflowClient(mlflow_local)
    assert _artifact_paths(client, callback.run_id) == ARTIFACTS
    local = client.download_artifacts(callback.run_id, "sparsity", str(tmp_path / "downloaded"))
    with open(os.path.join(local, "report.json")) as f:
        report = json.load(f)
    assert report["step"] == 5 and [point["step"] for point in report["history"]] == [2, 4, 5]
    assert report["changed_fraction"] == callback.last_measurement.changed_fraction
