"""`SparsityCallback` for Lightning (``lightning.pytorch``, or the standalone ``pytorch_lightning``).

A thin adapter: Lightning's events are mapped onto `_SparsitySession` (``start`` / ``on_optimizer_step`` /
``save`` / ``end``), which owns the tracker, the MLflow sink and the mask freezer.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import torch
from typing_extensions import override

from sparsity_callbacks.config import SparsityConfig, _resolve_config
from sparsity_callbacks.report import Measurement, _headline
from sparsity_callbacks.session import (
    TRACKER_FILE,
    _fresh_run_replaceable,
    _refuse_two_loggers,
    _saved_run,
    _SessionViews,
    _SparsitySession,
)

_log = logging.getLogger("sparsity_callbacks")

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - only the standalone package is installed
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError as err:
        raise ImportError(
            "sparsity_callbacks.integrations.lightning needs Lightning. "
            "HINT: pip install 'sparsity-callbacks[lightning]' (or `pytorch_lightning`)."
        ) from err

_ON_MISSING_STATE = ("raise", "resnapshot")
_STATE_VERSION = 1
#: folder written next to the checkpoints, one per global step: ``sparsity_state-step=<N>``.
STATE_DIR_PREFIX = "sparsity_state-step="


class SparsityCallback(_SessionViews, pl.Callback):
    """Measure which weights training changes, live in MLflow; optionally freeze training to a mask.

    Example::

        from lightning.pytorch import Trainer
        from lightning.pytorch.loggers import MLFlowLogger
        from sparsity_callbacks.integrations.lightning import SparsityCallback

        trainer = Trainer(logger=MLFlowLogger(tracking_uri="sqlite:///mlflow.db"),
                          callbacks=[SparsityCallback(compare_dtype="bfloat16")])
        trainer.fit(model, datamodule)

    Steps: measurements follow ``trainer.global_step`` after the optimizer step, Lightning's count of
    optimizer steps; the figures of the measurement after optimizer step ``k`` are logged at step ``k - 1``,
    where Lightning logs its own ``loss`` of the batches of that step, so the curves line up. With automatic
    optimization and ``accumulate_grad_batches=k`` that is one step per ``k`` batches; with manual
    optimization it counts every ``optimizer.step()`` of every optimizer (two optimizers stepped per batch
    advance it by two). The weights are compared at the end of each training batch in which
    ``global_step`` crossed a multiple of ``every_n_steps`` (default: ``Trainer(log_every_n_steps=...)``),
    i.e. after all optimizer steps of that batch, and once more when training ends. The reference is taken in
    ``on_train_start``: after the checkpoint of ``trainer.fit(ckpt_path=...)`` (weights, optimizer state,
    this callback's state) has been restored and before the first optimizer step.

    Logging: when the trainer has an ``MLFlowLogger``, the metrics, params and artifacts go into *its* run
    (same run id and tracking URI); otherwise into ``mlflow.active_run()`` or a new run (see `MLflowSink`).
    The headline figures (``sparsity/changed_fraction``, ``ever_changed_fraction``, ``churn_fraction``,
    ``update_sparsity``) are also passed to the trainer's other loggers (CSV, TensorBoard, ...) at
    ``step=trainer.global_step``, and shown in the progress bar and ``trainer.callback_metrics`` (the final
    figures of ``on_train_end`` in ``callback_metrics`` only). Only global rank 0 logs; every rank measures
    (sharded parameters, e.g. FSDP2, are counted by summing the ranks' counts, so every rank must run the same
    steps; DDP replicas are counted once).

    Checkpoints: the callback's entry in the ``.ckpt`` is small (step, folder, config). The tracker state (the
    original reference, the ever-changed mask, churn fingerprints; about 1x the tracked bytes in
    ``compare_dtype``) and the freeze mask go into a folder ``sparsity_state-step=<N>`` beside the checkpoints
    (``ModelCheckpoint.dirpath``, else ``trainer.default_root_dir``), one file per rank for sharded
    parameters. On ``trainer.fit(ckpt_path=...)`` it is looked up at the recorded path, then next to the
    checkpoint file, and loaded before training continues, so the cumulative curve continues from the
    original reference. Copy that folder along with the ``.ckpt`` when moving checkpoints.

    Args:
        config: the options (`SparsityConfig`); keyword ``overrides`` replace single fields, e.g.
            ``SparsityCallback(compare_dtype="bfloat16", every_n_steps=10)``,
            ``SparsityCallback(freeze_mask="discover", freeze_after_steps=50)``.
        on_missing_state: what to do when resuming from a checkpoint whose sparsity state folder cannot be
            found. ``"raise"`` (default): a ``FileNotFoundError`` naming the expected path. ``"resnapshot"``:
            warn and take the current weights as the new reference (the cumulative curve starts over).
            A checkpoint saved without this callback always gives the warning and a new reference.

    Attributes (read-only, the same as the Hugging Face callback's; None before ``on_train_start``):
        tracker: the `SparsityTracker`; freezer: the `MaskFreezer` once freezing began;
        last_measurement: the latest `Measurement`; run_id: the MLflow run logged into (after training).
    """

    def __init__(
        self, config: SparsityConfig | None = None, *, on_missing_state: str = "raise", **overrides: Any
    ) -> None:
        super().__init__()
        self.config = _resolve_config(config, overrides)
        if on_missing_state not in _ON_MISSING_STATE:
            raise ValueError(f"`on_missing_state` must be any of {_ON_MISSING_STATE}, got {on_missing_state!r}.")
        self.on_missing_state = on_missing_state
        self._session: _SparsitySession | None = None
        self._last_step: int | None = None
        self._last_logged_step: int | None = None
        self._saved: dict[str, Any] = {}  # what `state_dict` returns: the last side folder written
        self._resumed: dict[str, Any] | None = None  # what `load_state_dict` received

    # --- Lightning hooks -------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()
        _refuse_two_loggers(trainer.callbacks, self)  # type: ignore[attr-defined]
        step = trainer.global_step
        resume_dir = self._resume_dir(trainer, step)
        if resume_dir and trainer.is_global_zero and self.config.log_to_mlflow and not self.config.mlflow_run_id:
            _continue_saved_run(trainer, _saved_run(resume_dir))
        run_id, tracking_uri = _mlflow_logger_run(trainer) if trainer.is_global_zero else (None, None)
        self._session = _SparsitySession(
            self.config,
            is_rank_zero=trainer.is_global_zero,
            default_every_n_steps=trainer.log_every_n_steps,  # type: ignore[attr-defined]
            run_id=self.config.mlflow_run_id or run_id,
            tracking_uri=self.config.mlflow_tracking_uri or tracking_uri,
            extra_params={
                "sparsity.framework": f"{pl.__name__} {pl.__version__}",
                "sparsity.step": "trainer.global_step - 1 (the step of Lightning's own loss for that optimizer step)",
            },
            # Lightning logs a batch's `loss` before its optimizer step counts (at global_step - 1): the
            # measurement after optimizer step k goes to step k - 1, so the two curves line up.
            log_step_offset=-1,
            clips_grad_norm=_may_clip_grad_norm(trainer, pl_module),
        )
        self._session.start(pl_module, list(trainer.optimizers), step, resume_dir=resume_dir)
        self._last_step = step
        self._last_logged_step = None

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self._session is None or step == self._last_step:
            return  # no optimizer step in this batch (gradient accumulation)
        self._last_step = step
        measurement = self._session.on_optimizer_step(step)
        if measurement is not None:
            pl_module.log_dict(_headline(measurement), prog_bar=True, logger=False, on_step=True, on_epoch=False)
            self._log_headline(trainer, measurement)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._session is None:
            return
        measurement = self._session.end(trainer.global_step)  # closes the session; it stays readable
        if measurement is not None:
            # `pl_module.log` is not allowed in on_train_end: the final figures go to callback_metrics directly
            trainer.callback_metrics.update({k: torch.tensor(v) for k, v in _headline(measurement).items()})
            self._log_headline(trainer, measurement)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close()  # flush what was measured; the run of an MLFlowLogger is ended by the logger

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._close()

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        session = self._session
        if session is None or session.tracker is None or "callbacks" not in checkpoint:
            return  # not training, or a weights-only checkpoint (no callback state is restored from it)
        directory = self._state_dir(trainer)
        if directory is None:
            return
        session.save(directory)  # every rank writes its file (sharded) / rank 0 the freeze mask
        self._saved = {
            "version": _STATE_VERSION,
            "step": trainer.global_step,
            "state_dir": directory,
            "state_dir_name": os.path.basename(directory),
            "tracker_file": TRACKER_FILE,
            "frozen": session.freezer is not None,
            "config": self.config.to_dict(),
        }
        checkpoint["callbacks"][self.state_key] = self.state_dict()

    @override
    def state_dict(self) -> dict[str, Any]:
        """Small and tensor-free: the step, the side folder of the last checkpoint and the config."""
        return dict(self._saved)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if state_dict.get("version") != _STATE_VERSION or "state_dir" not in state_dict:
            raise ValueError(
                f"The checkpoint's SparsityCallback state has an unknown format (version "
                f"{state_dict.get('version')!r}, keys {sorted(state_dict)}). HINT: resume with the sparsity_callbacks "
                "version that wrote it."
            )
        self._resumed = dict(state_dict)
        self._saved = dict(state_dict)

    # --- internals -------------------------------------------------------------------------------
    def _state_dir(self, trainer: pl.Trainer) -> str | None:
        base = getattr(trainer.checkpoint_callback, "dirpath", None) or trainer.default_root_dir
        base = os.fspath(base)
        if "://" in base and not base.startswith("file://"):
            if "remote" not in getattr(self, "_warned", set()):
                self._warned = {"remote"}
                warnings.warn(
                    f"SparsityCallback: checkpoints go to {base!r}, which is not a local path; the sparsity state is "
                    "not saved beside them, so resuming will need on_missing_state='resnapshot'.",
                    stacklevel=2,
                )
            return None
        return os.path.abspath(os.path.join(base.removeprefix("file://"), f"{STATE_DIR_PREFIX}{trainer.global_step}"))

    def _resume_dir(self, trainer: pl.Trainer, step: int) -> str | None:
        """The side folder of the checkpoint being resumed (None: none, take a new reference)."""
        state, self._resumed = self._resumed, None
        if state is None:
            return None  # fresh start, or a checkpoint written without this callback (the session warns)
        name = state.get("tracker_file", TRACKER_FILE)  # rank 0's file; sharded runs have one per rank beside it
        candidates = [state["state_dir"]]
        ckpt_path = getattr(trainer, "ckpt_path", None)
        if ckpt_path:
            candidates.append(
                os.path.join(os.path.dirname(os.path.abspath(os.fspath(ckpt_path))), state["state_dir_name"])
            )
        for directory in candidates:
            if os.path.isfile(os.path.join(directory, name)):
                return directory
        expected = " or ".join(repr(os.path.join(d, name)) for d in dict.fromkeys(candidates))
        message = (
            f"SparsityCallback: the checkpoint{f' {os.fspath(ckpt_path)!r}' if ckpt_path else ''} was saved at step "
            f"{state.get('step')} with its sparsity state in {expected}, which does not exist. It holds the original "
            "reference and the ever-changed mask that the cumulative curve continues from."
        )
        if self.on_missing_state == "raise":
            raise FileNotFoundError(
                f"{message} HINT: copy the {state['state_dir_name']!r} folder next to the checkpoint, or pass "
                "SparsityCallback(..., on_missing_state='resnapshot') to take the current weights as a new reference "
                "(the cumulative curve starts over)."
            )
        warnings.warn(
            f"{message} on_missing_state='resnapshot': the current weights (step {step}) are the new "
            "reference; the cumulative curve starts over.",
            stacklevel=3,
        )
        return None

    def _log_headline(self, trainer: pl.Trainer, measurement: Measurement) -> None:
        """Give the headline figures to the trainer's loggers other than MLflow's (the sink logs those)."""
        if not trainer.is_global_zero or measurement.step == self._last_logged_step:
            return
        self._last_logged_step = measurement.step
        loggers = [lg for lg in trainer.loggers if not _is_mlflow_logger(lg)]
        if not loggers:
            return
        headline = _headline(measurement)
        for logger in loggers:
            logger.log_metrics(headline, step=self._session.log_step(trainer.global_step))

    def _close(self) -> None:
        if self._session is not None:
            self._session.close()  # idempotent; the session stays readable (`last_measurement`, `tracker`)


def _may_clip_grad_norm(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
    """Whether gradients may be clipped by norm: ``gradient_clip_val`` with the norm algorithm, a custom
    ``configure_gradient_clipping``, or manual optimization (the module's own code may clip)."""
    if not pl_module.automatic_optimization:
        return True
    if type(pl_module).configure_gradient_clipping is not pl.LightningModule.configure_gradient_clipping:
        return True
    return bool(trainer.gradient_clip_val) and trainer.gradient_clip_algorithm in (None, "norm")


def _is_mlflow_logger(logger: Any) -> bool:
    return isinstance(logger, pl.loggers.MLFlowLogger)


def _continue_saved_run(trainer: pl.Trainer, saved: dict[str, Any] | None) -> None:
    """Resuming after a crash: an ``MLFlowLogger`` of the new process opened a new run; when the checkpoint's
    run is still RUNNING and the new one holds no metric yet, point the logger back at the saved run (its
    ``_run_id``: ``MLFlowLogger(run_id=...)`` does the same when set by hand) and mark the new run deleted
    (MLflow's soft delete), so Lightning's metrics and ours continue in the one run of this training."""
    if saved is None:
        return
    logger: Any  # an MLFlowLogger below (`_is_mlflow_logger`)
    for logger in trainer.loggers:
        if not _is_mlflow_logger(logger):
            continue
        fresh = logger.run_id
        uri = getattr(logger, "_tracking_uri", None) or logger.experiment.tracking_uri
        if fresh and hasattr(logger, "_run_id") and _fresh_run_replaceable(fresh, saved, uri):
            logger.experiment.delete_run(fresh)
            logger._run_id = saved["run_id"]
            _log.info(
                "sparsity_callbacks: resumed training continues in MLflow run %s; the run %s that MLFlowLogger "
                "opened for it was empty and is marked deleted.",
                saved["run_id"],
                fresh,
            )
        return


def _mlflow_logger_run(trainer: pl.Trainer) -> tuple[str | None, str | None]:
    """``(run_id, tracking_uri)`` of the trainer's first ``MLFlowLogger``, else ``(None, None)``."""
    for logger in trainer.loggers:
        if _is_mlflow_logger(logger):
            run_id = logger.run_id  # type: ignore[attr-defined]  # an MLFlowLogger; creates its run if needed
            uri = getattr(logger, "_tracking_uri", None) or getattr(logger.experiment, "tracking_uri", None)  # type: ignore[attr-defined]
            return run_id, uri
    return None, None
