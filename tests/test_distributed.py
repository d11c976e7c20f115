"""Sharded and replicated parameters, for real: 2 processes on gloo (CPU), launched with
`torch.multiprocessing.start_processes` from a forkserver (`helpers.spawn_ranks`).

Every run applies the same known edits at the same *global* positions as a single-process run (through the
frameworks' own APIs: `DTensor.full_tensor` + `distribute_tensor` for FSDP2, `summon_full_params` for
FSDP1; ZeRO-3's `GatheredParameters` in test_deepspeed), then checks that the summed counts, the per-tensor numel, the
gathered full mask (on every rank) and the signatures equal the single-process result. Then a real
forward/backward/optimizer step, checked against the full weights gathered independently.

The model has 67 vocabulary rows, so the embedding and head shards are uneven (34 + 33 rows).
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

from sparsity_callbacks import Mask, SparsityTracker  # noqa: E402

pytestmark = pytest.mark.distributed  # real multi-process (gloo) runs

WORLD = 2
VOCAB = 67  # odd: uneven Shard(0) of the embedding and lm_head
EDITS = {  # flat indices in the full tensors; embed rank boundary at 34 rows * 16 = 544
    "model.embed_tokens.weight": [0, 543, 544, 1071],
    "model.layers.0.self_attn.q_proj.weight": [0, 5, 17, 255],
    "model.layers.1.mlp.down_proj.weight": [1, 2, 3, 4, 511],
    "model.norm.weight": [7, 15],
    "lm_head.weight": [1000],
}
N_EDITS = sum(len(v) for v in EDITS.values())


def _model():
    return tiny_llama(vocab_size=VOCAB)


def _summary(tracker: SparsityTracker, m) -> dict:
    return {
        "changed": m.total.changed,
        "ever": m.total.ever_changed,
        "numel": m.numel,
        "per_tensor": {n: [c.numel, c.changed, c.ever_changed] for n, c in m.tensors.items()},
        "signatures": tracker.signatures,
    }


def _single_process(mode: str) -> tuple[dict, Mask]:
    model = _model()
    tracker = SparsityTracker(model, mode=mode)
    tracker.snapshot()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, indices in EDITS.items():
            params[name].view(-1)[indices] += 0.5
    return _summary(tracker, tracker.measure(1)), tracker.ever_changed_mask()


# --- workers (run in the spawned processes) -------------------------------------------------------
def _init(rank: int, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank)
    )
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)


def _batch(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def _step_and_check(tracker, model, full_params, reference, step_model, out, key, rank, batch_seed):
    """One real optimizer step; the tracker's counts and gathered mask against the truth computed from the
    gathered full weights (``full_params()``) and the full reference."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    ids = _batch(batch_seed)
    step_model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    previous_ever = {n: f.clone() for n, f in out.pop("_ever").items()}
    m = tracker.measure(2)
    now = full_params()
    changed = {n: (now[n].view(-1).view(torch.int32) != reference[n].view(-1).view(torch.int32)) for n in reference}
    mask = tracker.ever_changed_mask()
    out[key] = {
        "changed": m.total.changed,
        "expected_changed": int(sum(c.sum() for c in changed.values())),
        "ever": m.total.ever_changed,
        "expected_ever": int(sum((changed[n] | previous_ever[n]).sum() for n in changed)),
        "mask_ok": all(torch.equal(mask[n].view(-1), changed[n] | previous_ever[n]) for n in changed),
        "mask_subset": all(not (mask[n].view(-1) & ~(changed[n] | previous_ever[n])).any() for n in changed),
        "changed_upper": m.changed_upper,
        "mode": tracker.mode,
        "moved": m.total.changed > 1000,  # the step really moved weights
    }


def _fsdp2(rank: int, tmp: str, out: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    model = _model()
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    params = dict(model.named_parameters())
    assert type(params["model.embed_tokens.weight"]).__name__ == "DTensor"
    out["local_rows"] = params["model.embed_tokens.weight"].to_local().shape[0]
    tracker = SparsityTracker(model, mode="exact")
    tracker.snapshot()
    with torch.no_grad():  # the edits, through the full tensor, redistributed into each rank's shard
        for name, indices in EDITS.items():
            full = params[name].full_tensor()
            full.view(-1)[indices] += 0.5
            params[name].to_local().copy_(distribute_tensor(full, mesh, params[name].placements).to_local())
    out["edits"] = _summary(tracker, tracker.measure(1))
    tracker.ever_changed_mask().save(os.path.join(tmp, f"fsdp2_mask_rank{rank}.safetensors"))
    # resume: each rank restores its own state file into a fresh tracker
    tracker.save(os.path.join(tmp, f"fsdp2_state_rank{rank}.safetensors"))
    resumed = SparsityTracker(model, mode="exact")
    resumed.load(os.path.join(tmp, f"fsdp2_state_rank{rank}.safetensors"))
    out["resumed"] = _summary(resumed, resumed.measure(1))
    out["_ever"] = dict(tracker.ever_changed_mask().items())
    out["_ever"] = {n: f.view(-1) for n, f in out["_ever"].items()}

    def full_params():
        return {n: p.full_tensor().detach() for n, p in model.named_parameters()}

    _step_and_check(tracker, model, full_params, reference, model, out, "step", rank, batch_seed=0)


def _fsdp1(rank: int, tmp: str, out: dict) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = _model()
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    wrapped = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
    out["local_numel"] = sum(p.numel() for p in wrapped.parameters())
    tracker = SparsityTracker(wrapped, mode="fingerprint")
    tracker.snapshot()
    with FSDP.summon_full_params(wrapped, writeback=True), torch.no_grad():
        params = dict(model.named_parameters())
        for name, indices in EDITS.items():
            params[name].view(-1)[indices] += 0.5
    out["edits"] = _summary(tracker, tracker.measure(1))
    tracker.ever_changed_mask().save(os.path.join(tmp, f"fsdp1_mask_rank{rank}.safetensors"))
    out["_ever"] = {n: f.view(-1) for n, f in tracker.ever_changed_mask().items()}

    def full_params():
        with FSDP.summon_full_params(wrapped):
            return {n: p.detach().clone() for n, p in model.named_parameters()}

    _step_and_check(tracker, wrapped, full_params, reference, wrapped, out, "step", rank, batch_seed=1)


def _ddp(rank: int, tmp: str, out: dict) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _model()
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    wrapped = DDP(model)
    tracker = SparsityTracker(model, mode="exact")  # the framework hands us the unwrapped model
    tracker.snapshot()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, indices in EDITS.items():
            params[name].view(-1)[indices] += 0.5
    out["edits"] = _summary(tracker, tracker.measure(1))
    tracker.ever_changed_mask().save(os.path.join(tmp, f"ddp_mask_rank{rank}.safetensors"))
    out["_ever"] = {n: f.view(-1) for n, f in tracker.ever_changed_mask().items()}

    def full_params():
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    # different data per rank: DDP averages the gradients, the replicas stay identical
    _step_and_check(tracker, model, full_params, reference, wrapped, out, "step", rank, batch_seed=10 + rank)


def _worker(rank: int, port: int, tmp: str, scenarios: list[str]) -> None:
    _init(rank, port)
    results = {}
    for scenario in scenarios:
        out: dict = {}
        try:
            globals()[f"_{scenario}"](rank, tmp, out)
        except Exception:
            out["error"] = traceback.format_exc()
        out.pop("_ever", None)
        results[scenario] = out
        torch.distributed.barrier()
    with open(os.path.join(tmp, f"results_rank{rank}.json"), "w") as f:
        json.dump(results, f)
    torch.distributed.destroy_process_group()


# --- tests ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """FSDP2, FSDP1 and DDP scenarios in one 2-process gloo group (one start-up for all)."""
    tmp = str(tmp_path_factory.mktemp("dist"))
    spawn_ranks(_worker, (tmp, ["fsdp2", "fsdp1", "ddp"]), nprocs=WORLD)
    results = []
    for rank in range(WORLD):
        with open(os.path.join(tmp, f"results_rank{rank}.json")) as f:
            results.append(json.load(f))
    return tmp, results


def _check_edits(tmp: str, results: list[dict], scenario: str, mode: str, same_weights: bool = True) -> None:
    for rank in range(WORLD):
        assert "error" not in results[rank][scenario], results[rank][scenario]["error"]
    expected, single_mask = _single_process(mode)
    for rank in range(WORLD):
        got = results[rank][scenario]["edits"]
        assert got["changed"] == got["ever"] == N_EDITS  # summed once over the shards, not doubled
        assert got["numel"] == expected["numel"] == sum(p.numel() for p in _model().parameters())
        assert got["per_tensor"] == expected["per_tensor"]  # global numel, changed, ever per tensor
        if same_weights:
            assert got["signatures"] == expected["signatures"]  # full-tensor signatures, same as one process
        else:  # the signatures of the full tensors, gathered by the framework
            assert got["signatures"] == results[rank][scenario]["full_signatures"]
        mask = Mask.load(os.path.join(tmp, f"{scenario}_mask_rank{rank}.safetensors"))
        assert mask == single_mask  # the full gathered mask on every rank
        assert mask.shapes == single_mask.shapes and mask.count() == N_EDITS
        mask.check_matches(single_mask.shapes, single_mask.signatures if same_weights else None)


def _check_step(results: list[dict], scenario: str) -> None:
    for rank in range(WORLD):
        step = results[rank][scenario]["step"]
        assert step["moved"], step
        if step["mode"] == "exact":
            assert step["changed"] == step["expected_changed"], step
            assert step["ever"] == step["expected_ever"], step
            assert step["mask_ok"], step
        else:  # large random updates: each missed with probability 1/255, within the reported bound
            assert step["changed"] <= step["expected_changed"] <= step["changed_upper"], step
            assert step["expected_changed"] - step["changed"] < 0.02 * step["expected_changed"], step
            assert step["mask_subset"], step  # no false positive


def test_fsdp2_dtensor_shards_sum_to_the_single_process_counts_and_mask(spawned):
    tmp, results = spawned
    assert [r["fsdp2"].get("local_rows") for r in results] == [34, 33]  # uneven Shard(0)
    _check_edits(tmp, results, "fsdp2", "exact")
    for rank in range(WORLD):
        assert results[rank]["fsdp2"]["resumed"] == results[rank]["fsdp2"]["edits"]  # per-rank state round trip


def test_fsdp2_real_optimizer_step_counts_match_the_gathered_weights(spawned):
    _check_step(spawned[1], "fsdp2")


def test_fsdp1_use_orig_params_flat_slices(spawned):
    tmp, results = spawned
    numels = [r["fsdp1"].get("local_numel") for r in results]
    assert sum(numels) == sum(p.numel() for p in _model().parameters()) and numels[0] != 0
    _check_edits(tmp, results, "fsdp1", "fingerprint")
    _check_step(results, "fsdp1")


def test_ddp_replicas_are_counted_once(spawned):
    tmp, results = spawned
    _check_edits(tmp, results, "ddp", "exact")
    _check_step(results, "ddp")
    assert results[0]["ddp"]["step"] == results[1]["ddp"]["step"]  # identical replicas, identical counts
