"""MaskFreezer: frozen elements stay bit-identical under every torch optimizer; _resolve_freeze_mask."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import optim

sys.path.insert(0, os.path.dirname(__file__))
from helpers import tiny_gpt2, tiny_llama  # noqa: E402

from sparsity_callbacks._rules import _tensor_signature  # noqa: E402
from sparsity_callbacks.config import SparsityConfig  # noqa: E402
from sparsity_callbacks.freeze import MaskFreezer, _resolve_freeze_mask  # noqa: E402
from sparsity_callbacks.masks import Mask  # noqa: E402
from sparsity_callbacks.params import _collect_parameters  # noqa: E402

_INT_VIEW = {
    torch.float32: torch.int32,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
    torch.float64: torch.int64,
}


# --- helpers ---------------------------------------------------------------------------------------
def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().view(_INT_VIEW[t.dtype])


def _tracked(model):
    return _collect_parameters(model, SparsityConfig())[0]


def _random_mask(model, density: float = 0.3, seed: int = 0) -> Mask:
    gen = torch.Generator().manual_seed(seed)
    return Mask({t.name: torch.rand(t.shape, generator=gen) < density for t in _tracked(model)})


def _state(model) -> dict[str, torch.Tensor]:
    return {t.name: _bits(t.param) for t in _tracked(model)}


def _batches(n: int, seed: int = 0, vocab: int = 64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (2, 12), generator=gen) for _ in range(n)]


def _make_closure(model, opt, ids, variant: str):
    micro = 2 if variant == "accumulate" else 1

    def closure():
        opt.zero_grad()
        for chunk in ids.chunk(micro):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant == "bf16_autocast"):
                loss = model(input_ids=chunk, labels=chunk).loss / micro
            loss.backward()
        if variant == "clip_norm":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        if variant == "clip_value":
            torch.nn.utils.clip_grad_value_(model.parameters(), 1e-3)
        return loss

    return closure


def _train(model, opt, steps: int, variant: str = "plain", seed: int = 0) -> None:
    for ids in _batches(steps, seed):
        closure = _make_closure(model, opt, ids, variant)
        if isinstance(opt, optim.LBFGS):
            opt.step(closure)
        else:
            closure()
            opt.step()


def _assert_frozen(before: dict, model, mask: Mask, min_moved: float = 0.3, moving=lambda name: True) -> None:
    """Every frozen element bit-identical to ``before``; at least ``min_moved`` of the trainable
    elements of the tensors ``moving(name)`` moved."""
    moved = trainable = 0
    for name, now in _state(model).items():
        keep = mask[name]
        assert torch.equal(now[~keep], before[name][~keep]), f"frozen elements of {name} changed"
        if not moving(name):
            continue
        moved += int((now[keep] != before[name][keep]).sum())
        trainable += int(keep.sum())
    assert moved >= min_moved * trainable, f"only {moved}/{trainable} trainable elements moved"


# --- the exactness matrix --------------------------------------------------------------------------
def _muon(params):
    params = list(params)
    return optim.Muon([p for p in params if p.ndim == 2], lr=0.05, weight_decay=0.1)


OPTIMIZERS = {
    "sgd": lambda p: optim.SGD(p, lr=0.5),
    "sgd_momentum": lambda p: optim.SGD(p, lr=0.2, momentum=0.9),
    "sgd_nesterov": lambda p: optim.SGD(p, lr=0.2, momentum=0.9, nesterov=True),
    "sgd_dampening": lambda p: optim.SGD(p, lr=0.2, momentum=0.9, dampening=0.5),
    "sgd_weight_decay": lambda p: optim.SGD(p, lr=0.2, momentum=0.9, weight_decay=0.1),
    "sgd_foreach": lambda p: optim.SGD(p, lr=0.2, momentum=0.9, weight_decay=0.1, foreach=True),
    "sgd_fused": lambda p: optim.SGD(p, lr=0.2, momentum=0.9, weight_decay=0.1, fused=True),
    "adam": lambda p: optim.Adam(p, lr=1e-2),
    "adam_weight_decay": lambda p: optim.Adam(p, lr=1e-2, weight_decay=0.1),
    "adam_amsgrad": lambda p: optim.Adam(p, lr=1e-2, weight_decay=0.1, amsgrad=True),
    "adam_maximize": lambda p: optim.Adam(p, lr=1e-2, maximize=True),
    "adam_foreach": lambda p: optim.Adam(p, lr=1e-2, weight_decay=0.1, foreach=True),
    "adam_fused": lambda p: optim.Adam(p, lr=1e-2, weight_decay=0.1, fused=True),
    "adamw": lambda p: optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "adamw_amsgrad": lambda p: optim.AdamW(p, lr=1e-2, weight_decay=0.1, amsgrad=True),
    "adamw_foreach": lambda p: optim.AdamW(p, lr=1e-2, weight_decay=0.1, foreach=True),
    "adamw_fused": lambda p: optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True),
    "adamw_fused_amsgrad": lambda p: optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True, amsgrad=True),
    "nadam": lambda p: optim.NAdam(p, lr=1e-2, weight_decay=0.1),
    "nadam_decoupled": lambda p: optim.NAdam(p, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
    "nadam_foreach": lambda p: optim.NAdam(p, lr=1e-2, weight_decay=0.1, foreach=True),
    "radam": lambda p: optim.RAdam(p, lr=1e-2, weight_decay=0.1),
    "radam_decoupled": lambda p: optim.RAdam(p, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
    "radam_foreach": lambda p: optim.RAdam(p, lr=1e-2, weight_decay=0.1, foreach=True),
    "rmsprop": lambda p: optim.RMSprop(p, lr=1e-2, weight_decay=0.1),
    "rmsprop_momentum": lambda p: optim.RMSprop(p, lr=1e-2, momentum=0.9),
    "rmsprop_centered": lambda p: optim.RMSprop(p, lr=1e-2, momentum=0.9, centered=True, weight_decay=0.1),
    "rmsprop_foreach": lambda p: optim.RMSprop(p, lr=1e-2, momentum=0.9, centered=True, foreach=True),
    "adagrad": lambda p: optim.Adagrad(p, lr=0.1, weight_decay=0.1, lr_decay=0.01, initial_accumulator_value=0.1),
    "adagrad_foreach": lambda p: optim.Adagrad(p, lr=0.1, weight_decay=0.1, foreach=True),
    "adagrad_fused": lambda p: optim.Adagrad(p, lr=0.1, weight_decay=0.1, fused=True),
    "adamax": lambda p: optim.Adamax(p, lr=1e-2, weight_decay=0.1),
    "adamax_foreach": lambda p: optim.Adamax(p, lr=1e-2, weight_decay=0.1, foreach=True),
    "adadelta": lambda p: optim.Adadelta(p, lr=1.0, weight_decay=0.1),
    "asgd": lambda p: optim.ASGD(p, lr=0.2, weight_decay=0.1),
    "rprop": lambda p: optim.Rprop(p, lr=1e-2),
    "adafactor": lambda p: optim.Adafactor(p, lr=1e-2, weight_decay=0.1),
    "muon": _muon,
    "lbfgs": lambda p: optim.LBFGS(p, lr=0.5, max_iter=3),
}
VARIANTS = ["plain", "clip_norm", "clip_value", "accumulate", "bf16_autocast"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_frozen_elements_bit_identical(name, variant):
    model = tiny_llama()
    opt = OPTIMIZERS[name](model.parameters())
    _train(model, opt, 1, variant, seed=1)  # optimizer state exists before freezing
    mask = _random_mask(model)
    before = _state(model)
    freezer = MaskFreezer(model, mask)
    freezer.attach(opt)
    _train(model, opt, 3, variant)
    # Muon only steps the 2-D weights: judge movement on those.
    _assert_frozen(before, model, mask, moving=lambda n: name != "muon" or mask.shapes[n].__len__() == 2)


@pytest.mark.parametrize("compact_state", [False, True])
def test_bf16_parameters(compact_state):
    model = tiny_llama().to(torch.bfloat16)
    opt = optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    mask = _random_mask(model)
    before = _state(model)
    freezer = MaskFreezer(model, mask, compact_optimizer_state=compact_state)
    freezer.attach(opt)
    _train(model, opt, 3)
    _assert_frozen(before, model, mask)
    if compact_state:  # an int32 index per trainable element
        assert freezer.extra_bytes == 4 * mask.count()
    else:  # bf16 copy + bool mask
        assert freezer.extra_bytes == sum(p.numel() * 3 for p in model.parameters())


# --- mechanisms ------------------------------------------------------------------------------------
def test_clip_norm_is_the_subnetworks():
    mask = _random_mask(tiny_llama())
    ids = _batches(1)[0]

    def run(model, zero_by_hand: bool, freeze: bool):
        opt = optim.SGD(model.parameters(), lr=0.5)
        if freeze:
            MaskFreezer(model, mask, compact_optimizer_state=False).attach(opt)
        model(input_ids=ids, labels=ids).loss.backward()
        if zero_by_hand:
            for t in _tracked(model):
                t.param.grad[~mask[t.name]] = 0
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()
        return norm, _state(model)

    norm_freezer, state_freezer = run(tiny_llama(), zero_by_hand=False, freeze=True)
    norm_manual, state_manual = run(tiny_llama(), zero_by_hand=True, freeze=False)
    norm_full, _ = run(tiny_llama(), zero_by_hand=False, freeze=False)
    assert torch.equal(norm_freezer, norm_manual)
    assert norm_full > 1.2 * norm_freezer  # the full norm would have been clipped differently
    for name in state_manual:
        assert torch.equal(state_freezer[name], state_manual[name]), name


def test_optimizer_state_zeroed_at_attach():
    model = tiny_llama()
    opt = optim.AdamW(model.parameters(), lr=1e-2, amsgrad=True)
    _train(model, opt, 2)
    mask = _random_mask(model)
    names = {id(t.param): t.name for t in _tracked(model)}
    before = {names[id(p)]: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    MaskFreezer(model, mask, compact_optimizer_state=False).attach(opt)
    for param, state in opt.state.items():
        name = names[id(param)]
        keep = mask[name]
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert not state[key][~keep].any(), (name, key)
            assert torch.equal(state[key][keep], before[name][key][keep]), (name, key)
            assert before[name][key][~keep].any()  # there was something to zero
        assert torch.equal(state["step"], before[name]["step"])


def test_grads_of_frozen_elements_are_zero_and_requires_grad_unchanged():
    model = tiny_llama()
    mask = _random_mask(model)
    freezer = MaskFreezer(model, mask)
    ids = _batches(1)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    for t in _tracked(model):
        assert t.param.requires_grad
        assert not t.param.grad[~mask[t.name]].any(), t.name
    assert 0.6 < freezer.frozen_fraction < 0.8


def test_gradient_accumulation_across_hooks():
    """Grads accumulated over 3 backward passes stay zero at frozen elements, nonzero elsewhere."""
    model = tiny_llama()
    mask = _random_mask(model)
    MaskFreezer(model, mask)
    for ids in _batches(3):
        model(input_ids=ids, labels=ids).loss.backward()
    grad = model.model.layers[0].mlp.up_proj.weight.grad
    keep = mask["model.layers.0.mlp.up_proj.weight"]
    assert not grad[~keep].any() and grad[keep].ne(0).float().mean() > 0.9


def test_detach_stops_restoring():
    model = tiny_llama()
    opt = optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    mask = _random_mask(model)
    before = _state(model)
    freezer = MaskFreezer(model, mask)
    freezer.attach(opt)
    _train(model, opt, 2)
    _assert_frozen(before, model, mask)
    freezer.detach()
    assert freezer.extra_bytes == 0
    _train(model, opt, 2)
    now = _state(model)
    name = "model.layers.0.mlp.up_proj.weight"
    assert (now[name][~mask[name]] != before[name][~mask[name]]).float().mean() > 0.9
    assert model.model.layers[0].mlp.up_proj.weight.grad[~mask[name]].ne(0).any()


def test_several_optimizers():
    model = tiny_llama()
    embed = [model.model.embed_tokens.weight]
    rest = [p for p in model.parameters() if p is not embed[0]]
    opts = [optim.SGD(embed, lr=0.5, momentum=0.9, weight_decay=0.1), optim.AdamW(rest, lr=1e-2, weight_decay=0.1)]
    mask = _random_mask(model)
    before = _state(model)
    freezer = MaskFreezer(model, mask)
    for opt in opts:
        freezer.attach(opt)
        freezer.attach(opt)  # twice is a no-op
    assert len(freezer.optimizers) == 2
    for ids in _batches(3):
        model(input_ids=ids, labels=ids).loss.backward()
        for opt in opts:
            opt.step()
            opt.zero_grad()
    _assert_frozen(before, model, mask)


def test_fully_frozen_and_fully_trainable_tensors_and_extra_bytes():
    model = tiny_llama()
    masks = dict(_random_mask(model).items())
    masks["model.embed_tokens.weight"] = torch.zeros_like(masks["model.embed_tokens.weight"])
    masks["lm_head.weight"] = torch.ones_like(masks["lm_head.weight"])
    mask = Mask(masks)
    opt = optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    before = _state(model)
    freezer = MaskFreezer(model, mask, compact_optimizer_state=False)
    freezer.attach(opt)
    _train(model, opt, 3)
    _assert_frozen(before, model, mask)
    params = dict(model.named_parameters())
    embed = params["model.embed_tokens.weight"].numel()
    partial = sum(p.numel() for n, p in params.items() if n not in ("model.embed_tokens.weight", "lm_head.weight"))
    assert freezer.extra_bytes == embed * 4 + partial * 5  # doc: itemsize (all frozen), itemsize + 1 (partly)
    assert freezer.frozen_fraction == pytest.approx(1 - mask.density)


def test_compact_storage():
    model = tiny_llama()
    opt = optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    mask = _random_mask(model)
    before = _state(model)
    freezer = MaskFreezer(model, mask, compact=True, compact_optimizer_state=False)
    freezer.attach(opt)
    _train(model, opt, 3)
    _assert_frozen(before, model, mask)
    numel = mask.numel()
    assert freezer.extra_bytes == numel * 1 + (numel - mask.count()) * 4


def test_tied_parameters_appear_once():
    model = tiny_llama(tie_word_embeddings=True)
    tracked = _tracked(model)
    assert "lm_head.weight" in tracked[0].aliases or any("lm_head.weight" in t.aliases for t in tracked)
    mask = _random_mask(model)
    opt = optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    before = _state(model)
    freezer = MaskFreezer(model, mask, tracked=[t.param for t in tracked], compact_optimizer_state=False)
    freezer.attach(opt)
    _train(model, opt, 3)
    _assert_frozen(before, model, mask)
    assert freezer.extra_bytes == sum(p.numel() for p in model.parameters()) * 5  # tied weight stored once


def test_accelerate_wrapped_optimizer():
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.state import AcceleratorState

    try:
        accelerator = Accelerator(cpu=True)
        model = tiny_llama()
        opt = optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        model, wrapped = accelerator.prepare(model, opt)
        assert isinstance(wrapped, AcceleratedOptimizer)
        mask = _random_mask(model)
        before = _state(model)
        freezer = MaskFreezer(model, mask)
        assert freezer.attach(wrapped) is opt
        for ids in _batches(3):
            accelerator.backward(model(input_ids=ids, labels=ids).loss)
            accelerator.clip_grad_norm_(model.parameters(), 0.5)
            wrapped.step()
            wrapped.zero_grad()
        _assert_frozen(before, model, mask)
    finally:
        AcceleratorState._reset_state(True)


@pytest.mark.slow
def test_lightning_optimizer_in_a_real_fit():
    import lightning.pytorch as pl
    from lightning.pytorch.core.optimizer import LightningOptimizer

    mask_holder = {}

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lm = tiny_llama()

        def training_step(self, batch, batch_idx):
            return self.lm(input_ids=batch, labels=batch).loss

        def configure_optimizers(self):
            return optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)

        def on_train_start(self):
            lightning_opt = self.optimizers()
            assert isinstance(lightning_opt, LightningOptimizer)
            mask_holder["before"] = _state(self.lm)
            freezer = MaskFreezer(self.lm, mask_holder["mask"])
            assert freezer.attach(lightning_opt) is lightning_opt.optimizer

    module = Module()
    mask_holder["mask"] = _random_mask(module.lm)
    data = torch.utils.data.DataLoader(torch.cat(_batches(4)), batch_size=2)
    trainer = pl.Trainer(
        max_steps=4,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=0.5,
    )
    trainer.fit(module, data)
    assert trainer.global_step == 4
    _assert_frozen(mask_holder["before"], module.lm, mask_holder["mask"])


def test_not_an_optimizer_is_refused():
    freezer = MaskFreezer(tiny_llama(), _random_mask(tiny_llama()))
    with pytest.raises(TypeError, match="not a torch.optim.Optimizer"):
        freezer.attach(object())


# --- masks for another model -----------------------------------------------------------------------
def test_mask_of_another_architecture_is_refused():
    with pytest.raises(ValueError, match=r"another model.*transformer\.wte\.weight"):
        MaskFreezer(tiny_llama(), _random_mask(tiny_gpt2()))


def test_mask_with_other_shapes_is_refused():
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' has shape"):
        MaskFreezer(tiny_llama(), _random_mask(tiny_llama(intermediate_size=48)))


# --- _resolve_freeze_mask (needs SparsityTracker) --------------------------------------------------
def _tracker(model, mode: str = "exact"):
    from sparsity_callbacks.tracker import SparsityTracker

    tracker = SparsityTracker(model, SparsityConfig(mode=mode))
    tracker.snapshot()
    return tracker


def _sparse_training(model, tracker, steps: int = 3) -> None:
    """SGD on a few tokens: embedding rows of the other tokens never change."""
    opt = optim.SGD(model.parameters(), lr=0.5)
    for ids in _batches(steps, vocab=8):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        tracker.measure()


def test_resolve_discover_freezes_the_complement_of_ever_changed():
    model = tiny_llama()
    tracker = _tracker(model)
    _sparse_training(model, tracker)
    config = SparsityConfig(mode="exact", freeze_mask="discover", freeze_after_steps=3)
    mask = _resolve_freeze_mask(config, tracker)
    assert mask == tracker.ever_changed_mask()
    assert 0 < mask.density < 1
    freezer = MaskFreezer(model, mask, tracked=tracker.names)
    assert freezer.frozen_fraction == pytest.approx(1 - mask.density)
    opt = optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    freezer.attach(opt)
    _train(model, opt, 3)
    for t in tracker._tracked:  # everything outside the ever-changed mask is still at its reference
        frozen = ~mask[t.name]
        assert torch.equal(_bits(t.param)[frozen], _bits(tracker.reference(t.name).to(t.param.dtype))[frozen]), t.name


def test_resolve_file_of_another_shape_is_refused(tmp_path):
    path = tmp_path / "mask.safetensors"
    _random_mask(tiny_llama(intermediate_size=48)).save(path)
    tracker = _tracker(tiny_llama())
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' has shape"):
        _resolve_freeze_mask(SparsityConfig(freeze_mask=str(path)), tracker)


def test_resolve_file_of_another_base_model_is_refused(tmp_path):
    other = tiny_llama(seed=1)
    mask = _random_mask(other)
    Mask(dict(mask.items()), signatures={t.name: _tensor_signature(t.param) for t in _tracked(other)}).save(
        tmp_path / "mask.safetensors"
    )
    tracker = _tracker(tiny_llama(seed=0))
    with pytest.raises(ValueError, match=r"reference weights of tensor 'model\.embed_tokens\.weight' differ"):
        _resolve_freeze_mask(SparsityConfig(freeze_mask=str(tmp_path / "mask.safetensors")), tracker)


def test_resolve_file_of_this_model_loads(tmp_path):
    model = tiny_llama()
    tracker = _tracker(model)
    mask = Mask(dict(_random_mask(model).items()), signatures=tracker.signatures)
    mask.save(tmp_path / "mask.safetensors")
    assert _resolve_freeze_mask(SparsityConfig(freeze_mask=str(tmp_path / "mask.safetensors")), tracker) == mask


def test_density_cap_keeps_the_largest_changes():
    model = tiny_llama()
    tracker = _tracker(model)
    _sparse_training(model, tracker)
    full = tracker.ever_changed_mask()
    cap = 0.5 * full.density
    config = SparsityConfig(mode="exact", freeze_mask="discover", freeze_after_steps=3, mask_density_cap=cap)
    capped = _resolve_freeze_mask(config, tracker)
    k = int(cap * full.numel())
    assert capped.count() == k
    params = {t.name: t.param for t in tracker._tracked}
    kept, dropped = [], []
    for name in full.names:
        ref = tracker.reference(name)
        score = (params[name].detach().to(ref.dtype).double() - ref.double()).abs().float()
        assert not (capped[name] & ~full[name]).any(), "the cap only removes elements"
        kept.append(score[capped[name]])
        dropped.append(score[full[name] & ~capped[name]])
    assert torch.cat(kept).min() >= torch.cat(dropped).max()
    assert _resolve_freeze_mask(config, tracker) == capped  # deterministic


def test_density_cap_ties_are_broken_deterministically():
    """A mask denser than the cap with every score equal (0): the first elements in order are kept."""
    model = tiny_llama()
    tracker = _tracker(model)
    config = SparsityConfig(mode="exact", freeze_mask="discover", freeze_after_steps=1, mask_density_cap=0.25)
    from sparsity_callbacks.freeze import _cap_density

    everything = Mask({t.name: torch.ones(t.shape, dtype=torch.bool) for t in tracker._tracked})
    capped = _cap_density(everything, tracker, config.mask_density_cap)
    flat = torch.cat([capped[n].reshape(-1) for n in capped.names])
    k = int(0.25 * flat.numel())
    assert flat[:k].all() and not flat[k:].any()


def test_density_cap_needs_exact_mode():
    model = tiny_llama()
    tracker = _tracker(model, mode="fingerprint")
    _sparse_training(model, tracker)
    with pytest.raises(ValueError, match="mode='exact'"):  # explicit: refused by the config at once
        SparsityConfig(mode="fingerprint", freeze_mask="discover", freeze_after_steps=3, mask_density_cap=0.01)
    # mode="auto" that resolved to fingerprints (not enough host RAM): refused when the mask is resolved
    config = SparsityConfig(mode="auto", freeze_mask="discover", freeze_after_steps=3, mask_density_cap=0.01)
    with pytest.raises(ValueError, match="mode='exact'"):
        _resolve_freeze_mask(config, tracker)


# --- the model's dtype / device / shape changes after freezing began ------------------------------
@pytest.mark.parametrize("convert", ["bfloat16", "half", "double"])
def test_dtype_change_after_freezing_refreezes_in_the_new_dtype_and_never_corrupts(convert):
    model = tiny_llama()
    mask = _random_mask(model, density=0.3)
    freezer = MaskFreezer(model, mask, compact_optimizer_state=False)  # compact: tests/test_freeze_compact.py
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.0, weight_decay=0.1)
    freezer.attach(opt)
    at_freeze = {t.name: t.param.detach().clone() for t in _tracked(model)}
    getattr(model, convert)() if convert != "bfloat16" else model.to(torch.bfloat16)
    dtype = next(model.parameters()).dtype
    with pytest.warns(UserWarning, match=r"changed dtype after freezing began .*-> torch\.(bfloat16|float16|float64)"):
        for ids in _batches(3):
            opt.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
    moved = 0
    for name, param in model.named_parameters():
        frozen = ~mask[name]
        expected = at_freeze[name].to(dtype)  # what the conversion gave the frozen elements
        assert torch.equal(_bits(param)[frozen], _bits(expected)[frozen]), name
        assert param.isfinite().all(), name
        moved += int((param.detach() != expected)[mask[name]].sum())
    assert moved > 0  # the trainable elements still train


def test_shape_change_after_freezing_is_refused_naming_the_parameter():
    model = torch.nn.Linear(8, 8)
    freezer = MaskFreezer(model, Mask({"weight": torch.rand(8, 8) < 0.5, "bias": torch.rand(8) < 0.5}))
    model.weight.data = torch.zeros(4, 8)
    with pytest.raises(ValueError, match=r"Parameter 'weight' changed shape from \[8, 8\] to \[4, 8\]"):
        freezer.restore()


def test_mask_without_signatures_is_refused_unless_opted_in(tmp_path):
    """Removing `signatures` from a mask must not bypass the "other base weights" check: a mask of a
    seed-1 model without signatures would otherwise freeze a seed-0 model."""
    other = tiny_llama(seed=1)
    Mask(dict(_random_mask(other).items())).save(tmp_path / "unsigned.safetensors")  # no signatures
    tracker = _tracker(tiny_llama(seed=0))
    config = SparsityConfig(freeze_mask=str(tmp_path / "unsigned.safetensors"))
    with pytest.raises(ValueError, match=r"no reference-weight signature .*allow_unsigned_mask=True"):
        _resolve_freeze_mask(config, tracker)
    mask = _resolve_freeze_mask(config.replace(allow_unsigned_mask=True), tracker)  # the explicit opt-in
    assert mask.names == _random_mask(other).names


def test_sparse_embedding_with_frozen_elements_is_refused_at_attach():
    model = torch.nn.Sequential(torch.nn.Embedding(16, 4, sparse=True), torch.nn.Linear(4, 2))
    mask = Mask({"0.weight": torch.rand(16, 4) < 0.5, "1.weight": torch.ones(2, 4, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"`0` is an Embedding\(sparse=True\).*sparse=False.*exclude=\['0\.weight'\]"):
        MaskFreezer(model, mask)
    # a fully trainable sparse embedding needs no masking: accepted
    MaskFreezer(model, Mask({"0.weight": torch.ones(16, 4, dtype=torch.bool), "1.weight": torch.rand(2, 4) < 0.5}))
