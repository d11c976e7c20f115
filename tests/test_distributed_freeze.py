"""Freezing sharded training, for real: 2 processes on gloo (CPU), launched by `helpers.spawn_ranks`.

FSDP2 (``fully_shard``, uneven ``Shard(0)``), FSDP1 ``use_orig_params=True`` and DeepSpeed ZeRO-3 (its runs are
in test_deepspeed, with the other ZeRO-3 case, in one DeepSpeed group) train a tiny Llama with a `MaskFreezer`
(AdamW with weight decay and gradient clipping, SGD with momentum). After every optimizer step the *gathered*
full parameters are checked: every frozen element bit-identical to its value when freezing began, trainable
elements moving. The final weights are compared with the same frozen run in a single process: both ranks see
the same batches, so the averaged gradient equals one process's gradient bit for bit, and the elementwise
optimizer math on a shard equals the single-process math. The one difference is the clip norm, summed over the
shards in another order: with clipping the weights agree to ~1e-6, without they are bit-identical (FSDP2,
FSDP1). DeepSpeed reduces gradients its own way: its trainable weights agree to ~1e-6 also without clipping;
frozen elements are bit-identical everywhere.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from helpers import spawn_ranks, tiny_llama  # noqa: E402

from sparsity_callbacks import Mask, MaskFreezer  # noqa: E402

pytestmark = pytest.mark.distributed

WORLD = 2
VOCAB = 67  # odd: uneven Shard(0) of the embedding and lm_head (34 + 33 rows)
STEPS = 3
CLIP = 0.5  # below the gradient norm: clipping is active
FULLY_FROZEN = "model.norm.weight"
FULLY_TRAINABLE = "model.layers.1.mlp.down_proj.weight"
SPLIT = "model.layers.0.self_attn.q_proj.weight"


def _model() -> torch.nn.Module:
    return tiny_llama(vocab_size=VOCAB)


def _held_bytes(freezer: MaskFreezer) -> int:
    """Bytes of the storages behind what the freezer keeps (a view of a full-tensor mask would count in full)."""
    kept = [t for e in freezer._entries.values() for t in (e.keep, e.frozen, e.index) if t is not None]
    return sum(t.untyped_storage().nbytes() for t in kept)


def _backward(model):
    return lambda ids: model(input_ids=ids, labels=ids).loss.backward()


def _stepper(optimizer):
    def step():
        optimizer.step()
        optimizer.zero_grad()

    return step


def _mask() -> Mask:
    """~30% trainable per tensor at fixed random positions; one tensor fully frozen, one fully trainable."""
    generator = torch.Generator().manual_seed(7)
    tensors = {}
    for name, param in _model().named_parameters():
        tensors[name] = torch.rand(param.shape, generator=generator) < 0.3
    tensors[FULLY_FROZEN] = torch.zeros_like(tensors[FULLY_FROZEN])
    tensors[FULLY_TRAINABLE] = torch.ones_like(tensors[FULLY_TRAINABLE])
    # rank 0's shard fully frozen, rank 1's fully trainable (an empty / a full compact shard under FSDP2)
    half = tensors[SPLIT].shape[0] // 2
    tensors[SPLIT][:half], tensors[SPLIT][half:] = False, True
    return Mask(tensors)


def _batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(100 + step))


def _optimizer(kind: str, params) -> torch.optim.Optimizer:
    if kind in ("adamw", "foreach"):  # foreach: the compact DTensors join the DTensor parameters' foreach step
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, foreach=kind == "foreach")
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def _check_frozen(full: dict[str, torch.Tensor], initial: dict[str, torch.Tensor], mask: Mask) -> dict:
    """Frozen elements of the gathered full weights vs their freeze-time values (bits); trainable ones moved."""
    moved_frozen, moved = [], 0
    for name, keep in mask.items():
        if not _bits_equal(full[name][~keep], initial[name][~keep]):
            moved_frozen.append(name)
        moved += int((full[name][keep] != initial[name][keep]).sum())
    return {"frozen_ok": not moved_frozen, "moved_frozen": moved_frozen, "moved": moved}


def _train(forward_backward, optimizer_step, clip, full_params, initial, mask, trace=None) -> list[dict]:
    """STEPS real steps (``forward_backward(ids)``, ``clip()``, ``optimizer_step()``); after each, the frozen
    elements of the gathered weights (appended to ``trace`` when given)."""
    checks = []
    for step in range(STEPS):
        forward_backward(_batch(step))
        norm = clip() if clip is not None else None
        optimizer_step()
        full = full_params()
        if trace is not None:
            trace.append({n: t.clone() for n, t in full.items()})
        check = _check_frozen(full, initial, mask)
        if norm is not None:
            check["norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        checks.append(check)
    return checks


def single_process(kind: str) -> tuple[dict[str, torch.Tensor], list[dict], list[float]]:
    """The same frozen run in one process: final weights, per-step checks, and the unmasked first norm."""
    model = _model()
    mask = _mask()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = _batch(0)
    model(input_ids=ids, labels=ids).loss.backward()
    unmasked = float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")))
    model.zero_grad(set_to_none=True)
    freezer = MaskFreezer(model, mask)
    optimizer = _optimizer(kind, model.parameters())
    freezer.attach(optimizer)
    clip = (lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)) if kind == "adamw" else None

    def full_params():
        return {n: p.detach() for n, p in model.named_parameters()}

    checks = _train(_backward(model), _stepper(optimizer), clip, full_params, initial, mask)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, checks, [unmasked]


# --- workers (run in the spawned processes) -------------------------------------------------------
def _fsdp2(kind: str, rank: int, tmp: str, out: dict, compact: bool = True) -> None:
    """FSDP2 frozen run; compact optimizer state (the default) unless ``compact=False``. Rank 0 saves the
    gathered weights after every step."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _model()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    mask = _mask()
    freezer = MaskFreezer(model, mask, compact_optimizer_state=compact)
    optimizer = _optimizer(kind, model.parameters())
    freezer.attach(optimizer)
    out["compact_optimizers"] = len(freezer.compact_optimizers)
    clip = (lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)) if kind != "sgd" else None
    out["extra_bytes"], out["held_bytes"] = freezer.extra_bytes, _held_bytes(freezer)

    def full_params():
        return {n: p.full_tensor().detach() for n, p in model.named_parameters()}

    trace: list = []
    out["steps"] = _train(_backward(model), _stepper(optimizer), clip, full_params, initial, mask, trace)
    out["optimizer_state_bytes"] = freezer.optimizer_state_bytes
    final = full_params()
    if rank == 0:
        name = "fsdp2" if compact else "fsdp2dense"
        torch.save(final, os.path.join(tmp, f"{name}-{kind}.pt"))
        torch.save(trace, os.path.join(tmp, f"{name}-{kind}-trace.pt"))


def _fsdp2dense(kind: str, rank: int, tmp: str, out: dict) -> None:
    _fsdp2(kind, rank, tmp, out, compact=False)


def _fsdp1(kind: str, rank: int, tmp: str, out: dict) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = _model()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    wrapped = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
    mask = _mask()
    freezer = MaskFreezer(wrapped, mask)
    optimizer = _optimizer(kind, wrapped.parameters())
    freezer.attach(optimizer)
    clip = (lambda: wrapped.clip_grad_norm_(CLIP)) if kind == "adamw" else None
    out["extra_bytes"], out["held_bytes"] = freezer.extra_bytes, _held_bytes(freezer)

    def full_params():
        with FSDP.summon_full_params(wrapped):
            return {n: p.detach().clone() for n, p in model.named_parameters()}

    out["steps"] = _train(_backward(wrapped), _stepper(optimizer), clip, full_params, initial, mask)
    final = full_params()
    if rank == 0:
        torch.save(final, os.path.join(tmp, f"fsdp1-{kind}.pt"))


def _fsdp2resume(kind: str, rank: int, tmp: str, out: dict) -> None:
    """The engine's path (what both adapters run): ``freeze_mask="discover"`` after step 1, a checkpoint at
    step 3 (the session's files + the model and optimizer state dicts), then a fresh model resumed from it;
    its steps 4-5 must end with exactly the weights of the uninterrupted run."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from sparsity_callbacks import SparsityConfig
    from sparsity_callbacks.session import _SparsitySession

    config = SparsityConfig(mode="exact", freeze_mask="discover", freeze_after_steps=1, log_to_mlflow=False)
    mesh = init_device_mesh("cpu", (WORLD,))
    directory = os.path.join(tmp, "resume_checkpoint")

    def build():
        model = _model()
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        # no weight decay until the freeze: the embedding rows of tokens not in batch 0 stay unchanged
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)

    def full(model):
        return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}

    def run(model, optimizer, session, steps, checks, saved):
        for step in steps:
            ids = _batch(step)
            model(input_ids=ids, labels=ids).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            optimizer.step()
            optimizer.zero_grad()
            session.on_optimizer_step(step)
            if step == 1:  # frozen from here on; weight decay would move every frozen element
                for group in optimizer.param_groups:
                    group["weight_decay"] = 0.1
                checks["frozen_at"], checks["mask"] = full(model), session._freeze_mask
            elif "mask" in checks:
                checks["steps"].append(_check_frozen(full(model), checks["frozen_at"], checks["mask"])["frozen_ok"])
            if step == 3 and saved is not None:
                session.save(directory)
                state = get_state_dict(model, optimizer)
                saved.extend(torch.utils._pytree.tree_map(lambda t: t.clone() if torch.is_tensor(t) else t, state))

    model, optimizer = build()
    session = _SparsitySession(config, is_rank_zero=rank == 0, default_every_n_steps=1)
    session.start(model, [optimizer], step=0)
    checks: dict = {"steps": []}
    saved: list = []
    run(model, optimizer, session, range(1, 6), checks, saved)
    uninterrupted = full(model)
    out["source"], out["frozen_fraction"] = session.freeze_source, session.freezer.frozen_fraction
    out["compact_optimizers"] = len(session.freezer.compact_optimizers)
    # the checkpoint holds compact state: 1-D Shard(0) DTensors of the trainable elements (resume: same mask)
    # the optimizer holds compact state (a 1-D Shard(0) DTensor of the trainable elements), its state_dict the
    # parameter's shape (0 at the frozen elements), as distributed checkpointing loads it
    params = dict(model.named_parameters())
    out["live_compact"] = sorted(name for name, p in params.items() if optimizer.state[p]["exp_avg"].shape != p.shape)
    out["saved_shapes_ok"] = all(s["exp_avg"].shape == params[n].shape for n, s in saved[1]["state"].items())
    session.close()

    model, optimizer = build()
    set_state_dict(model, optimizer, model_state_dict=saved[0], optim_state_dict=saved[1])
    session = _SparsitySession(config, is_rank_zero=rank == 0, default_every_n_steps=1)
    session.start(model, [optimizer], step=3, resume_dir=directory)
    out["resumed_source"] = session.freeze_source
    resumed_checks = {"steps": [], "frozen_at": checks["frozen_at"], "mask": checks["mask"]}
    run(model, optimizer, session, range(4, 6), resumed_checks, None)
    session.close()
    resumed = full(model)
    out["steps"], out["resumed_steps"] = checks["steps"], resumed_checks["steps"]
    out["resumed_equal"] = [n for n in uninterrupted if not _bits_equal(uninterrupted[n], resumed[n])]


def _worker(rank: int, port: int, tmp: str, scenarios: list[str]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    results = {}
    for scenario in scenarios:
        out: dict = {}
        framework, kind = scenario.split("-")
        try:
            globals()[f"_{framework}"](kind, rank, tmp, out)
        except Exception:
            out["error"] = traceback.format_exc()
        results[scenario] = out
        torch.distributed.barrier()
    with open(os.path.join(tmp, f"results_rank{rank}.json"), "w") as f:
        json.dump(results, f)
    torch.distributed.destroy_process_group()


# --- tests ------------------------------------------------------------------------------------------
TORCH_RUNS = ["fsdp2-adamw", "fsdp2-sgd", "fsdp1-adamw", "fsdp1-sgd"]
COMPACT_VS_DENSE = ["adamw", "sgd", "foreach"]
SCENARIOS = [
    *TORCH_RUNS,
    "fsdp2-foreach",
    *(f"fsdp2dense-{kind}" for kind in COMPACT_VS_DENSE),
    "fsdp2resume-adamw",
]


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """Every torch scenario in one 2-process gloo group (one start-up for all)."""
    tmp = str(tmp_path_factory.mktemp("dist_freeze"))
    spawn_ranks(_worker, (tmp, SCENARIOS), nprocs=WORLD)
    results = []
    for rank in range(WORLD):
        with open(os.path.join(tmp, f"results_rank{rank}.json")) as f:
            results.append(json.load(f))
    return tmp, results


@pytest.fixture(scope="module")
def single():
    """The frozen runs in this process, per optimizer kind (one intra-op thread: conftest's session fixture)."""
    return {kind: single_process(kind) for kind in ("adamw", "sgd")}


@pytest.mark.parametrize("scenario", TORCH_RUNS)
def test_sharded_frozen_elements_stay_bit_identical_and_match_one_process(spawned, single, scenario):
    tmp, results = spawned
    kind = scenario.split("-")[1]
    expected, single_checks, (unmasked_norm,) = single[kind]
    for rank in range(WORLD):
        out = results[rank][scenario]
        assert "error" not in out, out["error"]
        assert len(out["steps"]) == STEPS
        for step, check in enumerate(out["steps"]):
            assert check["frozen_ok"], (rank, step, check["moved_frozen"])  # after every step, on every rank
            assert check["moved"] > 0.5 * single_checks[step]["moved"], (rank, step)  # trainable ones move
            if kind == "adamw":  # the clip norm is the subnetwork's, summed over the shards
                assert check["norm"] == pytest.approx(single_checks[step]["norm"], rel=1e-5)
                assert check["norm"] > CLIP
        if kind == "adamw":
            assert out["steps"][0]["norm"] < 0.9 * unmasked_norm  # masked before clipping
    final = torch.load(os.path.join(tmp, f"{scenario}.pt"))
    mask = _mask()
    for name, value in expected.items():
        if kind == "sgd":  # no clipping: the same math, bit for bit
            assert _bits_equal(final[name], value), name
        else:  # the clip norm's reduction order differs in the last bits
            torch.testing.assert_close(final[name], value, rtol=1e-5, atol=1e-6)
            assert _bits_equal(final[name][~mask[name]], value[~mask[name]]), name  # frozen: exact anyway


def test_fsdp2_discovered_freeze_resumes_from_a_checkpoint_bit_exactly(spawned):
    _, results = spawned
    for rank in range(WORLD):
        out = results[rank]["fsdp2resume-adamw"]
        assert "error" not in out, out["error"]
        assert out["source"] == out["resumed_source"] == "discover@1"  # resumed from the saved mask
        assert 0.1 < out["frozen_fraction"] < 0.9
        assert out["steps"] == [True] * 4 and out["resumed_steps"] == [True] * 2
        assert out["resumed_equal"] == []  # every tensor bit-identical to the uninterrupted run
        # the partly frozen embedding (rows of tokens unseen at step 1) was saved and resumed with compact state
        assert out["compact_optimizers"] == 1 and out["live_compact"] == ["model.embed_tokens.weight"]
        assert out["saved_shapes_ok"]


@pytest.mark.parametrize("kind", COMPACT_VS_DENSE)
def test_fsdp2_compact_state_steps_bit_identical_to_dense_freezing(spawned, kind):
    """Compact optimizer state on the local shards (a 1-D Shard(0) DTensor of each rank's trainable elements)
    gives the gathered weights of dense sharded freezing bit for bit after every step, for less state."""
    tmp, results = spawned
    for rank in range(WORLD):
        compact, dense = results[rank][f"fsdp2-{kind}"], results[rank][f"fsdp2dense-{kind}"]
        assert "error" not in compact, compact["error"]
        assert "error" not in dense, dense["error"]
        assert (compact["compact_optimizers"], dense["compact_optimizers"]) == (1, 0)
        assert all(check["frozen_ok"] for check in compact["steps"])
        if kind != "sgd":  # the same clip norm: the subnetwork's, masked on the shards in both
            assert [c["norm"] for c in compact["steps"]] == [c["norm"] for c in dense["steps"]]
        assert compact["optimizer_state_bytes"] < 0.6 * dense["optimizer_state_bytes"], (compact, dense)
    compact_trace = torch.load(os.path.join(tmp, f"fsdp2-{kind}-trace.pt"))
    dense_trace = torch.load(os.path.join(tmp, f"fsdp2dense-{kind}-trace.pt"))
    assert len(compact_trace) == len(dense_trace) == STEPS
    for step, (got, want) in enumerate(zip(compact_trace, dense_trace, strict=True)):
        for name, value in want.items():
            assert _bits_equal(got[name], value), (step, name)


def test_each_rank_stores_only_its_shard(spawned):
    _, results = spawned
    model = _model()
    mask = _mask()
    single_bytes = MaskFreezer(model, mask, compact_optimizer_state=False).extra_bytes  # the same mechanism
    for scenario in ("fsdp2-adamw", "fsdp1-adamw"):
        per_rank = [results[rank][scenario]["extra_bytes"] for rank in range(WORLD)]
        assert all(0 < b < 0.7 * single_bytes for b in per_rank), per_rank
        assert sum(per_rank) <= single_bytes, per_rank  # shards: each element stored at most once over the ranks
        assert [results[rank][scenario]["held_bytes"] for rank in range(WORLD)] == per_rank  # no hidden full mask
