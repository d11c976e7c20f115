"""DeepSpeed ZeRO-3, for real: 2 processes on gloo (CPU), launched by `helpers.spawn_ranks`. A DeepSpeed
start-up costs seconds per process, so every ZeRO-3 case runs in one group (fixture ``zero3_group``), and in one
file, so that a parallel run (`pytest -n`, one file per worker) starts it once.

- Frozen training (test_distributed_freeze's runs under DeepSpeed): a `MaskFreezer` on the engine's optimizer
  (AdamW with clipping, SGD with momentum); every frozen element bit-identical after every step, the final
  weights equal to the single-process run (trainable ones to ~1e-6: DeepSpeed reduces gradients its own way).
- Partition counts (test_distributed's known edits): the counts, per-tensor numel and gathered mask of a model
  partitioned under ``zero.Init`` equal the single-process ones, and a real step is counted the same on both ranks.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from helpers import spawn_ranks  # noqa: E402
from test_distributed import EDITS, _check_edits, _summary  # noqa: E402
from test_distributed import _batch as _counts_batch  # noqa: E402
from test_distributed import _model as _counts_model  # noqa: E402
from test_distributed_freeze import (  # noqa: E402
    CLIP,
    WORLD,
    _bits_equal,
    _held_bytes,
    _mask,
    _model,
    _optimizer,
    _train,
    single_process,
)

from sparsity_callbacks import MaskFreezer, SparsityTracker  # noqa: E402

pytestmark = pytest.mark.distributed


# --- workers (run in the spawned processes) -------------------------------------------------------
def _zero3_group(rank: int, port: int, tmp: str, kinds: list[str]) -> None:
    """One rank of the DeepSpeed group (fixture ``zero3_group``): the frozen runs (one per optimizer ``kind``),
    then the partition counts. The frozen runs let DeepSpeed partition the model in ``deepspeed.initialize``
    (no ``zero.Init``), so their initial weights are the single-process ones; the partition counts build
    theirs under ``zero.Init``, last, so that nothing runs after its patching."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(WORLD),
    )
    torch.set_num_threads(1)
    importlib.import_module("torch._dynamo")  # before DeepSpeed patches torch.Tensor.__new__ (see params.py)
    importlib.import_module("transformers.generation.utils")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    results = {}
    for kind in kinds:
        out: dict = {}
        try:
            _zero3_run(deepspeed, kind, rank, tmp, out)
        except Exception:
            out["error"] = traceback.format_exc()
        results[kind] = out
    out = {}
    try:
        _zero3_partitions(deepspeed, rank, tmp, out)
    except Exception:
        out["error"] = traceback.format_exc()
    results["partitions"] = out
    with open(os.path.join(tmp, f"zero3_rank{rank}.json"), "w") as f:
        json.dump(results, f)
    torch.distributed.destroy_process_group()


def _zero3_run(deepspeed, kind: str, rank: int, tmp: str, out: dict) -> None:
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": 3},
        "zero_allow_untested_optimizer": True,
    }
    if kind == "adamw":
        config["gradient_clipping"] = CLIP
    model = _model()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine, *_ = deepspeed.initialize(model=model, optimizer=_optimizer(kind, model.parameters()), config=config)
    mask = _mask()
    freezer = MaskFreezer(model, mask)
    freezer.attach(engine.optimizer)
    out["extra_bytes"], out["held_bytes"] = freezer.extra_bytes, _held_bytes(freezer)
    params = dict(model.named_parameters())

    def full_params():
        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {n: p.detach().clone() for n, p in params.items()}

    def forward_backward(ids):
        engine.backward(engine(input_ids=ids, labels=ids).loss)

    out["steps"] = _train(forward_backward, engine.step, None, full_params, initial, mask)  # the engine clips
    if kind == "adamw":
        out["norms"] = [float(engine.get_global_grad_norm())]
    final = full_params()
    if rank == 0:
        torch.save(final, os.path.join(tmp, f"zero3-{kind}.pt"))


def _zero3_partitions(deepspeed, rank: int, tmp: str, out: dict) -> None:
    """One rank of the ZeRO-3 partition counts: the model built under ``zero.Init``, test_distributed's known
    edits through ``GatheredParameters``, then a real step."""
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": 3},
        "zero_allow_untested_optimizer": True,
    }
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = _counts_model()
    params = dict(model.named_parameters())
    tracker = SparsityTracker(model, mode="exact")
    tracker.snapshot()
    from sparsity_callbacks._rules import _tensor_signature

    with deepspeed.zero.GatheredParameters(list(params.values())):  # zero.Init initialises differently
        out["full_signatures"] = {n: _tensor_signature(p) for n, p in params.items()}
    with deepspeed.zero.GatheredParameters([params[n] for n in EDITS], modifier_rank=0), torch.no_grad():
        if rank == 0:
            for name, indices in EDITS.items():
                params[name].view(-1)[indices] += 0.5
    out["edits"] = _summary(tracker, tracker.measure(1))
    tracker.ever_changed_mask().save(os.path.join(tmp, f"zero3_mask_rank{rank}.safetensors"))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    ids = _counts_batch(0)
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    out["step_changed"] = tracker.measure(2).total.changed


# --- tests ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zero3_group(tmp_path_factory):
    """``(folder, [rank 0 results, rank 1 results])`` of every ZeRO-3 case, run in one 2-process gloo group
    (`_zero3_group`): each rank's results hold the frozen runs (``"adamw"``, ``"sgd"``) and the partition
    counts (``"partitions"``). Skipped without DeepSpeed."""
    pytest.importorskip("deepspeed", reason="DeepSpeed not installed (optional)")
    folder = tmp_path_factory.mktemp("zero3")
    spawn_ranks(_zero3_group, (str(folder), ["adamw", "sgd"]), nprocs=WORLD)
    return str(folder), [json.loads((folder / f"zero3_rank{rank}.json").read_text()) for rank in range(WORLD)]


@pytest.fixture(scope="module")
def single():
    """The frozen runs in this process, per optimizer kind (one intra-op thread: conftest's session fixture)."""
    return {kind: single_process(kind) for kind in ("adamw", "sgd")}


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_deepspeed_zero3_frozen_elements_stay_bit_identical(zero3_group, single, kind):
    tmp, results = zero3_group
    tmp_path = Path(tmp)
    expected, single_checks, _ = single[kind]
    for rank in range(WORLD):
        out = results[rank][kind]
        assert "error" not in out, out["error"]
        for step, check in enumerate(out["steps"]):
            assert check["frozen_ok"], (rank, step, check["moved_frozen"])
            assert check["moved"] > 0.5 * single_checks[step]["moved"], (rank, step)
        if kind == "adamw":  # DeepSpeed's clip norm (of the last step) is the subnetwork's
            assert out["norms"][0] == pytest.approx(single_checks[-1]["norm"], rel=1e-5)
        assert 0 < out["extra_bytes"] < 0.7 * MaskFreezer(_model(), _mask(), compact_optimizer_state=False).extra_bytes
    final = torch.load(tmp_path / f"zero3-{kind}.pt")
    mask = _mask()
    for name, value in expected.items():
        assert _bits_equal(final[name][~mask[name]], value[~mask[name]]), name
        # trainable ones: close, not bit-equal, even without clipping (DeepSpeed reduces gradients its own way)
        torch.testing.assert_close(final[name], value, rtol=1e-5, atol=1e-6)


def test_deepspeed_zero3_partitions(zero3_group):
    tmp, results = zero3_group
    results = [r["partitions"] for r in results]
    # zero.Init draws the initial weights differently: counts and masks are compared with the single-process
    # run, the signatures with the full tensors gathered by DeepSpeed
    _check_edits(tmp, [{"zero3": r} for r in results], "zero3", "exact", same_weights=False)
    assert all(r["step_changed"] > 1000 for r in results) and results[0]["step_changed"] == results[1]["step_changed"]
