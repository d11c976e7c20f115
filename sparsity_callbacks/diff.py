"""Streaming diff of two checkpoints: which elements of TUNED differ from BASE.

Reads safetensors files chunk by chunk (`checkpoint._Reader`: ``os.preadv`` into per-thread buffers, no
memory map, so the page cache never counts against this process) and hands each chunk, as a zero-copy
torch tensor, to the compare rules of `_rules` (the same rules `SparsityTracker` applies), on a few
threads: peak memory is a few MB, whatever the model size (``rank=True`` adds one float32 ΔW per tensor
in flight; ``mask=True`` the mask itself, 1 bit per element). Each stored tensor is compared once.

Example::

    from sparsity_callbacks.diff import diff_checkpoints
    result = diff_checkpoints("Qwen/Qwen2.5-0.5B", "runs/grpo/checkpoint-500", atol=(1e-5,),
                              compare_dtype="bfloat16", mask=True)
    result.measurement().changed_fraction            # fraction in [0, 1] of compared elements
    result.mask.save("grpo_mask.safetensors")
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sparsity_callbacks._bits import _pack_bits
from sparsity_callbacks._rules import (
    COMPARE_DTYPES,
    SIGNATURE_SAMPLES,
    _beyond_atol,
    _bits_differ,
    _count_nonfinite,
    _signature_bits,
    _signature_digest,
    _to_compare,
)
from sparsity_callbacks.checkpoint import (
    _DTYPES,
    Checkpoint,
    CheckpointError,
    TensorInfo,
    _Reader,
    open_checkpoint,
)
from sparsity_callbacks.masks import Mask
from sparsity_callbacks.measurement import Measurement, TensorCounts

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "DiffResult",
    "IncompatibleCheckpointsError",
    "TensorDiff",
    "TensorInfo",
    "diff_checkpoints",
    "open_checkpoint",
]


class IncompatibleCheckpointsError(ValueError):
    """The two checkpoints cannot be compared (different architectures, nothing in common)."""


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------
@dataclass
class TensorDiff:
    """Diff of one tensor, by the rules of `_rules`. ``changed``: elements whose bits differ (in
    ``compare_dtype``; a NaN whose payload changes counts); ``within[i]``: elements changed with
    ``atol=atols[i]`` (bits differ and not ``|tuned - base| <= atols[i]``, in float64);
    ``nonfinite``: NaN/inf elements of TUNED; ``rank``: numerical rank of ΔW (2-D tensors, on request)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    numel: int
    changed: int = 0
    within: list[int] = field(default_factory=list)
    nonfinite: int = 0
    rank: int | None = None

    @property
    def max_rank(self) -> int | None:
        return min(self.shape) if len(self.shape) == 2 else None

    @property
    def relative_rank(self) -> float | None:
        """rank / min(shape), in [0, 1]."""
        return self.rank / self.max_rank if self.rank is not None and self.max_rank else None


@dataclass
class DiffResult:
    """What `diff_checkpoints` found. Counts are elements; fractions are of compared elements."""

    base: str
    tuned: str
    atols: tuple[float, ...]
    compare_dtype: str | None
    tensors: dict[str, TensorDiff]
    only_in_base: list[str] = field(default_factory=list)
    only_in_tuned: list[str] = field(default_factory=list)
    dtype_mismatch: dict[str, tuple[str, str]] = field(default_factory=dict)
    not_float: dict[str, str] = field(default_factory=dict)
    mask: Mask | None = None
    seconds: float = 0.0
    bytes_read: int = 0

    # --- views -------------------------------------------------------------------------------------
    @property
    def skipped(self) -> dict[str, str]:
        """``{tensor name: why it was not compared}``."""
        skipped = {n: "only in BASE" for n in self.only_in_base}
        skipped.update({n: "only in TUNED" for n in self.only_in_tuned})
        skipped.update(
            {
                n: f"dtype {a} in BASE, {b} in TUNED (pass compare_dtype to compare them)"
                for n, (a, b) in self.dtype_mismatch.items()
            }
        )
        skipped.update({n: f"not floating point ({d})" for n, d in self.not_float.items()})
        return skipped

    def measurement(self, atol: float | None = None) -> Measurement:
        """Counts as a `Measurement` (``mode="diff"``): elements changed exactly, or with
        ``|tuned - base| > atol`` when ``atol`` is one of ``atols``."""
        if atol is None:
            counts = {n: t.changed for n, t in self.tensors.items()}
        else:
            if atol not in self.atols:
                raise ValueError(f"`atol` must be one of {list(self.atols)} (the tolerances diffed), got {atol!r}.")
            i = self.atols.index(atol)
            counts = {n: t.within[i] for n, t in self.tensors.items()}
        return Measurement(
            step=None,
            mode="diff",
            tensors={n: TensorCounts(self.tensors[n].numel, c, c, 0) for n, c in counts.items()},
            has_churn=False,
            nonfinite=sum(t.nonfinite for t in self.tensors.values()),
            skipped=self.skipped,
        )

    def rank_summary(self) -> dict[str, float] | None:
        """Mean and min of rank / min(shape) over the 2-D tensors with a non-zero update."""
        rel = [t.relative_rank for t in self.tensors.values() if t.relative_rank is not None and t.changed]
        if not rel:
            return None
        return {"mean_relative_rank": sum(rel) / len(rel), "min_relative_rank": min(rel), "tensors": len(rel)}

    def to_metrics(self, per_tensor: bool = False) -> dict[str, float]:
        """``sparsity/...`` metrics: `Measurement.to_metrics()` of the exact diff, plus
        ``sparsity/atol_<atol>/...changed_fraction`` per tolerance and ``sparsity/rank/...``."""
        metrics = self.measurement().to_metrics(per_tensor=per_tensor)
        for atol in self.atols:
            for key, value in self.measurement(atol).to_metrics(per_tensor=per_tensor).items():
                if key.endswith("/changed_fraction") and not key.endswith("ever_changed_fraction"):
                    metrics[key.replace("sparsity/", f"sparsity/atol_{atol:g}/", 1)] = value
        summary = self.rank_summary()
        if summary:
            metrics["sparsity/rank/mean_relative_rank"] = summary["mean_relative_rank"]
            metrics["sparsity/rank/min_relative_rank"] = summary["min_relative_rank"]
        return metrics

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable result: `Measurement.to_dict()` of the exact diff (its ``tensors`` rows
        extended with shape, dtype, ``within`` and rank), plus the per-atol groups and what was skipped."""
        out = self.measurement().to_dict()
        out.update(
            {
                "kind": "sparsity_callbacks.diff",
                "base": self.base,
                "tuned": self.tuned,
                "atols": list(self.atols),
                "compare_dtype": self.compare_dtype,
            }
        )
        for name, row in out["tensors"].items():
            t = self.tensors[name]
            row.update(
                {
                    "shape": list(t.shape),
                    "dtype": t.dtype,
                    "nonfinite": t.nonfinite,
                    "within": {f"{a:g}": c for a, c in zip(self.atols, t.within)},
                    "rank": t.rank,
                    "max_rank": t.max_rank,
                }
            )
        within = {}
        for atol in self.atols:
            m = self.measurement(atol)
            within[f"{atol:g}"] = {
                "atol": atol,
                "changed": m.changed,
                "changed_fraction": m.changed_fraction,
                "module_types": {k: v.changed for k, v in sorted(m.by_module_type().items())},
                "layers": {str(k): v.changed for k, v in sorted(m.by_layer().items())},
            }
        out["within_atol"] = within
        out["rank"] = self.rank_summary()
        out["only_in_base"] = list(self.only_in_base)
        out["only_in_tuned"] = list(self.only_in_tuned)
        out["dtype_mismatch"] = {n: list(v) for n, v in self.dtype_mismatch.items()}
        out["not_float"] = dict(self.not_float)
        out["seconds"] = self.seconds
        out["bytes_read"] = self.bytes_read
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DiffResult:
        """Inverse of `to_dict` (without the mask)."""
        if data.get("kind") != "sparsity_callbacks.diff":
            raise ValueError("Not a diff result: the JSON has no `kind: sparsity_callbacks.diff`.")
        atols = tuple(float(a) for a in data["atols"])
        tensors = {}
        for name, row in data["tensors"].items():
            tensors[name] = TensorDiff(
                name,
                tuple(row["shape"]),
                row["dtype"],
                int(row["numel"]),
                int(row["changed"]),
                [int(row["within"][f"{a:g}"]) for a in atols],
                int(row.get("nonfinite", 0)),
                row.get("rank"),
            )
        return cls(
            base=data["base"],
            tuned=data["tuned"],
            atols=atols,
            compare_dtype=data.get("compare_dtype"),
            tensors=tensors,
            only_in_base=list(data.get("only_in_base", [])),
            only_in_tuned=list(data.get("only_in_tuned", [])),
            dtype_mismatch={n: (v[0], v[1]) for n, v in data.get("dtype_mismatch", {}).items()},
            not_float=dict(data.get("not_float", {})),
            seconds=float(data.get("seconds", 0.0)),
            bytes_read=int(data.get("bytes_read", 0)),
        )


# ------------------------------------------------------------------------------------------------
# The engine
# ------------------------------------------------------------------------------------------------
ProgressFn = Callable[[int, int, str], None]


def diff_checkpoints(
    base: str | os.PathLike | Checkpoint,
    tuned: str | os.PathLike | Checkpoint,
    *,
    atol: float | Iterable[float] = (1e-5,),
    compare_dtype: str | torch.dtype | None = None,
    rank: bool = False,
    mask: bool = False,
    progress: bool | ProgressFn = False,
    workers: int | None = None,
    chunk_numel: int = 1 << 18,
) -> DiffResult:
    """Compare every floating-point tensor stored in both ``base`` and ``tuned``, streaming.

    Args:
        base, tuned: a ``.safetensors`` file, a model folder, a Hub id, or an opened `Checkpoint`.
        atol: one tolerance or several (each gives its own count): changed iff the bits differ and not
            ``|tuned - base| <= atol`` (float64; see `_rules`). The exact count (bits differ) is always given.
        compare_dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` (or ``"float64"``): convert both to
            this dtype with ``Tensor.to`` (round to nearest even; NaN made canonical) before comparing;
            bf16 counts fp32 drift below one bf16 ulp as unchanged. ``None``: compare as stored; tensors
            whose dtypes differ are then skipped (listed in ``skipped``).
        rank: numerical rank of each 2-D update ΔW = tuned - base (float32, `torch.linalg.matrix_rank`,
            None where ΔW has NaN/inf); holds the ΔW of the tensors in flight (4 bytes per element).
        mask: also build the changed mask (bits differ, in ``compare_dtype``) as ``result.mask``, with the
            base model's signatures so that it can freeze that model.
        progress: ``True`` for a rich progress bar on stderr, or ``fn(done_bytes, total_bytes, name)``.
        workers: threads reading and comparing chunks (default ``min(8, os.cpu_count())``).
        chunk_numel: elements per chunk; memory is about ``workers * chunk_numel * 30`` bytes.

    Raises:
        IncompatibleCheckpointsError: shapes differ (another architecture) or nothing is comparable.
        CheckpointError, FileNotFoundError: a checkpoint is missing or unreadable.
    """
    start_time = time.perf_counter()
    atols = _atols(atol)
    cdtype = _compare_dtype(compare_dtype)
    chunk_numel = max(64, int(chunk_numel) // 64 * 64)
    workers = _workers(workers)
    a_ckpt = base if isinstance(base, Checkpoint) else open_checkpoint(base)
    b_ckpt = tuned if isinstance(tuned, Checkpoint) else open_checkpoint(tuned)
    pairs, result = _plan(a_ckpt, b_ckpt, atols, cdtype)

    jobs = [_Job(a, b, result.tensors[a.name], remaining=-(-a.numel // chunk_numel)) for a, b in pairs]
    total_bytes = sum(a.nbytes + b.nbytes for a, b in pairs)
    report, close_progress = _progress(progress, total_bytes)
    engine = _Engine(cdtype, atols, chunk_numel, mask)
    done_bytes = 0

    def finish(job: _Job, n: int, counts: tuple[int, list[int], int]) -> None:
        nonlocal done_bytes
        changed, within, nonfinite = counts
        t = job.diff
        t.changed += changed
        t.within = [x + y for x, y in zip(t.within, within)]
        t.nonfinite += nonfinite
        job.remaining -= 1
        if job.remaining == 0:
            _finalize(job)
        done_bytes += n * (job.a_item + job.b_item)
        report(done_bytes, t.name)

    tasks = (
        (job, lo, min(chunk_numel, job.diff.numel - lo)) for job in jobs for lo in range(0, job.diff.numel, chunk_numel)
    )
    try:
        if workers == 1:
            for job, lo, n in tasks:
                _start(job, lo, rank, mask)
                finish(job, n, engine.chunk(job, lo, n))
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sparsity-diff") as pool:
                inflight: deque = deque()
                try:
                    for job, lo, n in tasks:
                        _start(job, lo, rank, mask)
                        inflight.append((job, lo, n, pool.submit(engine.chunk, job, lo, n)))
                        while len(inflight) >= 2 * workers:
                            job_, _, n_, future = inflight.popleft()
                            finish(job_, n_, future.result())
                    while inflight:
                        job_, _, n_, future = inflight.popleft()
                        finish(job_, n_, future.result())
                except BaseException:
                    for *_, future in inflight:
                        future.cancel()
                    raise
    finally:
        engine.close()
        close_progress()

    result.bytes_read = done_bytes
    if mask:
        shapes = {n: t.shape for n, t in result.tensors.items()}
        bits = {job.diff.name: job.packed for job in jobs if job.packed is not None}
        signatures = {job.diff.name: job.signature for job in jobs if job.signature is not None}
        metadata = {
            "source": "diff",
            "base": a_ckpt.source,
            "tuned": b_ckpt.source,
            "compare_dtype": result.compare_dtype,
            "criterion": "bits differ",
        }
        result.mask = Mask._from_packed(bits, shapes, signatures, metadata)
    result.seconds = time.perf_counter() - start_time
    return result


def _workers(workers: int | None) -> int:
    if workers is None:
        return max(1, min(8, os.cpu_count() or 1))
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"`workers` must be a positive integer or None, got {workers!r}.")
    return workers


def _atols(atol: float | Iterable[float]) -> tuple[float, ...]:
    values = (atol,) if isinstance(atol, (int, float)) else tuple(atol)
    out: list[float] = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or math.isinf(value):
            raise ValueError(f"`atol` must be finite numbers >= 0, got {value!r}.")
        if float(value) not in out:
            out.append(float(value))
    return tuple(out)


def _compare_dtype(value: str | torch.dtype | None) -> str | None:
    if value is None:
        return None
    name = str(value).removeprefix("torch.") if isinstance(value, (str, torch.dtype)) else value
    if name not in COMPARE_DTYPES:
        raise ValueError(f"`compare_dtype` must be one of {sorted(COMPARE_DTYPES)} or None, got {value!r}.")
    return name


def _plan(a: Checkpoint, b: Checkpoint, atols: tuple[float, ...], cdtype: str | None):
    """Pair the tensors, check the shapes; returns ``(pairs, DiffResult with zero counts)``."""
    only_a = [n for n in a.tensors if n not in b.tensors]
    only_b = [n for n in b.tensors if n not in a.tensors]
    shape_mismatch = [
        (n, a.tensors[n].shape, b.tensors[n].shape)
        for n in a.tensors
        if n in b.tensors and a.tensors[n].shape != b.tensors[n].shape
    ]
    if shape_mismatch:
        lines = "; ".join(f"{n}: {list(sa)} vs {list(sb)}" for n, sa, sb in shape_mismatch[:3])
        raise IncompatibleCheckpointsError(
            f"BASE and TUNED have different architectures: {len(shape_mismatch)} tensor(s) differ in shape "
            f"({lines}{'; ...' if len(shape_mismatch) > 3 else ''}). HINT: diff a fine-tuned checkpoint "
            "against the base model it was trained from."
        )
    pairs, tensors, dtype_mismatch, not_float = [], {}, {}, {}
    for name, ai in a.tensors.items():
        bi = b.tensors.get(name)
        if bi is None:
            continue
        if not (ai.is_float and bi.is_float):
            not_float[name] = ai.dtype if not ai.is_float else bi.dtype
        elif ai.dtype != bi.dtype and cdtype is None:
            dtype_mismatch[name] = (ai.dtype, bi.dtype)
        else:
            pairs.append((ai, bi))
            shown = cdtype or str(ai.torch_dtype).removeprefix("torch.")
            tensors[name] = TensorDiff(name, ai.shape, shown, ai.numel, 0, [0] * len(atols))
    if not pairs:
        why = []
        if not (set(a.tensors) & set(b.tensors)):
            why.append(f"no tensor name is in both (e.g. {list(a.tensors)[:2]} vs {list(b.tensors)[:2]})")
        if dtype_mismatch:
            first = next(iter(dtype_mismatch.values()))
            why.append(
                f"{len(dtype_mismatch)} tensor(s) differ in dtype ({first[0]} vs {first[1]}): pass "
                f"--compare-dtype {_code_to_name(first[1])} to compare them"
            )
        if not_float:
            why.append(f"{len(not_float)} tensor(s) are not floating point")
        raise IncompatibleCheckpointsError(
            f"Nothing to compare between {a.source!r} and {b.source!r}: {'; '.join(why) or 'no tensors'}."
        )
    result = DiffResult(
        base=a.source,
        tuned=b.source,
        atols=atols,
        compare_dtype=cdtype,
        tensors=tensors,
        only_in_base=only_a,
        only_in_tuned=only_b,
        dtype_mismatch=dtype_mismatch,
        not_float=not_float,
    )
    return pairs, result


def _code_to_name(code: str) -> str:
    """The compare dtype that holds a stored dtype (float8 -> float32)."""
    name = str(_DTYPES.get(code)).removeprefix("torch.")
    return name if name in COMPARE_DTYPES else "float32"


def _progress(progress: bool | ProgressFn, total: int):
    if callable(progress):
        return (lambda done, name: progress(done, total, name)), (lambda: None)
    if not progress:
        return (lambda done, name: None), (lambda: None)
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    bar = Progress(
        TextColumn("diff"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.description}"),
        console=Console(stderr=True),
        transient=True,
    )
    task = bar.add_task("", total=total)
    bar.start()
    last = [0.0]

    def report(done: int, name: str) -> None:
        now = time.monotonic()
        if now - last[0] > 0.1 or done >= total:
            last[0] = now
            bar.update(task, completed=done, description=name)

    return report, bar.stop


@dataclass(eq=False)
class _Job:
    """One tensor pair in flight. ``packed``: its mask bits; ``delta``: ΔW for ``rank``; ``samples``:
    ``(first element, values)`` of the elements the base tensor's signature samples (`_rules`, rule 5)."""

    a: TensorInfo
    b: TensorInfo
    diff: TensorDiff
    remaining: int = 0
    packed: torch.Tensor | None = None
    delta: torch.Tensor | None = None
    samples: list = field(default_factory=list)
    signature: str | None = None

    @property
    def a_item(self) -> int:
        return self.a.torch_dtype.itemsize

    @property
    def b_item(self) -> int:
        return self.b.torch_dtype.itemsize


def _start(job: _Job, lo: int, rank: bool, mask: bool) -> None:
    """Allocate a job's outputs before its first chunk is submitted."""
    if lo:
        return
    numel = job.diff.numel
    if mask:
        job.packed = torch.zeros((numel + 7) // 8, dtype=torch.uint8)
    if rank and len(job.diff.shape) == 2:
        job.delta = torch.empty(numel, dtype=torch.float32)


def _finalize(job: _Job) -> None:
    """After a tensor's last chunk: its rank and its mask signature."""
    t = job.diff
    if job.delta is not None:
        delta = job.delta.view(t.shape)
        if not t.changed:
            t.rank = 0
        elif bool(torch.isfinite(delta).all()):  # NaN/inf updates have no rank
            t.rank = int(torch.linalg.matrix_rank(delta))
        job.delta = None
    if job.samples:
        values = torch.cat([s for _, s in sorted(job.samples, key=lambda x: x[0])])
        job.signature = _signature_digest(t.shape, _signature_bits(values))
        job.samples = []


class _Engine:
    """Reads and compares one chunk of one tensor pair; safe to call from several threads (each thread
    has its own read buffers; ``os.preadv`` and torch's kernels release the GIL). Each chunk is handed to
    the rules of `_rules` as a zero-copy tensor over the read buffer."""

    def __init__(self, cdtype: str | None, atols: tuple[float, ...], chunk_numel: int, mask: bool) -> None:
        self.cdtype = COMPARE_DTYPES[cdtype] if cdtype is not None else None
        self.atols = atols
        self.chunk_numel = chunk_numel
        self.mask = mask
        self._local = threading.local()
        self._reader = _Reader()

    def close(self) -> None:
        self._reader.close()

    def _read(self, info: TensorInfo, lo: int, n: int, kind: str) -> torch.Tensor:
        """Elements ``[lo, lo + n)`` of ``info`` as a tensor of its dtype over this thread's ``kind`` buffer."""
        buffers = getattr(self._local, "buffers", None)
        if buffers is None:
            buffers = self._local.buffers = {}
        buf = buffers.get(kind)
        if buf is None:
            buf = buffers[kind] = np.empty(self.chunk_numel * 8, dtype=np.uint8)
        dtype = _DTYPES[info.dtype]
        raw = buf[: n * dtype.itemsize]
        self._reader.read(info, lo, raw)
        return torch.from_numpy(raw).view(dtype)

    def chunk(self, job: _Job, lo: int, n: int) -> tuple[int, list[int], int]:
        """Counts of elements ``[lo, lo + n)``: ``(changed, [changed with atol, per atol], nonfinite in
        TUNED)`` by the rules of `_rules`; writes the mask bits, ΔW and signature samples into ``job``."""
        a = self._read(job.a, lo, n, "a")
        b = self._read(job.b, lo, n, "b")
        if self.mask:
            sample = _signature_sample(a, lo, job.diff.numel)
            if sample is not None:
                job.samples.append((lo, sample))
        target = self.cdtype or a.dtype
        base, tuned = _to_compare(a, target), _to_compare(b, target)
        differ = _bits_differ(tuned, base)
        changed = int(differ.sum())
        nonfinite = _count_nonfinite(b)
        delta = job.delta[lo : lo + n] if job.delta is not None else None
        if changed == 0:  # the atol counts are subsets of the exact one
            if delta is not None:
                delta.zero_()
            return 0, [0] * len(self.atols), nonfinite
        if job.packed is not None:
            job.packed[lo // 8 : lo // 8 + (n + 7) // 8] = _pack_bits(differ)
        if delta is not None:
            step = (tuned - base).float() if tuned.dtype == torch.float64 else tuned.float() - base.float()
            delta.copy_(step.masked_fill_(~differ, 0.0))
        if changed == n:
            within = [int(_beyond_atol(tuned, base, atol).sum()) for atol in self.atols]
        else:  # |Δ| only where the bits differ
            tuned, base = tuned[differ], base[differ]
            within = [int(_beyond_atol(tuned, base, atol).sum()) for atol in self.atols]
        return changed, within, nonfinite


def _signature_sample(values: torch.Tensor, lo: int, numel: int) -> torch.Tensor | None:
    """Copies of this chunk's elements (``values`` starts at element ``lo``) that the signature samples:
    indices ``k * stride`` for ``k < 4096``, ``stride = max(1, numel // 4096)`` (`_rules`, rule 5)."""
    stride = max(1, numel // SIGNATURE_SAMPLES)
    end = min(lo + values.shape[0], SIGNATURE_SAMPLES * stride, numel)
    start = -(-lo // stride) * stride
    if start >= end:
        return None
    return values[start - lo : end - lo : stride].clone()
