"""`Measurement` and `TensorCounts`: what one measurement (or an offline diff) counted, per tensor, with
totals, fractions, fingerprint-miss corrections and groups per layer and module type."""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sparsity_callbacks.params import _layer_index, _module_type


@dataclass(frozen=True)
class TensorCounts:
    """Element counts of one tensor (or a sum of tensors). Counts are what was detected; in
    fingerprint mode they are lower bounds, see `Measurement.changed_miss_probability`."""

    numel: int
    changed: int = 0
    ever_changed: int = 0
    churn: int = 0

    def __add__(self, other: TensorCounts) -> TensorCounts:
        return TensorCounts(
            self.numel + other.numel,
            self.changed + other.changed,
            self.ever_changed + other.ever_changed,
            self.churn + other.churn,
        )


def _sum(counts: Iterable[TensorCounts]) -> TensorCounts:
    total = TensorCounts(0)
    for c in counts:
        total = total + c
    return total


def _corrected(detected: int, miss_probability: float) -> int | float:
    """Unbiased estimate of the true count when each change is missed with ``miss_probability``; the
    detected count itself, an integer, when nothing is missed (exact mode, diffs)."""
    if miss_probability == 0:
        return detected
    return detected / (1.0 - miss_probability)


def _upper_bound(detected: int, miss_probability: float) -> int | float:
    """99.9 % upper confidence bound of the true count (normal approximation of the binomial number of
    misses plus a Poisson floor of 7 for small counts, whose 99.9 % quantile at mean 1 is 5)."""
    if miss_probability == 0:
        return detected
    estimate = _corrected(detected, miss_probability)
    misses = estimate * miss_probability
    return detected + misses + 3.1 * math.sqrt(misses) + 7


@dataclass(frozen=True)
class Measurement:
    """The result of one `SparsityTracker.measure()` (or of an offline diff).

    Attributes:
        step: optimizer step of the measurement (None if unknown).
        mode: ``"exact"``, ``"fingerprint"`` or ``"diff"``.
        tensors: ``{parameter name: TensorCounts}`` of detected counts.
        changed_miss_probability: probability that a change is not detected (0 in exact mode,
            1/255 with 8-bit fingerprints for changes of 255 ulps or more).
        churn_miss_probability: the same for churn (churn always compares fingerprints).
        has_churn: False at the first measurement after a snapshot or with ``track_churn=False``.
        nonfinite: elements that are NaN or +-inf now.
        step_changed: elements detected as changed since the previous optimizer step, when the
            previous measurement was at the previous step (``every_n_steps=1``), else None. The detected
            count, not miss-corrected: exact for every change of fewer than ``2**fingerprint_bits - 1``
            ulps (RL's one-ulp steps); a larger change is missed with probability ``churn_miss_probability``.
        fingerprint_estimate: how fingerprint counts (``changed`` in fingerprint mode, ``churn``) become
            figures: ``"detected"`` (the count as detected; used when the compare dtype is 16-bit, where
            changes are a few ulps and always detected) or ``"corrected"`` (divided by 1 - miss probability;
            32-bit compare, where most changes are 255 ulps or more). The upper bound is reported with both.
        changed_native: with a ``compare_dtype`` that differs from the parameters' dtype, elements detected
            as changed in the parameters' own dtype (fingerprints: a change of 255 ulps or more is missed
            with ``native_miss_probability``), else None.
        step_delta_bytes: bytes of a lossless sparse patch from the previous step to this one (per tensor:
            int32 indices, int64 for tensors of 2**31 elements or more, plus the values in the compare
            dtype) for the ``step_changed`` elements; None when ``step_changed`` is.
    """

    step: int | None
    mode: str
    tensors: Mapping[str, TensorCounts]
    changed_miss_probability: float = 0.0
    churn_miss_probability: float = 0.0
    has_churn: bool = True
    nonfinite: int = 0
    skipped: Mapping[str, str] = field(default_factory=dict)
    step_changed: int | None = None
    step_delta_bytes: int | None = None
    fingerprint_estimate: str = "corrected"
    changed_native: int | None = None
    native_miss_probability: float = 0.0

    # --- totals ----------------------------------------------------------------------------------
    @functools.cached_property
    def total(self) -> TensorCounts:
        """The counts summed over `tensors` (computed once: every figure below reads it)."""
        return _sum(self.tensors.values())

    @property
    def numel(self) -> int:
        """Tracked elements."""
        return self.total.numel

    def _estimate(self, detected: int, miss_probability: float) -> int | float:
        """A fingerprint count as reported: the detected count itself, or corrected (``fingerprint_estimate``)."""
        if self.fingerprint_estimate == "detected":
            return detected
        return _corrected(detected, miss_probability)

    @property
    def changed(self) -> int | float:
        """Elements differing from the reference now (fingerprint mode: see ``fingerprint_estimate``)."""
        return self._estimate(self.total.changed, self.changed_miss_probability)

    @property
    def changed_upper(self) -> int | float:
        """99.9 % upper bound of the changed count (== `changed` in exact mode)."""
        return _upper_bound(self.total.changed, self.changed_miss_probability)

    @property
    def ever_changed(self) -> int | float:
        """Elements changed at any measurement so far: the ever-changed mask's size (``total.ever_changed``)
        plus, in fingerprint mode, the changes estimated to be missed now (so it is >= `changed`)."""
        return self.total.ever_changed + (self.changed - self.total.changed)

    @property
    def churn(self) -> int | float:
        """Elements changed since the previous measurement (see ``fingerprint_estimate``)."""
        return self._estimate(self.total.churn, self.churn_miss_probability)

    def _fraction(self, count: float) -> float:
        return count / self.numel if self.numel else math.nan

    @property
    def changed_fraction(self) -> float:
        """Fraction in [0, 1] of tracked elements that differ from the reference now."""
        return min(1.0, self._fraction(self.changed))

    @property
    def ever_changed_fraction(self) -> float:
        """Fraction in [0, 1] of tracked elements changed at any measurement (cumulative)."""
        return min(1.0, self._fraction(self.ever_changed))

    @property
    def changed_fraction_native(self) -> float | None:
        """Fraction in [0, 1] of tracked elements changed in the parameters' own dtype (what moved, before
        rounding to ``compare_dtype``; corrected estimate of fingerprint counts), or None without a
        compare dtype."""
        if self.changed_native is None:
            return None
        return min(1.0, self._fraction(_corrected(self.changed_native, self.native_miss_probability)))

    @property
    def update_sparsity(self) -> float:
        """1 - changed fraction (the papers' term)."""
        return 1.0 - self.changed_fraction

    @property
    def churn_fraction(self) -> float:
        return min(1.0, self._fraction(self.churn))

    @property
    def step_changed_fraction(self) -> float | None:
        """Fraction in [0, 1] of tracked elements changed since the previous optimizer step (detected; see
        ``step_changed``), or None when the previous measurement was not at the previous step."""
        return None if self.step_changed is None else self._fraction(self.step_changed)

    # --- groups ----------------------------------------------------------------------------------
    def by_module_type(self) -> dict[str, TensorCounts]:
        """``{module type: counts}``, e.g. ``self_attn.q_proj``, ``mlp.down_proj``, ``embed_tokens``."""
        return self._group(lambda name: _module_type(name))

    def by_layer(self) -> dict[int, TensorCounts]:
        """``{block index: counts}``; tensors outside the blocks are left out."""
        return {k: v for k, v in self._group(_layer_index).items() if k is not None}

    def by_layer_and_module(self) -> dict[tuple[int | None, str], TensorCounts]:
        """``{(block index or None, module type): counts}``, the cells of the heatmap."""
        return self._group(lambda name: (_layer_index(name), _module_type(name)))

    def _group(self, key) -> dict:
        groups: dict[Any, TensorCounts] = defaultdict(lambda: TensorCounts(0))
        for name, counts in self.tensors.items():
            groups[key(name)] = groups[key(name)] + counts
        return dict(groups)

    # --- output ----------------------------------------------------------------------------------
    def to_metrics(self, per_tensor: bool = False) -> dict[str, float]:
        """The flat ``sparsity/...`` metric dict (fractions in [0, 1]); the keys are listed in `report`."""
        from sparsity_callbacks.report import _metrics

        return _metrics(self, per_tensor)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (the ``report.json`` artifact)."""
        from sparsity_callbacks.report import _summary

        return _summary(self)
