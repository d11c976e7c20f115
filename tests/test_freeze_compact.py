"""Compact optimizer state (`MaskFreezer(compact_optimizer_state=True)`): the elementwise torch optimizers step
only the trainable elements, and the weights are bit-identical to dense freezing after every step."""

from __future__ import annotations

import logging
import os
import sys

import pytest
import torch
from torch import optim

sys.path.insert(0, os.path.dirname(__file__))
from helpers import tiny_llama  # noqa: E402
from test_freeze import OPTIMIZERS, _batches, _make_closure, _random_mask, _state  # noqa: E402

from sparsity_callbacks.freeze import MaskFreezer  # noqa: E402
from sparsity_callbacks.masks import Mask  # noqa: E402

ELEMENTWISE = [n for n in OPTIMIZERS if n not in ("adafactor", "muon", "lbfgs")]
#: fused kernels on the CPU step the tail of each tensor on a scalar path: those keep dense freezing.
DENSE_ON_CPU = {n for n in ELEMENTWISE if "fused" in n}
VARIANTS = ["plain", "clip_norm", "accumulate"]
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _mixed_mask(model, density: float = 0.3) -> Mask:
    """Random partly frozen tensors, a fully frozen embedding and a fully trainable head."""
    masks = dict(_random_mask(model, density).items())
    masks[EMBED] = torch.zeros_like(masks[EMBED])
    masks[HEAD] = torch.ones_like(masks[HEAD])
    return Mask(masks)


def _step(model, opt, ids, variant: str) -> None:
    closure = _make_closure(model, opt, ids, variant)
    if isinstance(opt, optim.LBFGS):
        opt.step(closure)
    else:
        closure()
        opt.step()


def _assert_same_weights(a, b, where: str) -> None:
    sa, sb = _state(a), _state(b)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), f"{name} differs {where}"


def _dense_and_compact(name: str, variant: str, steps: int = 3, pre_steps: int = 1, **freezer_kwargs):
    """Train two copies, dense and compact freezing, comparing the raw bits after every step."""
    models = [tiny_llama(), tiny_llama()]
    mask = _mixed_mask(models[0])
    opts = [OPTIMIZERS[name](m.parameters()) for m in models]
    for ids in _batches(pre_steps, seed=1):  # optimizer state exists before freezing
        for model, opt in zip(models, opts):
            _step(model, opt, ids, variant)
    freezers = [
        MaskFreezer(m, mask, compact_optimizer_state=c, **freezer_kwargs) for m, c in zip(models, (False, True))
    ]
    for freezer, opt in zip(freezers, opts):
        freezer.attach(opt)
    before = _state(models[0])
    for i, ids in enumerate(_batches(steps)):
        for model, opt in zip(models, opts):
            _step(model, opt, ids, variant)
        _assert_same_weights(models[0], models[1], f"after step {i + 1} ({name}, {variant})")
    moved = sum(int((now != before[n]).sum()) for n, now in _state(models[1]).items())
    assert moved > 0.3 * mask.count()
    return models, opts, freezers, mask


def _check_compact(name: str, variant: str) -> None:
    models, opts, freezers, mask = _dense_and_compact(name, variant)
    compact = name not in DENSE_ON_CPU
    assert freezers[1].compact_optimizers == ([opts[1]] if compact else [])
    if not compact:
        return
    params = dict(models[1].named_parameters())
    assert params[EMBED] not in opts[1].state  # fully frozen: no state
    for tensor_name in ("model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"):
        for key, value in opts[1].state[params[tensor_name]].items():
            if torch.is_tensor(value) and value.ndim > 0:
                assert value.shape == (int(mask[tensor_name].sum()),), (tensor_name, key)
    assert all(p is q for g in opts[1].param_groups for p, q in zip(g["params"], models[1].parameters()))


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_compact_state_bit_identical_to_dense_freezing(name):
    """Every elementwise optimizer once, the variant rotating (the full cross product is `slow`)."""
    _check_compact(name, VARIANTS[ELEMENTWISE.index(name) % len(VARIANTS)])


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", ELEMENTWISE)
def test_compact_state_bit_identical_to_dense_freezing_every_variant(name, variant):
    _check_compact(name, variant)


@pytest.mark.parametrize("name", ["adafactor", "muon", "lbfgs"])
def test_coupled_optimizers_keep_dense_freezing_with_a_note(name, caplog):
    with caplog.at_level(logging.INFO, logger="sparsity_callbacks"):
        _, opts, freezers, _ = _dense_and_compact(name, "clip_norm", steps=2)
    assert freezers[1].compact_optimizers == []
    why = {"adafactor": "factored second moments", "muon": "orthogonalizes", "lbfgs": "one search direction"}[name]
    assert any(
        f"dense freezing (full optimizer state) for {type(opts[1]).__name__}: " in r.message for r in caplog.records
    )
    assert any(why in r.message for r in caplog.records)


def test_fused_on_the_cpu_keeps_dense_freezing_with_a_note(caplog):
    model = tiny_llama()
    opt = optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    with caplog.at_level(logging.INFO, logger="sparsity_callbacks"):
        freezer = MaskFreezer(model, _random_mask(model))
        freezer.attach(opt)
    assert freezer.compact_optimizers == []
    assert any("fused=True) on the CPU" in r.message and "foreach=True" in r.message for r in caplog.records)


def test_unknown_optimizer_class_warns_and_keeps_dense_freezing():
    class MyAdamW(optim.AdamW):
        pass

    model = tiny_llama()
    before = _state(model)
    mask = _random_mask(model)
    opt = MyAdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    freezer = MaskFreezer(model, mask)
    with pytest.warns(UserWarning, match=r"dense freezing .* for MyAdamW: it is not one of the torch.optim"):
        freezer.attach(opt)
    for ids in _batches(2):
        _step(model, opt, ids, "plain")
    now = _state(model)
    for name in now:
        assert torch.equal(now[name][~mask[name]], before[name][~mask[name]])
    assert freezer.compact_optimizers == []


# --- state, resume, schedulers ------------------------------------------------------------------------
def _adamw(params):
    return optim.AdamW(params, lr=1e-2, weight_decay=0.1, amsgrad=True)


def _clone_state(state: dict) -> dict:
    return {k: {s: v.clone() if torch.is_tensor(v) else v for s, v in st.items()} for k, st in state.items()}


def test_state_dict_round_trip_resumes_bit_exactly_with_a_scheduler():
    """Save model + optimizer + scheduler after 2 compact steps, load them into fresh objects (freezer attached
    after loading, as the trainers do), continue: bit-identical to the uninterrupted run. A compact state also
    loads under dense freezing (expanded, 0 at frozen elements) with the same weights."""

    def build(model):
        opt = _adamw(model.parameters())
        return opt, optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    batches = _batches(5)
    model = tiny_llama()
    mask = _mixed_mask(model)
    opt, sched = build(model)
    MaskFreezer(model, mask).attach(opt)
    for i, ids in enumerate(batches):
        _step(model, opt, ids, "clip_norm")
        sched.step()
        if i == 1:
            saved = (
                {k: v.clone() for k, v in model.state_dict().items()},
                opt.state_dict(),
                sched.state_dict(),
            )
            saved_opt = _clone_state(saved[1]["state"])
    names = [n for n, _ in model.named_parameters()]
    up = names.index("model.layers.0.mlp.up_proj.weight")
    assert saved_opt[up]["exp_avg"].shape == (int(mask["model.layers.0.mlp.up_proj.weight"].sum()),)
    assert names.index(EMBED) not in saved_opt  # fully frozen: not in the saved state either

    for compact in (True, False):
        resumed = tiny_llama(seed=3)
        resumed.load_state_dict(saved[0])
        opt2, sched2 = build(resumed)
        opt2.load_state_dict({**saved[1], "state": _clone_state(saved_opt)})  # loading aliases the tensors
        sched2.load_state_dict(saved[2])
        MaskFreezer(resumed, mask, compact_optimizer_state=compact).attach(opt2)
        for ids in batches[2:]:
            _step(resumed, opt2, ids, "clip_norm")
            sched2.step()
        _assert_same_weights(model, resumed, f"after resuming (compact_optimizer_state={compact})")
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_optimizer_state_and_freezer_bytes():
    model = tiny_llama()
    mask = _mixed_mask(model)
    opt = optim.AdamW(model.parameters(), lr=1e-2)
    freezer = MaskFreezer(model, mask)
    freezer.attach(opt)
    _step(model, opt, _batches(1)[0], "plain")
    params = dict(model.named_parameters())
    partly = [n for n in mask.names if n not in (EMBED, HEAD)]
    kept = sum(int(mask[n].sum()) for n in partly)
    steps = 4 * (len(params) - 1)  # a float32 `step` per stepped tensor (not the fully frozen embedding)
    assert freezer.optimizer_state_bytes == 8 * (kept + params[HEAD].numel()) + steps
    assert freezer.extra_bytes == 4 * kept  # an int32 index per trainable element of the partly frozen tensors

    dense_model = tiny_llama()
    dense_opt = optim.AdamW(dense_model.parameters(), lr=1e-2)
    dense = MaskFreezer(dense_model, mask, compact_optimizer_state=False)
    dense.attach(dense_opt)
    _step(dense_model, dense_opt, _batches(1)[0], "plain")
    assert dense.optimizer_state_bytes == 8 * sum(p.numel() for p in dense_model.parameters()) + 4 * len(params)


def test_fully_frozen_tensors_stop_gradients_where_safe_and_detach_gives_them_back():
    model = tiny_llama()
    mask = _mixed_mask(model)
    embed = model.model.embed_tokens.weight
    opt = optim.Adagrad(model.parameters(), lr=0.1)  # creates state for every parameter up front
    freezer = MaskFreezer(model, mask, stop_gradients=True)
    freezer.attach(opt)
    assert not embed.requires_grad and embed not in opt.state
    for ids in _batches(2):
        _step(model, opt, ids, "clip_value")
        assert embed.grad is None
    freezer.detach()
    assert embed.requires_grad
    up = model.model.layers[0].mlp.up_proj.weight
    assert opt.state[up]["sum"].shape == up.shape  # full-shape state again
    assert not opt.state[up]["sum"][~mask["model.layers.0.mlp.up_proj.weight"]].any()
    assert opt.state[embed]["sum"].shape == embed.shape  # rebuilt: Adagrad needs it
    before = _state(model)
    for ids in _batches(2, seed=5):  # the optimizer keeps working on its own, and everything moves
        _step(model, opt, ids, "plain")
    assert (_state(model)[EMBED] != before[EMBED]).any()


def test_gradients_are_kept_under_gradient_checkpointing():
    model = tiny_llama()
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    opt = optim.AdamW(model.parameters(), lr=1e-2)
    MaskFreezer(model, _mixed_mask(model), stop_gradients=True).attach(opt)
    assert model.model.embed_tokens.weight.requires_grad


def test_model_parameters_stay_the_same_objects_and_zero_grad_reaches_them():
    model = tiny_llama()
    params = list(model.parameters())
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    MaskFreezer(model, _mixed_mask(model)).attach(opt)
    for ids in _batches(2):
        _step(model, opt, ids, "plain")
    assert list(model.parameters()) == params
    assert [p for g in opt.param_groups for p in g["params"]] == params
    assert all(p.grad is not None for p in params)
    opt.zero_grad()
    assert all(p.grad is None for p in params)


def test_dtype_change_after_freezing_needs_nothing_stored():
    """Compact state stores no values: after ``model.half()`` the frozen elements keep the converted values
    (nothing writes them, so no re-freeze and no warning) and the trainable ones train in the new dtype."""
    import warnings

    model = tiny_llama()
    mask = _random_mask(model)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    MaskFreezer(model, mask).attach(opt)
    model.half()
    at_conversion = _state(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for ids in _batches(3):
            _step(model, opt, ids, "plain")
    now = _state(model)
    for name in now:
        assert torch.equal(now[name][~mask[name]], at_conversion[name][~mask[name]]), name
    assert sum(int((now[n] != at_conversion[n])[mask[n]].sum()) for n in now) > 0.3 * mask.count()


# --- through the trainers: HF Trainer and Lightning ---------------------------------------------------
#: fast subset through the trainers (the full list is `slow`): Adam-family, momentum SGD, centered RMSprop.
TRAINER_FAST = ["adamw_amsgrad", "sgd_nesterov", "rmsprop_centered"]


def _mask_file(tmp_path, density: float = 0.3, prefix: str = "") -> str:
    """A mixed mask for `tiny_llama()` (its names under ``prefix``, e.g. a LightningModule's ``lm.``) with the
    model's signatures, saved as a file (freeze_mask=path)."""
    from sparsity_callbacks import SparsityConfig, SparsityTracker

    model = tiny_llama()
    owner = torch.nn.ModuleDict({prefix.rstrip("."): model}) if prefix else model
    tracker = SparsityTracker(owner, SparsityConfig(mode="exact"))
    tracker.snapshot()  # the reference-weight signatures that tie the mask to these base weights
    mask = {prefix + name: keep for name, keep in _mixed_mask(model, density).items()}
    path = str(tmp_path / f"mask{prefix}.safetensors")
    Mask(mask, signatures=tracker.signatures).save(path)
    return path


def _hf_train(
    out_dir,
    name: str,
    mask_path: str,
    compact: bool,
    max_steps: int,
    resume: str | None = None,
    max_grad_norm: float = 0.5,
    **extra,
):
    """A `transformers.Trainer` run (clip by norm ``max_grad_norm``, 2 accumulation steps) with the user's own
    optimizer; returns (model, weights after every optimizer step, callback, compact optimizers during training,
    whether the fully frozen embedding required grad during training)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from sparsity_callbacks.integrations.transformers import SparsityCallback

    model = tiny_llama()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 40, (32, 12), generator=gen).tolist()
    data = [{"input_ids": x, "labels": x} for x in ids]

    callback = SparsityCallback(freeze_mask=mask_path, compact_optimizer_state=compact, mode="exact", **extra)

    class Capture(TrainerCallback):
        def __init__(self):
            self.weights, self.compact_optimizers, self.embed_requires_grad = [], None, None

        def on_step_end(self, args, state, control, **kwargs):
            self.weights.append(_state(model))
            self.compact_optimizers = len(callback.freezer.compact_optimizers)
            self.embed_requires_grad = model.model.embed_tokens.weight.requires_grad

    capture = Capture()
    args = TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_grad_norm=max_grad_norm,
        max_steps=max_steps,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        save_strategy="steps" if resume is None else "no",
        save_steps=2,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data,
        optimizers=(OPTIMIZERS[name](model.parameters()), None),
        callbacks=[callback, capture],
    )
    trainer.train(resume_from_checkpoint=resume)
    return model, capture.weights, callback, capture.compact_optimizers, capture.embed_requires_grad


def _check_hf(tmp_path, name: str) -> None:
    mask_path = _mask_file(tmp_path)
    _, dense, _, _, _ = _hf_train(tmp_path / "dense", name, mask_path, False, 4, log_to_mlflow=False)
    model, compact, _, compact_optimizers, _ = _hf_train(
        tmp_path / "compact", name, mask_path, True, 4, log_to_mlflow=False
    )
    assert len(dense) == len(compact) == 4
    for step, (a, b) in enumerate(zip(dense, compact)):
        for tensor in a:
            assert torch.equal(a[tensor], b[tensor]), f"{tensor} differs after step {step + 1} ({name})"
    mask = Mask.load(mask_path)
    moved = sum(int((compact[-1][n] != compact[0][n])[mask[n]].sum()) for n in mask.names)
    assert moved > 0
    assert compact_optimizers == (0 if name in DENSE_ON_CPU else 1)


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAINER_FAST)
def test_hf_trainer_compact_state_bit_identical_to_dense_freezing(tmp_path, name):
    _check_hf(tmp_path, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ELEMENTWISE if n not in TRAINER_FAST])
def test_hf_trainer_compact_state_bit_identical_to_dense_freezing_every_optimizer(tmp_path, name):
    _check_hf(tmp_path, name)


@pytest.mark.slow
def test_hf_trainer_resume_with_compact_state_continues_bit_exactly(tmp_path, mlflow_local):
    from mlflow import MlflowClient

    mask_path = _mask_file(tmp_path, density=0.2)
    model, whole, callback, _, embed_requires_grad = _hf_train(tmp_path / "whole", "adamw", mask_path, True, 4)
    assert embed_requires_grad  # the Trainer clips by norm: fully frozen tensors keep their (zero) gradients
    saved = torch.load(tmp_path / "whole" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    names = [n for n, _ in model.named_parameters()]
    up = "model.layers.0.mlp.up_proj.weight"
    assert saved["state"][names.index(up)]["exp_avg"].shape == (int(Mask.load(mask_path)[up].sum()),)
    assert names.index(EMBED) not in saved["state"]  # fully frozen: no state saved

    # resume from checkpoint-2 in a fresh Trainer: steps 3 and 4 are bit-identical to the uninterrupted run
    _, tail, _, _, _ = _hf_train(
        tmp_path / "whole",
        "adamw",
        mask_path,
        True,
        4,
        resume=str(tmp_path / "whole" / "checkpoint-2"),
        log_to_mlflow=False,
    )
    assert len(tail) == 2
    for a, b in zip(whole[2:], tail):
        for tensor in a:
            assert torch.equal(a[tensor], b[tensor]), tensor

    # `sparsity/optimizer_state_bytes` once, after the first step (the optimizer creates its state there)
    client = MlflowClient(mlflow_local)
    history = client.get_metric_history(callback.run_id, "sparsity/optimizer_state_bytes")
    assert [m.step for m in history] == [1]
    dense_state = 8 * sum(p.numel() for p in model.parameters())
    assert 0 < history[0].value < 0.35 * dense_state


def _lightning_fit(tmp_path, name: str, mask_path: str, compact: bool, max_steps: int, ckpt_path=None, **kwargs):
    """A Lightning fit (closure-based automatic optimization, clip by norm 0.5, 2 accumulation steps); returns
    (weights after every optimizer step, callback)."""
    import lightning.pytorch as pl

    from sparsity_callbacks.integrations.lightning import SparsityCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lm = tiny_llama()

        def training_step(self, batch, batch_idx):
            (ids,) = batch
            return self.lm(input_ids=ids, labels=ids).loss

        def configure_optimizers(self):
            return OPTIMIZERS[name](self.parameters())

    class Capture(pl.Callback):
        def __init__(self):
            self.weights, self.step, self.compact_optimizers = [], 0, None

        def on_train_start(self, trainer, pl_module):
            self.step = trainer.global_step

        def on_train_batch_end(self, trainer, pl_module, *args):
            if trainer.global_step != self.step:
                self.step = trainer.global_step
                self.weights.append(_state(pl_module.lm))
                self.compact_optimizers = len(callback.freezer.compact_optimizers)

    gen = torch.Generator().manual_seed(0)
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randint(4, 40, (8, 12), generator=gen)), batch_size=2
    )  # 2 optimizer steps per epoch: the checkpoint at step 2 ends an epoch, so a resumed fit sees the same batches
    module, capture = Module(), Capture()
    callback = SparsityCallback(freeze_mask=mask_path, compact_optimizer_state=compact, mode="exact", **kwargs)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2, save_top_k=-1)
    trainer = pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        gradient_clip_val=0.5,
        accumulate_grad_batches=2,
        callbacks=[callback, capture, checkpoint],
    )
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return capture.weights, capture.compact_optimizers


def _check_lightning(tmp_path, name: str) -> None:
    mask_path = _mask_file(tmp_path, prefix="lm.")
    dense, _ = _lightning_fit(tmp_path / "dense", name, mask_path, False, 4, log_to_mlflow=False)
    compact, compact_optimizers = _lightning_fit(tmp_path / "compact", name, mask_path, True, 4, log_to_mlflow=False)
    assert len(dense) == len(compact) == 4
    for step, (a, b) in enumerate(zip(dense, compact)):
        for tensor in a:
            assert torch.equal(a[tensor], b[tensor]), f"{tensor} differs after step {step + 1} ({name})"
    assert compact_optimizers == (0 if name in DENSE_ON_CPU else 1)


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAINER_FAST)
def test_lightning_compact_state_bit_identical_to_dense_freezing(tmp_path, name):
    _check_lightning(tmp_path, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ELEMENTWISE if n not in TRAINER_FAST])
def test_lightning_compact_state_bit_identical_to_dense_freezing_every_optimizer(tmp_path, name):
    _check_lightning(tmp_path, name)


@pytest.mark.slow
def test_lightning_resume_with_compact_state_continues_bit_exactly(tmp_path):
    import glob

    mask_path = _mask_file(tmp_path, density=0.2, prefix="lm.")
    whole, _ = _lightning_fit(tmp_path / "whole", "adamw", mask_path, True, 4, log_to_mlflow=False)
    (ckpt,) = [c for c in glob.glob(str(tmp_path / "whole" / "ckpt" / "*.ckpt")) if "step=2" in c]
    saved = torch.load(ckpt, weights_only=False)["optimizer_states"][0]["state"]
    assert all(v["exp_avg"].ndim == 1 for v in saved.values() if v["exp_avg"].numel() < 64 * 16)
    tail, _ = _lightning_fit(tmp_path / "resumed", "adamw", mask_path, True, 4, ckpt_path=ckpt, log_to_mlflow=False)
    assert len(tail) == 2
    for a, b in zip(whole[2:], tail):
        for tensor in a:
            assert torch.equal(a[tensor], b[tensor]), tensor


@pytest.mark.slow
def test_hf_trainer_without_clipping_stops_the_gradients_of_fully_frozen_tensors(tmp_path):
    mask_path = _mask_file(tmp_path)
    model, weights, _, compact_optimizers, embed_requires_grad = _hf_train(
        tmp_path / "out", "adamw", mask_path, True, 2, max_grad_norm=0.0, log_to_mlflow=False
    )
    assert compact_optimizers == 1 and embed_requires_grad is False  # during training
    assert model.model.embed_tokens.weight.requires_grad  # given back at the end
    assert torch.equal(_state(model)[EMBED], _state(tiny_llama())[EMBED])
