"""The fused measurement kernel (changed + churn + new fingerprint + counts in one pass) applies the one
set of compare rules in `_rules`: NaN payloads, +-0, inf, subnormals, atol, compare-dtype casting; eager
and compiled alike. And `compile=None` decides by measurement, off the training thread."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

from sparsity_callbacks import SparsityTracker
from sparsity_callbacks._rules import _as_bits, _bfloat16_bits, _changed, _to_compare
from sparsity_callbacks.reference import (
    _RECOMPILE_LIMIT,
    _any_nonfinite_columns,
    _bits_input,
    _compiled_form,
    _compiled_kernel,
    _digit_residue,
    _elements_to_words,
    _fingerprint,
    _fingerprint_words,
    _kernel,
    _KernelRunner,
    _planar_to_bool,
    _words_to_elements,
)

_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _from_bits(bits: list[int], dtype: torch.dtype) -> torch.Tensor:
    width = 8 * torch.tensor([], dtype=dtype).element_size()
    signed = [b - (1 << width) if b >= 1 << (width - 1) else b for b in bits]
    return torch.tensor(signed, dtype=_INT[dtype]).view(dtype)


# (reference bits, current bits) pairs in float32: every special case of the rules, plus ordinary steps.
_F32_PAIRS = [
    (0x7FC00000, 0x7FC00000),  # the same NaN: unchanged
    (0x7FC00000, 0x7FC00001),  # NaN payload changes: changed
    (0x7F800001, 0x7FC00000),  # signalling -> quiet NaN: changed
    (0xFFC00000, 0x7FC00000),  # NaN sign: changed
    (0x00000000, 0x80000000),  # +0 -> -0: changed (bits), unchanged with atol
    (0x80000000, 0x80000000),  # -0 stays
    (0x7F800000, 0x7F800000),  # inf stays
    (0x7F800000, 0xFF800000),  # inf -> -inf: changed, also with atol
    (0x7F7FFFFF, 0x7F800000),  # max float -> inf
    (0x00000001, 0x00000002),  # subnormal one-ulp step
    (0x00000001, 0x80000001),  # subnormal sign flip
    (0x007FFFFF, 0x00800000),  # largest subnormal -> smallest normal
    (0x3F800000, 0x3F800001),  # 1.0 + one ulp
    (0x3F800000, 0x3F000000),  # 1.0 -> 0.5 (exponent only)
    (0x3F800000, 0x3F800000 + 255),  # 255 ulps: the fingerprint's blind spot
    (0x3F800000, 0x3F800000 + 7 * 256 * 256),  # bf16-visible step
    (0x3F800000, 0x3F800000 + 0x7FFF),  # rounds to the same bf16
    (0x3A83126F, 0x3A83126F ^ 0x10),  # 0.001, one bit
    (0xBF800000, 0x3F800000),  # -1 -> 1
    (0x7FC00000, 0x3F800000),  # NaN -> 1
]


def _case(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    refs = _from_bits([r for r, _ in _F32_PAIRS], torch.float32)
    curs = _from_bits([c for _, c in _F32_PAIRS], torch.float32)
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4000, generator=gen)
    step = base.clone()
    step[::3] += 1e-4 * torch.randn(step[::3].shape, generator=gen)
    ref, cur = torch.cat([refs, base]), torch.cat([curs, step])
    if dtype != torch.float32:
        ref, cur = ref.to(dtype), cur.to(dtype)
        cur[:8] = _from_bits([0x7FC0, 0x7FC1, 0x8000, 0x0001, 0x7F80, 0xFF80, 0x0000, 0x3F80], dtype)
        ref[:8] = _from_bits([0x7FC0, 0x7FC0, 0x0000, 0x0002, 0x7F80, 0x7F80, 0x0000, 0x3F81], dtype)
    return cur, ref


def _run(kernel, cur, ref, compare_dtype, mode, atol, bits_input=False):
    n = (cur.numel() + 7) // 8 * 8
    pad = n - cur.numel()
    cur = torch.cat([cur, cur.new_zeros(pad)])
    ref = torch.cat([ref, ref.new_zeros(pad)])
    ref_values = _to_compare(ref, compare_dtype)
    reference = _fingerprint_words(ref_values, 8) if mode == "fingerprint" else ref_values
    previous = _fingerprint_words(ref_values, 8)
    native = _fingerprint_words(ref, 8) if cur.dtype != compare_dtype else None
    ever = torch.zeros(n // 8, dtype=torch.uint8)
    extra = {}
    if bits_input:  # the raw-bits path the tracker takes when nothing is converted and atol == 0
        assert _bits_input(cur.dtype, compare_dtype, atol)
        extra = {"stored_dtype": cur.dtype}
    changed, stats = kernel(
        _as_bits(cur) if bits_input else cur,
        # float32 compared in bfloat16: the exact reference stays bfloat16 (a vectorisable load when compiled)
        _as_bits(reference) if bits_input and mode == "exact" and cur.dtype == compare_dtype else reference,
        previous,
        native,
        ever,
        compare_dtype=compare_dtype,
        fingerprint_reference=mode == "fingerprint",
        bits=8,
        atol=atol,
        update=True,
        **extra,
    )
    return _planar_to_bool(changed), stats, previous, ever, ref_values, ref, cur


CASES = [
    (torch.float32, torch.float32, 0.0),
    (torch.float32, torch.float32, 1e-3),
    (torch.float32, torch.bfloat16, 0.0),
    (torch.float32, torch.bfloat16, 1e-3),
    (torch.bfloat16, torch.bfloat16, 0.0),
    (torch.float16, torch.float16, 0.0),
    (torch.bfloat16, torch.float32, 0.0),
]


def _check(kernel, dtype, compare_dtype, atol, mode, bits_input=False):
    cur, ref = _case(dtype)
    changed, stats, previous, ever, ref_values, ref_own, padded = _run(
        kernel, cur, ref, compare_dtype, mode, atol, bits_input
    )
    values = _to_compare(padded, compare_dtype)
    expected = _changed(values, ref_values, atol)  # the rules module
    fp_now = _fingerprint(values, 8)
    if mode == "exact":
        assert torch.equal(changed, expected)
    else:  # the fingerprint detects a subset of the bit changes: exactly those that change x mod 255
        assert torch.equal(changed, fp_now != _fingerprint(ref_values, 8))
        assert not (changed & ~_changed(values, ref_values, 0.0)).any()
    churn = fp_now != _fingerprint(ref_values, 8)
    assert torch.equal(_words_to_elements(previous, previous.numel() * 4, 8), fp_now)  # the new fingerprint, stored
    native = int((_fingerprint(padded, 8) != _fingerprint(ref_own, 8)).sum()) if dtype != compare_dtype else 0
    assert stats.tolist() == [
        int(changed.sum()),
        int(not bool(torch.isfinite(cur).all())),
        int(churn.sum()),
        int(changed.sum()),  # ever was empty: ever == changed
        native,
    ]
    assert torch.equal(_planar_to_bool(ever), changed)
    assert expected[:20].any() and not expected[:20].all()  # the special cases exercise both outcomes
    if dtype != compare_dtype:  # the own-dtype count sees the changes the compare dtype rounds away
        assert native > int(changed.sum()) or compare_dtype.itemsize > dtype.itemsize


@pytest.mark.parametrize("mode", ["exact", "fingerprint"])
@pytest.mark.parametrize(("dtype", "compare_dtype", "atol"), CASES)
def test_eager_kernel_applies_the_rules(dtype, compare_dtype, atol, mode):
    _check(_kernel, dtype, compare_dtype, atol, mode)
    if _bits_input(dtype, compare_dtype, atol):
        _check(_kernel, dtype, compare_dtype, atol, mode, bits_input=True)


@pytest.mark.slow
@pytest.mark.parametrize(("dtype", "compare_dtype", "atol"), [CASES[0], CASES[1], CASES[2]])
def test_compiled_kernel_applies_the_rules(dtype, compare_dtype, atol):
    for mode in ("exact", "fingerprint"):
        _check(_compiled_kernel(), dtype, compare_dtype, atol, mode)
        if _bits_input(dtype, compare_dtype, atol):
            _check(_compiled_kernel(), dtype, compare_dtype, atol, mode, bits_input=True)


def test_fingerprint_eager_equals_digit_sum_definition():
    gen = torch.Generator().manual_seed(1)
    for dtype, modulus in ((torch.float32, 255), (torch.bfloat16, 255), (torch.float64, 255)):
        values = torch.randn(5000, generator=gen).to(dtype)
        values[:4] = torch.tensor([float("nan"), float("-inf"), -0.0, -1e-40]).to(dtype)
        bits = _as_bits(values).tolist()
        width = 8 * values.element_size()
        expected = [(b % (1 << width)) % modulus for b in bits]
        assert _fingerprint(values, 8).tolist() == expected


@pytest.mark.slow
@pytest.mark.parametrize("bits", [8, 16])
def test_compiled_fingerprint_digit_sum_equals_eager_on_every_width(bits):
    gen = torch.Generator().manual_seed(5)
    compiled = torch.compile(_digit_residue, dynamic=True)

    def residue(*args):  # the compiled form, and the same function run eagerly
        eager = _digit_residue(*args)
        assert torch.equal(compiled(*args), eager)
        return eager

    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        values = torch.randn(5000, generator=gen).to(dtype)
        values[:6] = torch.tensor([float("nan"), float("-inf"), -0.0, -1e-40, -3e38, 1.0]).to(dtype)
        raw = _as_bits(values)
        extremes = torch.tensor([-1, torch.iinfo(raw.dtype).min, 0], dtype=raw.dtype)  # all ones, sign bit, zero
        bits_as_is = torch.cat([raw, extremes])
        expected = _fingerprint(bits_as_is.view(dtype), bits).to(torch.int32)
        expected = expected if bits == 8 else expected + 32768
        assert torch.equal(residue(bits_as_is.view(dtype), bits), expected), dtype
    # bfloat16 bits held in int32 lanes (the compiled bfloat16 path): two digits are enough
    halves = _as_bits(torch.randn(5000, generator=gen).to(torch.bfloat16)).to(torch.int32) & 0xFFFF
    halves = torch.cat([halves, torch.tensor([0xFFFF, 0x8000, 0, 0xFF, 0xFE01], dtype=torch.int32)])
    expected = _fingerprint(halves.to(torch.int16).view(torch.bfloat16), bits).to(torch.int32)
    expected = expected if bits == 8 else expected + 32768
    assert torch.equal(residue(halves, bits, 16), expected)
    # ... and from `_bfloat16_bits`, which never sets all 16 (canonical NaN): no fold
    below = halves != 0xFFFF
    assert torch.equal(residue(halves[below], bits, 16, True), expected[below])


def test_compile_none_stays_eager_until_eager_time_pays_for_a_compile():
    model = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(1000)) for _ in range(3)])
    tracker = SparsityTracker(model)  # compile=None
    tracker.snapshot()
    for _ in range(3):
        tracker.measure()
    runner = tracker._kernel
    assert runner.use_compile is None and not runner.compiled
    assert runner._thread is None and runner.eager_seconds < 1  # milliseconds of eager work never compile
    exact_plain = SparsityTracker(model, mode="exact", track_churn=False)
    exact_plain.snapshot()
    assert exact_plain._kernel.use_compile is None  # the plain comparison compiles too (packing and counts fuse)


def test_runner_compiles_in_the_background_once_eager_time_reaches_the_cost():
    runner = _KernelRunner(None)
    calls = []
    runner.record_eager(4.0, lambda: calls.append("compiled"))
    for _ in range(1000):
        runner.record_eager(0.01, lambda: calls.append("compiled"))  # Python-bound calls do not count
    assert runner._thread is None and runner.eager_seconds == 4.0
    runner.record_eager(7.0, lambda: calls.append("compiled"))  # 11 s >= the 10 s estimate
    assert runner.wait(60) and calls == ["compiled"]
    failing = _KernelRunner(None)
    failing.record_eager(60.0, lambda: 1 / 0)
    assert not failing.wait(60) and failing.use_compile is False
    with pytest.warns(UserWarning, match="torch.compile of the sparsity kernel failed.*ZeroDivisionError"):
        cur = torch.zeros(8)
        failing(cur, cur.clone(), None, None, torch.zeros(1, dtype=torch.uint8), **_OPTIONS)


_OPTIONS = dict(compare_dtype=torch.float32, fingerprint_reference=False, bits=8, atol=0.0, update=True)


def test_nonfinite_from_exponent_bits_equals_isfinite():
    def any_nonfinite(values: torch.Tensor) -> bool:  # the compiled kernel's form, run eagerly: 8 rows of 1
        padded = torch.cat([values, values.new_zeros(8 - values.numel())])
        return bool(_any_nonfinite_columns(_as_bits(padded), values.dtype, 1))

    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        finite = torch.tensor([0.0, -0.0, 1e-40, -3.0, 65504.0]).to(dtype)
        assert not any_nonfinite(finite)
        for bad in (float("nan"), float("inf"), float("-inf")):
            values = torch.cat([finite, torch.tensor([bad]).to(dtype)])
            assert any_nonfinite(values)


@pytest.mark.parametrize("bits", [8, 16])
def test_word_packed_fingerprints_round_trip_through_the_per_element_form_at_any_chunk(bits):
    gen = torch.Generator().manual_seed(2)
    values = torch.randn(3 * 64, generator=gen)
    values[:3] = torch.tensor([float("nan"), -0.0, float("inf")])
    per_element = _fingerprint(values, bits)
    words = _elements_to_words(per_element, 64, bits)  # 3 chunks of 64 elements
    assert words.dtype == torch.int32 and words.numel() * 32 == values.numel() * bits  # same bytes per element
    assert torch.equal(words, torch.cat([_fingerprint_words(values[i : i + 64], bits) for i in range(0, 192, 64)]))
    assert torch.equal(_words_to_elements(words, 64, bits), per_element)
    # another chunk size gives another word layout of the same per-element fingerprints
    other = _elements_to_words(per_element, 96, bits)
    assert not torch.equal(other, words)
    assert torch.equal(_words_to_elements(other, 96, bits), per_element)


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_integer_bfloat16_conversion_is_tensor_to_on_every_special_case(compiled):
    cur, _ = _case(torch.float32)
    gen = torch.Generator().manual_seed(3)
    specials = [0x7FC00001, 0xFFFFFFFF, 0x7F800001, 0x3F808000, 0x3F818000, 0x3F807FFF, 0x7F7F8000, 0x807FFFFF]
    values = torch.cat([cur, _from_bits(specials, torch.float32), torch.randn(5000, generator=gen) * 1e-30])
    values = torch.cat([values, _from_bits(torch.randint(0, 2**32, (20000,), generator=gen).tolist(), torch.float32)])
    convert = torch.compile(_bfloat16_bits, dynamic=True) if compiled else _bfloat16_bits
    expected = _as_bits(_to_compare(values, torch.bfloat16)).to(torch.int32) & 0xFFFF
    assert torch.equal(convert(_as_bits(values)), expected)  # ties to even, overflow to inf, canonical NaN


@pytest.mark.slow
@pytest.mark.parametrize("options", [{}, {"compare_dtype": "bfloat16"}, {"mode": "fingerprint"}])
def test_the_background_compile_leaves_nothing_to_compile_on_the_training_thread(options):
    from torch._dynamo.utils import counters

    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 3))
    tracker = SparsityTracker(model, **options)
    tracker.snapshot()
    tracker._kernel.record_eager(100.0, tracker._warm_up_compiled_kernel)  # as if eager time paid for it
    assert tracker._kernel.wait(600)
    graphs = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        model[0].weight[0] += 1
    measurement = tracker.measure(1)  # under no_grad, like the warm-up: no guard fails, nothing recompiles
    assert counters["stats"]["unique_graphs"] == graphs
    assert measurement.tensors["0.weight"].changed == 64


def _every_bfloat16_case() -> tuple[torch.Tensor, torch.Tensor]:
    """(current float32 values, reference bfloat16 values): every bfloat16 bit pattern as the reference (NaN
    payloads, +-0, inf, subnormals), each against four float32 values around it: its exact value, a
    rounding tie (to even: up or down), just below and just above the tie."""
    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32)
    high = patterns << 16
    current = torch.cat([high, high | 0x8000, high | 0x7FFF, high | 0x8001]).view(torch.float32)
    reference = patterns.to(torch.int16).view(torch.bfloat16).repeat(4)
    return current, reference


@pytest.mark.slow
def test_compiled_bfloat16_kernel_equals_eager_and_the_rules_on_every_bfloat16_pattern():
    current, reference = _every_bfloat16_case()
    gen = torch.Generator().manual_seed(4)
    earlier = current[torch.randperm(current.numel(), generator=gen)]
    outputs = {}
    for name, kernel in (("eager", _kernel), ("compiled", _compiled_kernel())):
        previous = _fingerprint_words(_to_compare(earlier, torch.bfloat16), 8)
        native = _fingerprint_words(reference.float(), 8)
        ever = torch.zeros(current.numel() // 8, dtype=torch.uint8)
        options = dict(_OPTIONS, compare_dtype=torch.bfloat16, stored_dtype=torch.float32)
        changed, stats = kernel(_as_bits(current), reference, previous, native, ever, **options)
        outputs[name] = (changed, stats, previous, ever)
    values = _to_compare(current, torch.bfloat16)
    expected = _changed(values, reference, 0.0)  # the rules module
    fp_now = _fingerprint(values, 8)
    for name, (changed, stats, previous, ever) in outputs.items():
        assert torch.equal(_planar_to_bool(changed), expected), name
        assert torch.equal(changed, ever), name
        assert torch.equal(_words_to_elements(previous, current.numel(), 8), fp_now), name
        churn = int((fp_now != _fingerprint(_to_compare(earlier, torch.bfloat16), 8)).sum())
        native = int((_fingerprint(current, 8) != _fingerprint(reference.float(), 8)).sum())
        assert stats.tolist() == [int(expected.sum()), 1, churn, int(expected.sum()), native], name
    assert 0 < int(expected.sum()) < expected.numel()


def _mixed_model() -> torch.nn.Module:
    """Small tensors of odd sizes (padding), float32 and bfloat16 (separate groups), one NaN, and one tensor
    larger than a group (measured on its own)."""
    gen = torch.Generator().manual_seed(5)
    sizes = [13, 64, 1000, 7, 4096, 333, 2**18 + 24]
    params = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in sizes]
    params += [torch.nn.Parameter(torch.randn(n, generator=gen).bfloat16()) for n in (40, 17)]
    return torch.nn.ParameterList(params)


def _step(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            flat = p.view(-1)
            picked = torch.rand(flat.shape, generator=gen) < 0.3
            flat[picked] += (1e-3 * torch.randn(flat.shape, generator=gen)).to(p.dtype)[picked]
            if i == 1 and seed == 2:
                flat[5] = float("nan")


@pytest.mark.parametrize(
    "options",
    [
        {"mode": "exact"},
        {"mode": "fingerprint"},
        {"mode": "exact", "compare_dtype": "bfloat16"},
        {"mode": "fingerprint", "compare_dtype": "bfloat16", "fingerprint_bits": 16},
    ],
)
def test_small_tensors_measured_together_give_the_per_tensor_results_bit_for_bit(options, monkeypatch):
    import sparsity_callbacks.tracker as tracker_module

    results = []
    for group_numel in (tracker_module._GROUP_NUMEL, 0):  # grouped, then one tensor per kernel call
        monkeypatch.setattr(tracker_module, "_GROUP_NUMEL", group_numel)
        model = _mixed_model()
        tracker = SparsityTracker(model, compile=False, **options)
        tracker.snapshot()
        measurements = []
        for step in range(1, 4):
            _step(model, step)
            with pytest.warns(UserWarning, match="NaN or inf") if step == 2 else contextlib.nullcontext():
                measurements.append(tracker.measure(step).to_dict())
        results.append((measurements, tracker.state_dict()["tensors"], tracker.changed_mask()))
    (grouped, grouped_state, grouped_mask), (single, single_state, single_mask) = results
    assert grouped == single
    assert grouped[1]["nonfinite"] == 1 and grouped[2]["churn_fraction"] > 0
    assert grouped_state.keys() == single_state.keys()
    for key, tensor in grouped_state.items():
        assert torch.equal(tensor.view(torch.uint8), single_state[key].view(torch.uint8)), key
    for name in grouped_mask.names:
        assert torch.equal(grouped_mask[name], single_mask[name]), name


def test_eager_measurement_while_another_thread_compiles_is_unaffected(monkeypatch):
    """torch.compiler.is_compiling() is process-wide: while the background thread compiles, it is True on
    the training thread too. The eager kernel must not take the compiled form's branches then (with
    fingerprints compared in bfloat16 that crashed on a reshaped reference)."""
    results = []
    for compiling_elsewhere in (False, True):
        model = _mixed_model()
        tracker = SparsityTracker(model, compile=False, mode="fingerprint", compare_dtype="bfloat16")
        tracker.snapshot()
        _step(model, 1)
        monkeypatch.setattr(torch.compiler, "_is_compiling_flag", compiling_elsewhere, raising=False)
        assert torch.compiler.is_compiling() is compiling_elsewhere
        results.append(tracker.measure(1).to_dict())
        monkeypatch.setattr(torch.compiler, "_is_compiling_flag", False, raising=False)
    assert results[0] == results[1] and results[0]["changed_fraction"] > 0


@pytest.mark.slow
def test_compiled_and_eager_trackers_agree_on_fingerprints_compared_in_bfloat16():
    """Compiled, the bfloat16 widening of an exact reference was once applied to fingerprint words too: in
    fingerprint mode with compare_dtype="bfloat16" the compiled kernel counted several times the changes."""
    results = []
    for compile in (False, True):
        model = _mixed_model()
        tracker = SparsityTracker(model, compile=compile, mode="fingerprint", compare_dtype="bfloat16")
        tracker.snapshot()
        measurements = []
        for step in (1, 3):  # no NaN (step 2 writes one)
            _step(model, step)
            measurements.append(tracker.measure(step).to_dict())
        assert tracker._kernel.compiled is compile
        if compile:  # compiled for real: torch's recompile limit would have run it eagerly without a word
            assert 0 < len(_debug_get_cache_entry_list(_compiled_form.__code__)) < _RECOMPILE_LIMIT
        results.append((measurements, tracker.ever_changed_mask()))
    (eager, eager_mask), (compiled, compiled_mask) = results
    assert eager == compiled and 0 < eager[0]["changed_fraction"] < 1
    assert all(torch.equal(eager_mask[name], compiled_mask[name]) for name in eager_mask.names)
