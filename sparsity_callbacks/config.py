"""`SparsityConfig`: the one place every option lives, validated eagerly."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from sparsity_callbacks._rules import COMPARE_DTYPES

_MODES = ("exact", "fingerprint", "auto")
_COMPARE_DTYPES = tuple(COMPARE_DTYPES)
_FINGERPRINT_BITS = (8, 16)


def _dtype_name(value: Any) -> Any:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, str):
        return value.removeprefix("torch.")
    return value


def _bad(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"`{name}` must be {allowed}, got {value!r}.")


@dataclass
class SparsityConfig:
    """Options shared by `SparsityTracker` and every `SparsityCallback`.

    Args:
        every_n_steps: measure every this many optimizer steps. ``None``: the framework's logging
            interval (HF ``logging_steps``, Lightning ``log_every_n_steps``); the tracker itself does
            not schedule.
        mode: how the reference is held. ``"exact"``: a host copy in ``compare_dtype`` (1x parameter
            bytes in that dtype). ``"fingerprint"``: ``fingerprint_bits`` per element on the device;
            changes of fewer than 255 ulps are always detected, larger ones are missed with
            probability 1/255 (k=8) and the count is corrected. ``"auto"``: ``exact`` when host RAM
            allows, else ``fingerprint`` (the choice and the reason are logged).
        fingerprint_bits: 8 or 16 bits per element for ``fingerprint`` mode (and for churn).
        compare_dtype: compare as this dtype (``"bfloat16"`` reproduces measurements of bf16
            checkpoints: drift below one bf16 ulp counts as unchanged). ``None``: the parameter's dtype.
        atol: an element is changed iff ``|w - ref| > atol``. 0 means "any bit differs". Needs ``exact``.
        include: regular expressions (``re.search``) on parameter names; if given, only matching
            parameters are tracked.
        exclude: regular expressions on parameter names never tracked.
        per_tensor_metrics: also log ``sparsity/changed_fraction_by_tensor/<name>`` (off: long runs stay small).
        track_churn: keep a fingerprint of the previous measurement to report churn (costs
            ``fingerprint_bits`` more per element on the device).
        chunk_numel: elements compared at once; bounds the extra device memory of ``exact`` mode to
            about ``chunk_numel * (2 * itemsize + 1)`` bytes.
        compile: fuse each measurement into one `torch.compile`d kernel per chunk (several times faster
            on CPU; ~10 s of compile, once). True: compile at the first measurement; False: never. ``None``:
            decided by measurement: eager until the eager measurements have taken as long as one
            compilation, then compiled on a background thread (off the training thread's critical path);
            a small model measured a few times never compiles. Falls back to eager with a warning if
            compilation fails.
        reference_dir: if set, the ``exact`` reference is a memory-mapped file in this folder instead
            of RAM (for models larger than host RAM).
        freeze_mask: ``None``, ``"discover"``, a mask file path or an MLflow artifact URI
            (``runs:/<run_id>/sparsity/mask.safetensors``, ``mlflow-artifacts:/...``).
        freeze_after_steps: with ``freeze_mask="discover"``: the ever-changed mask after this many
            optimizer steps becomes the trainable set.
        mask_density_cap: keep at most this fraction (0, 1] of tracked elements trainable, the ones
            with the largest ``|w - ref|``, when the discovered mask is denser.
        compact_optimizer_state: when freezing, let the elementwise ``torch.optim`` optimizers (SGD, Adam,
            AdamW, NAdam, RAdam, RMSprop, Adagrad, Adamax, Adadelta, Rprop, ASGD) step only the trainable
            elements: fully frozen tensors leave the step, partly frozen ones are stepped as a 1-D tensor of
            their trainable elements, so optimizer state and step work scale with the mask's density. The
            weights are bit-identical to dense freezing (``False``), which other optimizers (Adafactor, Muon,
            LBFGS, ``fused=True`` on the CPU, unknown classes) keep using, with a note saying why.
        allow_unsigned_mask: freeze to a mask file whose tensors carry no reference-weight signatures (made by
            hand, or with its ``signatures`` removed), which cannot be checked against this model's base weights.
            Off: such a mask is refused.
        log_to_mlflow: log metrics, params and artifacts to MLflow.
        log_artifacts: at the end, log the mask, ``report.json`` and the plots as artifacts.
        mlflow_experiment: experiment name for a run we start ourselves.
        mlflow_run_id: log into this existing run.
        mlflow_tracking_uri: tracking URI for a run we start ourselves (default: ``MLFLOW_TRACKING_URI``
            read at run time, else MLflow's default).
        mlflow_end_timeout_s: seconds the end of training waits at most for MLflow to take what is still
            queued (the final metrics and the artifacts); what is left is written to a fallback file. With
            the server unreachable at that moment the wait ends after one failed attempt.
    """

    every_n_steps: int | None = None
    mode: str = "auto"
    fingerprint_bits: int = 8
    compare_dtype: str | None = None
    atol: float = 0.0
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    per_tensor_metrics: bool = False
    track_churn: bool = True
    chunk_numel: int = 1 << 24
    compile: bool | None = None
    reference_dir: str | None = None
    freeze_mask: str | None = None
    freeze_after_steps: int | None = None
    mask_density_cap: float | None = None
    allow_unsigned_mask: bool = False
    compact_optimizer_state: bool = True
    log_to_mlflow: bool = True
    log_artifacts: bool = True
    mlflow_experiment: str | None = None
    mlflow_run_id: str | None = None
    mlflow_tracking_uri: str | None = None
    mlflow_end_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        self.compare_dtype = _dtype_name(self.compare_dtype)
        if isinstance(self.include, str):
            self.include = (self.include,)
        if isinstance(self.exclude, str):
            self.exclude = (self.exclude,)
        self.include = tuple(self.include)
        self.exclude = tuple(self.exclude)
        self.validate()

    def validate(self) -> None:
        """Raise `ValueError` naming the first invalid field, its value and what is allowed."""
        if self.every_n_steps is not None and (
            isinstance(self.every_n_steps, bool) or not isinstance(self.every_n_steps, int) or self.every_n_steps < 1
        ):
            raise _bad("every_n_steps", self.every_n_steps, "a positive int or None")
        if self.mode not in _MODES:
            raise _bad("mode", self.mode, f"one of {_MODES}")
        if self.fingerprint_bits not in _FINGERPRINT_BITS:
            raise _bad("fingerprint_bits", self.fingerprint_bits, f"one of {_FINGERPRINT_BITS}")
        if self.compare_dtype is not None and self.compare_dtype not in _COMPARE_DTYPES:
            raise _bad("compare_dtype", self.compare_dtype, f"None or one of {_COMPARE_DTYPES}")
        if isinstance(self.atol, bool) or not isinstance(self.atol, (int, float)) or not self.atol >= 0:
            raise _bad("atol", self.atol, "a finite float >= 0")
        if self.atol > 0 and self.mode == "fingerprint":
            raise ValueError(
                f"`atol`={self.atol} needs the reference values, which `mode='fingerprint'` does not keep. "
                "HINT: use mode='exact' (or 'auto'), or atol=0."
            )
        for name in ("include", "exclude"):
            import re

            for pattern in getattr(self, name):
                if not isinstance(pattern, str):
                    raise _bad(name, getattr(self, name), "a tuple of regular-expression strings")
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ValueError(
                        f"`{name}` pattern {pattern!r} is not a valid regular expression: {err}."
                    ) from None
        for name in (
            "per_tensor_metrics",
            "track_churn",
            "allow_unsigned_mask",
            "compact_optimizer_state",
            "log_to_mlflow",
            "log_artifacts",
        ):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, getattr(self, name), "True or False")
        if self.compile is not None and not isinstance(self.compile, bool):
            raise _bad("compile", self.compile, "True, False or None")
        if isinstance(self.chunk_numel, bool) or not isinstance(self.chunk_numel, int) or self.chunk_numel < 1024:
            raise _bad("chunk_numel", self.chunk_numel, "an int >= 1024")
        if self.freeze_mask is not None and not isinstance(self.freeze_mask, str):
            raise _bad("freeze_mask", self.freeze_mask, "None, 'discover', a file path or an MLflow artifact URI")
        if self.freeze_after_steps is not None and (
            isinstance(self.freeze_after_steps, bool)
            or not isinstance(self.freeze_after_steps, int)
            or self.freeze_after_steps < 1
        ):
            raise _bad("freeze_after_steps", self.freeze_after_steps, "a positive int or None")
        if self.freeze_mask == "discover" and self.freeze_after_steps is None:
            raise ValueError(
                "`freeze_mask='discover'` needs `freeze_after_steps`: the number of optimizer steps after which "
                "the ever-changed mask becomes the trainable set (e.g. freeze_after_steps=50)."
            )
        if self.freeze_after_steps is not None and self.freeze_mask != "discover":
            raise ValueError(
                f"`freeze_after_steps`={self.freeze_after_steps} only applies to `freeze_mask='discover'`, "
                f"got freeze_mask={self.freeze_mask!r}."
            )
        if self.mask_density_cap is not None and (
            isinstance(self.mask_density_cap, bool)
            or not isinstance(self.mask_density_cap, (int, float))
            or not 0 < self.mask_density_cap <= 1
        ):
            raise _bad("mask_density_cap", self.mask_density_cap, "a fraction in (0, 1] or None")
        if self.mask_density_cap is not None and self.mode == "fingerprint":
            raise ValueError(
                f"`mask_density_cap`={self.mask_density_cap} ranks elements by |w - ref|, and `mode='fingerprint'` "
                "keeps no reference values. HINT: use mode='exact' (or 'auto')."
            )
        for name in ("reference_dir", "mlflow_experiment", "mlflow_run_id", "mlflow_tracking_uri"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise _bad(name, value, "a string or None")

        value = self.mlflow_end_timeout_s
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise _bad("mlflow_end_timeout_s", value, "a positive, finite number of seconds")

    def replace(self, **overrides: Any) -> SparsityConfig:
        """A copy with ``overrides`` applied (validated). Unknown names raise `TypeError`."""
        known = {f.name for f in dataclasses.fields(self) if not f.name.startswith("_")}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"Unknown SparsityConfig option(s) {unknown}; allowed: {sorted(known)}.")
        return dataclasses.replace(self, **overrides)

    def to_params(self) -> dict[str, str]:
        """The options as flat MLflow params ``sparsity.<field>`` (strings)."""
        return {
            f"sparsity.{f.name}": str(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if not f.name.startswith("_")
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict of the options."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in dataclasses.fields(self)
            if not f.name.startswith("_")
        }


def _resolve_config(config: SparsityConfig | None, overrides: dict[str, Any]) -> SparsityConfig:
    """``config`` (or the defaults) with keyword ``overrides`` applied (tracker and callbacks)."""
    if config is not None and not isinstance(config, SparsityConfig):
        raise TypeError(f"`config` must be a SparsityConfig or None, got {type(config).__name__}.")
    return (config or SparsityConfig()).replace(**overrides) if overrides else (config or SparsityConfig())
