"""`_SparsitySession`: everything a framework callback does, written once for every framework.

An adapter maps its framework's events onto these calls:
``start`` (train begin) -> ``on_optimizer_step`` (after every optimizer step) -> ``save`` (checkpoint)
-> ``end`` (train end). The session owns the tracker, the MLflow sink and the mask freezer.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from sparsity_callbacks.config import SparsityConfig
from sparsity_callbacks.masks import Mask
from sparsity_callbacks.report import PREFIX, Measurement
from sparsity_callbacks.tracker import SparsityTracker

if TYPE_CHECKING:
    from sparsity_callbacks.freeze import MaskFreezer
    from sparsity_callbacks.sinks.mlflow import MLflowSink

_log = logging.getLogger("sparsity_callbacks")

TRACKER_FILE = "sparsity_tracker.safetensors"
FREEZE_MASK_FILE = "sparsity_freeze_mask.safetensors"
#: the MLflow run of the training, beside the tracker state: a resumed training logs into the same run.
MLFLOW_RUN_FILE = "sparsity_mlflow_run.json"


def _saved_run(directory: str | None) -> dict[str, Any] | None:
    """``{"run_id", "tracking_uri", "owns_run"}`` saved in a checkpoint folder, or None (none, or unreadable:
    the resumed training then logs into a new run, which is no reason to stop it)."""
    if not directory:
        return None
    path = os.path.join(directory, MLFLOW_RUN_FILE)
    try:
        with open(path, encoding="utf-8") as handle:
            saved = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        warnings.warn(
            f"Ignoring {path!r} ({type(err).__name__}: {err}); the resumed training logs into a new run.", stacklevel=3
        )
        return None
    if not (isinstance(saved, dict) and all(isinstance(saved.get(k), str) for k in ("run_id", "tracking_uri"))):
        warnings.warn(f"Ignoring {path!r}: it does not hold a run id and tracking URI.", stacklevel=3)
        return None
    return saved


def _state_file(directory: str, tracker: SparsityTracker) -> str:
    """Where the tracker state lives in a checkpoint folder: one file for replicated parameters (DDP
    replicas hold the same reference, so it is stored once), one per rank for sharded ones."""
    rank = (
        torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
    )
    if rank > 0 and tracker.is_sharded:
        stem, ext = os.path.splitext(TRACKER_FILE)
        return os.path.join(directory, f"{stem}.rank{rank}{ext}")
    return os.path.join(directory, TRACKER_FILE)


def _refuse_two_loggers(callbacks: Any, me: Any) -> None:
    """`ValueError` when a trainer's ``callbacks`` hold another callback of ``me``'s class that also logs to
    MLflow: both would write different values under the same ``sparsity/...`` keys and params of one run
    (MLflow refuses the second's params)."""
    logging_ones = [c for c in callbacks if type(c) is type(me) and c.config.log_to_mlflow]
    if len(logging_ones) > 1 and any(c is me for c in logging_ones):
        raise ValueError(
            f"{len(logging_ones)} {type(me).__name__}s that log to MLflow are attached to one trainer; they would "
            "write different values under the same `sparsity/...` metric keys and params of one run. HINT: keep one "
            "(it measures every tracked parameter; choose them with `include`/`exclude`), or pass "
            "log_to_mlflow=False to the others."
        )


def _still_running(saved: dict[str, Any] | None, uri: str) -> bool:
    """True when ``saved`` names a run under ``uri`` whose status is still RUNNING: its training was killed
    (a training that ended finished its run; resuming from one of its checkpoints starts a new training and
    a new run). Never waits for a server that does not answer its probe."""
    if saved is None or saved["tracking_uri"] != uri:
        return False
    from sparsity_callbacks.sinks.mlflow import _PROBE_TIMEOUT_S, _is_http, _probe

    if _is_http(uri) and not _probe(uri, _PROBE_TIMEOUT_S):
        return False
    try:
        from mlflow import MlflowClient

        return MlflowClient(uri).get_run(saved["run_id"]).info.status == "RUNNING"
    except Exception as err:  # gone, or a store that fails: log into a new run
        _log.info("sparsity_callbacks: not resuming MLflow run %s (%s: %s)", saved["run_id"], type(err).__name__, err)
        return False


def _fresh_run_replaceable(fresh_run_id: str, saved: dict[str, Any] | None, uri: str) -> bool:
    """True when a framework's run ``fresh_run_id``, just opened for a resumed training, should give way to
    the checkpoint's run ``saved``: that one is still RUNNING (its training was killed) and the fresh one
    holds no metric yet. The adapter then points the framework back at the saved run and marks the fresh
    one deleted (MLflow's soft delete, restorable), so one training keeps one run."""
    if saved is None or fresh_run_id == saved["run_id"] or not _still_running(saved, uri):
        return False
    from mlflow import MlflowClient

    try:
        return not MlflowClient(uri).get_run(fresh_run_id).data.metrics
    except Exception:
        return False


class _ArtifactWriter:
    """The train-end artifact files of one measurement, written into a temporary folder: ``files`` is a list
    of ``(file name, function writing that file to a path)`` whose data were captured when it was built.

    `start` writes them on a background thread (the session starts it at the last training step, so the
    plots are drawn while the trainer does its own end work, e.g. HF's final checkpoint save); `log` hands
    the written files to the sink (the sink stages its own link to each, so the folder then goes)."""

    def __init__(self, measurement: Measurement, files: list[tuple[str, Callable[[str], None]]]) -> None:
        self.measurement = measurement
        self._files = files
        self._folder = tempfile.mkdtemp(prefix="sparsity_artifacts_")
        self._written: list[str] = []
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self, after: threading.Thread | None) -> None:
        """Write the files on a background thread, once ``after`` (the plots' warm-up) has finished."""

        def write_all() -> None:
            if after is not None:
                after.join()
            try:
                self._write(None)
            except BaseException as err:  # reported on the training thread by `log`
                self._error = err

        self._thread = threading.Thread(target=write_all, name="sparsity-artifacts")
        self._thread.start()

    def log(self, sink: MLflowSink) -> None:
        """Queue every file with ``sink`` (under ``sparsity/``): each as soon as it is written when `start`
        was not called (the worker uploads the mask and report while the plots are drawn), else once the
        background thread is done. Re-raises what writing raised; the folder is removed either way."""
        try:
            if self._thread is None:
                self._write(sink)
                return
            self._thread.join()
            for name in self._written:
                sink.log_artifact(os.path.join(self._folder, name), "sparsity")
            if self._error is not None:
                raise self._error
        finally:
            self.discard()

    def discard(self) -> None:
        """Wait for the background thread, if any, and remove the folder."""
        if self._thread is not None:
            self._thread.join()
        shutil.rmtree(self._folder, ignore_errors=True)

    def _write(self, sink: MLflowSink | None) -> None:
        for name, write in self._files:
            path = os.path.join(self._folder, name)
            write(path)
            self._written.append(name)
            if sink is not None:
                sink.log_artifact(path, "sparsity")


class _SessionViews:
    """The read-only attributes every framework adapter exposes, the same on each (the adapter keeps its
    session in ``_session``). All are None before training starts."""

    _session: _SparsitySession | None

    @property
    def tracker(self) -> SparsityTracker | None:
        """The `SparsityTracker` of the current (or last) training: ``tracker.reference(name)``,
        ``tracker.ever_changed_mask()``, ``tracker.history``."""
        return None if self._session is None else self._session.tracker

    @property
    def freezer(self) -> MaskFreezer | None:
        """The `MaskFreezer` once freezing began (``freeze_mask``), else None."""
        return None if self._session is None else self._session.freezer

    @property
    def last_measurement(self) -> Measurement | None:
        """The latest `Measurement` (the final one after training ends; totals summed over ranks for
        sharded parameters)."""
        return None if self._session is None else self._session.last_measurement

    @property
    def run_id(self) -> str | None:
        """The MLflow run the metrics went to, once training has ended; None before, or when not logging
        (``log_to_mlflow=False``, or a rank other than 0)."""
        return None if self._session is None else self._session.logged_run_id


class _SparsitySession:
    """Tracker + sink + freezer for one training run.

    Args:
        config: the options.
        is_rank_zero: only rank 0 logs and writes shared files; every rank measures (sharded counts
            are summed with a collective, so all ranks must call `on_optimizer_step` alike).
        default_every_n_steps: the framework's logging interval, used when ``config.every_n_steps`` is None.
        log_step_offset: metrics measured after optimizer step ``k`` are logged at step ``k + log_step_offset``:
            0 for HF (its ``loss`` of step ``k`` is logged at ``k``), -1 for Lightning (at ``k - 1``).
        run_id / tracking_uri: log into this MLflow run (e.g. Lightning's MLFlowLogger); otherwise the
            sink reuses ``mlflow.active_run()`` or starts one.
        clips_grad_norm: whether the framework may clip gradients by norm. When it does not, fully frozen
            tensors stop receiving gradients under compact optimizer state (see `MaskFreezer`).
    """

    def __init__(
        self,
        config: SparsityConfig,
        *,
        is_rank_zero: bool,
        default_every_n_steps: int,
        run_id: str | None = None,
        tracking_uri: str | None = None,
        extra_params: dict[str, str] | None = None,
        clips_grad_norm: bool = True,
        log_step_offset: int = 0,
    ) -> None:
        self._log_step_offset = log_step_offset
        self.is_rank_zero = is_rank_zero
        self.every_n_steps = config.every_n_steps or max(1, int(default_every_n_steps))
        # the effective options: masks, report.json and params record the interval actually used
        self.config = config.replace(every_n_steps=self.every_n_steps)
        self.tracker: SparsityTracker | None = None
        self.freezer: MaskFreezer | None = None
        self.freeze_source: str | None = None
        self.last_measurement: Measurement | None = None
        self._last_step: int | None = None
        self._optimizers: list[Any] = []
        self._model: torch.nn.Module | None = None
        self._run_id = run_id or config.mlflow_run_id
        self._tracking_uri = tracking_uri or config.mlflow_tracking_uri
        self._extra_params = dict(extra_params or {})
        self._clips_grad_norm = clips_grad_norm
        self._state_bytes_pending = False
        #: `on_optimizer_step` of a step below this, after the previous one, has nothing to do (`_plan`).
        self._quiet_until = 0
        self.sink: MLflowSink | None = None
        self.logged_run_id: str | None = None  # the run the sink logged into, set when it closes
        self._plots_warm_up: threading.Thread | None = None
        self._artifacts: _ArtifactWriter | None = None  # started at the last step, logged by `end`
        self._artifacts_for: Measurement | None = None  # whose mask every rank gathered at the last step

    # --- events ----------------------------------------------------------------------------------
    def start(self, model: torch.nn.Module, optimizers: list[Any], step: int, resume_dir: str | None = None) -> None:
        """Train begin: snapshot (or restore the state saved in ``resume_dir``), open the sink,
        attach the freezer when a mask is given."""
        self._model = model
        self._optimizers = [o for o in optimizers if o is not None]
        self.tracker = SparsityTracker(model, self.config)
        state_file = _state_file(resume_dir, self.tracker) if resume_dir else None
        if state_file and os.path.exists(state_file):
            self.tracker.load(state_file)
            _log.info("sparsity_callbacks: resumed tracker state from %s (original reference kept)", state_file)
        else:
            if step > 0:
                warnings.warn(
                    f"Training starts at step {step} but no {TRACKER_FILE} was found"
                    f"{' in ' + repr(resume_dir) if resume_dir else ''}: the reference is the current weights, "
                    "not the original ones, so the cumulative curve starts over. HINT: resume from a checkpoint "
                    "saved with the SparsityCallback attached.",
                    stacklevel=3,
                )
            self.tracker.snapshot()
        self._last_step = step
        self._open_sink(_saved_run(resume_dir) if self.is_rank_zero else None)
        self._start_freeze(resume_dir)
        self._plan(step)

    def on_optimizer_step(self, step: int, *, last: bool = False) -> Measurement | None:
        """After optimizer step number ``step`` (1-based global step): measure on schedule (when ``step``
        reached or passed a multiple of ``every_n_steps`` since the previous call: frameworks whose step
        counter advances by more than one, e.g. Lightning's manual optimization with several optimizers),
        and at the ``last`` step of training (so the final figures reach the trainer's log line, and `end`
        need not measure again); discover and apply the freeze mask at ``freeze_after_steps``.

        A step with nothing to do costs two integer compares (the trainer calls this after every step)."""
        previous = self._last_step
        if previous is not None and previous < step < self._quiet_until and not last:
            self._last_step = step
            return None
        if self.tracker is None:
            return None
        discover = (
            self.config.freeze_mask == "discover"
            and self.freezer is None
            and step >= (self.config.freeze_after_steps or 0)  # set whenever "discover" (SparsityConfig checks)
        )
        if self._state_bytes_pending:  # the optimizer state created by the first step after freezing
            self._log_state_bytes(step)
        self._last_step = step
        n = self.every_n_steps
        due = step // n > previous // n if previous is not None and previous < step else step % n == 0
        measurement = None
        if due or discover or last:
            measurement = self._measure(step)
        if discover:
            self._freeze(self._resolve_mask(), source=f"discover@{step}", step=step)
        if last and measurement is not None:
            self._artifacts_for, self._artifacts = measurement, self._artifact_writer(measurement)
            if self._artifacts is not None:
                self._artifacts.start(after=self._plots_warm_up)
        self._plan(step)
        return measurement

    def _plan(self, step: int) -> None:
        """Set `_quiet_until` after step ``step``: the next multiple of ``every_n_steps``, or earlier when the
        freeze mask is still to be discovered or the optimizer state bytes are still to be logged."""
        quiet_until = (step // self.every_n_steps + 1) * self.every_n_steps
        if self.config.freeze_mask == "discover" and self.freezer is None:
            quiet_until = min(quiet_until, self.config.freeze_after_steps or 0)
        if self._state_bytes_pending:
            quiet_until = step + 1
        self._quiet_until = quiet_until

    def save(self, directory: str) -> None:
        """Write the tracker state (and the freeze mask) into a checkpoint folder."""
        if self.tracker is None or not self.tracker.is_snapshotted:
            return
        os.makedirs(directory, exist_ok=True)
        if self.is_rank_zero or self.tracker.is_sharded:
            self.tracker.save(_state_file(directory, self.tracker))
        if self.freezer is not None and self.is_rank_zero:
            self._freeze_mask.save(os.path.join(directory, FREEZE_MASK_FILE))
        run_id = self.sink.wait_for_run_id(self.config.mlflow_end_timeout_s) if self.sink is not None else None
        if run_id is not None:
            saved = {"run_id": run_id, "tracking_uri": self.sink.tracking_uri, "owns_run": self.sink.owns_run}
            with open(os.path.join(directory, MLFLOW_RUN_FILE), "w", encoding="utf-8") as handle:
                json.dump(saved, handle)

    def end(self, step: int) -> Measurement | None:
        """Train end: a final measurement (unless this step was just measured), artifacts (written since the
        last step when that step was measured with ``last=True``, else now), flush."""
        if self.tracker is None:
            return None
        measurement = self.last_measurement
        if measurement is None or measurement.step != step:
            measurement = self._measure(step)
        artifacts, self._artifacts = self._artifacts, None
        prepared_for, self._artifacts_for = self._artifacts_for, None
        if prepared_for is not measurement:  # the same decision on every rank: the mask gather is a collective
            if artifacts is not None:
                artifacts.discard()  # written for a measurement that is not the final one
            artifacts = self._artifact_writer(measurement)
            if self._plots_warm_up is not None:
                self._plots_warm_up.join()  # the files are written here, on this thread
        if self.sink is not None and artifacts is not None:
            try:
                artifacts.log(self.sink)
            except Exception as err:  # plots or disk trouble must not fail the end of training
                warnings.warn(f"Could not write the sparsity artifacts: {type(err).__name__}: {err}", stacklevel=2)
        self._announce_charts()
        self.close()
        return measurement

    def close(self) -> None:
        artifacts, self._artifacts, self._artifacts_for = self._artifacts, None, None
        if artifacts is not None:  # started at the last step, but training ended without `end`
            artifacts.discard()
        if self.freezer is not None:
            # A compact optimizer state stays compact: expanding it now would allocate the full state at the end
            # of a run sized for the compact one. A later train() with this callback attaches a freezer again.
            self.freezer.detach(expand_state=False)
        if self.sink is not None:
            self.sink.close(timeout=self.config.mlflow_end_timeout_s)
            self.logged_run_id = self.sink.run_id  # after close: never waits for the server
            self.sink = None

    # --- internals -------------------------------------------------------------------------------
    def _measure(self, step: int) -> Measurement:
        measurement = self.tracker.measure(step)
        self.last_measurement = measurement
        # The metric dict (per layer, per module type) is built on the sink's worker thread: a Measurement
        # never changes, so the training thread pays only the queue put.
        self._log_metrics(functools.partial(measurement.to_metrics, per_tensor=self.config.per_tensor_metrics), step)
        return measurement

    def _log_metrics(self, metrics: dict[str, float] | Callable[[], dict[str, float]], step: int) -> None:
        if self.sink is not None:
            self.sink.log_metrics(metrics, self.log_step(step))

    def log_step(self, step: int) -> int:
        """The step a measurement after optimizer step ``step`` is logged at: ``step + log_step_offset``
        (never below 0), the step at which the framework logs its own ``loss`` for that optimizer step."""
        return max(0, step + self._log_step_offset)

    def _announce_charts(self) -> None:
        """Print where the charts are and keep it as the run tag ``sparsity.charts``."""
        if self.sink is None:
            return
        from sparsity_callbacks.sinks.mlflow import _charts_location

        run_id = self.sink.run_id
        if run_id is None:
            return
        tag, message = _charts_location(self.sink.tracking_uri, self.sink.experiment_id, run_id)
        self.sink.set_tags({"sparsity.charts": tag})
        print(f"\n{message}", flush=True)  # on a line of its own, after the trainer's progress bar

    def _open_sink(self, saved: dict[str, Any] | None = None) -> None:
        """Open the sink. ``saved``: the run of the checkpoint being resumed (`_saved_run`): logged into again
        when it is still RUNNING (its training was killed: one run per training) and no run was given
        explicitly or by the framework; a run the sink had created is finished at the end."""
        if not (self.config.log_to_mlflow and self.is_rank_zero):
            return
        try:
            import mlflow

            from sparsity_callbacks.sinks.mlflow import MLflowSink

            run_id, finish = self._run_id, False
            uri = self._tracking_uri or mlflow.get_tracking_uri()
            # A framework's run (HF's active run, Lightning's MLFlowLogger) wins: the adapters already moved it
            # back to the saved run where they could, so that the framework's own metrics continue there too.
            if run_id is None and mlflow.active_run() is None and _still_running(saved, uri):
                run_id, finish = saved["run_id"], bool(saved.get("owns_run"))  # type: ignore[index]
                _log.info("sparsity_callbacks: resuming into MLflow run %s (saved with the checkpoint)", run_id)
            self.sink = MLflowSink(
                run_id=run_id,
                tracking_uri=self._tracking_uri,
                experiment=self.config.mlflow_experiment,
                finish_run=finish,
            )
        except ImportError as err:
            warnings.warn(
                f"{err} Sparsity metrics are not logged to MLflow (log_to_mlflow=False silences this).", stacklevel=3
            )
            return
        tracker = self.tracker
        assert tracker is not None  # the sink opens after the snapshot
        params = self.config.to_params()
        params.update(
            {
                "sparsity.resolved_mode": str(tracker.mode),
                "sparsity.tracked_tensors": str(len(tracker._tracked)),
                "sparsity.tracked_elements": str(sum(t.layout.numel for t in tracker._tracked)),
                "sparsity.skipped_tensors": str(len(tracker.skipped)),
                "sparsity.every_n_steps": str(self.every_n_steps),
            }
        )
        if tracker.reference_representable_fraction is not None:
            params["sparsity.reference_representable_fraction"] = f"{tracker.reference_representable_fraction:.6f}"
        params.update(self._extra_params)
        self.sink.log_params(params)
        from sparsity_callbacks import plots

        if self.config.log_artifacts and not plots._warmed_up:
            # matplotlib's import and font set-up (~0.5 s on a cold process) while training runs, not at its end.
            self._plots_warm_up = threading.Thread(target=plots._warm_up, name="sparsity-plots-warm-up")
            self._plots_warm_up.start()

    def _start_freeze(self, resume_dir: str | None) -> None:
        source = self.config.freeze_mask
        saved = os.path.join(resume_dir, FREEZE_MASK_FILE) if resume_dir else None
        if saved and os.path.exists(saved):
            # Resumed after freezing began: the weights outside the mask are still at their freeze-time values.
            mask = Mask.load(saved)
            self._freeze(mask, source=mask.metadata.get("freeze_source", str(source)), step=self._last_step or 0)
        elif source is not None and source != "discover":
            self._freeze(self._resolve_mask(), source=source, step=self._last_step or 0)

    def _resolve_mask(self) -> Mask:
        from sparsity_callbacks.freeze import _resolve_freeze_mask

        return _resolve_freeze_mask(self.config, self.tracker)

    def _freeze(self, mask: Mask, source: str, step: int) -> None:
        from sparsity_callbacks.freeze import MaskFreezer

        assert self._model is not None  # set by `start`
        compact = self.config.compact_optimizer_state
        self.freezer = MaskFreezer(
            self._model,
            mask,
            tracked=self.tracker.names,
            compact_optimizer_state=compact,
            stop_gradients=compact and not self._clips_grad_norm,
        )
        for optimizer in self._optimizers:
            self.freezer.attach(optimizer)
        mask.metadata["freeze_source"] = source  # kept in the checkpoint copy, so a resumed run logs the same
        self._freeze_mask = mask
        self.freeze_source = source
        _log.info(
            "sparsity_callbacks: training frozen to %s (%.2f%% of tracked elements frozen, %d extra bytes, "
            "%d of %d optimizers with compact state)",
            source,
            100 * self.freezer.frozen_fraction,
            self.freezer.extra_bytes,
            len(self.freezer.compact_optimizers),
            len(self.freezer.optimizers),
        )
        if self.sink is not None:
            self.sink.log_params({"sparsity.freeze_source": source})
        self._log_metrics({f"{PREFIX}frozen_fraction": self.freezer.frozen_fraction}, step)
        self._state_bytes_pending = True
        if any(optimizer.state for optimizer in self.freezer.optimizers):
            self._log_state_bytes(step)  # else the optimizer creates its state in the next step

    def _log_state_bytes(self, step: int) -> None:
        """Log ``sparsity/optimizer_state_bytes`` (the attached optimizers' state) once after freezing."""
        self._state_bytes_pending = False
        if self.freezer is not None:
            self._log_metrics({f"{PREFIX}optimizer_state_bytes": float(self.freezer.optimizer_state_bytes)}, step)

    def _artifact_writer(self, measurement: Measurement) -> _ArtifactWriter | None:
        """The train-end artifacts of ``measurement`` (mask, freeze mask, ``report.json``, heatmap and curves
        PNGs), their data captured now; None when they are not logged. Gathers the ever-changed mask on
        every rank (a collective for sharded parameters); only rank 0 (with a sink) gets a writer."""
        if not (self.config.log_artifacts and self.config.log_to_mlflow):
            return None
        mask = self.tracker.ever_changed_mask()
        if self.sink is None:
            return None
        from sparsity_callbacks.plots import save_curves, save_heatmap

        history = [dict(point) for point in self.tracker.history]
        report = measurement.to_dict()
        report.update(
            {
                "mode_reason": self.tracker.mode_reason,
                "history": history,
                "config": self.config.to_dict(),
                "freeze_source": self.freeze_source,
            }
        )

        def write_report(path: str) -> None:
            with open(path, "w") as f:
                json.dump(report, f, indent=1, default=str)

        cells = {key: counts.changed / counts.numel for key, counts in measurement.by_layer_and_module().items()}
        title = f"changed fraction at step {measurement.step}"
        files: list[tuple[str, Callable[[str], None]]] = [("mask.safetensors", mask.save)]
        if self.freezer is not None:
            report["frozen_fraction"] = self.freezer.frozen_fraction
            files.append(("freeze_mask.safetensors", self._freeze_mask.save))
        files += [
            ("report.json", write_report),
            ("heatmap.png", lambda path: save_heatmap(cells, path, title=title)),
            ("curves.png", lambda path: save_curves(history, path, title="sparsity")),
        ]
        return _ArtifactWriter(measurement, files)
