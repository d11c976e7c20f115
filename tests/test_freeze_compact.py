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


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
