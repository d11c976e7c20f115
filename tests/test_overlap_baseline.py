"""The magnitude-matched chance baseline of `Mask.overlap(reference=...)` and `overlap --base`, on synthetic
masks whose dependence on the base weights' magnitude is known by construction."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from sparsity_callbacks import Mask
from sparsity_callbacks.cli import main

NAMES = ("model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight")


def _base_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two tensors whose magnitudes spread evenly over 12 binades (2^-12 .. 1), random signs."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in zip(NAMES, ((300, 400), (200, 300))):
        magnitude = torch.exp2(-12 * torch.rand(shape, generator=gen))
        sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
        weights[name] = magnitude * sign
    return weights


def _masks(base: dict[str, torch.Tensor], probability, seed: int) -> Mask:
    """Each element in the mask independently with ``probability(|w|)``."""
    gen = torch.Generator().manual_seed(seed)
    return Mask({n: torch.rand(w.shape, generator=gen) < probability(w.abs()) for n, w in base.items()})


def _small_weights_move(magnitude: torch.Tensor) -> torch.Tensor:
    """What bf16 comparison does to an update of one size: the two smallest binades flip often, the rest rarely."""
    return torch.where(magnitude < 2.0**-10, 0.6, 0.01)


def test_magnitude_dependent_masks_overlap_as_the_matched_baseline_predicts_not_as_uniform_chance():
    base = _base_weights()
    a, b = _masks(base, _small_weights_move, seed=1), _masks(base, _small_weights_move, seed=2)
    o = a.overlap(b, reference=base)
    # A and B are independent given the magnitude: the matched baseline is the observed overlap up to sampling
    # noise (|A n B| is about 12,000 here, relative standard deviation < 1 %).
    assert o.overlap_ab > 0.5
    assert o.chance_magnitude_matched == pytest.approx(o.overlap_ab, abs=0.02)
    assert o.chance_magnitude_matched_ba == pytest.approx(o.overlap_ba, abs=0.02)
    assert o.chance_magnitude_matched_jaccard == pytest.approx(o.jaccard, abs=0.02)
    assert o.chance_ab < o.overlap_ab / 4  # the uniform baseline is far below
    # per tensor: the same, and the global expectation is the sum of the tensors' ones
    for t in o.per_tensor.values():
        assert t.chance_magnitude_matched == pytest.approx(t.overlap_ab, abs=0.03)
    assert o.expected_intersection_magnitude_matched == pytest.approx(
        sum(t.expected_intersection_magnitude_matched for t in o.per_tensor.values())
    )


def test_magnitude_independent_masks_agree_with_both_baselines():
    base = _base_weights()
    a, b = _masks(base, lambda m: torch.full_like(m, 0.1), seed=3), _masks(base, lambda m: torch.full_like(m, 0.3), 4)
    o = a.overlap(b, reference=base)
    assert o.overlap_ab == pytest.approx(0.3, abs=0.01)
    assert o.chance_ab == pytest.approx(o.overlap_ab, abs=0.01)
    assert o.chance_magnitude_matched == pytest.approx(o.overlap_ab, abs=0.01)
    assert o.chance_magnitude_matched_ba == pytest.approx(o.overlap_ba, abs=0.01)


def test_strata_are_the_bf16_exponent_of_each_tensor():
    """Hand count: one tensor, two binades; A and B fill each binade to known counts."""
    w = torch.tensor([1.0, 1.5, 1.9, 1.2, 0.25, 0.3, 0.26, 0.4])  # strata: exponent of 1.x (4), of 0.25..0.5 (4)
    a = torch.tensor([1, 1, 0, 0, 1, 0, 0, 0], dtype=torch.bool)
    b = torch.tensor([1, 0, 1, 1, 0, 0, 0, 1], dtype=torch.bool)
    o = Mask({"w": a}).overlap(Mask({"w": b}), reference={"w": w})
    expected = 2 * 3 / 4 + 1 * 1 / 4  # sum over strata of |A_s| |B_s| / N_s
    assert o.expected_intersection_magnitude_matched == pytest.approx(expected)
    assert o.chance_magnitude_matched == pytest.approx(expected / 3)
    assert o.chance_magnitude_matched_jaccard == pytest.approx(expected / (3 + 4 - expected))
    assert "chance_magnitude_matched" in o.to_dict()
    assert "chance_magnitude_matched" not in Mask({"w": a}).overlap(Mask({"w": b})).to_dict()
    assert Mask({"w": a}).overlap(Mask({"w": b})).chance_magnitude_matched is None


def test_reference_that_does_not_match_the_masks_is_refused():
    a = Mask({"w": torch.ones(4, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"`reference` does not match the masks: missing \['w'\]"):
        a.overlap(a, reference={"v": torch.ones(4)})
    with pytest.raises(ValueError, match=r"shape differs for \['w'\]"):
        a.overlap(a, reference={"w": torch.ones(5)})


def test_cli_overlap_with_base_adds_the_matched_baseline_to_json_and_table(tmp_path, capsys):
    base = _base_weights()
    save_file(base, tmp_path / "base.safetensors")
    _masks(base, _small_weights_move, seed=1).save(tmp_path / "A.safetensors")
    _masks(base, _small_weights_move, seed=2).save(tmp_path / "B.safetensors")
    masks = [str(tmp_path / "A.safetensors"), str(tmp_path / "B.safetensors")]
    assert main(["overlap", *masks, "--base", str(tmp_path / "base.safetensors"), "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    g = data["global"]
    assert g["chance_magnitude_matched"] == pytest.approx(g["overlap_ab"], abs=0.02)
    assert g["chance_ab"] < g["overlap_ab"] / 4
    assert "chance_magnitude_matched" in data["module_types"]["mlp.up_proj"]
    assert main(["overlap", *masks, "--base", str(tmp_path / "base.safetensors")]) == 0
    out = capsys.readouterr().out
    assert out.count("chance|mag") >= 3 and f"{g['chance_magnitude_matched']:.4f}" in out
    # without --base: no matched column
    assert main(["overlap", *masks]) == 0
    assert "chance|mag" not in capsys.readouterr().out


def test_cli_overlap_base_errors(tmp_path, capsys):
    base = _base_weights()
    save_file({NAMES[0]: base[NAMES[0]]}, tmp_path / "half.safetensors")
    for label in "ABC":
        _masks(base, _small_weights_move, seed=ord(label)).save(tmp_path / f"{label}.safetensors")
    masks = [str(tmp_path / f"{label}.safetensors") for label in "ABC"]
    assert main(["overlap", *masks[:2], "--base", str(tmp_path / "half.safetensors")]) == 2
    assert "lacks 1 tensor(s) of the masks" in capsys.readouterr().err
    assert main(["overlap", *masks, "--base", str(tmp_path / "half.safetensors")]) == 2
    assert "--base works with two masks, got 3" in capsys.readouterr().err
    assert main(["overlap", *masks[:2], "--base", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
