"""A torchmetrics `Metric` holding per-tensor counts, summed across ranks (for sharded parameters)."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class _SparsityCounts(Metric):
    """Counts per tracked tensor, shape ``(num_tensors, columns)``: changed, nonfinite, churn, ever-changed
    (and, as `SparsityTracker` uses it, a 5th column: the elements each rank holds, whose sum tells how
    many ranks hold each shard).

    States are counts with ``dist_reduce_fx="sum"``: every rank adds the counts of its own shard and
    ratios are taken after the reduction (never averaged across ranks).
    """

    full_state_update = False
    higher_is_better = None
    counts: torch.Tensor

    def __init__(self, num_tensors: int, columns: int = 4, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("counts", default=torch.zeros(num_tensors, columns, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, counts: torch.Tensor) -> None:
        self.counts += counts.to(self.counts.device, torch.int64)

    def compute(self) -> torch.Tensor:
        return self.counts
