"""The Lightning adapter: a real `lightning.pytorch.Trainer`, real MLflow read back with `MlflowClient`,
real 2-process gloo (DDP and FSDP2) in new processes (`helpers.new_process`).
"""

from __future__ import annotations

import csv
import glob
import json
import os
import sys
import time

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lightning.pytorch as pl  # noqa: E402
from helpers import free_ports, new_process, run_in_new_process, tiny_llama  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger  # noqa: E402

from sparsity_callbacks import SparsityConfig  # noqa: E402
from sparsity_callbacks.integrations.lightning import SparsityCallback  # noqa: E402
from sparsity_callbacks.masks import Mask  # noqa: E402

SEQ = 8
#: tokens used by the data: embedding rows of the other tokens get no gradient and stay unchanged.
USED_TOKENS = 24
DIST_TIMEOUT_S = 120


# --- a tiny LightningModule ------------------------------------------------------------------------
pytestmark = pytest.mark.slow  # real Lightning fits, new processes and an MLflow server


class LitLM(pl.LightningModule):
    """Causal-LM loss on a tiny Llama. ``manual``: manual optimization with two optimizers (embeddings +
    block 0, the rest), both stepped every batch. ``fsdp2``: the model is built and ``fully_shard``-ed in
    ``configure_model`` on the ``data_parallel`` mesh of `ModelParallelStrategy`."""

    def __init__(
        self, seed: int = 0, lr: float = 1e-2, weight_decay: float = 0.0, manual: bool = False, fsdp2: bool = False
    ) -> None:
        super().__init__()
        self.seed, self.lr, self.weight_decay, self.fsdp2 = seed, lr, weight_decay, fsdp2
        self.automatic_optimization = not manual
        self.model = None if fsdp2 else tiny_llama(seed)
        self.optimizer_steps = 0

    def configure_model(self) -> None:
        if self.fsdp2 and self.model is None:
            from torch.distributed.fsdp import fully_shard

            self.model = tiny_llama(self.seed)
            mesh = self.device_mesh["data_parallel"]
            for layer in self.model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(self.model, mesh=mesh)

    def _loss(self, batch) -> torch.Tensor:
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def training_step(self, batch, batch_idx):
        if self.automatic_optimization:
            return self._loss(batch)
        optimizers = self.optimizers()
        for opt in optimizers:
            opt.zero_grad()
        self.manual_backward(self._loss(batch))
        for opt in optimizers:
            opt.step()
        return None

    def configure_optimizers(self):
        def adamw(params):
            opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
            opt.register_step_post_hook(lambda *_: setattr(self, "optimizer_steps", self.optimizer_steps + 1))
            return opt

        if self.automatic_optimization:
            return adamw(self.parameters())
        named = list(self.named_parameters())
        first = [p for n, p in named if "embed_tokens" in n or ".layers.0." in n]
        rest = [p for n, p in named if not ("embed_tokens" in n or ".layers.0." in n)]
        return [adamw(first), adamw(rest)]


def _data(n_batches: int, batch_size: int = 4, seed: int = 1) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, USED_TOKENS, (n_batches * batch_size, SEQ), generator=generator)
    return DataLoader(TensorDataset(ids), batch_size=batch_size, shuffle=False)


def _trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        max_steps=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        num_sanity_val_steps=0,
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _recount(reference: dict[str, torch.Tensor], module: torch.nn.Module) -> tuple[int, int]:
    """(changed, numel) over all parameters, counted here with `torch.ne` (independent of the engine)."""
    changed = numel = 0
    for name, param in module.named_parameters():
        changed += int(torch.ne(param.detach(), reference[name]).sum())
        numel += param.numel()
    return changed, numel


def _metric_steps(client, run_id: str, key: str = "sparsity/changed_fraction") -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _no_tensors(obj) -> bool:
    if torch.is_tensor(obj):
        return False
    if isinstance(obj, dict):
        return all(_no_tensors(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_no_tensors(v) for v in obj)
    return True


# --- validation ------------------------------------------------------------------------------------
def test_invalid_arguments_are_refused_eagerly():
    with pytest.raises(ValueError, match="`on_missing_state` must be any of"):
        SparsityCallback(on_missing_state="ignore")
    with pytest.raises(ValueError, match="`every_n_steps` must be"):
        SparsityCallback(every_n_steps=0)
    with pytest.raises(TypeError, match="Unknown SparsityConfig option"):
        SparsityCallback(every_n_step=5)
    with pytest.raises(TypeError, match="`config` must be a SparsityConfig"):
        SparsityCallback({"mode": "exact"})
    callback = SparsityCallback(SparsityConfig(mode="exact"), compare_dtype="bfloat16")
    assert (callback.config.mode, callback.config.compare_dtype) == ("exact", "bfloat16")


# --- MLflow ------------------------------------------------------------------------------------------
def test_metrics_land_in_the_mlflow_loggers_run_at_the_right_steps(tmp_path, mlflow_server):
    from mlflow import MlflowClient

    logger = MLFlowLogger(experiment_name="lit-run", tracking_uri=mlflow_server)
    module = LitLM()
    reference = _params(module)
    callback = SparsityCallback(mode="exact")
    trainer = _trainer(tmp_path, [callback], logger=logger, max_steps=5, log_every_n_steps=2)
    trainer.fit(module, _data(8))

    client = MlflowClient(mlflow_server)
    runs = client.search_runs([logger.experiment_id])
    assert [r.info.run_id for r in runs] == [logger.run_id]  # no second run for one fit
    curve = _metric_steps(client, logger.run_id)
    # after optimizer steps 2, 4 (every log_every_n_steps) and 5 (the end), at Lightning's step for each: k - 1
    assert [s for s, _ in curve] == [1, 3, 4]
    changed, numel = _recount(reference, module)
    assert 0 < changed < numel  # unused embedding rows stay unchanged
    assert curve[-1][1] == pytest.approx(changed / numel, abs=1e-12)
    assert callback.last_measurement.total.changed == changed
    run = client.get_run(logger.run_id)
    assert run.data.params["sparsity.mode"] == "exact"
    assert run.data.params["sparsity.every_n_steps"] == "2"
    assert run.data.metrics["sparsity/ever_changed_fraction"] >= curve[-1][1]
    assert "sparsity/churn_fraction" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(logger.run_id, "sparsity")}
    assert {"sparsity/mask.safetensors", "sparsity/report.json"} <= artifacts
    assert run.info.status == "FINISHED"  # ended by the logger, once


def test_csv_logger_sees_the_headline_metrics_and_a_new_mlflow_run_is_made(tmp_path, mlflow_local):
    from mlflow import MlflowClient

    class ProgressBarRecorder(pl.Callback):
        def __init__(self):
            self.seen: dict[int, float] = {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if "sparsity/changed_fraction" in trainer.progress_bar_metrics:
                self.seen[trainer.global_step] = trainer.progress_bar_metrics["sparsity/changed_fraction"]

    logger = CSVLogger(str(tmp_path), name="csv")
    callback, recorder = SparsityCallback(mode="exact", every_n_steps=3), ProgressBarRecorder()
    trainer = _trainer(tmp_path, [callback, recorder], logger=logger, max_steps=6, log_every_n_steps=1)
    trainer.fit(LitLM(), _data(8))

    # the progress bar shows the figures from the first measured step on; callback_metrics has the last
    assert min(recorder.seen) == 3
    assert recorder.seen[6] == pytest.approx(callback.last_measurement.changed_fraction)
    assert float(trainer.callback_metrics["sparsity/ever_changed_fraction"]) == pytest.approx(
        callback.last_measurement.ever_changed_fraction
    )

    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get("sparsity/changed_fraction")]
    assert [int(r["step"]) for r in rows] == [2, 5]  # optimizer steps 3 and 6, at Lightning's steps
    for key in ("sparsity/ever_changed_fraction", "sparsity/update_sparsity"):
        assert all(r[key] for r in rows), key
    assert [bool(r["sparsity/churn_fraction"]) for r in rows] == [False, True]  # churn needs a previous measurement
    assert float(rows[-1]["sparsity/changed_fraction"]) == pytest.approx(callback.last_measurement.changed_fraction)

    client = MlflowClient(mlflow_local)
    runs = client.search_runs(["0"])
    assert len(runs) == 1  # the sink's own run in the default store, one per fit
    assert [s for s, _ in _metric_steps(client, runs[0].info.run_id)] == [2, 5]


# --- steps -------------------------------------------------------------------------------------------
def test_manual_optimization_with_two_optimizers_counts_every_optimizer_step(tmp_path):
    module = LitLM(manual=True)
    reference = _params(module)
    callback = SparsityCallback(mode="exact", every_n_steps=3, log_to_mlflow=False)
    trainer = _trainer(tmp_path, [callback], max_steps=12)
    trainer.fit(module, _data(6))

    assert trainer.global_step == 12 == module.optimizer_steps  # 6 batches x 2 optimizers
    history = [int(p["step"]) for p in callback.tracker.history]
    # Measured at the end of the batches whose global_step crossed a multiple of 3: 4 (3), 6, 10 (9), 12.
    assert history == [4, 6, 10, 12]
    assert callback.last_measurement.total.changed == _recount(reference, module)[0]


def test_gradient_accumulation_counts_optimizer_steps_not_batches(tmp_path):
    module = LitLM()
    reference = _params(module)
    callback = SparsityCallback(mode="exact", every_n_steps=1, log_to_mlflow=False)
    trainer = _trainer(tmp_path, [callback], max_steps=3, accumulate_grad_batches=4)
    trainer.fit(module, _data(12))

    assert trainer.global_step == 3 == module.optimizer_steps
    assert [int(p["step"]) for p in callback.tracker.history] == [1, 2, 3]
    assert callback.last_measurement.total.changed == _recount(reference, module)[0]


def test_bf16_mixed_precision(tmp_path):
    module = LitLM()
    reference = _params(module)
    callback = SparsityCallback(mode="exact", every_n_steps=2, compare_dtype="bfloat16", log_to_mlflow=False)
    trainer = _trainer(tmp_path, [callback], max_steps=4, precision="bf16-mixed")
    trainer.fit(module, _data(4))

    expected = sum(
        int(torch.ne(p.detach().bfloat16(), reference[n].bfloat16()).sum()) for n, p in module.named_parameters()
    )
    assert callback.last_measurement.total.changed == expected
    assert [int(p["step"]) for p in callback.tracker.history] == [2, 4]


# --- checkpoints and resume --------------------------------------------------------------------------
def _fit_with_checkpoint(tmp_path, mlflow_uri: str | None = None, **callback_kwargs):
    """Fit 4 steps (one epoch of 4 batches), checkpoint at step 4. Returns (module, reference, ckpt path, run id)."""
    module = LitLM(seed=0)
    reference = _params(module)
    logger = MLFlowLogger(experiment_name="resume", tracking_uri=mlflow_uri) if mlflow_uri else False
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=4, save_top_k=-1)
    callback = SparsityCallback(mode="exact", every_n_steps=2, **callback_kwargs)
    trainer = _trainer(tmp_path, [callback, checkpoint], max_steps=4, logger=logger, enable_checkpointing=True)
    trainer.fit(module, _data(4))
    (ckpt,) = glob.glob(str(tmp_path / "ckpt" / "*.ckpt"))
    return module, reference, ckpt, (logger.run_id if logger else None), callback


def test_resume_continues_the_curve_from_the_original_reference(tmp_path, mlflow_local):
    from mlflow import MlflowClient

    _, reference, ckpt, run_id, first = _fit_with_checkpoint(tmp_path, mlflow_local)
    state_dir = tmp_path / "ckpt" / "sparsity_state-step=4"
    assert (state_dir / "sparsity_tracker.safetensors").is_file()

    # The .ckpt stays small: the callback's entry holds no tensor, only the step, the folder and the config.
    saved = torch.load(ckpt, weights_only=False)
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("SparsityCallback")]
    assert _no_tensors(state) and len(json.dumps(state)) < 4096
    assert state["step"] == 4 and state["state_dir"] == str(state_dir)
    assert os.path.getsize(state_dir / "sparsity_tracker.safetensors") > 4 * sum(t.numel() for t in reference.values())

    # Resume into the same MLflow run, with a model of another seed: the checkpoint restores the weights, the
    # side folder restores the original reference and ever-changed mask.
    module = LitLM(seed=123)
    callback = SparsityCallback(mode="exact", every_n_steps=2)
    logger = MLFlowLogger(experiment_name="resume", tracking_uri=mlflow_local, run_id=run_id)
    trainer = _trainer(tmp_path, [callback], max_steps=8, logger=logger)
    trainer.fit(module, _data(4), ckpt_path=ckpt)

    assert trainer.global_step == 8
    assert [int(p["step"]) for p in callback.tracker.history] == [2, 4, 6, 8]
    changed, numel = _recount(reference, module)
    assert callback.last_measurement.total.changed == changed
    assert callback.last_measurement.total.ever_changed >= first.last_measurement.total.ever_changed
    curve = _metric_steps(MlflowClient(mlflow_local), run_id)
    assert [s for s, _ in curve] == [1, 3, 5, 7]  # optimizer steps 2..8, at Lightning's step for each
    assert curve[-1][1] == pytest.approx(changed / numel, abs=1e-12)

    # The same 8 steps without interruption give the same curve.
    module = LitLM(seed=0)
    straight = SparsityCallback(mode="exact", every_n_steps=2, log_to_mlflow=False)
    _trainer(tmp_path / "straight", [straight], max_steps=8).fit(module, _data(4))
    assert straight.tracker.history == callback.tracker.history


def test_missing_side_state_raises_a_clear_error(tmp_path):
    _, _, ckpt, _, _ = _fit_with_checkpoint(tmp_path, log_to_mlflow=False)
    state_dir = tmp_path / "ckpt" / "sparsity_state-step=4"
    for path in state_dir.iterdir():
        path.unlink()
    state_dir.rmdir()

    callback = SparsityCallback(mode="exact", every_n_steps=2, log_to_mlflow=False)
    trainer = _trainer(tmp_path, [callback], max_steps=8)
    expected = r"sparsity_state-step=4.*does not exist.*on_missing_state='resnapshot'"
    with pytest.raises(FileNotFoundError, match=expected):
        trainer.fit(LitLM(), _data(4), ckpt_path=ckpt)


def test_missing_side_state_with_resnapshot_takes_a_new_reference(tmp_path):
    _, _, ckpt, _, _ = _fit_with_checkpoint(tmp_path, log_to_mlflow=False)
    os.rename(tmp_path / "ckpt" / "sparsity_state-step=4", tmp_path / "elsewhere")

    at_resume = {}

    class Snapshot(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            at_resume.update(_params(pl_module))

    module = LitLM()
    callback = SparsityCallback(mode="exact", every_n_steps=2, log_to_mlflow=False, on_missing_state="resnapshot")
    trainer = _trainer(tmp_path, [callback, Snapshot()], max_steps=8)
    with pytest.warns(UserWarning, match="new reference"):
        trainer.fit(module, _data(4), ckpt_path=ckpt)
    assert callback.last_measurement.total.changed == _recount(at_resume, module)[0]
    assert [int(p["step"]) for p in callback.tracker.history] == [6, 8]


def test_side_state_is_found_next_to_a_moved_checkpoint(tmp_path):
    _, reference, ckpt, _, _ = _fit_with_checkpoint(tmp_path, log_to_mlflow=False)
    moved = tmp_path / "moved"
    os.rename(tmp_path / "ckpt", moved)

    module = LitLM()
    callback = SparsityCallback(mode="exact", every_n_steps=2, log_to_mlflow=False)
    _trainer(tmp_path, [callback], max_steps=6).fit(module, _data(4), ckpt_path=str(moved / os.path.basename(ckpt)))
    assert callback.last_measurement.total.changed == _recount(reference, module)[0]


# --- freeze ------------------------------------------------------------------------------------------
class _FreezeWatcher(pl.Callback):
    """Records the weights right after the sparsity callback froze the model (it runs after it)."""

    def __init__(self, sparsity: SparsityCallback) -> None:
        self.sparsity = sparsity
        self.at_freeze: dict[str, torch.Tensor] | None = None
        self.step: int | None = None

    def _grab(self, trainer, pl_module) -> None:
        session = self.sparsity._session
        if self.at_freeze is None and session is not None and session.freezer is not None:
            self.at_freeze, self.step = _params(pl_module), trainer.global_step

    def on_train_start(self, trainer, pl_module):
        self._grab(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, *args):
        self._grab(trainer, pl_module)


def _assert_frozen_bit_identical(module, at_freeze, mask: Mask) -> int:
    """Every element outside ``mask`` has the same raw bits as at freeze time; returns how many there are."""
    frozen_total = 0
    for name, param in module.named_parameters():
        frozen = ~mask[name]
        now = param.detach().view(torch.int32)[frozen]
        assert torch.equal(now, at_freeze[name].view(torch.int32)[frozen]), name
        frozen_total += int(frozen.sum())
    return frozen_total


def test_discovered_mask_keeps_frozen_elements_bit_identical_under_adamw_weight_decay_and_clipping(tmp_path):
    # Decoupled weight decay moves every fp32 weight a little; compared in bfloat16 the rows of unused tokens stay
    # unchanged, so the discovered mask leaves them out -- and then the freezer must undo the decay.
    module = LitLM(weight_decay=0.01, lr=1e-2)
    callback = SparsityCallback(
        mode="exact",
        compare_dtype="bfloat16",
        every_n_steps=2,
        freeze_mask="discover",
        freeze_after_steps=3,
        log_to_mlflow=False,
    )
    watcher = _FreezeWatcher(callback)
    trainer = _trainer(tmp_path, [callback, watcher], max_steps=10, gradient_clip_val=0.5, accumulate_grad_batches=2)
    trainer.fit(module, _data(20))

    assert watcher.step == 3
    mask = callback._session._freeze_mask
    frozen = _assert_frozen_bit_identical(module, watcher.at_freeze, mask)
    assert frozen > 0
    # weight decay would have moved every element; the trainable ones did move after freezing
    moved = sum(
        int(torch.ne(p.detach()[mask[n]], watcher.at_freeze[n][mask[n]]).sum()) for n, p in module.named_parameters()
    )
    assert moved > 0


def test_mask_file_keeps_frozen_elements_bit_identical(tmp_path):
    module = LitLM(weight_decay=0.1, lr=5e-2)
    from sparsity_callbacks import SparsityTracker

    tracker = SparsityTracker(module, SparsityConfig(mode="exact"))
    tracker.snapshot()
    generator = torch.Generator().manual_seed(0)
    mask = Mask(
        {n: torch.rand(p.shape, generator=generator) < 0.2 for n, p in module.named_parameters()},
        signatures=tracker.signatures,
    )
    mask.save(tmp_path / "mask.safetensors")
    start = _params(module)

    callback = SparsityCallback(mode="exact", freeze_mask=str(tmp_path / "mask.safetensors"), log_to_mlflow=False)
    trainer = _trainer(tmp_path, [callback], max_steps=6, gradient_clip_val=0.5, precision="bf16-mixed")
    trainer.fit(module, _data(6))

    assert callback.freezer is not None
    assert _assert_frozen_bit_identical(module, start, mask) == mask.numel() - mask.count()
    assert callback.last_measurement.total.ever_changed <= mask.count()


class _ConvertAfterFreezing(pl.Callback):
    """Converts the module to ``dtype`` at the first batch end after the sparsity callback froze it."""

    def __init__(self, sparsity: SparsityCallback, dtype: torch.dtype) -> None:
        self.sparsity, self.dtype = sparsity, dtype
        self.at_convert: dict[str, torch.Tensor] | None = None

    def on_train_batch_end(self, trainer, pl_module, *args):
        if self.at_convert is None and self.sparsity._session.freezer is not None:
            self.at_convert = _params(pl_module)
            pl_module.to(self.dtype)


class _SgdLM(LitLM):
    """SGD with weight decay (stateless: Adam's float32 moments refuse bfloat16 gradients after a cast)."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


def test_dtype_change_after_freezing_never_corrupts_frozen_weights(tmp_path):
    from sparsity_callbacks import SparsityTracker

    module = _SgdLM(weight_decay=0.1, lr=5e-2)
    tracker = SparsityTracker(module, SparsityConfig(mode="exact"))
    tracker.snapshot()
    generator = torch.Generator().manual_seed(0)
    mask = Mask(
        {n: torch.rand(p.shape, generator=generator) < 0.2 for n, p in module.named_parameters()},
        signatures=tracker.signatures,
    )
    mask.save(tmp_path / "mask.safetensors")
    callback = SparsityCallback(  # dense freezing re-freezes (compact state stores nothing: nothing to warn about)
        mode="exact",
        freeze_mask=str(tmp_path / "mask.safetensors"),
        log_to_mlflow=False,
        compact_optimizer_state=False,
    )
    convert = _ConvertAfterFreezing(callback, torch.bfloat16)
    with pytest.warns(UserWarning, match=r"frozen parameter\(s\) changed dtype after freezing began"):
        _trainer(tmp_path, [callback, convert], max_steps=4).fit(module, _data(4))

    for name, param in module.named_parameters():
        assert param.dtype == torch.bfloat16 and param.isfinite().all(), name
        frozen = ~mask[name]
        expected = convert.at_convert[name].to(torch.bfloat16)[frozen].view(torch.int16)
        assert torch.equal(param.detach()[frozen].view(torch.int16), expected), name


def _killed_fit(uri: str, ckpt: str, root: str, with_logger: bool) -> None:
    """The fit of `test_resume_after_sigkill_continues_in_the_same_mlflow_run`, in a new process: it checkpoints
    every 2 steps and SIGKILLs its own process at step 3, after what was measured reached MLflow."""
    import signal

    sparsity = SparsityCallback(mode="exact", every_n_steps=1)

    class KillAtStep3(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 3:
                sparsity._session.sink.flush(60)  # what was measured reached MLflow; then die like a crash
                os.kill(os.getpid(), signal.SIGKILL)

    logger = MLFlowLogger(experiment_name="crash", tracking_uri=uri) if with_logger else False
    checkpoint = ModelCheckpoint(dirpath=ckpt, every_n_train_steps=2, save_top_k=-1)
    trainer = _trainer(
        root, [sparsity, KillAtStep3(), checkpoint], max_steps=6, logger=logger, enable_checkpointing=True
    )
    trainer.fit(LitLM(seed=0), _data(6))


@pytest.mark.parametrize("with_logger", [True, False], ids=["mlflow_logger", "own_run"])
def test_resume_after_sigkill_continues_in_the_same_mlflow_run(tmp_path, mlflow_local, monkeypatch, with_logger):
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    ckpt_dir = tmp_path / "ckpt"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_local}
    log = tmp_path / "killed.log"
    arguments = (mlflow_local, str(ckpt_dir), str(tmp_path), with_logger)
    code = run_in_new_process(_killed_fit, *arguments, timeout=600, env=env, cwd=tmp_path, log=log)
    assert code == -9, log.read_text()[-2000:]
    client = MlflowClient(mlflow_local)
    experiments = [e.experiment_id for e in client.search_experiments()]
    (crashed,) = client.search_runs(experiments)
    assert crashed.info.status == "RUNNING"  # nobody finished it

    callback = SparsityCallback(mode="exact", every_n_steps=1)
    logger = MLFlowLogger(experiment_name="crash", tracking_uri=mlflow_local) if with_logger else False
    trainer = _trainer(tmp_path, [callback], max_steps=6, logger=logger)
    trainer.fit(LitLM(seed=0), _data(6), ckpt_path=str(ckpt_dir / "epoch=0-step=2.ckpt"))

    (run,) = client.search_runs(experiments)  # one run for the whole training
    assert run.info.run_id == crashed.info.run_id and run.info.status == "FINISHED"
    assert {s for s, _ in _metric_steps(client, run.info.run_id)} == {0, 1, 2, 3, 4, 5}
    deleted = client.search_runs(experiments, run_view_type=ViewType.DELETED_ONLY)
    assert len(deleted) == (1 if with_logger else 0)  # the empty run the new MLFlowLogger opened


def test_two_sparsity_callbacks_are_refused(tmp_path):
    # Lightning itself refuses two stateful callbacks with one state key, when the Trainer is built.
    with pytest.raises(RuntimeError, match=r"more than one stateful callback of type `SparsityCallback`"):
        _trainer(tmp_path, [SparsityCallback(), SparsityCallback(every_n_steps=2)], max_steps=1)


class _LoggingLM(LitLM):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("loss", loss)
        return loss


@pytest.mark.parametrize("accumulate", [1, 2])
def test_sparsity_steps_line_up_with_lightnings_own_loss(tmp_path, mlflow_local, accumulate):
    """Lightning logs the loss of the batch(es) of optimizer step k at step k - 1; the measurement after
    optimizer step k is logged at the same step, so the curves line up (same steps, same count)."""
    from mlflow import MlflowClient

    logger = MLFlowLogger(experiment_name="steps", tracking_uri=mlflow_local)
    callback = SparsityCallback(mode="exact", every_n_steps=1)
    trainer = _trainer(
        tmp_path, [callback], max_steps=4, logger=logger, log_every_n_steps=1, accumulate_grad_batches=accumulate
    )
    trainer.fit(_LoggingLM(), _data(4 * accumulate))
    client = MlflowClient(mlflow_local)
    loss_steps = sorted({m.step for m in client.get_metric_history(logger.run_id, "loss")})
    assert loss_steps == [0, 1, 2, 3]
    assert [s for s, _ in _metric_steps(client, logger.run_id)] == loss_steps
    assert [int(p["step"]) for p in callback.tracker.history] == [1, 2, 3, 4]  # optimizer steps


# --- distributed: real 2-process gloo runs of this file ----------------------------------------------


def _dist_fit(kind: str, out_dir: str, mlflow_uri: str | None, devices: int) -> None:
    """One rank of a DDP / FSDP2 fit (or the single-process baseline). Every rank sees the same batches
    (``use_distributed_sampler=False``): DDP's averaged gradient then equals one process's gradient bit for bit.
    Writes ``rank<i>.json`` with what this rank measured."""
    torch.set_num_threads(1)
    if kind == "fsdp2" and devices > 1:
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
    else:
        strategy = "ddp" if devices > 1 else "auto"
    module = LitLM(fsdp2=kind == "fsdp2" and devices > 1)
    logger = MLFlowLogger(experiment_name=f"dist-{kind}", tracking_uri=mlflow_uri) if mlflow_uri else False
    callback = SparsityCallback(mode="exact", every_n_steps=2, log_to_mlflow=mlflow_uri is not None)
    sinks = []

    class SinkWatcher(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            sinks.append(callback._session.sink is not None)

    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=6,
        logger=logger,
        callbacks=[callback, SinkWatcher()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        default_root_dir=out_dir,
    )
    trainer.fit(module, _data(6))
    m = callback.last_measurement
    local = sum(t.local().numel() for t in callback.tracker._tracked)
    result = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "history": callback.tracker.history,
        "tensors": {n: [c.numel, c.changed, c.ever_changed, c.churn] for n, c in m.tensors.items()},
        "local_numel": local,
        "has_sink": any(sinks),
        "run_id": logger.run_id if (logger and trainer.is_global_zero) else None,
    }
    with open(os.path.join(out_dir, f"{kind}-{devices}-rank{trainer.global_rank}.json"), "w") as f:
        json.dump(result, f)
    if torch.distributed.is_initialized():
        # Exiting with a live gloo group after a collective can abort at interpreter shutdown
        # ("terminate called without an active exception", pytorch/pytorch#190489): tear it down first.
        torch.distributed.destroy_process_group()


def _launch(kinds: list[str], out_dir, mlflow_uri: str | None, world_size: int = 2) -> dict[str, list[dict]]:
    """Start ``world_size`` ranks as new processes (`helpers.new_process`; Lightning's LightningEnvironment
    with LOCAL_RANK set: no re-launch of pytest) that run the fits ``kinds`` one after the other, each in a
    process group of its own (its own ``MASTER_PORT``). Wait for all; return each kind's results sorted by
    rank. A port found free can be taken by another process before rank 0 listens on it (EADDRINUSE): then
    the ranks start again on fresh ports, up to 3 times."""
    for _ in range(3):
        codes, logs = _run_ranks(kinds, out_dir, mlflow_uri, world_size)
        if codes == [0] * world_size or "EADDRINUSE" not in logs:
            break
    assert codes == [0] * world_size, f"ranks exited with {codes} (a rank blocked or failed):\n{logs}"
    results: dict[str, list[dict]] = {}
    for kind in kinds:
        results[kind] = []
        for rank in range(world_size):
            with open(os.path.join(out_dir, f"{kind}-{world_size}-rank{rank}.json")) as f:
                results[kind].append(json.load(f))
    return results


def _rank(kinds: list[str], out_dir: str, mlflow_uri: str | None, world_size: int, ports: list[int]) -> None:
    """One rank of `_launch`: the fits ``kinds``, each in a process group of its own (its ``MASTER_PORT``)."""
    for kind, port in zip(kinds, ports, strict=True):
        os.environ["MASTER_PORT"] = str(port)
        if kind.startswith("freeze-"):
            _freeze_fit(out_dir, world_size, resume=kind == "freeze-resumed")
        else:
            _dist_fit(kind, out_dir, mlflow_uri, world_size)


def _run_ranks(kinds: list[str], out_dir, mlflow_uri: str | None, world_size: int) -> tuple[list[int], str]:
    """One start of the ranks of `_launch`: their exit codes and the tails of their logs. When a rank fails,
    the others are stopped at once (they would wait for it until the timeout)."""
    ports = free_ports(len(kinds))
    name = "+".join(kinds)
    processes = []
    for rank in range(world_size):
        env = dict(
            os.environ,
            MASTER_ADDR="127.0.0.1",
            WORLD_SIZE=str(world_size),
            NODE_RANK="0",
            LOCAL_RANK=str(rank),
            OMP_NUM_THREADS="1",
        )
        env.pop("MLFLOW_TRACKING_URI", None)
        log = os.path.join(out_dir, f"{name}-rank{rank}.log")
        processes.append(new_process(_rank, kinds, str(out_dir), mlflow_uri, world_size, ports, env=env, log=log))
    deadline = time.monotonic() + DIST_TIMEOUT_S * len(kinds)
    try:
        while time.monotonic() < deadline:
            codes = [process.exitcode for process in processes]
            if all(code is not None for code in codes) or any(code not in (None, 0) for code in codes):
                break
            time.sleep(0.2)
    finally:
        for process in processes:
            if process.exitcode is None:
                process.kill()
            process.join()
    logs = "\n".join(open(os.path.join(out_dir, f"{name}-rank{r}.log")).read()[-3000:] for r in range(world_size))
    return [process.exitcode for process in processes], logs


@pytest.fixture(scope="module")
def launched(tmp_path_factory, mlflow_server):
    """``(folder, {kind: results by rank})``: the 2-process fits of this module's distributed tests (DDP and
    FSDP2 logging to the session's MLflow server, the first FSDP2 freezing fit), in one launch."""
    folder = tmp_path_factory.mktemp("lightning_dist")
    return folder, _launch(["ddp", "fsdp2", "freeze-first"], folder, mlflow_server)


def _single(kind: str, out_dir) -> dict:
    _dist_fit(kind, str(out_dir), None, 1)
    with open(os.path.join(out_dir, f"{kind}-1-rank0.json")) as f:
        return json.load(f)


@pytest.mark.distributed
def test_ddp_two_processes_equal_one_process_and_only_rank_zero_logs(launched, mlflow_server):
    from mlflow import MlflowClient

    folder, runs = launched
    ranks = runs["ddp"]
    single = _single("ddp", folder)
    for result in ranks:
        assert result["world_size"] == 2
        assert result["tensors"] == single["tensors"]  # replicas counted once: not doubled
        assert result["history"] == single["history"]  # every rank measured at the same steps
    assert [int(p["step"]) for p in single["history"]] == [2, 4, 6]
    assert [r["has_sink"] for r in ranks] == [True, False]

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("dist-ddp")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [ranks[0]["run_id"]]  # exactly one writer, one run
    curve = _metric_steps(client, ranks[0]["run_id"])
    assert [s for s, _ in curve] == [1, 3, 5]  # one value per step, not one per rank
    assert [v for _, v in curve] == pytest.approx([p["changed_fraction"] for p in single["history"]], abs=1e-12)


@pytest.mark.distributed
def test_fsdp2_each_rank_measures_its_shard_and_the_sums_equal_one_process(launched, mlflow_server, tmp_path):
    """FSDP2 (`ModelParallelStrategy` + `fully_shard` on the data-parallel mesh) runs on CPU with gloo.
    (FSDP1, ``strategy="fsdp"``, does not: see the README.)"""
    from mlflow import MlflowClient

    folder, runs = launched
    ranks = runs["fsdp2"]
    single = _single("fsdp2", folder)
    total = sum(n for n, *_ in single["tensors"].values())
    assert [r["local_numel"] for r in ranks] != [total, total]  # each rank holds a shard ...
    assert sum(r["local_numel"] for r in ranks) == total  # ... and the shards add up to the model
    for result in ranks:
        # FSDP2 names carry no wrapper prefix here; compare the summed counts per tensor
        assert result["tensors"] == single["tensors"]
        assert [p["step"] for p in result["history"]] == [p["step"] for p in single["history"]]
        for ours, theirs in zip(result["history"], single["history"]):
            assert ours["changed_fraction"] == pytest.approx(theirs["changed_fraction"], abs=1e-12)
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("dist-fsdp2")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [ranks[0]["run_id"]]
    assert [s for s, _ in _metric_steps(client, ranks[0]["run_id"])] == [1, 3, 5]
    # the mask artifact is the full mask, gathered from both shards (every rank joins the gather)
    local = client.download_artifacts(ranks[0]["run_id"], "sparsity/mask.safetensors", str(tmp_path / "artifacts"))
    mask = Mask.load(local)
    assert mask.numel() == total
    assert mask.count() == sum(ever for _, _, ever, _ in single["tensors"].values())


def _freeze_fit(out_dir: str, devices: int, resume: bool) -> None:
    """One rank of an FSDP2 (`ModelParallelStrategy`) fit that freezes to the discovered mask after step 2
    (AdamW, with weight decay from the freeze on: the embedding rows of unused tokens are unchanged until
    then; gradient clipping), checkpointing at step 4 (end of epoch 3, one batch per epoch); ``resume``:
    continue from that checkpoint to step 6. After every optimizer step from the freeze on, the gathered full
    weights' frozen elements are compared with their values when freezing began."""
    torch.set_num_threads(1)
    from lightning.pytorch.strategies import ModelParallelStrategy

    callback = SparsityCallback(
        mode="exact", every_n_steps=1, freeze_mask="discover", freeze_after_steps=2, log_to_mlflow=False
    )
    state = {"frozen_at": None, "checks": []}

    def full(pl_module) -> dict[str, torch.Tensor]:
        return {n: p.full_tensor().detach().clone() for n, p in pl_module.named_parameters()}

    class FrozenWatcher(pl.Callback):  # after SparsityCallback: sees the freezer it just made
        def on_train_batch_end(self, trainer, pl_module, *args):
            freezer = callback.freezer
            if freezer is None:
                return
            weights = full(pl_module)
            if state["frozen_at"] is None:
                state["frozen_at"] = weights
                state["mask"] = callback._session._freeze_mask
                for optimizer in trainer.optimizers:  # from now on weight decay would move every frozen element
                    for group in optimizer.param_groups:
                        group["weight_decay"] = 0.1
                return
            ok = all(
                torch.equal(weights[n][~keep].view(torch.int32), state["frozen_at"][n][~keep].view(torch.int32))
                for n, keep in state["mask"].items()
            )
            state["checks"].append([trainer.global_step, ok])

    # 1 batch per epoch, a checkpoint at the end of epoch 3 (step 4): the batch order cannot differ on resume
    checkpoint = ModelCheckpoint(
        dirpath=os.path.join(out_dir, "ckpt"), every_n_epochs=4, save_top_k=-1, save_on_train_epoch_end=True
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1),
        max_steps=6,
        logger=False,
        callbacks=[callback, FrozenWatcher(), checkpoint],
        gradient_clip_val=0.5,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        default_root_dir=out_dir,
    )
    module = LitLM(fsdp2=True)
    ckpt = os.path.join(out_dir, "ckpt", "epoch=3-step=4.ckpt") if resume else None
    if resume:  # the weights at the resumed step are the ones frozen at step 2 of the first run
        state["frozen_at"] = torch.load(os.path.join(out_dir, "frozen_at.pt"))
        state["mask"] = Mask(torch.load(os.path.join(out_dir, "mask.pt")))
    trainer.fit(module, _data(1), ckpt_path=ckpt)
    session = callback._session
    final = full(module)
    result = {
        "rank": trainer.global_rank,
        "checks": state["checks"],
        "frozen_fraction": session.freezer.frozen_fraction if session.freezer else None,
        "freeze_source": session.freeze_source,
        "extra_bytes": session.freezer.extra_bytes if session.freezer else None,
        "mask_count": session._freeze_mask.count(),
    }
    name = "resumed" if resume else "first"
    if trainer.global_rank == 0:
        torch.save(final, os.path.join(out_dir, f"final-{name}.pt"))
        if not resume:
            torch.save(state["frozen_at"], os.path.join(out_dir, "frozen_at.pt"))
            torch.save(dict(state["mask"].items()), os.path.join(out_dir, "mask.pt"))
    with open(os.path.join(out_dir, f"freeze-{name}-{devices}-rank{trainer.global_rank}.json"), "w") as f:
        json.dump(result, f)
    torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_fsdp2_freezes_to_the_discovered_mask_and_resumes_bit_exactly(launched):
    """`ModelParallelStrategy` + FSDP2 with ``freeze_mask="discover"``: each rank freezes its shard of the
    gathered ever-changed mask; frozen elements stay bit-identical through clipping, weight decay and a
    checkpoint resume (Lightning's distributed checkpoint + the callback's mask), and the resumed run ends
    with exactly the weights of the uninterrupted one. One batch per epoch: with two, the resumed run's
    trainable weights differed by ~lr here although weights and optimizer state came back exactly (the batch
    order Lightning replays after an end-of-epoch checkpoint is the suspect; with one batch it cannot differ).
    """
    folder, runs = launched
    first = runs["freeze-first"]
    resumed = _launch(["freeze-resumed"], folder, None)["freeze-resumed"]  # fresh processes, from the checkpoint
    for result in first:
        assert result["freeze_source"] == "discover@2"
        assert [step for step, _ in result["checks"]] == [3, 4, 5, 6] and all(ok for _, ok in result["checks"])
        assert 0.01 < result["frozen_fraction"] < 0.5  # e.g. the embedding rows of unused tokens never changed
    for result in resumed:
        assert result["freeze_source"] == "discover@2"  # from the checkpoint, not discovered again
        assert [step for step, _ in result["checks"]] == [5, 6] and all(ok for _, ok in result["checks"])
        assert result["frozen_fraction"] == first[0]["frozen_fraction"]
    total = sum(p.numel() for p in tiny_llama().parameters())
    assert [r["mask_count"] for r in first] == [r["mask_count"] for r in resumed] and first[0]["mask_count"] < total
    end, again = torch.load(folder / "final-first.pt"), torch.load(folder / "final-resumed.pt")
    frozen_at, mask = torch.load(folder / "frozen_at.pt"), torch.load(folder / "mask.pt")
    for name, value in end.items():
        frozen = ~mask[name]
        assert torch.equal(value[frozen].view(torch.int32), frozen_at[name][frozen].view(torch.int32)), name
        assert torch.equal(again[name][frozen].view(torch.int32), frozen_at[name][frozen].view(torch.int32)), name
        assert not torch.equal(value[~frozen], frozen_at[name][~frozen]) or not (~frozen).any(), name  # trained
    assert [n for n in end if not torch.equal(end[n].view(torch.int32), again[n].view(torch.int32))] == []
