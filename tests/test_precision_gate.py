"""The bf16 precision gate (arXiv 2511.08567) in the tracker: the representable fraction of the reference, the
native-dtype changed fraction beside the compare-dtype one, and the fingerprint estimator per regime."""

from __future__ import annotations

import warnings

import pytest
import torch

from sparsity_callbacks import SparsityTracker


def _model(numel: int = 4000, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Linear(numel // 40, 40, bias=False)
    with torch.no_grad():
        model.weight.normal_(0, 0.05)
    return model


def _round_to_bf16(model: torch.nn.Module, fraction: float = 1.0) -> int:
    """Round the first ``fraction`` of the weights to bf16 values (fp32 storage); returns how many now are."""
    with torch.no_grad():
        flat = model.weight.view(-1)
        k = int(flat.numel() * fraction)
        flat[:k] = flat[:k].to(torch.bfloat16).float()
        return int((flat.to(torch.bfloat16).float() == flat).sum())


def _next_bf16_up(values: torch.Tensor) -> torch.Tensor:
    """Each bf16-representable fp32 value moved one bf16 ulp away from zero."""
    return (values.to(torch.bfloat16).view(torch.int16) + 1).view(torch.bfloat16).float()


def test_representable_fraction_is_the_exact_count_and_warns_once_with_its_meaning():
    model = _model()
    representable = _round_to_bf16(model, fraction=0.5)
    tracker = SparsityTracker(model, compare_dtype="bfloat16", mode="exact")
    with pytest.warns(UserWarning, match=r"Only 50\.\d% of the reference weights are exactly representable in bf"):
        tracker.snapshot()
    assert tracker.reference_representable_fraction == representable / 4000
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per tracker
        tracker.snapshot()


def test_no_warning_for_a_representable_reference_and_no_fraction_without_compare_dtype():
    model = _model()
    _round_to_bf16(model)
    tracker = SparsityTracker(model, compare_dtype="bfloat16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tracker.snapshot()
    assert tracker.reference_representable_fraction == 1.0
    plain = SparsityTracker(model)
    plain.snapshot()
    assert plain.reference_representable_fraction is None
    assert "sparsity/changed_fraction_native" not in plain.measure(1).to_metrics()


@pytest.mark.parametrize("mode", ["exact", "fingerprint"])
def test_native_changed_fraction_sees_what_bf16_hides(mode):
    """fp32 steps far below half a bf16 ulp of a bf16-rounded base: nothing changed in bf16, all moved in fp32."""
    model = _model()
    _round_to_bf16(model)
    tracker = SparsityTracker(model, compare_dtype="bfloat16", mode=mode)
    tracker.snapshot()
    with torch.no_grad():
        w = model.weight.view(-1)
        w[:1000] = torch.nextafter(w[:1000], torch.full_like(w[:1000], float("inf")))  # one fp32 ulp
        w[1000:1500] = _next_bf16_up(w[1000:1500])  # one bf16 ulp
    m = tracker.measure(1)
    assert m.changed == 500  # only the bf16 moves show in bf16
    assert m.changed_native == 1500  # one-ulp changes: every one detected by the native fingerprint
    assert m.changed_fraction_native == pytest.approx(1500 / (1 - 1 / 255) / 4000)
    assert m.to_metrics()["sparsity/changed_fraction_native"] == m.changed_fraction_native
    # resume keeps the native reference and the representable fraction
    again = SparsityTracker(model, compare_dtype="bfloat16", mode=mode)
    again.load_state_dict(tracker.state_dict())
    assert again.measure(2).changed_native == 1500
    assert again.reference_representable_fraction == 1.0


def test_fingerprint_estimate_is_the_detected_count_in_bf16_and_corrected_in_fp32():
    """10 % of the elements moved by one ulp of the compared dtype: detected exactly by the 8-bit fingerprint.
    Compared in bf16 (the regime where changes are a few ulps) the figure is the detected count; in fp32
    (where most changes are >= 255 ulps and 1/255 of them are missed) the corrected estimate."""
    model = _model()
    _round_to_bf16(model)
    bf16 = SparsityTracker(model, compare_dtype="bfloat16", mode="fingerprint")
    fp32 = SparsityTracker(model, mode="fingerprint", track_churn=True)
    bf16.snapshot()
    fp32.snapshot()
    bf16.measure(1)
    fp32.measure(1)
    with torch.no_grad():
        w = model.weight.view(-1)
        w[:400] = _next_bf16_up(w[:400])
    m16, m32 = bf16.measure(2), fp32.measure(2)
    assert m16.fingerprint_estimate == "detected" and m32.fingerprint_estimate == "corrected"
    assert m16.changed_fraction == 0.1 and m16.churn_fraction == 0.1
    assert m16.to_metrics()["sparsity/changed_fraction_upper"] > 0.1  # the bound stays beside it
    assert m32.changed_fraction == pytest.approx(0.1 / (1 - 1 / 255))
    assert m32.churn_fraction == pytest.approx(0.1 / (1 - 1 / 255))


@pytest.mark.slow
def test_trainer_run_logs_the_representable_fraction_param_and_the_native_metric(mlflow_local, tmp_path):
    """A real HF Trainer on a tiny Llama whose weights are fp32 (almost none bf16 values): the param, the
    warning, and sparsity/changed_fraction_native >= sparsity/changed_fraction at every step."""
    from datasets import Dataset
    from helpers import tiny_llama
    from mlflow import MlflowClient
    from transformers import Trainer, TrainingArguments

    from sparsity_callbacks import SparsityCallback

    model = tiny_llama()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    representable = int((flat.to(torch.bfloat16).float() == flat).sum()) / flat.numel()
    ids = torch.randint(4, 20, (16, 12), generator=torch.Generator().manual_seed(0)).tolist()
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        learning_rate=1e-5,
        max_steps=3,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    callback = SparsityCallback(compare_dtype="bfloat16", log_artifacts=False)
    trainer = Trainer(
        model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}), callbacks=[callback]
    )
    with pytest.warns(UserWarning, match=r"exactly representable in bfloat16"):
        trainer.train()
    client = MlflowClient(mlflow_local)
    run = client.get_run(callback.run_id)
    assert float(run.data.params["sparsity.reference_representable_fraction"]) == pytest.approx(representable, abs=1e-6)
    native = {m.step: m.value for m in client.get_metric_history(callback.run_id, "sparsity/changed_fraction_native")}
    bf16 = {m.step: m.value for m in client.get_metric_history(callback.run_id, "sparsity/changed_fraction")}
    assert sorted(native) == sorted(bf16) == [1, 2, 3]
    assert all(native[s] >= bf16[s] for s in native) and native[3] > 0.5


def _without_native(path) -> None:
    """Rewrite a tracker state file as a version before the native fingerprints wrote it (no ``native/`` keys)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys() if not k.startswith("native/")}
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("mode", ["exact", "fingerprint"])
def test_resume_from_a_state_without_native_fingerprints_continues_without_the_native_figure(mode, tmp_path):
    """A state saved before sparsity/changed_fraction_native existed: every other figure continues exactly, the
    native one is absent (not rebuilt: the state holds the reference only in bf16), with one note per tracker."""
    model = _model()
    _round_to_bf16(model)
    tracker = SparsityTracker(model, compare_dtype="bfloat16", mode=mode)
    tracker.snapshot()
    with torch.no_grad():
        w = model.weight.view(-1)
        w[:300] = _next_bf16_up(w[:300])
    tracker.measure(1)
    path = tmp_path / "old_state.safetensors"
    tracker.save(path)
    _without_native(path)

    resumed = SparsityTracker(model, compare_dtype="bfloat16", mode=mode)
    with pytest.warns(UserWarning, match=r"without sparsity/changed_fraction_native\. It cannot be rebuilt"):
        resumed.load(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per tracker: neither a second load nor the measurements note again
        resumed.load(path)
        with torch.no_grad():
            w[300:500] = _next_bf16_up(w[300:500])
        m = resumed.measure(2)
    assert m.changed == 500 and m.ever_changed == 500 and m.changed_native is None
    assert "sparsity/changed_fraction_native" not in m.to_metrics()
    assert m.to_metrics()["sparsity/changed_fraction"] == 500 / 4000
    # a fresh state of the same version still carries them: the note is only for old files
    fresh = SparsityTracker(model, compare_dtype="bfloat16", mode=mode)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.load_state_dict(tracker.state_dict())
    assert fresh.measure(2).changed_native == 500


def test_resume_without_native_fingerprints_is_silent_when_no_native_figure_is_reported(tmp_path):
    """Without a compare dtype there is no native figure, so an old state file resumes without a note."""
    model = _model()
    tracker = SparsityTracker(model, mode="exact")
    tracker.snapshot()
    path = tmp_path / "state.safetensors"
    tracker.save(path)
    _without_native(path)
    resumed = SparsityTracker(model, mode="exact")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed.load(path)
    assert resumed.measure(1).changed == 0
