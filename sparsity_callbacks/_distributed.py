"""Collectives for sharded parameters (FSDP, ZeRO-3): sum per-tensor counts over ranks, gather the
signature samples of full tensors, and gather bit masks. Every rank must call these alike."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from sparsity_callbacks._bits import _pack_bits, _unpack_bits
from sparsity_callbacks._rules import _signature_bits, _signature_digest, _signature_positions
from sparsity_callbacks.params import _Layout, _TrackedTensor

# Per rank: ``(start, count)`` of each sharded tracked tensor, in tracking order.
RankLayouts = list[list[tuple[int, int]]]


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _comm_device() -> torch.device:
    """Where collective buffers must live: the current CUDA device for NCCL, else the CPU (gloo)."""
    backend = str(torch.distributed.get_backend()).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _exchange(payload: Any) -> list[Any]:
    """``payload`` of every rank (all_gather_object), in rank order."""
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, payload)
    return gathered


def _local_signature_samples(local_flat: torch.Tensor, layout: _Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """(global positions, bfloat16 bits as int16) of the signature samples that fall in this rank's slice."""
    positions = _signature_positions(layout.numel)
    start = layout.start if layout.sharded else 0
    inside = positions[(positions >= start) & (positions < start + local_flat.numel())]
    return inside, _signature_bits(local_flat[(inside - start).to(local_flat.device)])


def _local_layouts(sharded: Sequence[_TrackedTensor]) -> list[tuple[int, int]]:
    return [(t.layout.start, t.layout.local_count) for t in sharded]


def _sum_across_ranks(tracked: Sequence[_TrackedTensor], totals: torch.Tensor) -> torch.Tensor:
    """Per-tensor counts ``(n, 5)`` (changed, nonfinite, churn, ever, local numel) summed over ranks for
    sharded tensors, each shard counted once; unsharded (DDP replica) rows stay local."""
    from sparsity_callbacks.metrics import _SparsityCounts

    metric = _SparsityCounts(len(tracked), columns=totals.shape[1]).to(_comm_device())
    metric.update(totals)
    summed = metric.compute().cpu()
    out = totals.clone()
    for i, t in enumerate(tracked):
        if not t.sharded:
            continue
        held = int(summed[i, 4])
        if held % t.layout.numel:
            raise RuntimeError(
                f"The ranks hold {held} elements of {t.name!r} in total, not a multiple of its {t.layout.numel}: "
                "the shards do not cover the tensor evenly. Is every rank measuring the same model?"
            )
        out[i] = summed[i] // (held // t.layout.numel)  # HSDP: each shard is held by several ranks
    return out


def _full_signatures(tracked: Sequence[_TrackedTensor]) -> tuple[dict[str, str], RankLayouts | None]:
    """Signatures of the full sharded tensors (each rank contributes the samples in its shard), and the
    layouts of every rank (None when nothing is sharded)."""
    sharded = [t for t in tracked if t.sharded]
    if not sharded:
        return {}, None
    samples = {t.name: _local_signature_samples(t.local().detach().reshape(-1), t.layout) for t in sharded}
    layouts = _local_layouts(sharded)
    everyone = _exchange((layouts, samples)) if _dist_ready() else [(layouts, samples)]
    rank_layouts = [rank_layouts for rank_layouts, _ in everyone]
    out = {}
    for t in sharded:
        positions = torch.cat([rank_samples[t.name][0] for _, rank_samples in everyone])
        values = torch.cat([rank_samples[t.name][1] for _, rank_samples in everyone])
        order = positions.argsort()
        positions, values = positions[order], values[order]
        keep = torch.ones_like(positions, dtype=torch.bool)
        keep[1:] = positions[1:] != positions[:-1]  # replicated shards (HSDP) send the same samples
        out[t.name] = _signature_digest(t.shape, values[keep])
    return out, rank_layouts


def _nonfinite_across_ranks(nonfinite: dict[str, int]) -> dict[str, int]:
    """``{name: count}`` summed over ranks."""
    merged: dict[str, int] = {}
    for rank_counts in _exchange(nonfinite):
        for name, count in rank_counts.items():
            merged[name] = merged.get(name, 0) + count
    return merged


def _gather_masks(
    sharded: Sequence[_TrackedTensor], local: dict[str, torch.Tensor], rank_layouts: RankLayouts | None
) -> tuple[dict[str, torch.Tensor], RankLayouts]:
    """Local flat bool flags of the sharded tensors -> ``{name: packed bits of the full tensor}`` on every
    rank (one all_gather), and the rank layouts used (exchanged once when not known yet)."""
    if rank_layouts is None:
        rank_layouts = _exchange(_local_layouts(sharded))
    buffer = torch.cat([_pack_bits(local[t.name]) for t in sharded])
    sizes = [sum((count + 7) // 8 for _, count in rank) for rank in rank_layouts]
    device = _comm_device()
    padded = torch.zeros(max(sizes), dtype=torch.uint8, device=device)
    padded[: buffer.numel()] = buffer.to(device)
    gathered = [torch.empty_like(padded) for _ in sizes]
    torch.distributed.all_gather(gathered, padded)
    gathered = [g.cpu() for g in gathered]
    packed: dict[str, torch.Tensor] = {}
    for i, t in enumerate(sharded):
        full = torch.zeros(t.layout.numel, dtype=torch.bool)
        for rank, rank_layout in enumerate(rank_layouts):
            offset = sum((count + 7) // 8 for _, count in rank_layout[:i])
            start, count = rank_layout[i]
            flags = _unpack_bits(gathered[rank][offset : offset + (count + 7) // 8], count)
            full[start : start + count] |= flags
        packed[t.name] = _pack_bits(full)
    return packed, rank_layouts
