"""The engine: exact counts for known edits, fingerprints, masks, state, options."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from helpers import run_in_new_process, tiny_gpt2, tiny_llama  # noqa: E402

from sparsity_callbacks import Mask, SparsityConfig, SparsityTracker  # noqa: E402
from sparsity_callbacks.metrics import _SparsityCounts  # noqa: E402

MODES = ["exact", "fingerprint"]


def _edit(model: torch.nn.Module, edits: dict[str, list[int]], delta: float = 0.5) -> None:
    """Add ``delta`` to the given flat indices of the named parameters."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, indices in edits.items():
            params[name].view(-1)[indices] += delta


def _ulp_edit(tensor: torch.Tensor, indices: torch.Tensor, ulps: torch.Tensor) -> None:
    """Move the given elements by ``ulps`` units in the last place (integer steps of the raw bits)."""
    bits = tensor.detach().view(-1).view({2: torch.int16, 4: torch.int32}[tensor.element_size()])
    bits[indices] += ulps.to(bits.dtype)


EDITS = {
    "model.layers.0.self_attn.q_proj.weight": [0, 5, 17],
    "model.layers.1.self_attn.q_proj.weight": [3],
    "model.layers.1.mlp.down_proj.weight": [1, 2, 3, 4],
    "model.embed_tokens.weight": [100],
    "model.norm.weight": [7],
}


@pytest.mark.parametrize("mode", MODES)
def test_known_edits_counted_exactly_global_tensor_layer_module(mode):
    model = tiny_llama()
    tracker = SparsityTracker(model, mode=mode)
    tracker.snapshot()
    _edit(model, EDITS)
    m = tracker.measure(step=1)
    assert m.total.changed == 10 and m.total.ever_changed == 10
    # fingerprints detect small edits always; the estimate corrects for the 1/255 miss rate of large ones
    assert m.changed == (10 if mode == "exact" else pytest.approx(10 * 255 / 254))
    for name, counts in m.tensors.items():
        assert counts.changed == len(EDITS.get(name, [])), name
    assert m.by_layer()[0].changed == 3 and m.by_layer()[1].changed == 5
    modules = m.by_module_type()
    assert modules["self_attn.q_proj"].changed == 4
    assert modules["mlp.down_proj"].changed == 4
    assert modules["embed_tokens"].changed == 1 and modules["norm"].changed == 1
    numel = sum(p.numel() for p in model.parameters())
    metrics = m.to_metrics()
    assert metrics["sparsity/changed_fraction"] == pytest.approx(10 / numel, rel=1e-2 if mode == "fingerprint" else 0)
    assert metrics["sparsity/update_sparsity"] == pytest.approx(1 - metrics["sparsity/changed_fraction"])
    q_numel = sum(p.numel() for n, p in model.named_parameters() if "q_proj" in n)
    assert metrics["sparsity/changed_fraction_by_module/self_attn.q_proj"] == pytest.approx(4 / q_numel, rel=1e-2)
    assert "sparsity/changed_fraction_by_layer/layer_00" in metrics and "sparsity/churn_fraction" not in metrics


@pytest.mark.parametrize("mode", MODES)
def test_ever_changed_is_monotone_restored_elements_and_churn(mode):
    model = tiny_llama()
    name = "model.layers.0.mlp.up_proj.weight"
    weight = dict(model.named_parameters())[name]
    original = weight.detach().clone()
    tracker = SparsityTracker(model, mode=mode)
    tracker.snapshot()
    _edit(model, {name: [0, 1, 2]})
    first = tracker.measure(1)
    with torch.no_grad():
        weight.view(-1)[0] = original.view(-1)[0]  # restored: changed back to its reference
    _edit(model, {name: [10, 11]})  # two new elements move; 1 and 2 stay where they were
    second = tracker.measure(2)
    assert first.total.changed == 3
    assert second.total.changed == 4  # 1, 2, 10, 11
    assert second.total.ever_changed == 5  # 0, 1, 2, 10, 11
    assert second.total.churn == 3  # 0 (restored), 10, 11
    changed = tracker.changed_mask()[name].view(-1)
    ever = tracker.ever_changed_mask()[name].view(-1)
    assert changed.nonzero().view(-1).tolist() == [1, 2, 10, 11]
    assert ever.nonzero().view(-1).tolist() == [0, 1, 2, 10, 11]
    third = tracker.measure(3)
    assert third.total.churn == 0 and third.total.ever_changed == 5
    assert [h["ever_changed_fraction"] for h in tracker.history] == sorted(
        h["ever_changed_fraction"] for h in tracker.history
    )


class _Mixed(torch.nn.Module):
    def __init__(self, dtype):
        super().__init__()
        torch.manual_seed(0)
        self.weight = torch.nn.Parameter((torch.randn(4096) * 0.05).to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bits", [8, 16])
def test_fingerprint_detects_every_small_ulp_edit(dtype, bits):
    module = _Mixed(dtype)
    tracker = SparsityTracker(module, mode="fingerprint", fingerprint_bits=bits)
    tracker.snapshot()
    generator = torch.Generator().manual_seed(1)
    indices = torch.randperm(4096, generator=generator)[:2000]
    ulps = torch.randint(1, 5, (2000,), generator=generator) * (
        torch.randint(0, 2, (2000,), generator=generator) * 2 - 1
    )
    _ulp_edit(module.weight, indices, ulps)
    m = tracker.measure()
    assert m.total.changed == 2000
    detected = tracker.changed_mask()["weight"]
    expected = torch.zeros(4096, dtype=torch.bool)
    expected[indices] = True
    assert torch.equal(detected, expected)


@pytest.mark.slow
def test_fingerprint_corrected_count_within_bound_for_large_random_edits():
    """Random new values: each change is missed with probability ~1/255. Over 40 seeded trials of
    20 000 changes (≈80 misses each, sd ≈ 9), the true count must never exceed the 99.9 % upper bound
    and the corrected estimate must be unbiased: its mean error stays within 4 standard errors (±6)."""
    module = _Mixed(torch.float32)
    module.weight = torch.nn.Parameter(torch.randn(100_000) * 0.05)
    tracker = SparsityTracker(module, mode="fingerprint")
    generator = torch.Generator().manual_seed(0)
    errors = []
    for _ in range(40):
        tracker.snapshot()
        indices = torch.randperm(100_000, generator=generator)[:20_000]
        with torch.no_grad():
            module.weight[indices] = torch.randn(20_000, generator=generator) * 0.05
        m = tracker.measure()
        assert m.total.changed <= 20_000 <= m.changed_upper
        errors.append(m.changed - 20_000)
    assert abs(sum(errors) / len(errors)) < 6
    assert any(e != 0 for e in errors)  # misses really happen: this is not a vacuous test


@pytest.mark.parametrize("mode", MODES)
def test_tied_embeddings_counted_once_frozen_and_integer_tensors_skipped(mode):
    model = tiny_llama(tie_word_embeddings=True)
    model.model.layers[0].input_layernorm.weight.requires_grad_(False)
    model.register_parameter("step_counter", torch.nn.Parameter(torch.zeros(3, dtype=torch.int64), requires_grad=False))
    tracker = SparsityTracker(model, mode=mode)
    assert "lm_head.weight" not in tracker.names
    assert tracker._tracked[0].aliases == ["lm_head.weight"]
    assert tracker.skipped == {
        "model.layers.0.input_layernorm.weight": "requires_grad=False",
        "step_counter": "not floating point (torch.int64)",
    }
    tracker.snapshot()
    with torch.no_grad():
        model.lm_head.weight.view(-1)[:4] += 1  # the same storage as embed_tokens
    m = tracker.measure()
    assert m.total.changed == 4
    expected = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert m.numel == expected


def test_no_trainable_parameter_is_a_clear_error():
    model = tiny_llama().requires_grad_(False)
    with pytest.raises(ValueError, match="No parameter to track .*requires_grad=False"):
        SparsityTracker(model)
    with pytest.raises(ValueError, match="No parameter to track"):
        SparsityTracker(tiny_llama(), include=("nothing_matches",))


def test_include_and_exclude_patterns():
    tracker = SparsityTracker(tiny_llama(), include=(r"self_attn",), exclude=(r"k_proj",))
    assert tracker.names and all("self_attn" in n and "k_proj" not in n for n in tracker.names)
    assert tracker.skipped["model.layers.0.self_attn.k_proj.weight"] == "matched by `exclude`"


def test_nan_handling_exact_and_atol():
    module = _Mixed(torch.float32)
    with torch.no_grad():
        module.weight[0] = float("nan")
    with pytest.warns(UserWarning, match="NaN or inf"):
        tracker = SparsityTracker(module, mode="exact")
        tracker.snapshot()
    assert tracker.measure().total.changed == 0  # the same NaN stays unchanged
    with torch.no_grad():
        module.weight[1] = float("nan")
    with pytest.warns(UserWarning, match="NaN or inf at step 5"):
        m = tracker.measure(step=5)
    assert m.total.changed == 1 and m.nonfinite == 2
    assert m.to_metrics()["sparsity/nonfinite_elements"] == 2
    atol_module = _Mixed(torch.float32)
    atol_tracker = SparsityTracker(atol_module, mode="exact", atol=1e-3)
    atol_tracker.snapshot()
    with torch.no_grad():
        atol_module.weight[:10] += 1e-4  # within atol
        atol_module.weight[10:13] += 1e-2
        atol_module.weight[13] = float("nan")
    assert atol_tracker.measure().total.changed == 4


def test_bfloat16_compare_hides_sub_ulp_drift_of_fp32_training():
    """The papers' mechanism on our own model: tiny Adam updates move every fp32 weight but most
    of them by less than half a bf16 ulp, so the bf16 changed fraction is far lower."""
    model = tiny_llama()
    fp32 = SparsityTracker(model, mode="exact")
    bf16 = SparsityTracker(model, mode="exact", compare_dtype="bfloat16")
    fp32.snapshot()
    bf16.snapshot()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
    torch.manual_seed(0)
    for _ in range(5):
        ids = torch.randint(0, 64, (4, 16))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    full, rounded = fp32.measure().changed_fraction, bf16.measure().changed_fraction
    assert full > 0.9
    assert rounded < 0.25 * full


@pytest.mark.slow
def test_chunking_and_compile_give_identical_counts():
    torch.manual_seed(0)
    module = torch.nn.Linear(999, 37)  # numel not a multiple of 8 or of the chunk
    exact = [
        SparsityTracker(module, mode="exact", chunk_numel=1 << 24, compile=False),
        SparsityTracker(module, mode="exact", chunk_numel=1024, compile=False),
        SparsityTracker(module, mode="exact", chunk_numel=1024, compile=True),
    ]
    fingerprint = [
        SparsityTracker(module, mode="fingerprint", chunk_numel=1 << 24, compile=False),
        SparsityTracker(module, mode="fingerprint", chunk_numel=1024, compile=True),
    ]
    for t in exact + fingerprint:
        t.snapshot()
    with torch.no_grad():
        module.weight.view(-1)[::7] += 1.0
        module.bias[-1] += 1.0
    assert {t.measure().total.changed for t in exact} == {len(range(0, 999 * 37, 7)) + 1}
    assert len({(t.measure().total.changed, t.measure().total.churn) for t in fingerprint}) == 1
    assert exact[0].ever_changed_mask() == exact[1].ever_changed_mask() == exact[2].ever_changed_mask()
    assert fingerprint[0].ever_changed_mask() == fingerprint[1].ever_changed_mask()


def test_mask_round_trip_bit_for_bit(tmp_path):
    model = tiny_llama()
    tracker = SparsityTracker(model)
    tracker.snapshot()
    _edit(model, EDITS)
    tracker.measure()
    mask = tracker.ever_changed_mask()
    mask.save(tmp_path / "mask.safetensors")
    loaded = Mask.load(tmp_path / "mask.safetensors")
    assert loaded == mask and loaded.count() == 10
    for name, flags in mask.items():
        assert torch.equal(loaded[name], flags)
    assert loaded.signatures == tracker.signatures
    loaded.check_matches(tracker.shapes, tracker.signatures)


def test_mask_for_another_model_or_corrupt_file_is_refused(tmp_path):
    tracker = SparsityTracker(tiny_llama())
    tracker.snapshot()
    other = SparsityTracker(tiny_llama(hidden_size=32, intermediate_size=32))
    other.snapshot()
    with pytest.raises(ValueError, match="another model: tensor 'model.embed_tokens.weight' has shape"):
        other.ever_changed_mask().check_matches(tracker.shapes, tracker.signatures)
    reseeded = SparsityTracker(tiny_llama(seed=1))
    reseeded.snapshot()
    with pytest.raises(
        ValueError, match="another base model: the reference weights of tensor 'model.embed_tokens.weight'"
    ):
        reseeded.ever_changed_mask().check_matches(tracker.shapes, tracker.signatures)
    with pytest.raises(ValueError, match="another model: 1 model tensor"):
        Mask({n: t for n, t in tracker.ever_changed_mask().items() if n != "model.norm.weight"}).check_matches(
            tracker.shapes
        )

    path = tmp_path / "mask.safetensors"
    tracker.ever_changed_mask().save(path)
    data = path.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="Cannot read mask file .*truncated"):
        Mask.load(tmp_path / "truncated.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="Cannot read mask file"):
        Mask.load(tmp_path / "garbage.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, tmp_path / "weights.safetensors")
    with pytest.raises(ValueError, match="not a sparsity_callbacks mask"):
        Mask.load(tmp_path / "weights.safetensors")
    with pytest.raises(FileNotFoundError):
        Mask.load(tmp_path / "missing.safetensors")


def test_pickle_payload_is_refused_without_running_it(tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "mask.safetensors"
    path.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ValueError, match="Cannot read mask file"):
        Mask.load(path)
    tracker = SparsityTracker(tiny_llama())
    with pytest.raises(ValueError, match="Cannot read tracker state"):
        tracker.load(path)
    assert not marker.exists()


def _continue_from_saved_state(folder: str) -> None:
    """In a new process: a model with other initial weights loads the saved weights and tracker state, edits
    two elements of another tensor and measures; writes the changed and ever-changed counts and the history
    length to ``out.txt`` and the ever-changed mask to ``after.safetensors``."""
    from safetensors.torch import load_file

    model = tiny_llama(seed=123)  # other init: the weights come from the checkpoint
    model.load_state_dict(load_file(os.path.join(folder, "model.safetensors")), strict=False)
    tracker = SparsityTracker(model, mode="exact")
    tracker.load(os.path.join(folder, "sparsity_tracker.safetensors"))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.view(-1)[[4, 5]] += 1.0
    m = tracker.measure(step=20)
    tracker.ever_changed_mask().save(os.path.join(folder, "after.safetensors"))
    with open(os.path.join(folder, "out.txt"), "w") as f:
        f.write(f"{m.total.changed} {m.total.ever_changed} {len(tracker.history)}")


@pytest.mark.slow
def test_state_round_trip_in_a_fresh_process_continues_the_ever_changed_mask(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_llama()
    tracker = SparsityTracker(model, mode="exact")
    tracker.snapshot()
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    _edit(model, {"model.layers.0.mlp.up_proj.weight": [1, 2, 3]})
    tracker.measure(step=10)
    tracker.save(tmp_path / "sparsity_tracker.safetensors")
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, tmp_path / "model.safetensors")

    log = tmp_path / "continued.log"
    assert run_in_new_process(_continue_from_saved_state, str(tmp_path), timeout=300, log=log) == 0, log.read_text()
    out = (tmp_path / "out.txt").read_text().split()
    assert out == ["5", "5", "2"]
    ever = Mask.load(tmp_path / "after.safetensors")
    assert ever["model.layers.0.mlp.up_proj.weight"].view(-1).nonzero().view(-1).tolist() == [1, 2, 3]
    assert ever["model.layers.1.mlp.up_proj.weight"].view(-1).nonzero().view(-1).tolist() == [4, 5]
    restored = SparsityTracker(tiny_llama(), mode="exact")
    restored.load(tmp_path / "sparsity_tracker.safetensors")
    for name in restored.names:  # the reference is the original one, not the resumed weights
        assert torch.equal(restored.reference(name), reference[name])
    assert set(load_file(tmp_path / "sparsity_tracker.safetensors")) >= {f"ever/{n}" for n in restored.names}


def test_state_for_another_model_or_corrupt_state_is_refused(tmp_path):
    tracker = SparsityTracker(tiny_llama())
    tracker.snapshot()
    tracker.save(tmp_path / "state.safetensors")
    with pytest.raises(ValueError, match="another model: 'model.embed_tokens.weight' has shape"):
        SparsityTracker(tiny_llama(vocab_size=80)).load(tmp_path / "state.safetensors")
    with pytest.raises(ValueError, match="another model or other include/exclude"):
        SparsityTracker(tiny_gpt2()).load(tmp_path / "state.safetensors")
    data = (tmp_path / "state.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-50])
    with pytest.raises(ValueError, match="Cannot read tracker state .*truncated"):
        SparsityTracker(tiny_llama()).load(tmp_path / "cut.safetensors")


def test_model_changes_after_snapshot_are_clear_errors():
    model = tiny_llama()
    tracker = SparsityTracker(model)
    with pytest.raises(RuntimeError, match="snapshot"):
        tracker.measure()
    tracker.snapshot()
    del model.model.norm.weight
    with pytest.raises(ValueError, match="'model.norm.weight' was removed"):
        tracker.measure()


def test_dtype_change_mid_run_warns_and_still_compares():
    model = tiny_llama()
    tracker = SparsityTracker(model)
    tracker.snapshot()
    model.half()
    with pytest.warns(UserWarning, match="changed dtype from torch.float32 to torch.float16"):
        m = tracker.measure()
    assert m.changed_fraction > 0.5  # the cast rounded most fp32 values


def test_meta_device_snapshot_is_a_clear_error():
    with torch.device("meta"):
        model = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="meta device .* materialised"):
        SparsityTracker(model).snapshot()


def test_auto_mode_says_what_it_chose_and_why():
    tracker = SparsityTracker(tiny_llama())
    tracker.snapshot()
    assert tracker.mode == "exact" and "GiB of host RAM needed" in tracker.mode_reason


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "hashes"}, r"`mode` must be one of \('exact', 'fingerprint', 'auto'\), got 'hashes'"),
        ({"fingerprint_bits": 4}, r"`fingerprint_bits` must be one of \(8, 16\), got 4"),
        ({"compare_dtype": "int8"}, r"`compare_dtype` must be None or one of"),
        ({"atol": -1.0}, r"`atol` must be a finite float >= 0, got -1.0"),
        ({"atol": 1e-5, "mode": "fingerprint"}, r"`atol`=1e-05 needs the reference values"),
        ({"every_n_steps": 0}, r"`every_n_steps` must be a positive int or None, got 0"),
        ({"include": ("[",)}, r"`include` pattern '\[' is not a valid regular expression"),
        ({"freeze_mask": "discover"}, r"needs `freeze_after_steps`"),
        ({"mask_density_cap": 1.5}, r"`mask_density_cap` must be a fraction in \(0, 1\] or None, got 1.5"),
        ({"mask_density_cap": 0.2, "mode": "fingerprint"}, r"`mask_density_cap`=0.2 ranks elements by \|w - ref\|"),
    ],
)
def test_invalid_config_values_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SparsityConfig(**kwargs)


def test_unknown_override_is_a_type_error():
    with pytest.raises(TypeError, match="Unknown SparsityConfig option"):
        SparsityConfig().replace(every_n_step=3)


def test_counts_metric_sums_states():
    first, second = _SparsityCounts(2), _SparsityCounts(2)
    first.update(torch.tensor([[1, 0, 2, 3], [4, 0, 0, 4]]))
    second.update(torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0]]))
    first.merge_state(second)
    assert first.compute().tolist() == [[2, 1, 2, 4], [4, 0, 0, 4]]


# --- delta-sync figures (changed since the previous optimizer step, sparse patch size) -------------
@pytest.mark.parametrize("mode", MODES)
def test_step_delta_counts_one_ulp_steps_exactly_without_miss_correction(mode):
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.ParameterDict(
        {"w": torch.nn.Parameter(torch.randn(40_000, generator=gen)), "b": torch.nn.Parameter(torch.randn(1000))}
    )
    tracker = SparsityTracker(model, mode=mode)
    tracker.snapshot()
    first = tracker.measure(step=1)
    assert first.step_changed is None and "sparsity/step_changed_fraction" not in first.to_metrics()
    moved = torch.randperm(40_000, generator=gen)[:12_345]
    _ulp_edit(model["w"], moved, torch.ones(moved.numel(), dtype=torch.int64))  # one-ulp steps
    _ulp_edit(model["b"], torch.arange(7), torch.full((7,), -1))
    m = tracker.measure(step=2)
    assert m.step_changed == 12_345 + 7  # the detected count, no 1/255 correction
    assert m.churn > m.step_changed  # churn_fraction is the miss-corrected estimate
    assert m.step_changed_fraction == (12_345 + 7) / 41_000
    assert m.step_delta_bytes == (12_345 + 7) * (4 + 4)  # int32 index + fp32 value
    metrics = m.to_metrics()
    assert metrics["sparsity/step_changed_fraction"] == m.step_changed_fraction
    assert metrics["sparsity/step_delta_bytes"] == float(m.step_delta_bytes)
    assert m.to_dict()["step_delta_bytes"] == m.step_delta_bytes
    same = tracker.measure(step=3)  # nothing moved during step 3
    assert same.step_changed == 0 and same.step_delta_bytes == 0


def test_step_delta_only_when_the_previous_measurement_was_the_previous_step(tmp_path):
    model = tiny_llama()
    tracker = SparsityTracker(model, mode="fingerprint", compare_dtype="bfloat16")
    tracker.snapshot()
    tracker.measure(step=10)
    _edit(model, EDITS)
    skipped = tracker.measure(step=12)  # churn covers steps 11 and 12: not one step's delta
    assert skipped.has_churn and skipped.step_changed is None
    assert "sparsity/step_delta_bytes" not in skipped.to_metrics()
    tracker.save(tmp_path / "state.safetensors")
    resumed = SparsityTracker(model, mode="fingerprint", compare_dtype="bfloat16")
    resumed.load(tmp_path / "state.safetensors")
    _edit(model, {"model.layers.0.self_attn.q_proj.weight": [0, 5, 17, 30]})
    m = resumed.measure(step=13)  # the previous step survives a restart
    assert m.step_changed == 4 and m.step_delta_bytes == 4 * (4 + 2)  # int32 index + bf16 value
    assert resumed.measure(step=None).step_changed is None


def test_step_delta_needs_churn():
    model = tiny_llama()
    tracker = SparsityTracker(model, track_churn=False)
    tracker.snapshot()
    tracker.measure(step=1)
    _edit(model, EDITS)
    assert tracker.measure(step=2).step_changed is None
