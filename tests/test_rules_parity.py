"""The tracker and `diff` apply the same compare rules (`sparsity_callbacks._rules`): on the same pairs of
weights, saved as safetensors for `diff_checkpoints` and loaded into a model for `SparsityTracker`, they
give identical counts, masks, non-finite counts and signatures. The oracle is their agreement plus a few
expectations checked by hand (the special values), never a third implementation of the rules."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from sparsity_callbacks import SparsityTracker
from sparsity_callbacks.diff import diff_checkpoints

# NaN/inf in the weights is what these tests are about: the tracker's warnings about it are expected.
pytestmark = pytest.mark.filterwarnings("ignore:.*NaN or inf:UserWarning")

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}
DIFF_CHUNK = 64  # small chunks, at other boundaries than the tracker's, so both cut tensors differently
TRACKER_CHUNK = 1024  # the smallest the config allows


class _Weights(torch.nn.Module):
    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for name, value in tensors.items():
            self.register_parameter(name, torch.nn.Parameter(value.clone()))


def _tracker_counts(base, tuned, *, atol, compare_dtype, mode="exact"):
    """(per-tensor changed counts, changed mask, nonfinite, signatures) of the tracker: snapshot ``base``,
    write ``tuned`` bit for bit, measure."""
    model = _Weights(base)
    tracker = SparsityTracker(
        model, mode=mode, atol=atol, compare_dtype=compare_dtype, track_churn=False, chunk_numel=TRACKER_CHUNK
    )
    tracker.snapshot()
    with torch.no_grad():
        for name, value in tuned.items():
            getattr(model, name).copy_(value)  # same dtype: a bit-exact copy, NaN payloads included
    m = tracker.measure(1)
    return {n: c.changed for n, c in m.tensors.items()}, tracker.changed_mask(), m.nonfinite, tracker.signatures


def _check_parity(tmp_path, base, tuned, *, atols=(1e-3,), compare_dtype=None):
    """Assert the tracker and `diff` agree on ``base`` -> ``tuned``; returns the diff result."""
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    result = diff_checkpoints(
        tmp_path / "base.safetensors",
        tmp_path / "tuned.safetensors",
        atol=atols,
        compare_dtype=compare_dtype,
        mask=True,
        chunk_numel=DIFF_CHUNK,
        workers=2,
    )
    exact, mask, nonfinite, signatures = _tracker_counts(base, tuned, atol=0.0, compare_dtype=compare_dtype)
    assert {n: t.changed for n, t in result.tensors.items()} == exact
    assert result.mask == mask
    for name in base:
        assert torch.equal(result.mask[name], mask[name]), name
    assert sum(t.nonfinite for t in result.tensors.values()) == nonfinite
    assert result.mask.signatures == signatures
    for i, atol in enumerate(atols):
        within, _, _, _ = _tracker_counts(base, tuned, atol=atol, compare_dtype=compare_dtype)
        assert {n: t.within[i] for n, t in result.tensors.items()} == within, atol
        assert all(within[n] <= exact[n] for n in exact)  # the atol mask is a subset of the exact one
    return result


def _random_pair(dtype: torch.dtype, seed: int) -> tuple[dict, dict]:
    """Tensors of odd sizes; ~10 % of the elements moved: by 1 ulp, by 1e-4 and by 1e-2."""
    gen = torch.Generator().manual_seed(seed)
    base, tuned = {}, {}
    for i, shape in enumerate([(37, 29), (200,), (5, 7, 3)]):
        w = (torch.randn(shape, generator=gen) * 0.05).to(dtype)
        t = w.clone()
        flat = t.view(-1)
        pick = torch.randperm(flat.numel(), generator=gen)[: max(3, flat.numel() // 10)]
        third = len(pick) // 3
        flat.view(_INT[flat.element_size()])[pick[:third]] += 1  # one ulp
        flat[pick[third : 2 * third]] += 1e-4
        flat[pick[2 * third :]] += 1e-2
        base[f"t{i}"], tuned[f"t{i}"] = w, t
    return base, tuned


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_updates_agree_in_every_dtype(tmp_path, dtype):
    base, tuned = _random_pair(dtype, seed=DTYPES.index(dtype))
    result = _check_parity(tmp_path, base, tuned, atols=(1e-5, 1e-3))
    assert result.measurement().changed > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_random_updates_agree_compared_in_bfloat16(tmp_path, dtype):
    base, tuned = _random_pair(dtype, seed=10)
    result = _check_parity(tmp_path, base, tuned, compare_dtype="bfloat16")
    # sub-bf16-ulp moves do not count in bf16 (the 1-ulp third of the moves, for fp32 and fp64 sources)
    stored = sum(
        int((base[n].view(_INT[base[n].element_size()]) != tuned[n].view(_INT[base[n].element_size()])).sum())
        for n in base
    )
    assert result.measurement().changed < stored


def _nan(dtype: torch.dtype, payload: int = 0) -> torch.Tensor:
    """A quiet NaN of ``dtype`` with ``payload`` added to the canonical bits."""
    value = torch.tensor([math.nan], dtype=dtype)
    value.view(_INT[value.element_size()])[0] += payload
    return value


def _specials(dtype: torch.dtype) -> tuple[dict, dict, dict[str, tuple[int, int]]]:
    """Pairs of special values, and the hand-checked (changed at atol=0, changed at atol=1e-3) per tensor."""
    info = torch.finfo(dtype)
    inf = torch.tensor([math.inf], dtype=dtype)
    tiny = torch.tensor([info.smallest_normal / 4], dtype=dtype)  # a subnormal
    one = torch.ones(1, dtype=dtype)
    zero = torch.zeros(1, dtype=dtype)
    pairs = {
        "nan_payload": (_nan(dtype), _nan(dtype, 1), (1, 1)),  # bits differ: changed (the NaN rule)
        "nan_same": (_nan(dtype, 1), _nan(dtype, 1), (0, 0)),
        "number_to_nan": (one, _nan(dtype), (1, 1)),
        "nan_to_number": (_nan(dtype), one, (1, 1)),
        "signed_zero": (zero, -zero, (1, 0)),  # bits differ, |Δ| = 0 <= atol
        "inf_same": (inf, inf.clone(), (0, 0)),
        "inf_flip": (inf, -inf, (1, 1)),
        "to_inf": (one, inf, (1, 1)),
        "subnormal_step": (tiny, tiny * 2, (1, 0)),
        "subnormal_to_zero": (tiny, zero, (1, 0)),
        "unchanged": (one * 3, one * 3, (0, 0)),
    }
    base = {k: v[0].clone() for k, v in pairs.items()}
    tuned = {k: v[1].clone() for k, v in pairs.items()}
    return base, tuned, {k: v[2] for k, v in pairs.items()}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_special_values_follow_the_rules_in_both_paths(tmp_path, dtype):
    base, tuned, expected = _specials(dtype)
    assert tiny_is_subnormal(base["subnormal_step"])
    result = _check_parity(tmp_path, base, tuned, atols=(1e-3,))
    assert {n: t.changed for n, t in result.tensors.items()} == {n: e[0] for n, e in expected.items()}
    assert {n: t.within[0] for n, t in result.tensors.items()} == {n: e[1] for n, e in expected.items()}
    assert sum(t.nonfinite for t in result.tensors.values()) == 6  # the NaN and inf elements of TUNED


def tiny_is_subnormal(value: torch.Tensor) -> bool:
    return 0 < abs(float(value)) < torch.finfo(value.dtype).smallest_normal


def test_nan_payload_change_counts_in_fingerprint_mode_too(tmp_path):
    """The fingerprint of 0x7FC00001 differs from that of 0x7FC00000 (a change of 1 in the bits)."""
    base, tuned, expected = _specials(torch.float32)
    counts, _, _, _ = _tracker_counts(base, tuned, atol=0.0, compare_dtype=None, mode="fingerprint")
    assert counts == {n: e[0] for n, e in expected.items()}


def test_nan_payloads_are_canonical_after_a_conversion(tmp_path):
    """Compared in bfloat16, fp32 NaNs with other payloads are the same canonical NaN: unchanged."""
    base = {"w": torch.cat([_nan(torch.float32), _nan(torch.float32, 5), torch.ones(3)])}
    tuned = {"w": torch.cat([_nan(torch.float32, 1), _nan(torch.float32, 7), torch.ones(3)])}
    result = _check_parity(tmp_path, base, tuned, compare_dtype="bfloat16")
    assert result.tensors["w"].changed == 0
    assert _check_parity(tmp_path, base, tuned).tensors["w"].changed == 2  # as stored: payloads differ


def test_atol_edge_is_exact_in_float64_and_float32(tmp_path):
    """|Δ| is taken in float64: 1e-9 > 1e-10 in float64; in float32 |Δ| = atol exactly is unchanged and
    an atol one part in 1e9 smaller (which float32 cannot represent) is changed."""
    base = {"w": torch.tensor([1.0, 2.0], dtype=torch.float64)}
    tuned = {"w": torch.tensor([1.0 + 1e-9, 2.0], dtype=torch.float64)}
    result = _check_parity(tmp_path, base, tuned, atols=(1e-10, 1e-8))
    assert result.tensors["w"].within == [1, 0]

    ulp = 2.0**-23
    base = {"w": torch.ones(3)}
    tuned = {"w": torch.tensor([1.0 + ulp, 1.0, 1.0])}
    result = _check_parity(tmp_path, base, tuned, atols=(ulp, ulp * (1 - 1e-9)))
    assert result.tensors["w"].within == [0, 1]
