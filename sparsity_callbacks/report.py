"""Flat metric dicts and JSON summaries of a `Measurement`: the ``sparsity/...`` keys logged to MLflow
and the trainers' loggers, and the ``report.json`` layout."""

from __future__ import annotations

import math
from typing import Any

from sparsity_callbacks.measurement import Measurement, TensorCounts, _corrected

__all__ = ["PREFIX", "Measurement", "TensorCounts"]

PREFIX = "sparsity/"


def _metrics(m: Measurement, per_tensor: bool = False) -> dict[str, float]:
    """The flat ``sparsity/...`` metric dict of ``m`` (fractions in [0, 1])."""
    p = m.changed_miss_probability
    metrics = {
        f"{PREFIX}changed_fraction": m.changed_fraction,
        f"{PREFIX}ever_changed_fraction": m.ever_changed_fraction,
        f"{PREFIX}update_sparsity": m.update_sparsity,
        f"{PREFIX}tracked_elements": float(m.numel),
    }
    if m.has_churn:
        metrics[f"{PREFIX}churn_fraction"] = m.churn_fraction
    if m.step_changed is not None:
        metrics[f"{PREFIX}step_changed_fraction"] = m.step_changed_fraction
        metrics[f"{PREFIX}step_delta_bytes"] = float(m.step_delta_bytes)
    if p:
        metrics[f"{PREFIX}changed_fraction_upper"] = min(1.0, m._fraction(m.changed_upper))
    if m.nonfinite:
        metrics[f"{PREFIX}nonfinite_elements"] = float(m.nonfinite)

    def fraction(c: TensorCounts) -> float:
        return min(1.0, _corrected(c.changed, p) / c.numel) if c.numel else math.nan

    for module_type, counts in sorted(m.by_module_type().items()):
        metrics[f"{PREFIX}module/{module_type}/changed_fraction"] = fraction(counts)
    for layer, counts in sorted(m.by_layer().items()):
        metrics[f"{PREFIX}layer/{layer}/changed_fraction"] = fraction(counts)
    if per_tensor:
        for name, counts in m.tensors.items():
            metrics[f"{PREFIX}tensor/{name}/changed_fraction"] = fraction(counts)
    return metrics


def _summary(m: Measurement) -> dict[str, Any]:
    """JSON-serialisable summary of ``m`` (the ``report.json`` artifact)."""

    def row(c: TensorCounts) -> dict[str, int]:
        return {"numel": c.numel, "changed": c.changed, "ever_changed": c.ever_changed, "churn": c.churn}

    return {
        "step": m.step,
        "mode": m.mode,
        "numel": m.numel,
        "changed": m.changed,
        "changed_upper": m.changed_upper,
        "ever_changed": m.ever_changed,
        "changed_fraction": m.changed_fraction,
        "ever_changed_fraction": m.ever_changed_fraction,
        "update_sparsity": m.update_sparsity,
        "churn_fraction": m.churn_fraction if m.has_churn else None,
        "step_changed_fraction": m.step_changed_fraction,
        "step_delta_bytes": m.step_delta_bytes,
        "changed_miss_probability": m.changed_miss_probability,
        "nonfinite": m.nonfinite,
        "skipped": dict(m.skipped),
        "module_types": {k: row(v) for k, v in sorted(m.by_module_type().items())},
        "layers": {str(k): row(v) for k, v in sorted(m.by_layer().items())},
        "tensors": {k: row(v) for k, v in m.tensors.items()},
    }
