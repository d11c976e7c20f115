"""`SparsityCallback` for `transformers.Trainer` and every TRL trainer (GRPO, DPO, PPO, RLOO, SFT, ...).

A thin adapter: it maps the Trainer's events onto `_SparsitySession` (the engine glue shared with the
Lightning adapter) and holds no sparsity logic of its own::

    on_train_begin   -> session.start(model, [optimizer], global_step, resume_dir)
    on_optimizer_step-> session.on_optimizer_step(global_step + 1)   # after the step, before zero_grad
    on_step_end      -> control.should_log = True at a measured step
    on_log           -> the headline figures join the Trainer's `logs` (log line, log_history, reporters)
    on_save          -> session.save(<output_dir>/checkpoint-<global_step>)
    on_train_end     -> session.end(global_step)

Getting the figures to every reporter: the Trainer calls its callbacks in list order, and a user's
callbacks come after the reporting ones (``report_to``), so adding to ``logs`` in our own ``on_log`` would
reach the console and ``state.log_history`` but no reporter. At train begin the callback therefore puts a
small relay at the front of the Trainer's callback list that adds the headline figures to ``logs`` before
any reporter sees them. HF's ``MLflowCallback`` is bracketed by a relay that hides them from it and one that
puts them back: the MLflow sink already logs them into the same run, with its buffering and retries, so
every key has one value per step there.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import warnings
from types import FrameType
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import CallbackHandler

from sparsity_callbacks.config import SparsityConfig, _resolve_config
from sparsity_callbacks.report import HEADLINE_KEYS, _headline
from sparsity_callbacks.session import (
    TRACKER_FILE,
    _fresh_run_replaceable,
    _refuse_two_loggers,
    _saved_run,
    _SessionViews,
    _SparsitySession,
)

_log = logging.getLogger("sparsity_callbacks")

#: wrappers whose ``.module`` is the model itself (FSDP is left wrapped: its parameters are the shards).
_WRAPPERS = ("DistributedDataParallel", "DataParallel", "DeepSpeedEngine")
_CHECKPOINT_PREFIX = "checkpoint"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR


class SparsityCallback(_SessionViews, TrainerCallback):
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

    Attributes (read-only, the same as the Lightning callback's; None before train begin):
        tracker: the `SparsityTracker`; ``tracker.reference(name)`` is the reference of a tensor.
        freezer: the `MaskFreezer` once freezing began.
        last_measurement: the latest `Measurement` (the final one after train end).
        run_id: the MLflow run the metrics went to (after train end; None when not logging).
    """

    def __init__(self, config: SparsityConfig | None = None, **overrides: Any) -> None:
        self.config = _resolve_config(config, overrides)
        self._session: _SparsitySession | None = None
        self._save_warned = False
        self._handler: CallbackHandler | None = None  # the Trainer's, while our relays are in it
        self._headline: dict[str, float] = {}  # figures measured at `_headline_step`, not yet in `logs`
        self._headline_step: int | None = None
        self._hidden: dict[str, float] = {}  # taken out of `logs` while HF's MLflowCallback runs

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
        if self._session is not None:  # a previous train() of this callback did not reach on_train_end
            self._session.close()
        handler = _calling_handler(self)
        if handler is not None:
            _refuse_two_loggers(handler.callbacks, self)
        if model is None:
            raise ValueError(
                "SparsityCallback.on_train_begin got no `model`: it must be used as a callback of a "
                "transformers.Trainer (or a TRL trainer), e.g. Trainer(..., callbacks=[SparsityCallback()])."
            )
        model = _unwrap_model(model)
        step = int(state.global_step)
        resume_dir = _resume_dir(args, state) if step > 0 else None
        if resume_dir and state.is_world_process_zero and self.config.log_to_mlflow and not self.config.mlflow_run_id:
            _continue_saved_run(_saved_run(resume_dir), self.config.mlflow_tracking_uri)
        self._session = _SparsitySession(
            self.config,
            is_rank_zero=bool(state.is_world_process_zero),
            default_every_n_steps=_logging_interval(args, state),
            extra_params=_describe_tracked(model),
            clips_grad_norm=bool(args.max_grad_norm) and args.max_grad_norm > 0,
        )
        self._session.start(model, [optimizer], step, resume_dir)
        self._headline, self._headline_step = {}, None
        self._install_relays(handler)

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        # The Trainer calls this after `optimizer.step()` and before `global_step += 1`: the step just taken
        # is `global_step + 1`, the step at which the Trainer logs its own metrics for it.
        if self._session is None:
            return
        step = int(state.global_step) + 1
        measurement = self._session.on_optimizer_step(step, last=0 < state.max_steps <= step)
        if measurement is not None:
            self._headline = _headline(measurement)
            self._headline_step = step

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self._headline_step == state.global_step:
            control.should_log = True  # the Trainer writes a log line (with our figures) at every measured step

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ):
        if self._handler is None:  # no relay (the callback list was not found): console and log_history only
            self._add_headline(state, logs)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self._session is None:
            return
        folder = os.path.join(str(args.output_dir), f"{_CHECKPOINT_PREFIX}-{state.global_step}")
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
        self._session.save(folder)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self._session is None:
            return
        self._remove_relays()
        measurement = self._session.end(int(state.global_step))
        if measurement is not None and state.is_world_process_zero:
            _log.info(
                "sparsity_callbacks: step %s: changed %.4f, ever-changed %.4f of %d tracked elements%s",
                measurement.step,
                measurement.changed_fraction,
                measurement.ever_changed_fraction,
                measurement.numel,
                f" (MLflow run {self.run_id})" if self.run_id else "",
            )

    # --- the figures in the Trainer's logs ----------------------------------------------------------
    def _add_headline(self, state: TrainerState, logs: dict[str, float] | None) -> None:
        """Add the figures measured at this step to the Trainer's ``logs`` and to the ``state.log_history``
        entry the Trainer just made from them (a copy), once per measured step."""
        if logs is None or not self._headline or self._headline_step != state.global_step:
            return
        logs.update(self._headline)
        last = state.log_history[-1] if state.log_history else None
        if isinstance(last, dict) and last.get("step") == state.global_step:
            last.update(self._headline)
        self._headline = {}

    def _install_relays(self, handler: CallbackHandler | None) -> None:
        """Put `_HeadlineRelay`s into the Trainer's callback list (see the module docstring).

        The list is replaced, not changed in place: the Trainer is iterating over it right now."""
        self._remove_relays()
        if handler is None:
            return
        from transformers.integrations import MLflowCallback

        # Hidden from MLflowCallback only when the sink logs them (log_to_mlflow=False: MLflowCallback does).
        hide = self._session is not None and self._session.sink is not None
        callbacks: list[TrainerCallback] = [_HeadlineRelay(self, "add")]
        for callback in handler.callbacks:
            if hide and isinstance(callback, MLflowCallback):
                callbacks += [_HeadlineRelay(self, "hide"), callback, _HeadlineRelay(self, "restore")]
            else:
                callbacks.append(callback)
        handler.callbacks = callbacks
        self._handler = handler

    def _remove_relays(self) -> None:
        handler, self._handler = self._handler, None
        if handler is not None:
            handler.callbacks = [
                c for c in handler.callbacks if not (isinstance(c, _HeadlineRelay) and c.owner is self)
            ]

    def _relay(self, role: str, state: TrainerState, logs: dict[str, float] | None) -> None:
        if logs is None:
            return
        if role == "add":
            self._add_headline(state, logs)
        elif role == "hide":
            self._hidden = {key: logs.pop(key) for key in HEADLINE_KEYS if key in logs}
        else:
            logs.update(self._hidden)
            self._hidden = {}


class _HeadlineRelay(TrainerCallback):
    """One position in the Trainer's callback list where `SparsityCallback` works on ``logs``: ``"add"``
    (first in the list), ``"hide"`` / ``"restore"`` (around HF's ``MLflowCallback``)."""

    def __init__(self, owner: SparsityCallback, role: str) -> None:
        self.owner = owner
        self.role = role

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.owner._relay(self.role, state, logs)


# --- helpers (Trainer-specific; anything the Lightning adapter also needs lives in session.py) --------
def _calling_handler(callback: TrainerCallback) -> CallbackHandler | None:
    """The Trainer's `CallbackHandler` that is calling ``callback`` now (its ``call_event`` frame), or None
    when the event was called some other way. Transformers gives callbacks no reference to it."""
    frame: FrameType | None = sys._getframe(1)
    try:
        for _ in range(6):
            frame = frame.f_back
            if frame is None:
                return None
            handler = frame.f_locals.get("self")
            if isinstance(handler, CallbackHandler) and any(c is callback for c in handler.callbacks):
                return handler
        return None
    finally:
        del frame


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


def _continue_saved_run(saved: dict[str, Any] | None, tracking_uri: str | None) -> None:
    """Resuming after a crash with HF's ``MLflowCallback``: it has just opened a new run for this ``train()``;
    when the checkpoint's run (``saved``) is still RUNNING (its training was killed), close the new one and
    make the saved run the active run again, so HF's own metrics and ours continue in the
    one run of this training.

    Only a run that ``MLflowCallback`` opened itself (its ``_auto_end_run``) and that holds no metric yet is
    replaced: it is ended and marked deleted (MLflow's soft delete, restorable with ``mlflow runs restore``;
    it holds only the params HF logged at setup, which the original run has too). HF then ends the original
    run at train end. A run the user opened, a server that does not answer, or a saved run that does not
    exist leave everything as it is (our metrics then go into the active run).
    """
    import mlflow

    active = mlflow.active_run()
    if saved is None or active is None or active.info.run_id == saved["run_id"]:
        return
    uri = mlflow.get_tracking_uri()
    if (tracking_uri or uri) != uri:
        return
    trainer, _ = _running_training_loop()
    handler = getattr(trainer, "callback_handler", None)
    if not any(
        type(cb).__name__ == "MLflowCallback" and getattr(cb, "_auto_end_run", False)
        for cb in getattr(handler, "callbacks", ())
    ):
        return
    if not _fresh_run_replaceable(active.info.run_id, saved, uri):
        return
    from mlflow import MlflowClient

    mlflow.end_run()
    MlflowClient(uri).delete_run(active.info.run_id)
    mlflow.start_run(run_id=saved["run_id"])
    _log.info(
        "sparsity_callbacks: resumed training continues in MLflow run %s; the run %s that MLflowCallback opened "
        "for it was empty and is marked deleted.",
        saved["run_id"],
        active.info.run_id,
    )


def _running_training_loop() -> tuple[Any, str | None]:
    """``(trainer, resume_from_checkpoint)`` of the ``Trainer._inner_training_loop`` on the call stack, read
    from its frame; ``(None, None)`` when there is none (``resume_from_checkpoint`` is None too when that
    loop got no path).

    transformers (4.46 to 5.x) hands callbacks neither the `Trainer` nor the checkpoint being resumed:
    `TrainerState` is re-loaded from the checkpoint without its path, ``args.resume_from_checkpoint`` is
    only set when the user sets it, and callback state restored through ``ExportableState`` needs
    ``restore_callback_states_from_checkpoint=True``. ``tests/test_public_api.py`` checks that
    ``_inner_training_loop`` still takes that argument.
    """
    frame: FrameType | None = sys._getframe(1)
    try:
        while frame is not None:
            if frame.f_code.co_name == "_inner_training_loop":
                value = frame.f_locals.get("resume_from_checkpoint")
                path = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
                return frame.f_locals.get("self"), path
            frame = frame.f_back
        return None, None
    finally:
        del frame


def _resume_dir(args: TrainingArguments, state: TrainerState) -> str | None:
    """The checkpoint folder this training resumes from (``global_step > 0``).

    ``Trainer.train(resume_from_checkpoint=...)`` does not hand the path to callbacks, so the candidates
    are, in order: the path in ``args.resume_from_checkpoint``, the ``resume_from_checkpoint`` the running
    ``Trainer._inner_training_loop`` received (`_running_training_loop`), and
    ``<output_dir>/checkpoint-<global_step>``. The first holding a tracker state saved at this global step
    wins; else the first that exists (the session then warns that the reference restarts).
    """
    candidates: list[str] = []
    if isinstance(args.resume_from_checkpoint, str):
        candidates.append(args.resume_from_checkpoint)
    _, running = _running_training_loop()
    if running is not None:
        candidates.append(running)
    candidates.append(os.path.join(str(args.output_dir), f"{_CHECKPOINT_PREFIX}-{state.global_step}"))

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
