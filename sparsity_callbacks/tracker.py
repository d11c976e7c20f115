"""`SparsityTracker`: the framework-free engine. Snapshot, measure, keep the ever-changed mask.

The memory policy is in `_memory`, the collectives for sharded parameters in `_distributed`, the saved
state in `_tracker_state`, and the per-chunk kernels in `reference`."""

from __future__ import annotations

import logging
import math
import os
import re
import time
import warnings
from typing import Any

import torch

from sparsity_callbacks._bits import _pack_bits
from sparsity_callbacks._distributed import (
    _dist_ready,
    _full_signatures,
    _gather_masks,
    _nonfinite_across_ranks,
    _sum_across_ranks,
)
from sparsity_callbacks._memory import _choose_mode
from sparsity_callbacks._rules import COMPARE_DTYPES, _as_bits, _count_nonfinite, _representable, _tensor_signature
from sparsity_callbacks._tracker_state import _load_state_dict, _read_file, _save, _state_dict, _TensorState
from sparsity_callbacks.config import SparsityConfig, _resolve_config
from sparsity_callbacks.masks import Mask
from sparsity_callbacks.measurement import Measurement, TensorCounts
from sparsity_callbacks.params import (
    _clean_name,
    _collect_parameters,
    _global_shape,
    _local_tensor,
    _skip_reason,
    _TrackedTensor,
)
from sparsity_callbacks.reference import (
    _bits_input,
    _chunks,
    _compiled_kernel,
    _fingerprint_words,
    _flat_chunk,
    _kernel_eager,
    _KernelRunner,
    _miss_probability,
    _new_host_buffer,
    _padded,
    _planar_to_bool,
    _planar_to_bool_chunks,
)

_log = logging.getLogger("sparsity_callbacks")

_MAX_HISTORY = 4096
#: Eager measurements concatenate tensors up to this many elements (each at most one chunk): that removes
#: ~125 us of per-tensor op dispatch; larger concatenations measured slower (their fresh buffers page-fault).
_GROUP_NUMEL = 1 << 18
#: warn at the snapshot when fewer reference elements than this are exactly representable in compare_dtype
_REPRESENTABLE_WARN_BELOW = 0.99


class SparsityTracker:
    """Measure which elements of a model's trainable parameters changed since a snapshot.

    Example::

        tracker = SparsityTracker(model, SparsityConfig(mode="fingerprint"))
        tracker.snapshot()                      # before the first optimizer step
        for step in range(1, 101):
            train_step()
            if step % 10 == 0:
                m = tracker.measure(step)
                print(m.changed_fraction, m.ever_changed_fraction)
        tracker.ever_changed_mask().save("mask.safetensors")

    Tracks trainable floating-point parameters (tied ones once); skipped ones are in `skipped`.
    Memory: ``exact`` holds 1x the tracked bytes in ``compare_dtype`` on the host (pinned with CUDA);
    ``fingerprint`` holds ``fingerprint_bits / 8`` bytes per element on the parameter's device. Both
    add 1 bit per element (ever-changed) and, with ``track_churn``, ``fingerprint_bits / 8`` bytes
    per element on the device. One measurement needs at most about ``chunk_numel * (2 * itemsize + 3)``
    bytes of extra device memory. `snapshot` checks the memory first: ``exact`` against the host RAM
    available (MemAvailable, capped by the environment variable ``SPARSITY_CALLBACKS_HOST_RAM_LIMIT``
    in bytes when set, read at each snapshot), ``fingerprint`` on CUDA against the free device memory;
    a mode that cannot fit raises `MemoryError` with the numbers and the alternatives.

    Distributed: every rank must call `snapshot`, `measure`, `ever_changed_mask` and `changed_mask`
    alike (they run collectives when parameters are sharded). DDP replicas are measured locally and
    counted once. Sharded parameters (FSDP2 ``Shard(0)`` DTensors, FSDP1 with ``use_orig_params=True``,
    DeepSpeed ZeRO-3) are measured on each rank's shard; the counts are summed over ranks (a torchmetrics
    ``Metric`` with ``dist_reduce_fx="sum"``; replicated shards, as in HSDP, are counted once) and
    ``numel`` is the full tensor's. Masks are gathered: every rank gets the full mask (rank 0 saves it).
    ``signatures`` are those of the full tensors (the samples are gathered at the snapshot), equal to a
    single-process run's, so masks move between single-process and sharded runs. ``reference(name)``
    and the saved state (`state_dict`, one file per rank) hold this rank's shard only.

    A trainable floating-point parameter added after the snapshot (e.g. a new head or adapter) is not
    tracked: `measure` warns once per tracker, naming it, and keeps measuring the tracked ones.
    """

    def __init__(self, model: torch.nn.Module, config: SparsityConfig | None = None, **overrides: Any) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
        self.model = model
        self.config = _resolve_config(config, overrides)
        self._tracked, self.skipped = _collect_parameters(model, self.config)
        self.mode: str | None = None
        self.mode_reason: str = ""
        self.history: list[dict[str, float]] = []
        self.last_measurement: Measurement | None = None
        self._states: dict[str, _TensorState] = {}
        self._has_previous = False
        self._previous_step: int | None = None  # step of the previous measurement (delta-sync figures)
        self._reference_nonfinite = 0
        #: fraction in [0, 1] of reference elements exactly representable in ``compare_dtype`` (None without one)
        self.reference_representable_fraction: float | None = None
        self._warned: set[str] = set()
        self._rank_layouts: list[list[tuple[int, int]]] | None = None  # per rank: (start, count) per sharded tensor
        self._chunk = max(8, self.config.chunk_numel // 8 * 8)
        self._kernel = _KernelRunner(self.config.compile)

    # --- public ----------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Names of the tracked parameters (tied parameters under their first name)."""
        return [t.name for t in self._tracked]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {t.name: t.shape for t in self._tracked}

    @property
    def signatures(self) -> dict[str, str]:
        """Content hashes of the reference weights (see `Mask.check_matches`); empty before `snapshot`."""
        return {name: s.signature for name, s in self._states.items()}

    @property
    def is_sharded(self) -> bool:
        """True when some tracked parameter is sharded across ranks (FSDP, ZeRO-3)."""
        return any(t.sharded for t in self._tracked)

    @property
    def is_snapshotted(self) -> bool:
        return bool(self._states)

    def snapshot(self) -> None:
        """Take the reference: the current values of every tracked parameter. Resets the ever-changed
        mask, churn and history. Call it before the first optimizer step."""
        self._current_parameters()  # the model's Parameter objects now (`to_empty` replaces them)
        self._check_materialised()
        self.mode, self.mode_reason = self._choose_mode()
        self._choose_compile()
        _log.info("sparsity_callbacks: mode=%s (%s)", self.mode, self.mode_reason)
        self._states = {}
        nonfinite = {}
        representable = torch.zeros(len(self._tracked), 5, dtype=torch.int64)  # columns as measure()'s totals
        for i, tracked in enumerate(self._tracked):
            self._states[tracked.name], bad, representable[i, 0] = self._snapshot_tensor(tracked)
            representable[i, 4] = self._states[tracked.name].numel
            if bad:
                nonfinite[tracked.name] = bad
        self._gate_precision(representable)
        for name, signature in self._full_signatures().items():
            self._states[name].signature = signature
        nonfinite = self._nonfinite_across_ranks(nonfinite)
        if nonfinite:
            first = next(iter(nonfinite))
            warnings.warn(
                f"{sum(nonfinite.values())} reference elements are NaN or inf (e.g. {nonfinite[first]} in {first!r}). "
                "They are compared by their bits: a NaN that stays the same NaN counts as unchanged. "
                "Check the checkpoint if this is unexpected.",
                stacklevel=2,
            )
        self._reference_nonfinite = sum(nonfinite.values())
        self._has_previous = False
        self._previous_step = None
        self.history = []
        self.last_measurement = None

    @torch.no_grad()
    def measure(self, step: int | None = None) -> Measurement:
        """Compare every tracked element with the reference; update the ever-changed mask and churn.

        Returns a `Measurement` with counts per tensor (summed over ranks when parameters are sharded).
        """
        self._require_snapshot()
        params = self._current_parameters()
        cfg = self.config
        has_churn = cfg.track_churn and self._has_previous
        began = time.perf_counter()
        counts = self._count_all(params)
        totals = torch.zeros(len(self._tracked), 6, dtype=torch.int64)
        totals[:, :4], totals[:, 5] = counts[:, :4], counts[:, 4]
        totals[:, 1].clamp_(max=1)
        totals[:, 4] = torch.tensor([s.numel for s in self._states.values()], dtype=torch.int64)
        if not self._kernel.compiled:
            self._kernel.record_eager(time.perf_counter() - began, self._warm_up_compiled_kernel)
        for row, tracked in zip(totals, self._tracked):
            if row[1]:
                state = self._states[tracked.name]
                row[1] = _count_nonfinite(self._local_flat(params[tracked.name], tracked.name, state))
        totals = self._sum_across_ranks(totals)
        # Churn since the previous measurement is the step's delta when that measurement was one step ago.
        consecutive = has_churn and step is not None and self._previous_step == step - 1
        self._has_previous = True
        self._previous_step = step
        step_changed = step_delta_bytes = None
        if consecutive:
            step_changed = int(totals[:, 2].sum())
            step_delta_bytes = sum(
                int(row[2]) * self._patch_bytes_per_element(t) for t, row in zip(self._tracked, totals.tolist())
            )
        tensors = {
            t.name: TensorCounts(
                numel=t.layout.numel,
                changed=int(row[0]),
                ever_changed=int(row[3]),
                churn=int(row[2]) if has_churn else 0,
            )
            for t, row in zip(self._tracked, totals.tolist())
        }
        nonfinite = int(totals[:, 1].sum())
        has_native = all(s.native is not None for s in self._states.values())
        measurement = Measurement(
            step=step,
            mode=self.mode or "exact",
            tensors=tensors,
            changed_miss_probability=_miss_probability(cfg.fingerprint_bits) if self.mode == "fingerprint" else 0.0,
            churn_miss_probability=_miss_probability(cfg.fingerprint_bits),
            fingerprint_estimate=_fingerprint_estimate(s.dtype for s in self._states.values()),
            changed_native=int(totals[:, 5].sum()) if has_native else None,
            native_miss_probability=_miss_probability(cfg.fingerprint_bits),
            has_churn=has_churn,
            nonfinite=nonfinite,
            skipped=self.skipped,
            step_changed=step_changed,
            step_delta_bytes=step_delta_bytes,
        )
        if nonfinite > self._reference_nonfinite and "nonfinite" not in self._warned:
            self._warned.add("nonfinite")
            bad = [n for n, row in zip(self.names, totals.tolist()) if row[1]]
            warnings.warn(
                f"{nonfinite} tracked elements are NaN or inf at step {step} ({self._reference_nonfinite} at the "
                f"snapshot; e.g. in {bad[:3]}): training has probably diverged. They count as changed unless the "
                "reference had the same bits. HINT: lower the learning rate or enable gradient clipping.",
                stacklevel=3,  # past torch.no_grad's wrapper: the caller of measure()
            )
        self.last_measurement = measurement
        self._append_history(measurement)
        return measurement

    @torch.no_grad()
    def ever_changed_mask(self) -> Mask:
        """Elements detected as changed at any measurement so far (1 = changed), as a `Mask` carrying
        the reference signatures. Sharded parameters: the full mask, gathered, on every rank (a
        collective: call it on every rank)."""
        self._require_snapshot()
        local = {
            name: _planar_to_bool_chunks(state.ever, self._chunk)[: state.numel].cpu()
            for name, state in self._states.items()
        }
        return self._full_mask(local, "ever_changed")

    @torch.no_grad()
    def changed_mask(self) -> Mask:
        """Elements that differ from the reference now (detected; does not update any state)."""
        self._require_snapshot()
        params = self._current_parameters()
        tensors = {}
        for tracked in self._tracked:
            state = self._states[tracked.name]
            flat = self._local_flat(params[tracked.name], tracked.name, state)
            pieces = [
                _planar_to_bool(self._run_chunk(flat, state, start, end, update=False)[0])
                for start, end in _chunks(state.ever.numel() * 8, self._chunk)
            ]
            flags = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.bool)  # an empty FSDP1 slice
            tensors[tracked.name] = flags[: state.numel].cpu()
        return self._full_mask(tensors, "changed")

    def reference(self, name: str) -> torch.Tensor | None:
        """Reference values of a tracked parameter (CPU, compare dtype, local shape: this rank's flat
        slice for sharded ones) in ``exact`` mode; None in ``fingerprint`` mode, which keeps no values.
        ``name`` may be any name of a tied parameter."""
        self._require_snapshot()
        name = self._primary_name(name)
        state = self._states[name]
        if self.mode != "exact":
            return None
        return state.reference[: state.numel].view(self._local_shape(name))

    # --- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue after a restart: ``{"meta": json str, "tensors": {key: tensor}}``.
        Tensors are on the CPU. Keyed by parameter names."""
        self._require_snapshot()
        return _state_dict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict`: the original reference, ever-changed mask, churn state and history.
        Raises `ValueError` when the state belongs to another model or is corrupt (nothing is changed then)."""
        _load_state_dict(self, state)

    def save(self, path: str | os.PathLike) -> None:
        """Write `state_dict` to a safetensors file (atomic rename). No pickle."""
        self._require_snapshot()
        _save(self, path)

    def load(self, path: str | os.PathLike) -> None:
        """Restore from a file written by `save`. Raises `ValueError` for a corrupt or foreign file."""
        self.load_state_dict(_read_file(path))

    # --- internals -------------------------------------------------------------------------------
    def _choose_compile(self) -> None:
        """``compile=None``: measured, not by size (`_KernelRunner`): eager measurements until the time they
        took reaches the cost of one compilation, then compiled in the background. Every configuration can
        pay: compiled, even a plain exact comparison without churn runs ~2x faster than eager on CPU (the
        packing and counting fuse into the comparison's loop)."""
        if self.config.compile is None:
            self._kernel.use_compile = None

    @torch.no_grad()  # as `measure` runs: grad mode is thread-local and guards the compiled kernel
    def _warm_up_compiled_kernel(self) -> None:
        """Run the compiled kernel once on small inputs of every signature `measure` uses (dtypes, device,
        churn or not, and a one-byte chunk where a tensor has one: the compiler specialises sizes 0 and 1),
        so that it is compiled before the training thread calls it."""
        seen = set()
        for tracked in self._tracked:
            state = self._states[tracked.name]
            current = tracked.local()
            device = current.device
            previous = state.previous if self.config.track_churn else None
            signature = (
                current.dtype,
                state.dtype,
                state.reference.dtype,
                device,
                previous is None,
                state.native is None,
            )
            last_chunk = (state.ever.numel() * 8) % self._chunk or self._chunk
            for n in (4096, 8) if last_chunk == 8 else (4096,):
                if (signature, n) in seen:
                    continue
                seen.add((signature, n))
                words = n * self.config.fingerprint_bits // 32
                args, options = self._kernel_inputs(
                    torch.zeros(n, dtype=current.dtype, device=device),
                    torch.zeros(n if self.mode == "exact" else words, dtype=state.reference.dtype, device=device),
                    None if previous is None else torch.zeros(words, dtype=torch.int32, device=device),
                    None if state.native is None else torch.zeros(words, dtype=torch.int32, device=device),
                    torch.zeros(n // 8, dtype=torch.uint8, device=device),
                    state,
                    update=True,
                )
                _compiled_kernel()(*args, **options)

    def _kernel_options(self, state: _TensorState, *, update: bool) -> dict[str, Any]:
        return {
            "compare_dtype": state.dtype,
            "fingerprint_reference": self.mode == "fingerprint",
            "bits": self.config.fingerprint_bits,
            "atol": float(self.config.atol),
            "update": update,
        }

    def _patch_bytes_per_element(self, tracked: _TrackedTensor) -> int:
        """Bytes per changed element of a sparse patch of ``tracked``: its index within the full tensor
        (int32, int64 from 2**31 elements) and its value in the compare dtype."""
        index = 4 if tracked.layout.numel < 2**31 else 8
        return index + self._states[tracked.name].dtype.itemsize

    def _require_snapshot(self) -> None:
        if not self._states:
            raise RuntimeError("Call tracker.snapshot() (before the first optimizer step) or load a state first.")

    def _check_materialised(self) -> None:
        for tracked in self._tracked:
            if tracked.local().device.type == "meta":
                raise ValueError(
                    f"Parameter {tracked.name!r} is on the meta device (deferred initialisation): there are no "
                    "values to snapshot. HINT: snapshot after the weights are materialised and loaded "
                    "(e.g. after `model.to_empty(device=...)` and loading the checkpoint)."
                )

    def _compare_dtype(self, tracked: _TrackedTensor) -> torch.dtype:
        if self.config.compare_dtype is None:
            return tracked.local().dtype
        return COMPARE_DTYPES[self.config.compare_dtype]

    def _choose_mode(self) -> tuple[str, str]:
        return _choose_mode(self.config, self._tracked, [self._compare_dtype(t) for t in self._tracked])

    def _reference_path(self, name: str) -> str | None:
        if self.config.reference_dir is None or self.mode != "exact":
            return None
        os.makedirs(self.config.reference_dir, exist_ok=True)
        rank = torch.distributed.get_rank() if _dist_ready() else 0
        return os.path.join(self.config.reference_dir, f"reference_rank{rank}_{name}.bin")

    def _gate_precision(self, representable: torch.Tensor) -> None:
        """The precision gate (arXiv 2511.08567): which share of the reference is exactly representable in
        ``compare_dtype``; warn once when it is below `_REPRESENTABLE_WARN_BELOW`. ``representable``: per
        tensor, column 0 the representable count, column 4 the local element count."""
        if self.config.compare_dtype is None:
            self.reference_representable_fraction = None
            return
        totals = self._sum_across_ranks(representable)
        numel = int(totals[:, 4].sum())
        self.reference_representable_fraction = int(totals[:, 0].sum()) / numel if numel else 1.0
        fraction = self.reference_representable_fraction
        if fraction < _REPRESENTABLE_WARN_BELOW and "representable" not in self._warned:
            self._warned.add("representable")
            warnings.warn(
                f"Only {fraction:.1%} of the reference weights are exactly representable in "
                f"{self.config.compare_dtype}: the others lie between two {self.config.compare_dtype} values, so a "
                f"step far smaller than one {self.config.compare_dtype} ulp can move them across a rounding "
                f"boundary and count as changed. Changed fractions then measure how close the weights sat to "
                f"those boundaries as much as which weights learned (e.g. weights dequantized from a 4-bit "
                f"checkpoint). HINT: round the base to {self.config.compare_dtype} before training to measure what "
                f"a {self.config.compare_dtype} checkpoint would show, and compare with "
                "sparsity/changed_fraction_native (changed in the parameters' own dtype).",
                stacklevel=3,
            )

    def _snapshot_tensor(self, tracked: _TrackedTensor) -> tuple[_TensorState, int, int]:
        """The tensor's reference state, its non-finite count, and its count of elements exactly
        representable in the compare dtype (all of them without a compare dtype)."""
        local = tracked.local().detach()
        flat = local.reshape(-1)
        dtype = self._compare_dtype(tracked)
        padded = _padded(flat.numel())
        bits = self.config.fingerprint_bits
        words = padded * bits // 32  # fingerprints are packed into int32 words (`_fingerprint_words`)
        native = None
        if dtype != flat.dtype:  # compare_dtype set: also a fingerprint of the own-dtype values
            native = torch.empty(words, dtype=torch.int32, device=flat.device)
        representable = flat.numel()
        ever = torch.zeros(padded // 8, dtype=torch.uint8, device=flat.device)
        previous = torch.empty(words, dtype=torch.int32, device=flat.device) if self.config.track_churn else None
        if self.mode == "exact":
            pin = flat.device.type == "cuda"
            reference = _new_host_buffer(padded, dtype, pin, self._reference_path(tracked.name))
        else:
            reference = torch.empty(words, dtype=torch.int32, device=flat.device)
        nonfinite = _count_nonfinite(flat)
        for start, end in _chunks(padded, self._chunk):
            values = _flat_chunk(flat, start, end, dtype)
            at = slice(start * bits // 32, end * bits // 32)
            if self.mode == "exact":
                reference[start:end].copy_(values, non_blocking=True)
            if previous is not None or self.mode != "exact":
                fingerprint = _fingerprint_words(values, bits)
                if self.mode != "exact":
                    reference[at] = fingerprint
                if previous is not None:
                    previous[at] = fingerprint
            if native is not None:
                own = _flat_chunk(flat, start, end, flat.dtype)
                native[at] = _fingerprint_words(own, bits)
                representable -= int((~_representable(own[: max(0, min(end, flat.numel()) - start)], dtype)).sum())
        if flat.device.type == "cuda":
            torch.cuda.synchronize(flat.device)
        state = _TensorState(
            numel=flat.numel(),
            shape=tracked.shape,
            dtype=dtype,
            reference=reference,
            previous=previous,
            ever=ever,
            signature=_tensor_signature(local),
            native=native,
        )
        return state, nonfinite, representable

    def _count_all(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Run the kernel over every tracked tensor, updating the ever-changed bits and churn fingerprints.
        Returns int64 counts per tracked tensor (CPU, ``(n, 5)``): changed, some element NaN/inf (> 0), churn,
        ever-changed and changed in the parameters' own dtype (with a compare dtype), summed over chunks.
        Eagerly, small tensors run together, up to `_GROUP_NUMEL` elements per `_kernel_eager` call."""
        stats: dict[torch.device, list[torch.Tensor]] = {}  # (rows, 5) per kernel call
        owners: dict[torch.device, list[int]] = {}
        group_limit = min(self._chunk, _GROUP_NUMEL) if not (self._kernel.use_compile or self._kernel.compiled) else 0
        groups: dict[tuple, list[tuple[int, torch.Tensor, _TensorState]]] = {}
        group_numel: dict[tuple, int] = {}

        def run_group(key: tuple) -> None:
            members = groups.pop(key)
            device = members[0][1].device
            stats.setdefault(device, []).append(self._run_group([(flat, state) for _, flat, state in members]))
            owners.setdefault(device, []).extend(index for index, _, _ in members)

        for index, tracked in enumerate(self._tracked):
            state = self._states[tracked.name]
            flat = self._local_flat(params[tracked.name], tracked.name, state)
            padded = state.ever.numel() * 8
            if 0 < padded <= group_limit:
                key = (flat.device, flat.dtype, state.dtype, state.native is None)
                if key in groups and group_numel[key] + padded > group_limit:
                    run_group(key)
                if key not in groups:
                    groups[key], group_numel[key] = [], 0
                groups[key].append((index, flat, state))
                group_numel[key] += padded
                continue
            for start, end in _chunks(padded, self._chunk):
                stats.setdefault(flat.device, []).append(self._run_chunk(flat, state, start, end, update=True)[1][None])
                owners.setdefault(flat.device, []).append(index)
        for key in list(groups):
            run_group(key)
        counts = torch.zeros(len(self._tracked), 5, dtype=torch.int64)
        for device, rows in stats.items():  # one sync per device
            counts.index_add_(0, torch.tensor(owners[device]), torch.cat(rows).cpu())
        return counts

    def _run_chunk(self, flat: torch.Tensor, state: _TensorState, start: int, end: int, *, update: bool):
        args, options = self._chunk_inputs(flat, state, start, end, update=update)
        return self._kernel(*args, **options)

    def _chunk_inputs(self, flat: torch.Tensor, state: _TensorState, start: int, end: int, *, update: bool):
        """``(args, kwargs)`` of `_kernel` for elements ``[start, end)`` of a tensor's padded flat values."""
        current = _flat_chunk(flat, start, end, flat.dtype)  # as stored: the kernel converts (one pass)
        bits = self.config.fingerprint_bits
        words = slice(start * bits // 32, end * bits // 32)
        reference = state.reference[start:end] if self.mode == "exact" else state.reference[words]
        if self.mode == "exact" and reference.device != current.device:
            reference = reference.to(current.device, non_blocking=True)
        previous = state.previous[words] if (state.previous is not None and self.config.track_churn) else None
        native = None if state.native is None else state.native[words]
        ever = state.ever[start // 8 : end // 8]
        return self._kernel_inputs(current, reference, previous, native, ever, state, update=update)

    def _run_group(self, members: list[tuple[torch.Tensor, _TensorState]]) -> torch.Tensor:
        """Measure (and update) whole single-chunk tensors of the same dtypes and device together, eagerly
        (`_kernel_eager`): ``members`` are (local flat values, state); returns their ``(len(members), 5)`` stats."""
        chunks, options = [], {}
        for flat, state in members:
            args, options = self._chunk_inputs(flat, state, 0, state.ever.numel() * 8, update=True)
            chunks.append(args)
        return _kernel_eager(chunks, **options)[1]

    def _kernel_inputs(self, current, reference, previous, native, ever, state: _TensorState, *, update: bool):
        """``(args, kwargs)`` of `_kernel` for one chunk: raw bits when no conversion or atol is involved (an
        exact bfloat16 reference of float32 values stays bfloat16: see `_kernel`)."""
        options = self._kernel_options(state, update=update)
        if _bits_input(current.dtype, state.dtype, options["atol"]):
            options["stored_dtype"] = current.dtype
            if self.mode == "exact" and current.dtype == state.dtype:
                reference = _as_bits(reference)
            current = _as_bits(current)
        return (current, reference, previous, native, ever), options

    def _current_parameters(self) -> dict[str, torch.Tensor]:
        """The tracked parameters as they are now, by name; raises when the model changed shape, warns
        (once) about trainable parameters added after the snapshot, which are not tracked."""
        params: dict[str, torch.Tensor] = {
            _clean_name(n): p for n, p in self.model.named_parameters(remove_duplicate=False)
        }
        for tracked in self._tracked:
            param = params.get(tracked.name)
            if param is None:
                raise ValueError(
                    f"Parameter {tracked.name!r} was removed from the model after the snapshot. HINT: create a new "
                    "SparsityTracker and call snapshot() (the cumulative curve starts over)."
                )
            shape = _global_shape(param)
            if shape != tracked.shape:
                raise ValueError(
                    f"Parameter {tracked.name!r} changed shape from {list(tracked.shape)} to {list(shape)} after "
                    "the snapshot. HINT: create a new SparsityTracker and call snapshot()."
                )
            tracked.param = param  # type: ignore[assignment]  # a Parameter (named_parameters)
        if "new_parameters" not in self._warned:
            self._warn_new_parameters(params)
        return params

    def _warn_new_parameters(self, params: dict[str, torch.Tensor]) -> None:
        known = {id(t.param) for t in self._tracked}
        include = [re.compile(p) for p in self.config.include]
        exclude = [re.compile(p) for p in self.config.exclude]
        new = sorted(
            name
            for name, param in params.items()
            if id(param) not in known and _skip_reason(name, param, include, exclude) is None
        )
        if new:
            self._warned.add("new_parameters")
            warnings.warn(
                f"{len(new)} trainable parameter(s) were added or unfrozen after the tracker was created and are NOT "
                f"tracked (e.g. {new[:3]}); the fractions cover the {len(self._tracked)} tracked tensors only. HINT: "
                "create the SparsityTracker after adding heads/adapters (e.g. after get_peft_model) and unfreezing, "
                "or build a new tracker and call snapshot() (the cumulative curve starts over).",
                stacklevel=5,  # _current_parameters <- measure <- torch.no_grad wrapper <- the caller
            )

    def _local_flat(self, param: torch.Tensor, name: str, state: _TensorState) -> torch.Tensor:
        local = _local_tensor(param).detach()
        if local.numel() != state.numel:
            raise ValueError(
                f"Parameter {name!r} holds {local.numel()} elements on this rank, {state.numel} at the snapshot "
                "(the sharding changed?). HINT: keep the FSDP/ZeRO wrapping fixed between snapshot and measure."
            )
        expected = state.dtype
        if self.config.compare_dtype is None and local.dtype != expected and f"dtype:{name}" not in self._warned:
            self._warned.add(f"dtype:{name}")
            warnings.warn(
                f"Parameter {name!r} changed dtype from {expected} to {local.dtype} after the snapshot (e.g. "
                f"model.half()); comparing in {expected}. Values that the cast rounded count as changed. HINT: set "
                "compare_dtype to the dtype you save checkpoints in.",
                stacklevel=4,
            )
        return local.reshape(-1)

    def _local_shape(self, name: str) -> tuple[int, ...]:
        state = self._states[name]
        return state.shape if math.prod(state.shape) == state.numel else (state.numel,)

    def _distributed(self) -> bool:
        """True when some tracked tensor is sharded over an initialised process group (then snapshot,
        measure and the masks run collectives; the answer is the same on every rank)."""
        return _dist_ready() and self.is_sharded

    def _sum_across_ranks(self, totals: torch.Tensor) -> torch.Tensor:
        """Per-tensor counts summed over ranks when sharded (see `_distributed._sum_across_ranks`)."""
        if not self._distributed():
            return totals
        return _sum_across_ranks(self._tracked, totals)

    def _full_signatures(self) -> dict[str, str]:
        """Signatures of the full tensors: each rank contributes the samples in its shard."""
        signatures, rank_layouts = _full_signatures(self._tracked)
        if rank_layouts is not None:
            self._rank_layouts = rank_layouts
        return signatures

    def _nonfinite_across_ranks(self, nonfinite: dict[str, int]) -> dict[str, int]:
        if not self._distributed():
            return nonfinite
        return _nonfinite_across_ranks(nonfinite)

    def _full_mask(self, local: dict[str, torch.Tensor], kind: str) -> Mask:
        """Per-tensor local flat bool flags -> `Mask` of full tensors (gathered over ranks when sharded)."""
        by_name = {t.name: t for t in self._tracked}
        packed: dict[str, torch.Tensor] = {}
        sharded = [t for t in self._tracked if t.sharded]
        if sharded and self._distributed():
            packed, self._rank_layouts = _gather_masks(sharded, local, self._rank_layouts)
        for name, flags in local.items():
            if name not in packed:
                tracked = by_name[name]
                if tracked.sharded and flags.numel() != tracked.layout.numel:
                    raise RuntimeError(
                        f"{name!r} is sharded but torch.distributed is not initialised: cannot gather "
                        "its mask. HINT: call ever_changed_mask() while the process group is up."
                    )
                packed[name] = _pack_bits(flags)
        shapes = {t.name: t.shape for t in self._tracked}
        return Mask._from_packed(packed, shapes, self.signatures, self._mask_metadata(kind))

    def _primary_name(self, name: str) -> str:
        if name in self._states:
            return name
        for t in self._tracked:
            if name in t.aliases:
                return t.name
        raise KeyError(f"{name!r} is not a tracked parameter (tracked: {self.names[:5]}...).")

    def _append_history(self, m: Measurement) -> None:
        point = {
            "step": float(m.step if m.step is not None else len(self.history)),
            "changed_fraction": m.changed_fraction,
            "ever_changed_fraction": m.ever_changed_fraction,
        }
        if m.has_churn:
            point["churn_fraction"] = m.churn_fraction
        self.history.append(point)
        if len(self.history) > _MAX_HISTORY:  # bounded memory on long runs: keep every other point
            self.history = self.history[::2]

    def _mask_metadata(self, kind: str) -> dict[str, Any]:
        return {
            "kind": kind,
            "mode": self.mode,
            "step": self.last_measurement.step if self.last_measurement else None,
            "config": self.config.to_dict(),
        }


def _fingerprint_estimate(compare_dtypes) -> str:
    """How fingerprint counts (``changed`` in fingerprint mode, churn) are reported, by regime: ``"detected"``
    when every tensor is compared in a 16-bit dtype, ``"corrected"`` otherwise. A fraction s of the changes
    moves >= 255 ulps and is missed with probability 1/255, so the detected count is low by s/255 and the
    corrected one (/ (1 - 1/255)) high by (1 - s)/255. Measured on SmolLM2-135M (3-step GRPO/DPO/SFT runs,
    README "Reproducing the papers"): compared in bf16, s = 3-53 % (weights at or near zero jump many ulps),
    so the detected count is within 0.21 % below the truth while the correction would overstate it by up
    to 0.38 %; compared in fp32, s = 32-86 % after 3 steps and grows with every step, so the corrected
    estimate is the figure. The 99.9 % upper bound is reported beside either."""
    return "detected" if all(torch.empty(0, dtype=d).element_size() <= 2 for d in compare_dtypes) else "corrected"
