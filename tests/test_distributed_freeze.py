"""Freezing sharded training, for real: 2 processes on gloo (CPU), launched with `torch.multiprocessing.spawn`.

FSDP2 (``fully_shard``, uneven ``Shard(0)``), FSDP1 ``use_orig_params=True`` and DeepSpeed ZeRO-3 train a tiny
Llama with a `MaskFreezer` (AdamW with weight decay and gradient clipping, SGD with momentum). After every
optimizer step the *gathered* full parameters are checked: every frozen element bit-identical to its value
when freezing began, trainable elements moving. The final weights are compared with the same frozen run in a
single process: both ranks see the same batches, so the averaged gradient equals one process's gradient bit
for bit, and the elementwise optimizer math on a shard equals the single-process math. The one difference is
the clip norm, summed over the shards in another order: with clipping the weights agree to ~1e-6, without
they are bit-identical.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import traceback

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from helpers import tiny_llama  # noqa: E402

from sparsity_callbacks import Mask, MaskFreezer  # noqa: E402

pytestmark = pytest.mark.distributed

WORLD = 2
VOCAB = 67  # odd: uneven Shard(0) of the embedding and lm_head (34 + 33 rows)
STEPS = 3
CLIP = 0.5  # below the gradient norm: clipping is active
FULLY_FROZEN = "model.norm.weight"
FULLY_TRAINABLE = "model.layers.1.mlp.down_proj.weight"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model() -> torch.nn.Module:
    return tiny_llama(vocab_size=VOCAB)


def _mask() -> Mask:
    """~30% trainable per tensor at fixed random positions; one tensor fully frozen, one fully trainable."""
    generator = torch.Generator().manual_seed(7)
    tensors = {}
    for name, param in _model().named_parameters():
        tensors[name] = torch.rand(param.shape, generator=generator) < 0.3
    tensors[FULLY_FROZEN] = torch.zeros_like(tensors[FULLY_FROZEN])
    tensors[FULLY_TRAINABLE] = torch.ones_like(tensors[FULLY_TRAINABLE])
    return Mask(tensors)


def _batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(100 + step))


def _optimizer(kind: str, params) -> torch.optim.Optimizer:
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def _check_frozen(full: dict[str, torch.Tensor], initial: dict[str, torch.Tensor], mask: Mask) -> dict:
    """Frozen elements of the gathered full weights vs their freeze-time values (bits); trainable ones moved."""
    frozen_ok, moved = True, 0
    for name, keep in mask.items():
        frozen_ok &= _bits_equal(full[name][~keep], initial[name][~keep])
        moved += int((full[name][keep] != initial[name][keep]).sum())
    return {"frozen_ok": bool(frozen_ok), "moved": moved}


def _train(model, step_model, optimizer, clip, full_params, initial, mask) -> list[dict]:
    """STEPS real steps; after each, the frozen elements of the gathered weights."""
    checks = []
    for step in range(STEPS):
        ids = _batch(step)
        step_model(input_ids=ids, labels=ids).loss.backward()
        norm = clip() if clip is not None else None
        optimizer.step()
        optimizer.zero_grad()
        check = _check_frozen(full_params(), initial, mask)
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

    checks = _train(model, model, optimizer, clip, full_params, initial, mask)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, checks, [unmasked]


# --- workers (run in the spawned processes) -------------------------------------------------------
def _fsdp2(kind: str, rank: int, tmp: str, out: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _model()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    mask = _mask()
    freezer = MaskFreezer(model, mask)
    optimizer = _optimizer(kind, model.parameters())
    freezer.attach(optimizer)
    clip = (lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)) if kind == "adamw" else None
    out["extra_bytes"] = freezer.extra_bytes

    def full_params():
        return {n: p.full_tensor().detach() for n, p in model.named_parameters()}

    out["steps"] = _train(model, model, optimizer, clip, full_params, initial, mask)
    final = full_params()
    if rank == 0:
        torch.save(final, os.path.join(tmp, f"fsdp2-{kind}.pt"))


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
    out["extra_bytes"] = freezer.extra_bytes

    def full_params():
        with FSDP.summon_full_params(wrapped):
            return {n: p.detach().clone() for n, p in model.named_parameters()}

    out["steps"] = _train(model, wrapped, optimizer, clip, full_params, initial, mask)
    final = full_params()
    if rank == 0:
        torch.save(final, os.path.join(tmp, f"fsdp1-{kind}.pt"))


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
SCENARIOS = ["fsdp2-adamw", "fsdp2-sgd", "fsdp1-adamw", "fsdp1-sgd"]


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """Every torch scenario in one 2-process gloo group (one start-up for all)."""
    tmp = str(tmp_path_factory.mktemp("dist_freeze"))
    torch.multiprocessing.spawn(_worker, args=(_free_port(), tmp, SCENARIOS), nprocs=WORLD)
    results = []
    for rank in range(WORLD):
        with open(os.path.join(tmp, f"results_rank{rank}.json")) as f:
            results.append(json.load(f))
    return tmp, results


@pytest.fixture(scope="module")
def single():
    torch.set_num_threads(1)
    return {kind: single_process(kind) for kind in ("adamw", "sgd")}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_sharded_frozen_elements_stay_bit_identical_and_match_one_process(spawned, single, scenario):
    tmp, results = spawned
    kind = scenario.split("-")[1]
    expected, single_checks, (unmasked_norm,) = single[kind]
    for rank in range(WORLD):
        out = results[rank][scenario]
        assert "error" not in out, out["error"]
        assert len(out["steps"]) == STEPS
        for step, check in enumerate(out["steps"]):
            assert check["frozen_ok"], (rank, step)  # after every step, on every rank
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


def test_each_rank_stores_only_its_shard(spawned):
    _, results = spawned
    model = _model()
    mask = _mask()
    single_bytes = MaskFreezer(model, mask).extra_bytes
    for scenario in ("fsdp2-adamw", "fsdp1-adamw"):
        per_rank = [results[rank][scenario]["extra_bytes"] for rank in range(WORLD)]
        assert all(0 < b < 0.7 * single_bytes for b in per_rank), per_rank
        assert sum(per_rank) <= single_bytes, per_rank  # shards: each element stored at most once over the ranks
