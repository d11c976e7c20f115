"""`SparsityCallback` for `transformers.Trainer` and every TRL trainer (GRPO, DPO, PPO, RLOO, SFT, ...).

A thin adapter: it maps the Trainer's events onto `_SparsitySession` (the engine glue shared with the
Lightning adapter) and holds no sparsity logic of its own::

    on_train_begin   -> session.start(model, [optimizer], global_step, resume_dir)
    on_optimizer_step-> session.on_optimizer_step(global_step + 1)   # after the step, before zero_grad
    on_save          -> session.save(<output_dir>/checkpoint-<global_step>)
    on_train_end     -> session.end(global_step)
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import warnings
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from sparsity_callbacks.config import SparsityConfig, _resolve_config
from sparsity_callbacks.report import Measurement
from sparsity_callbacks.session import TRACKER_FILE, _SparsitySession

_log = logging.getLogger("sparsity_callbacks")

#: wrappers whose ``.module`` is the model itself (FSDP is left wrapped: its parameters are the shards).
_WRAPPERS = ("DistributedDataParallel", "DataParallel", "DeepSpeedEngine")
_CHECKPOINT_PREFIX = "checkpoint"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR


class SparsityCallback(TrainerCallback):
    """Track which weights training changes (and optionally freeze to a mask), live in MLflow.

    Works with `transformers.Trainer` and every TRL trainer, which pass ``callbacks=`` on to it::

        trainer = GRPOTrainer(..., callbacks=[SparsityCallback(compare_dtype="bfloat16")])
        SparsityCallback(freeze_mask="discover", freeze_after_steps=50)   # train only the discovered subnetwork

    At train begin the trainable parameters are snapshotted (the *reference*); after every
    ``every_n_steps``-th optimizer step (default: ``TrainingArguments.logging_steps``) the changed /
    ever-changed / churn fractions, per module type and per layer, are logged as ``sparsity/...`` metrics at
    the trainer's global step, so they line up with the trainer's own ``loss``. With gradient accumulation
    one optimizer step is one step. At train end the ever-changed mask, ``report.json`` and the plots are
    logged as artifacts under ``sparsity/``.

    MLflow: with ``report_to="mlflow"`` the metrics go into the run of the Trainer's own ``MLflowCallback``
    (``mlflow.active_run()``); otherwise into a run started for this training (``MLFLOW_TRACKING_URI`` or
    MLflow's default store, ``mlflow_experiment`` / ``MLFLOW_EXPERIMENT_NAME``), or into ``mlflow_run_id``.
    Never a second run for one training. Only the main process logs and writes shared files.

    Checkpoints: ``sparsity_tracker.safetensors`` (the reference and the ever-changed mask) is written into
    every ``checkpoint-<step>`` folder, so ``trainer.train(resume_from_checkpoint=...)`` keeps the original
    reference and the cumulative curve continues.

    PEFT / LoRA: only trainable parameters are tracked, i.e. the adapter weights; the param
    ``sparsity.tracked`` says so.

    Args:
        config: the options (`SparsityConfig`); default ``SparsityConfig()``.
        **overrides: any `SparsityConfig` field, applied on top of ``config`` (e.g. ``mode="fingerprint"``,
            ``compare_dtype="bfloat16"``, ``every_n_steps=10``, ``freeze_mask="discover"``,
            ``freeze_after_steps=50``, ``mlflow_experiment="rl"``).

    Attributes (after train begin):
        session: the `_SparsitySession` of the current / last training (tracker, freezer, sink).
        tracker: its `SparsityTracker`; ``tracker.reference(name)`` is the reference of a tensor.
        last_measurement: the latest `Measurement` (the final one after train end).
        run_id: the MLflow run the metrics went to (after train end; None when not logging).
    """

    def __init__(self, config: SparsityConfig | None = None, **overrides: Any) -> None:
        self.config = _resolve_config(config, overrides)
        self.session: _SparsitySession | None = None
        self.run_id: str | None = None
        self._save_warned = False

    # --- read-only views -------------------------------------------------------------------------
    @property
    def tracker(self):
        return None if self.session is None else self.session.tracker

    @property
    def freezer(self):
        return None if self.session is None else self.session.freezer

    @property
    def last_measurement(self) -> Measurement | None:
        return None if self.session is None else self.session.last_measurement

    # --- events ----------------------------------------------------------------------------------
    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        if self.session is not None:  # a previous train() of this callback did not reach on_train_end
            self.session.close()
        if model is None:
            raise ValueError(
                "SparsityCallback.on_train_begin got no `model`: it must be used as a callback of a "
                "transformers.Trainer (or a TRL trainer), e.g. Trainer(..., callbacks=[SparsityCallback()])."
            )
        model = _unwrap_model(model)
        step = int(state.global_step)
        self.run_id = None
        self.session = _SparsitySession(
            self.config,
            is_rank_zero=bool(state.is_world_process_zero),
            default_every_n_steps=_logging_interval(args, state),
            extra_params=_describe_tracked(model),
            clips_grad_norm=bool(args.max_grad_norm) and args.max_grad_norm > 0,
        )
        self.session.start(model, [optimizer], step, _resume_dir(args, state) if step > 0 else None)

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        # The Trainer calls this after `optimizer.step()` and before `global_step += 1`: the step just taken
        # is `global_step + 1`, the step at which the Trainer logs its own metrics for it.
        if self.session is not None:
            self.session.on_optimizer_step(int(state.global_step) + 1)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self.session is None:
            return
        folder = os.path.join(args.output_dir, f"{_CHECKPOINT_PREFIX}-{state.global_step}")
        if not os.path.isdir(folder):
            # e.g. a hyperparameter-search trial writes into <output_dir>/<run name>/checkpoint-<step>.
            if not self._save_warned:
                self._save_warned = True
                warnings.warn(
                    f"SparsityCallback: checkpoint folder {folder!r} not found; the sparsity tracker state is not "
                    "saved with this checkpoint, so resuming from it restarts the reference.",
                    stacklevel=2,
                )
            return
        self.session.save(folder)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self.session is None:
            return
        sink = self.session.sink
        measurement = self.session.end(int(state.global_step))
        self.run_id = sink.run_id if sink is not None else None  # after `end`: never waits for the server
        if measurement is not None and state.is_world_process_zero:
            _log.info(
                "sparsity_callbacks: step %s: changed %.4f, ever-changed %.4f of %d tracked elements%s",
                measurement.step,
                measurement.changed_fraction,
                measurement.ever_changed_fraction,
                measurement.numel,
                f" (MLflow run {self.run_id})" if self.run_id else "",
            )


# --- helpers (Trainer-specific; anything the Lightning adapter also needs lives in session.py) --------
def _unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP / DataParallel / DeepSpeedEngine / ``torch.compile`` wrappers. FSDP stays
    wrapped (the tracker reads its local shards)."""
    for _ in range(8):
        inner = model.__dict__.get("_orig_mod")  # torch.compile's OptimizedModule
        if inner is None and type(model).__name__ in _WRAPPERS:
            inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            break
        model = inner
    return model


def _is_peft(model: torch.nn.Module) -> bool:
    if getattr(model, "_hf_peft_config_loaded", False):  # adapters added with transformers' `add_adapter`
        return True
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _describe_tracked(model: torch.nn.Module) -> dict[str, str]:
    """Params saying what is tracked (PEFT: only the trainable adapter weights, not the base model)."""
    if _is_peft(model):
        return {"sparsity.tracked": "trainable adapter weights (PEFT); the frozen base model is not tracked"}
    return {"sparsity.tracked": "trainable parameters"}


def _logging_interval(args: TrainingArguments, state: TrainerState) -> int:
    """``logging_steps`` as a number of optimizer steps (a ratio < 1 is a fraction of ``max_steps``)."""
    steps = getattr(state, "logging_steps", None) or args.logging_steps
    if steps is not None and 0 < steps < 1:
        steps = math.ceil(max(1, state.max_steps) * steps)
    return max(1, int(steps or 1))


def _resume_dir(args: TrainingArguments, state: TrainerState) -> str | None:
    """The checkpoint folder this training resumes from (``global_step > 0``).

    ``Trainer.train(resume_from_checkpoint=...)`` does not hand the path to callbacks, so the candidates
    are, in order: the path in ``args.resume_from_checkpoint``, the ``resume_from_checkpoint`` the running
    ``Trainer._inner_training_loop`` received (read from its frame), and
    ``<output_dir>/checkpoint-<global_step>``. The first holding a tracker state saved at this global step
    wins; else the first that exists (the session then warns that the reference restarts).
    """
    candidates: list[str] = []
    if isinstance(args.resume_from_checkpoint, str):
        candidates.append(args.resume_from_checkpoint)
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_inner_training_loop":
            value = frame.f_locals.get("resume_from_checkpoint")
            if isinstance(value, (str, os.PathLike)):
                candidates.append(os.fspath(value))
            break
        frame = frame.f_back
    del frame
    candidates.append(os.path.join(args.output_dir, f"{_CHECKPOINT_PREFIX}-{state.global_step}"))

    def saved_step(folder: str) -> int | None:
        try:
            with open(os.path.join(folder, "trainer_state.json")) as f:
                return int(json.load(f)["global_step"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    with_state = [c for c in candidates if os.path.isfile(os.path.join(c, TRACKER_FILE))]
    for folder in with_state:
        if saved_step(folder) in (None, state.global_step):
            return folder
    existing = [c for c in candidates if os.path.isdir(c)]
    return (with_state or existing or candidates)[0]
