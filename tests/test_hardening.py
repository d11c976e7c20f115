"""Long runs, memory limits and the bad-input cases not covered in test_tracker.py. No mocks: the host RAM
limit is the documented environment knob ``SPARSITY_CALLBACKS_HOST_RAM_LIMIT``."""

from __future__ import annotations

import gc
import json
import os
import re
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from helpers import tiny_llama  # noqa: E402

from sparsity_callbacks import Mask, SparsityConfig, SparsityTracker  # noqa: E402
from sparsity_callbacks._memory import HOST_RAM_LIMIT_ENV  # noqa: E402
from sparsity_callbacks.tracker import _MAX_HISTORY  # noqa: E402

# --- long runs ---------------------------------------------------------------------------------------
SOAK_CALLS = 4000
WARMUP_CALLS = 500
# RSS may still move by allocator page granularity and pymalloc arena reuse after the warm-up; 4 MiB over
# 3500 calls still catches any per-call leak of >= ~1.2 KiB (a leaked chunk tensor or metrics dict is larger).
RSS_TOLERANCE = 4 * 2**20


@pytest.mark.slow
def test_soak_rss_history_and_metric_keys_stay_bounded():
    import psutil

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 16), torch.nn.Linear(16, 4))  # tiny: the loop, not the math
    # compile=False: the loop's memory, not a one-time compilation (which a slow, busy machine could trigger)
    tracker = SparsityTracker(model, mode="fingerprint", per_tensor_metrics=False, compile=False)
    tracker.snapshot()
    process = psutil.Process()
    generator = torch.Generator().manual_seed(0)
    weight = model[0].weight
    key_counts = set()
    baseline = None
    for step in range(1, SOAK_CALLS + 1):
        with torch.no_grad():
            index = torch.randint(0, weight.numel(), (3,), generator=generator)
            weight.view(-1)[index] += torch.randn(3, generator=generator) * 1e-3
        m = tracker.measure(step)
        if step > 1:
            key_counts.add(len(m.to_metrics()))
        if step == WARMUP_CALLS:
            gc.collect()
            baseline = process.memory_info().rss
        assert len(tracker.history) <= _MAX_HISTORY
    gc.collect()
    growth = process.memory_info().rss - baseline
    assert growth < RSS_TOLERANCE, f"RSS grew by {growth / 2**20:.1f} MiB over {SOAK_CALLS - WARMUP_CALLS} calls"
    assert len(key_counts) == 1  # the metrics dict does not grow with the run
    # history: bounded by thinning (every other point) when it passes _MAX_HISTORY; the thinning itself is
    # exercised by tracker._append_history below without 4097 measurements
    assert len(tracker.history) == SOAK_CALLS
    for _ in range(_MAX_HISTORY + 1 - len(tracker.history)):
        tracker._append_history(tracker.last_measurement)
    assert _MAX_HISTORY // 2 <= len(tracker.history) <= _MAX_HISTORY
    steps = [h["step"] for h in tracker.history]
    assert steps == sorted(steps)
    assert tracker.measure().ever_changed_fraction > 0


# --- memory ------------------------------------------------------------------------------------------
def test_exact_that_cannot_fit_raises_with_numbers_and_alternatives(monkeypatch, tmp_path):
    model = tiny_llama()
    need = sum((p.numel() + 7) // 8 * 8 * 4 for p in model.parameters())
    monkeypatch.setenv(HOST_RAM_LIMIT_ENV, str(need))  # 0.9 * limit < need
    with pytest.raises(
        MemoryError,
        match=rf"mode='exact' cannot fit: .*\({need:,} bytes\).*"
        rf"{HOST_RAM_LIMIT_ENV}.*mode='fingerprint'.*reference_dir",
    ):
        SparsityTracker(model, mode="exact").snapshot()
    auto = SparsityTracker(model)  # auto falls back to fingerprints and says why
    auto.snapshot()
    assert auto.mode == "fingerprint" and "more than half" in auto.mode_reason
    with pytest.raises(MemoryError, match="atol=0.001 needs an exact reference"):
        SparsityTracker(model, atol=1e-3).snapshot()
    on_disk = SparsityTracker(model, mode="exact", reference_dir=str(tmp_path))  # no RAM needed
    on_disk.snapshot()
    assert on_disk.mode == "exact" and "memory-mapped" in on_disk.mode_reason
    monkeypatch.setenv(HOST_RAM_LIMIT_ENV, str(4 * need))
    SparsityTracker(model, mode="exact").snapshot()  # read at each snapshot: fits now
    monkeypatch.setenv(HOST_RAM_LIMIT_ENV, "8GB")
    with pytest.raises(ValueError, match=f"{HOST_RAM_LIMIT_ENV}='8GB' must be a number of bytes"):
        SparsityTracker(model, mode="exact").snapshot()


def test_reference_dir_equals_ram_and_survives_state_round_trip(tmp_path):
    model = tiny_llama()
    ram = SparsityTracker(model, mode="exact")
    disk = SparsityTracker(model, mode="exact", reference_dir=str(tmp_path / "ref"), chunk_numel=1024)
    ram.snapshot()
    disk.snapshot()
    files = sorted(os.listdir(tmp_path / "ref"))
    assert len(files) == len(disk.names) and all(f.startswith("reference_rank0_") for f in files)
    generator = torch.Generator().manual_seed(0)
    for step in range(1, 4):
        with torch.no_grad():
            for p in model.parameters():
                index = torch.randint(0, p.numel(), (2,), generator=generator)
                p.view(-1)[index] += 0.1 * step
        a, b = ram.measure(step), disk.measure(step)
        assert a.tensors == b.tensors
    assert ram.ever_changed_mask() == disk.ever_changed_mask()
    for name in ram.names:
        assert torch.equal(ram.reference(name), disk.reference(name))
    disk.save(tmp_path / "state.safetensors")
    resumed = SparsityTracker(model, mode="exact", reference_dir=str(tmp_path / "ref2"))
    resumed.load(tmp_path / "state.safetensors")
    assert len(os.listdir(tmp_path / "ref2")) == len(resumed.names)  # restored onto disk, not into RAM
    assert resumed.reference(resumed.names[0]).is_shared()  # memory-mapped
    restored_ram = SparsityTracker(model, mode="exact")
    restored_ram.load_state_dict(disk.state_dict())
    with torch.no_grad():
        model.lm_head.weight.view(-1)[:5] += 1.0
    expected = ram.measure(4)
    assert resumed.measure(4).tensors == expected.tensors == restored_ram.measure(4).tensors
    assert resumed.ever_changed_mask() == ram.ever_changed_mask()


# --- bad input -----------------------------------------------------------------------------------------
def test_nonfinite_reference_count_survives_resume(tmp_path):
    model = torch.nn.Linear(8, 8)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    tracker = SparsityTracker(model, mode="fingerprint")
    with pytest.warns(UserWarning, match="1 reference elements are NaN or inf"):
        tracker.snapshot()
    tracker.save(tmp_path / "state.safetensors")
    resumed = SparsityTracker(model, mode="fingerprint")
    resumed.load(tmp_path / "state.safetensors")
    assert resumed.state_dict()["meta"] and json.loads(resumed.state_dict()["meta"])["reference_nonfinite"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the inf from the snapshot is not "training diverged"
        assert resumed.measure(1).nonfinite == 1
    with torch.no_grad():
        model.weight[1, 1] = float("-inf")
    with pytest.warns(UserWarning, match=r"2 tracked elements are NaN or inf at step 2 \(1 at the snapshot"):
        m = resumed.measure(2)
    assert m.total.changed == 1


def test_parameter_added_or_unfrozen_after_the_snapshot_warns_once():
    model = tiny_llama()
    model.model.norm.weight.requires_grad_(False)
    tracker = SparsityTracker(model)
    tracker.snapshot()
    tracker.measure(1)
    model.register_parameter("value_head", torch.nn.Parameter(torch.zeros(16)))
    model.model.norm.weight.requires_grad_(True)
    with pytest.warns(
        UserWarning,
        match=r"2 trainable parameter\(s\) were added or unfrozen .* NOT tracked "
        r"\(e.g. \['model.norm.weight', 'value_head'\]\).*HINT: create the",
    ):
        m = tracker.measure(2)
    assert "value_head" not in m.tensors
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per tracker
        tracker.measure(3)
    excluded = SparsityTracker(tiny_llama(), exclude=("head",))
    excluded.snapshot()
    excluded.model.register_parameter("value_head", torch.nn.Parameter(torch.zeros(4)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # excluded by the config: not a surprise
        excluded.measure()


def test_meta_model_materialised_later_can_be_snapshotted():
    from transformers import LlamaForCausalLM

    reference = tiny_llama()
    with torch.device("meta"):
        model = LlamaForCausalLM(reference.config)
    tracker = SparsityTracker(model)  # the tracker may be built before the weights exist
    with pytest.raises(ValueError, match="meta device"):
        tracker.snapshot()
    model.to_empty(device="cpu")  # replaces the Parameter objects
    model.load_state_dict(reference.state_dict())
    tracker.snapshot()
    with torch.no_grad():
        model.model.norm.weight[:3] += 1
    assert tracker.measure().total.changed == 3


def test_tied_weights_reference_and_mask_under_either_name():
    from sparsity_callbacks.freeze import MaskFreezer

    model = tiny_llama(tie_word_embeddings=True)
    tracker = SparsityTracker(model, mode="exact")
    tracker.snapshot()
    assert torch.equal(tracker.reference("lm_head.weight"), tracker.reference("model.embed_tokens.weight"))
    with pytest.raises(KeyError, match="'nope' is not a tracked parameter"):
        tracker.reference("nope")
    with torch.no_grad():
        model.lm_head.weight.view(-1)[:4] += 1
    tracker.measure()
    mask = tracker.ever_changed_mask()
    renamed = Mask({("lm_head.weight" if n == "model.embed_tokens.weight" else n): f for n, f in mask.items()})
    for m in (mask, renamed):  # the freezer accepts the mask under either name of the tied tensor
        MaskFreezer(model, m, tracked=tracker.names)


def test_lora_adapters_are_tracked_and_frozen_adapters_are_a_peft_error():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    tracker = SparsityTracker(model, mode="exact")
    assert tracker.names and all(".lora_A." in n or ".lora_B." in n for n in tracker.names)
    assert {t.module_type for t in tracker._tracked} == {
        "self_attn.q_proj.lora_A",
        "self_attn.q_proj.lora_B",
        "self_attn.v_proj.lora_A",
        "self_attn.v_proj.lora_B",
    }
    tracker.snapshot()
    lora_b = next(p for n, p in model.named_parameters() if "layers.0.self_attn.q_proj.lora_B" in n)
    with torch.no_grad():
        lora_b.view(-1)[:2] += 1
    m = tracker.measure()
    assert m.total.changed == 2 and m.by_module_type()["self_attn.q_proj.lora_B"].changed == 2
    assert "sparsity/changed_fraction_by_module/self_attn.q_proj.lora_B" in m.to_metrics()
    model.requires_grad_(False)
    with pytest.raises(
        ValueError, match="No parameter to track .*PEFT model with no trainable adapter.*is_trainable=True"
    ):
        SparsityTracker(model)


def test_corrupt_tracker_state_is_refused_and_the_tracker_is_unchanged(tmp_path):
    model = tiny_llama()
    tracker = SparsityTracker(model, mode="exact")
    tracker.snapshot()
    with torch.no_grad():
        model.model.norm.weight[:2] += 1
    tracker.measure(1)
    good = tracker.state_dict()
    name = "model.norm.weight"
    cases = {
        "missing tensor": ({k: v for k, v in good["tensors"].items() if k != f"ever/{name}"}, "is missing"),
        "short tensor": (
            {**good["tensors"], f"reference/{name}": good["tensors"][f"reference/{name}"][:8]},
            "expected 16 and 2",
        ),
        "wrong dtype": (
            {**good["tensors"], f"ever/{name}": good["tensors"][f"ever/{name}"].float()},
            "its mask torch.float32",
        ),
    }
    fresh = SparsityTracker(model, mode="exact")
    fresh.snapshot()
    before = fresh.ever_changed_mask()
    for label, (tensors, message) in cases.items():
        with pytest.raises(ValueError, match=f"state is corrupt: tensor '{name}'.*{message}"):
            fresh.load_state_dict({"meta": good["meta"], "tensors": tensors})
        assert fresh.ever_changed_mask() == before, label  # nothing half-loaded
    with pytest.raises(ValueError, match="Not a SparsityTracker state"):
        fresh.load_state_dict({"meta": "[1, 2]", "tensors": {}})
    with pytest.raises(ValueError, match="Not a SparsityTracker state"):
        fresh.load_state_dict({"meta": "{not json", "tensors": {}})
    meta = json.loads(good["meta"])
    meta["mode"] = "magic"
    with pytest.raises(ValueError, match="state is corrupt: mode='magic'"):
        fresh.load_state_dict({"meta": json.dumps(meta), "tensors": good["tensors"]})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"chunk_numel": 100}, r"`chunk_numel` must be an int >= 1024, got 100"),
        ({"compile": "yes"}, r"`compile` must be True, False or None, got 'yes'"),
        ({"per_tensor_metrics": 1}, r"`per_tensor_metrics` must be True or False, got 1"),
        ({"reference_dir": 3}, r"`reference_dir` must be a string or None, got 3"),
        ({"freeze_after_steps": 5}, r"`freeze_after_steps`=5 only applies to `freeze_mask='discover'`"),
        ({"exclude": (3,)}, r"`exclude` must be a tuple of regular-expression strings"),
        ({"atol": float("nan")}, r"`atol` must be a finite float >= 0, got nan"),
    ],
)
def test_more_invalid_config_values_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SparsityConfig(**kwargs)


# --- issue 14: files are checked, not trusted --------------------------------------------------------
def _rewrite_mask_metadata(src, dst, **changes):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {n: handle.get_tensor(n) for n in handle.keys()}
    metadata.update(changes)
    save_file(tensors, str(dst), metadata=metadata)


def test_mask_with_negative_or_malformed_shapes_is_refused(tmp_path):
    import json

    from sparsity_callbacks import Mask

    Mask({"w": torch.ones(2, 8, dtype=torch.bool)}).save(tmp_path / "good.safetensors")
    _rewrite_mask_metadata(
        tmp_path / "good.safetensors", tmp_path / "neg.safetensors", shapes=json.dumps({"w": [-2, -8]})
    )
    with pytest.raises(ValueError, match=r"tensor 'w' has shape \[-2, -8\]; a shape is a list of non-negative"):
        Mask.load(tmp_path / "neg.safetensors")
    _rewrite_mask_metadata(tmp_path / "good.safetensors", tmp_path / "bad.safetensors", shapes="{not json")
    with pytest.raises(ValueError, match=r"bad\.safetensors' has metadata that is not valid JSON"):
        Mask.load(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"is a folder, not a mask file"):
        Mask.load(tmp_path)


@pytest.mark.slow
def test_replay_uploads_only_files_of_the_fallbacks_own_artifacts_folder(tmp_path, mlflow_local):
    import json

    from sparsity_callbacks.sinks.mlflow import _replay_fallback

    secret = tmp_path / "secret.txt"
    secret.write_text("not for upload")
    fallback = tmp_path / "sparsity_mlflow_fallback_x.jsonl"
    header = {"type": "header", "version": 1, "tracking_uri": mlflow_local, "run_id": None, "experiment": "replay"}
    crafted = {"type": "artifact", "path": str(secret), "name": "secret.txt", "artifact_path": "sparsity"}
    metrics = {"type": "metrics", "metrics": [["m", 1.0, 0, 1]]}
    fallback.write_text("\n".join(json.dumps(r) for r in (header, metrics, crafted)) + "\n")
    with pytest.raises(ValueError, match=r"does not name a file of this fallback's own artifacts folder"):
        _replay_fallback(str(fallback))
    from mlflow import MlflowClient

    assert (
        MlflowClient(mlflow_local).search_runs(
            [e.experiment_id for e in MlflowClient(mlflow_local).search_experiments()]
        )
        == []
    )
    # a traversal in the upload name is refused as well, even for a file inside the folder
    folder = tmp_path / "sparsity_mlflow_fallback_x_artifacts"
    folder.mkdir()
    (folder / "3_mask.bin").write_bytes(b"\x01")
    crafted = {"type": "artifact", "path": str(folder / "3_mask.bin"), "name": "../../x", "artifact_path": "s"}
    fallback.write_text("\n".join(json.dumps(r) for r in (header, crafted)) + "\n")
    with pytest.raises(ValueError, match=r"own artifacts folder"):
        _replay_fallback(str(fallback))
    fallback.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"fallback_x\.jsonl' is not a sparsity_callbacks MLflow fallback file"):
        _replay_fallback(str(fallback))


@pytest.mark.parametrize(
    "row, message",
    [
        ({"numel": -5, "changed": 0}, r"numel=-5"),
        ({"numel": 10, "changed": 11}, r"changed=11; counts must be integers from 0 to numel \(10\)"),
        ({"numel": 10, "changed": 1.5}, r"changed=1\.5"),
        ({"numel": 10, "changed": True}, r"changed=True"),
        ({"numel": 10, "churn": -1}, r"churn=-1"),
        ([1, 2], r"is not an object with a `numel`"),
    ],
)
def test_report_json_with_nonsense_numbers_is_refused(tmp_path, capsys, row, message):
    import json

    from sparsity_callbacks.cli import main

    path = tmp_path / "report.json"
    path.write_text(json.dumps({"tensors": {"w": row}}))
    assert main(["report", str(path), "--png", str(tmp_path / "h.png")]) == 1
    assert re.search(r"report\.json: tensor 'w' .*" + message, capsys.readouterr().err)


def test_report_json_that_is_not_json_or_nested_too_deeply_names_the_file(tmp_path, capsys):
    from sparsity_callbacks.cli import main

    for text, reason in (("{not json", "Expecting"), ("[" * 100000 + "]" * 100000, "nested too deeply")):
        path = tmp_path / "r.json"
        path.write_text(text)
        assert main(["report", str(path), "--png", str(tmp_path / "h.png")]) == 1
        err = capsys.readouterr().err
        assert f"{str(path)!r} is not a valid JSON report" in err and reason in err
    assert main(["report", str(tmp_path), "--png", str(tmp_path / "h.png")]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_json_output_into_a_missing_folder_creates_nothing(tmp_path, capsys):
    from sparsity_callbacks import Mask
    from sparsity_callbacks.cli import main

    for seed in (0, 1):
        torch.manual_seed(seed)
        Mask({"w": torch.rand(4, 4) < 0.5}).save(tmp_path / f"m{seed}.safetensors")
    target = tmp_path / "nonexistent" / "dir" / "x.json"
    code = main(["overlap", str(tmp_path / "m0.safetensors"), str(tmp_path / "m1.safetensors"), "--json", str(target)])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "nonexistent").exists()


def test_folders_and_fifos_as_state_or_mask_files_get_clear_messages(tmp_path):
    from sparsity_callbacks import Mask

    tracker = SparsityTracker(torch.nn.Linear(4, 4), SparsityConfig(mode="exact"))
    tracker.snapshot()
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(ValueError, match=r"'.*folder' is a folder, not a tracker state file"):  # was OSError ENODEV
        tracker.load(folder)
    with pytest.raises(ValueError, match=r"Cannot save the tracker state to '.*folder': it is a folder"):
        tracker.save(folder)
    with pytest.raises(ValueError, match=r"Cannot save the mask to '.*folder': it is a folder"):
        Mask({"w": torch.ones(2, dtype=torch.bool)}).save(folder)
    if hasattr(os, "mkfifo"):  # a FIFO would block the reader forever
        os.mkfifo(tmp_path / "fifo.safetensors")
        with pytest.raises(ValueError, match=r"is a special file \(not a regular file\)"):
            tracker.load(tmp_path / "fifo.safetensors")
        with pytest.raises(ValueError, match=r"is a special file \(not a regular file\)"):
            Mask.load(tmp_path / "fifo.safetensors")


def test_report_json_with_a_nonsense_step_is_refused(tmp_path, capsys):
    from sparsity_callbacks.cli import main

    path = tmp_path / "report.json"
    path.write_text(json.dumps({"step": "x", "tensors": {"w": {"numel": 4, "changed": 1}}}))
    assert main(["report", str(path), "--png", str(tmp_path / "h.png")]) == 1
    assert "`step` must be a non-negative integer or null, got 'x'" in capsys.readouterr().err


def test_wrong_types_on_the_public_api_get_type_errors_that_say_what_is_expected():
    from sparsity_callbacks import Mask, MaskFreezer

    model = torch.nn.Linear(4, 4)
    mask = Mask({"weight": torch.ones(4, 4, dtype=torch.bool), "bias": torch.ones(4, dtype=torch.bool)})
    cases = [  # each was an AttributeError from deep inside
        (lambda: mask.overlap("other.safetensors"), r"`other` must be a Mask, got str\. HINT: .*Mask\.load"),
        (lambda: Mask({"a": [1, 2]}), r"Mask tensor 'a' must be a torch\.bool tensor, got list"),
        (lambda: Mask([torch.ones(2, dtype=torch.bool)]), r"`tensors` must map names to torch\.bool tensors"),
        (lambda: SparsityTracker(None), r"`model` must be a torch\.nn\.Module, got NoneType"),
        (lambda: MaskFreezer(model, "mask.safetensors"), r"`mask` must be a Mask, got str"),
        (lambda: MaskFreezer(None, mask), r"`model` must be a torch\.nn\.Module, got NoneType"),
        (lambda: Mask.load(None), r"`source` must be a path or an MLflow URI, got NoneType"),
    ]
    for call, message in cases:
        with pytest.raises(TypeError, match=message):
            call()
