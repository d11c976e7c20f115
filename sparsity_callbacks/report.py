"""Flat metric dicts and JSON summaries of a `Measurement`: the ``sparsity/...`` keys logged to MLflow
and the trainers' loggers, and the ``report.json`` layout."""

from __future__ import annotations

import math
from typing import Any

from sparsity_callbacks.measurement import Measurement, TensorCounts

__all__ = ["PREFIX", "Measurement", "TensorCounts"]

PREFIX = "sparsity/"
#: MLflow's run page groups charts by the key up to its last ``/`` (and titles each chart by the rest), so
#: the headline keys form the group ``sparsity`` and each breakdown one group of its own.
BY_LAYER = f"{PREFIX}changed_fraction_by_layer/"
BY_MODULE = f"{PREFIX}changed_fraction_by_module/"
BY_TENSOR = f"{PREFIX}changed_fraction_by_tensor/"
#: the figures also shown where users look first: the trainer's log lines, progress bar and other loggers.
HEADLINE_KEYS = (
    f"{PREFIX}changed_fraction",
    f"{PREFIX}ever_changed_fraction",
    f"{PREFIX}churn_fraction",
    f"{PREFIX}update_sparsity",
)


def _headline(m: Measurement) -> dict[str, float]:
    """The `HEADLINE_KEYS` figures of ``m`` (fractions in [0, 1]; churn only when ``m.has_churn``), the same
    values as in `_metrics`, without the per-layer and per-module breakdown: what a trainer's log line
    needs on the training thread."""
    metrics = {
        f"{PREFIX}changed_fraction": m.changed_fraction,
        f"{PREFIX}ever_changed_fraction": m.ever_changed_fraction,
    }
    if m.has_churn:
        metrics[f"{PREFIX}churn_fraction"] = m.churn_fraction
    metrics[f"{PREFIX}update_sparsity"] = m.update_sparsity
    return metrics


def _metrics(m: Measurement, per_tensor: bool = False) -> dict[str, float]:
    """The flat ``sparsity/...`` metric dict of ``m`` (fractions in [0, 1]), in three MLflow chart groups:
    the headline keys ``sparsity/<figure>``, ``sparsity/changed_fraction_by_layer/layer_<i>`` (``i``
    zero-padded to at least two digits, so the charts sort by depth) and
    ``sparsity/changed_fraction_by_module/<module type>``; with ``per_tensor``, also
    ``sparsity/changed_fraction_by_tensor/<parameter name>``. The number of tracked elements is a
    constant, logged as the param ``sparsity.tracked_elements``, not here."""
    p = m.changed_miss_probability
    metrics = _headline(m)
    if m.step_changed is not None:
        metrics[f"{PREFIX}step_changed_fraction"] = m.step_changed_fraction  # type: ignore[assignment]
        metrics[f"{PREFIX}step_delta_bytes"] = float(m.step_delta_bytes)  # type: ignore[arg-type]
    if p:
        metrics[f"{PREFIX}changed_fraction_upper"] = min(1.0, m._fraction(m.changed_upper))
    if m.nonfinite:
        metrics[f"{PREFIX}nonfinite_elements"] = float(m.nonfinite)
    if m.changed_native is not None:
        metrics[f"{PREFIX}changed_fraction_native"] = m.changed_fraction_native  # type: ignore[assignment]

    def fraction(c: TensorCounts) -> float:
        return min(1.0, m._estimate(c.changed, p) / c.numel) if c.numel else math.nan

    layers = m.by_layer()
    width = max(2, len(str(max(layers, default=0))))
    for layer, counts in sorted(layers.items()):
        metrics[f"{BY_LAYER}layer_{layer:0{width}d}"] = fraction(counts)
    for module_type, counts in sorted(m.by_module_type().items()):
        metrics[f"{BY_MODULE}{module_type}"] = fraction(counts)
    if per_tensor:
        for name, counts in m.tensors.items():
            metrics[f"{BY_TENSOR}{name}"] = fraction(counts)
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
        "fingerprint_estimate": m.fingerprint_estimate,
        "changed_fraction_native": m.changed_fraction_native,
        "nonfinite": m.nonfinite,
        "skipped": dict(m.skipped),
        "module_types": {k: row(v) for k, v in sorted(m.by_module_type().items())},
        "layers": {str(k): row(v) for k, v in sorted(m.by_layer().items())},
        "tensors": {k: row(v) for k, v in m.tensors.items()},
    }
