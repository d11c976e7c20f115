"""`SparsityTracker`: the framework-free engine. Snapshot, measure, keep the ever-changed mask."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from sparsity_callbacks._bits import _pack_bits, _popcount, _unpack_bits
from sparsity_callbacks.config import SparsityConfig, _resolve_config
from sparsity_callbacks.masks import Mask
from sparsity_callbacks.params import (
    _clean_name,
    _collect_parameters,
    _global_shape,
    _local_signature_samples,
    _local_tensor,
    _signature_digest,
    _skip_reason,
    _tensor_signature,
    _TrackedTensor,
)
from sparsity_callbacks.reference import (
    _FINGERPRINT_DTYPES,
    HOST_RAM_LIMIT_ENV,
    _available_host_bytes,
    _chunks,
    _fingerprint,
    _flat_chunk,
    _KernelRunner,
    _miss_probability,
    _new_host_buffer,
    _pack_planar,
    _padded,
    _planar_to_bool,
)
from sparsity_callbacks.report import Measurement, TensorCounts

_log = logging.getLogger("sparsity_callbacks")

_STATE_FORMAT = "sparsity_callbacks.tracker_state"
_STATE_VERSION = 1
_COMPILE_AUTO_NUMEL = 10_000_000
_MAX_HISTORY = 4096


@dataclass
class _TensorState:
    """Per tracked tensor: reference (host values or device fingerprints), previous fingerprint,
    planar-packed ever-changed bits. All flat, padded to a multiple of 8."""

    numel: int
    shape: tuple[int, ...]
    dtype: torch.dtype  # compare dtype
    reference: torch.Tensor
    previous: torch.Tensor | None
    ever: torch.Tensor
    signature: str


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
        self.model = model
        self.config = _resolve_config(config, overrides)
        self.tracked, self.skipped = _collect_parameters(model, self.config)
        self.mode: str | None = None
        self.mode_reason: str = ""
        self.history: list[dict[str, float]] = []
        self.last_measurement: Measurement | None = None
        self._states: dict[str, _TensorState] = {}
        self._has_previous = False
        self._reference_nonfinite = 0
        self._warned: set[str] = set()
        self._rank_layouts: list[list[tuple[int, int]]] | None = None  # per rank: (start, count) per sharded tensor
        self._chunk = max(8, self.config.chunk_numel // 8 * 8)
        self._kernel = _KernelRunner(bool(self.config.compile))

    # --- public ----------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Names of the tracked parameters (tied parameters under their first name)."""
        return [t.name for t in self.tracked]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {t.name: t.shape for t in self.tracked}

    @property
    def signatures(self) -> dict[str, str]:
        """Content hashes of the reference weights (see `Mask.check_matches`); empty before `snapshot`."""
        return {name: s.signature for name, s in self._states.items()}

    @property
    def is_sharded(self) -> bool:
        """True when some tracked parameter is sharded across ranks (FSDP, ZeRO-3)."""
        return any(t.sharded for t in self.tracked)

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
        for tracked in self.tracked:
            self._states[tracked.name], bad = self._snapshot_tensor(tracked)
            if bad:
                nonfinite[tracked.name] = bad
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
        rows = []
        for tracked in self.tracked:
            state = self._states[tracked.name]
            flat = self._local_flat(params[tracked.name], tracked.name, state)
            counts = torch.zeros(5, dtype=torch.int64, device=flat.device)
            for start, end in _chunks(state.ever.numel() * 8, self._chunk):
                changed, churn = self._run_chunk(flat, state, start, end, update=True)
                counts[0] += _popcount(changed)
                if churn is not None:
                    counts[2] += _popcount(churn)
            # NaN/inf anywhere makes the sum non-finite: one fast reduction, exact count only when needed.
            counts[1] = ~torch.isfinite(flat.sum())
            counts[3] = _popcount(state.ever)
            counts[4] = state.numel
            rows.append(counts)
        totals = torch.stack([r.cpu() for r in rows])  # one sync per device
        for row, tracked in zip(totals, self.tracked):
            if row[1]:
                row[1] = int(
                    (
                        ~torch.isfinite(
                            self._local_flat(params[tracked.name], tracked.name, self._states[tracked.name])
                        )
                    ).sum()
                )
        totals = self._sum_across_ranks(totals)
        self._has_previous = True
        tensors = {
            t.name: TensorCounts(
                numel=t.layout.numel,
                changed=int(row[0]),
                ever_changed=int(row[3]),
                churn=int(row[2]) if has_churn else 0,
            )
            for t, row in zip(self.tracked, totals.tolist())
        }
        nonfinite = int(totals[:, 1].sum())
        measurement = Measurement(
            step=step,
            mode=self.mode or "exact",
            tensors=tensors,
            changed_miss_probability=_miss_probability(cfg.fingerprint_bits) if self.mode == "fingerprint" else 0.0,
            churn_miss_probability=_miss_probability(cfg.fingerprint_bits),
            has_churn=has_churn,
            nonfinite=nonfinite,
            skipped=self.skipped,
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
        for tracked in self.tracked:
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
        meta = {
            "format": _STATE_FORMAT,
            "version": _STATE_VERSION,
            "mode": self.mode,
            "mode_reason": self.mode_reason,
            "chunk": self._chunk,
            "has_previous": self._has_previous,
            "reference_nonfinite": self._reference_nonfinite,
            "fingerprint_bits": self.config.fingerprint_bits,
            "history": self.history,
            "tensors": {
                name: {"shape": list(s.shape), "dtype": str(s.dtype), "numel": s.numel, "signature": s.signature}
                for name, s in self._states.items()
            },
        }
        tensors = {}
        for name, s in self._states.items():
            tensors[f"reference/{name}"] = s.reference.detach().cpu()
            tensors[f"ever/{name}"] = s.ever.detach().cpu()
            if s.previous is not None:
                tensors[f"previous/{name}"] = s.previous.detach().cpu()
        return {"meta": json.dumps(meta), "tensors": tensors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict`: the original reference, ever-changed mask, churn state and history.
        Raises `ValueError` when the state belongs to another model or is corrupt (nothing is changed then)."""
        try:
            meta = json.loads(state["meta"])
            tensors = state["tensors"]
            if not isinstance(meta, dict) or not isinstance(meta.get("tensors"), dict):
                raise TypeError("the meta data is not a JSON object with 'tensors'")
        except (KeyError, TypeError, json.JSONDecodeError) as err:
            raise ValueError(f"Not a SparsityTracker state ({type(err).__name__}: {err}).") from None
        if meta.get("format") != _STATE_FORMAT or meta.get("version") != _STATE_VERSION:
            raise ValueError(
                f"Not a SparsityTracker state of version {_STATE_VERSION}: format={meta.get('format')!r}, "
                f"version={meta.get('version')!r}."
            )
        saved = meta["tensors"]
        current = {t.name: t for t in self.tracked}
        missing, extra = sorted(set(current) - set(saved)), sorted(set(saved) - set(current))
        if missing or extra:
            raise ValueError(
                f"The tracker state was saved for another model or other include/exclude options: "
                f"not in the state {missing[:3]}, not in the model {extra[:3]}. HINT: resume with the same model "
                "and SparsityConfig, or start over with tracker.snapshot()."
            )
        for name, tracked in current.items():
            if tuple(saved[name]["shape"]) != tracked.shape:
                raise ValueError(
                    f"The tracker state was saved for another model: {name!r} has shape "
                    f"{saved[name]['shape']} in the state but {list(tracked.shape)} in the model."
                )
            if saved[name]["numel"] != tracked.layout.local_count:
                raise ValueError(
                    f"The tracker state was saved with another sharding: {name!r} has {saved[name]['numel']} elements "
                    f"on this rank in the state but {tracked.layout.local_count} now. HINT: resume with the same "
                    "number of ranks and the same FSDP/ZeRO wrapping (each rank loads its own state file)."
                )
        mode = meta.get("mode")
        if mode not in ("exact", "fingerprint"):
            raise ValueError(f"The tracker state is corrupt: mode={mode!r}.")
        if meta["fingerprint_bits"] != self.config.fingerprint_bits and mode == "fingerprint":
            raise ValueError(
                f"The tracker state uses {meta['fingerprint_bits']}-bit fingerprints but the config asks "
                f"for {self.config.fingerprint_bits}; use the same `fingerprint_bits` to resume."
            )
        fp_dtype = _FINGERPRINT_DTYPES.get(meta["fingerprint_bits"])
        # validate every tensor before touching any state, so a corrupt file leaves the tracker as it was
        for tracked in self.tracked:
            info = saved[tracked.name]
            padded = _padded(info["numel"])
            reference = tensors.get(f"reference/{tracked.name}")
            ever = tensors.get(f"ever/{tracked.name}")
            previous = tensors.get(f"previous/{tracked.name}")
            expected = getattr(torch, str(info["dtype"]).removeprefix("torch."), None) if mode == "exact" else fp_dtype
            problem = None
            if reference is None or ever is None:
                problem = "its reference or mask tensor is missing"
            elif reference.numel() != padded or ever.numel() != padded // 8:
                problem = (
                    f"it has {reference.numel()} reference and {ever.numel()} mask elements, expected "
                    f"{padded} and {padded // 8}"
                )
            elif reference.dtype != expected or ever.dtype != torch.uint8:
                problem = f"its reference is {reference.dtype} (expected {expected}) and its mask {ever.dtype}"
            elif previous is not None and (previous.numel() != padded or previous.dtype != fp_dtype):
                problem = f"its churn state has {previous.numel()} {previous.dtype} elements"
            if problem:
                raise ValueError(
                    f"The tracker state is corrupt: tensor {tracked.name!r}: {problem}. HINT: resume "
                    "from an earlier checkpoint, or start over with tracker.snapshot()."
                )
        self.mode = mode  # before allocating: `_reference_path` needs it (memory-mapped exact reference)
        self._choose_compile()
        states = {}
        for tracked in self.tracked:
            info = saved[tracked.name]
            device = tracked.local().device
            padded = _padded(info["numel"])
            reference = tensors[f"reference/{tracked.name}"]
            ever = tensors[f"ever/{tracked.name}"]
            previous = tensors.get(f"previous/{tracked.name}") if self.config.track_churn else None
            if meta["chunk"] != self._chunk:
                ever = _repack(ever, meta["chunk"], self._chunk)
            if mode == "exact":
                pin = device.type == "cuda"
                host = _new_host_buffer(padded, reference.dtype, pin, self._reference_path(tracked.name))
                host.copy_(reference)
                reference = host
            else:
                reference = reference.to(device)
            if previous is not None:
                previous = previous.to(device)
            states[tracked.name] = _TensorState(
                numel=info["numel"],
                shape=tuple(info["shape"]),
                dtype=reference.dtype if mode == "exact" else getattr(torch, str(info["dtype"]).removeprefix("torch.")),
                reference=reference,
                previous=previous,
                ever=ever.to(device),
                signature=info["signature"],
            )
        self._states = states
        self.mode_reason = meta["mode_reason"] + " (restored)"
        self._reference_nonfinite = int(meta.get("reference_nonfinite", 0))
        self._has_previous = bool(meta["has_previous"]) and all(s.previous is not None for s in states.values())
        self.history = list(meta["history"])
        self.last_measurement = None
        if self.config.track_churn and not all(s.previous is not None for s in states.values()):
            for s in states.values():
                s.previous = torch.zeros(
                    s.ever.numel() * 8, dtype=_FINGERPRINT_DTYPES[self.config.fingerprint_bits], device=s.ever.device
                )
            self._has_previous = False

    def save(self, path: str | os.PathLike) -> None:
        """Write `state_dict` to a safetensors file (atomic rename). No pickle."""
        from safetensors.torch import save_file

        state = self.state_dict()
        path = os.fspath(path)
        tmp = f"{path}.tmp{os.getpid()}"
        save_file({k: v.contiguous() for k, v in state["tensors"].items()}, tmp, metadata={"meta": state["meta"]})
        os.replace(tmp, path)

    def load(self, path: str | os.PathLike) -> None:
        """Restore from a file written by `save`. Raises `ValueError` for a corrupt or foreign file."""
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"Tracker state file {path!r} does not exist.")
        try:
            with safe_open(path, framework="pt") as handle:
                meta = (handle.metadata() or {}).get("meta")
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        except Exception as err:
            raise ValueError(
                f"Cannot read tracker state {path!r} ({type(err).__name__}: {err}). HINT: the file is truncated or "
                "not a tracker state; resume from an earlier checkpoint or start over with snapshot()."
            ) from None
        if meta is None:
            raise ValueError(f"{path!r} is a safetensors file but not a SparsityTracker state.")
        self.load_state_dict({"meta": meta, "tensors": tensors})

    # --- internals -------------------------------------------------------------------------------
    def _choose_compile(self) -> None:
        """``compile=None``: compile only where it pays. Fingerprints (fingerprint mode, or churn) compile to
        one fused pass, 3-4x faster than eager on CPU; a plain exact comparison is one eager pass already
        (compiled it measured 2x slower). Small models stay eager: compiling takes ~10 s."""
        if self.config.compile is None:
            numel = sum(t.local().numel() for t in self.tracked)
            needs_fingerprint = self.mode == "fingerprint" or self.config.track_churn
            self._kernel.use_compile = numel >= _COMPILE_AUTO_NUMEL and needs_fingerprint

    def _require_snapshot(self) -> None:
        if not self._states:
            raise RuntimeError("Call tracker.snapshot() (before the first optimizer step) or load a state first.")

    def _check_materialised(self) -> None:
        for tracked in self.tracked:
            if tracked.local().device.type == "meta":
                raise ValueError(
                    f"Parameter {tracked.name!r} is on the meta device (deferred initialisation): there are no "
                    "values to snapshot. HINT: snapshot after the weights are materialised and loaded "
                    "(e.g. after `model.to_empty(device=...)` and loading the checkpoint)."
                )

    def _compare_dtype(self, tracked: _TrackedTensor) -> torch.dtype:
        if self.config.compare_dtype is None:
            return tracked.local().dtype
        return getattr(torch, self.config.compare_dtype)

    def _choose_mode(self) -> tuple[str, str]:
        cfg = self.config
        need = sum(_padded(t.local().numel()) * self._compare_dtype(t).itemsize for t in self.tracked)
        if cfg.reference_dir is not None:
            if cfg.mode == "fingerprint":
                return "fingerprint", "mode='fingerprint' requested (reference_dir is ignored)"
            return "exact", f"exact reference memory-mapped in {cfg.reference_dir} ({_human(need)} on disk)"
        available = _available_host_bytes()
        text = (
            f"{need / 2**30:.2f} GiB of host RAM needed for an exact reference ({need:,} bytes), "
            f"{_human(available)} available"
        )
        if os.environ.get(HOST_RAM_LIMIT_ENV):
            text += f" ({HOST_RAM_LIMIT_ENV}={os.environ[HOST_RAM_LIMIT_ENV]})"
        if cfg.mode == "fingerprint":
            self._check_device_memory()
            return "fingerprint", "mode='fingerprint' requested"
        if cfg.mode == "exact":
            if need > 0.9 * available:
                raise MemoryError(
                    f"mode='exact' cannot fit: {text}. HINT: use mode='fingerprint' "
                    f"({cfg.fingerprint_bits // 8} byte(s) per element on the device), or reference_dir=<a folder on "
                    "a disk with room> for a memory-mapped exact reference."
                )
            return "exact", f"mode='exact' requested; {text}"
        if need <= 0.5 * available:
            return "exact", f"auto: {text}"
        if cfg.atol > 0:
            raise MemoryError(
                f"atol={cfg.atol} needs an exact reference, which cannot fit: {text}. HINT: set "
                "reference_dir=<folder> for a memory-mapped reference, or atol=0 with mode='fingerprint'."
            )
        self._check_device_memory()
        return "fingerprint", f"auto: {text} (more than half), so {cfg.fingerprint_bits}-bit fingerprints on the device"

    def _check_device_memory(self) -> None:
        """``fingerprint`` keeps its state on the parameters' device: check it fits in the free CUDA memory."""
        bytes_per_element = self.config.fingerprint_bits / 8 * (1 + self.config.track_churn) + 1 / 8
        need: dict[torch.device, float] = {}
        for t in self.tracked:
            device = t.local().device
            if device.type == "cuda":
                need[device] = need.get(device, 0.0) + _padded(t.local().numel()) * bytes_per_element
        for device, needed in need.items():
            free, _ = torch.cuda.mem_get_info(device)
            if needed > 0.9 * free:
                raise MemoryError(
                    f"mode='fingerprint' cannot fit on {device}: {needed / 2**30:.2f} GiB needed, "
                    f"{free / 2**30:.2f} GiB free. HINT: fingerprint_bits=8, track_churn=False, mode='exact' "
                    "(host RAM) with reference_dir for a memory-mapped reference, "
                    "or track fewer tensors with include/exclude."
                )

    def _reference_path(self, name: str) -> str | None:
        if self.config.reference_dir is None or self.mode != "exact":
            return None
        os.makedirs(self.config.reference_dir, exist_ok=True)
        rank = torch.distributed.get_rank() if _dist_ready() else 0
        return os.path.join(self.config.reference_dir, f"reference_rank{rank}_{name}.bin")

    def _snapshot_tensor(self, tracked: _TrackedTensor) -> tuple[_TensorState, int]:
        local = tracked.local().detach()
        flat = local.reshape(-1)
        dtype = self._compare_dtype(tracked)
        padded = _padded(flat.numel())
        bits = self.config.fingerprint_bits
        fp_dtype = _FINGERPRINT_DTYPES[bits]
        ever = torch.zeros(padded // 8, dtype=torch.uint8, device=flat.device)
        previous = torch.empty(padded, dtype=fp_dtype, device=flat.device) if self.config.track_churn else None
        if self.mode == "exact":
            pin = flat.device.type == "cuda"
            reference = _new_host_buffer(padded, dtype, pin, self._reference_path(tracked.name))
        else:
            reference = torch.empty(padded, dtype=fp_dtype, device=flat.device)
        nonfinite = 0
        for start, end in _chunks(padded, self._chunk):
            values = _flat_chunk(flat, start, end, dtype)
            nonfinite += int((~torch.isfinite(values)).sum())
            fingerprint = _fingerprint(values, bits) if (previous is not None or self.mode != "exact") else None
            if self.mode == "exact":
                reference[start:end].copy_(values, non_blocking=True)
            else:
                reference[start:end] = fingerprint
            if previous is not None:
                previous[start:end] = fingerprint
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
        )
        return state, nonfinite

    def _run_chunk(self, flat: torch.Tensor, state: _TensorState, start: int, end: int, *, update: bool):
        current = _flat_chunk(flat, start, end, state.dtype)
        reference = state.reference[start:end]
        if self.mode == "exact" and reference.device != current.device:
            reference = reference.to(current.device, non_blocking=True)
        previous = state.previous[start:end] if (state.previous is not None and self.config.track_churn) else None
        ever = state.ever[start // 8 : end // 8]
        return self._kernel(
            current,
            reference,
            previous,
            ever,
            fingerprint_reference=self.mode == "fingerprint",
            bits=self.config.fingerprint_bits,
            atol=float(self.config.atol),
            update=update,
        )

    def _current_parameters(self) -> dict[str, torch.Tensor]:
        """The tracked parameters as they are now, by name; raises when the model changed shape, warns
        (once) about trainable parameters added after the snapshot, which are not tracked."""
        params = {_clean_name(n): p for n, p in self.model.named_parameters(remove_duplicate=False)}
        for tracked in self.tracked:
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
            tracked.param = param
        if "new_parameters" not in self._warned:
            self._warn_new_parameters(params)
        return params

    def _warn_new_parameters(self, params: dict[str, torch.Tensor]) -> None:
        known = {id(t.param) for t in self.tracked}
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
                f"tracked (e.g. {new[:3]}); the fractions cover the {len(self.tracked)} tracked tensors only. HINT: "
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
        """Per-tensor counts ``(n, 5)`` (changed, nonfinite, churn, ever, local numel) summed over ranks for
        sharded tensors, each shard counted once; unsharded (DDP replica) rows stay local."""
        if not self._distributed():
            return totals
        from sparsity_callbacks.metrics import _SparsityCounts

        metric = _SparsityCounts(len(self.tracked), columns=totals.shape[1]).to(_comm_device())
        metric.update(totals)
        summed = metric.compute().cpu()
        out = totals.clone()
        for i, t in enumerate(self.tracked):
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

    def _exchange(self, payload: Any) -> list[Any]:
        """``payload`` of every rank (all_gather_object), in rank order."""
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, payload)
        return gathered

    def _full_signatures(self) -> dict[str, str]:
        """Signatures of the full tensors: each rank contributes the samples in its shard."""
        sharded = [t for t in self.tracked if t.sharded]
        if not sharded:
            return {}
        samples = {t.name: _local_signature_samples(t.local().detach().reshape(-1), t.layout) for t in sharded}
        layouts = [(t.layout.start, t.layout.local_count) for t in sharded]
        if not _dist_ready():
            everyone = [(layouts, samples)]
        else:
            everyone = self._exchange((layouts, samples))
        self._rank_layouts = [rank_layouts for rank_layouts, _ in everyone]
        out = {}
        for t in sharded:
            positions = torch.cat([rank_samples[t.name][0] for _, rank_samples in everyone])
            values = torch.cat([rank_samples[t.name][1] for _, rank_samples in everyone])
            order = positions.argsort()
            positions, values = positions[order], values[order]
            keep = torch.ones_like(positions, dtype=torch.bool)
            keep[1:] = positions[1:] != positions[:-1]  # replicated shards (HSDP) send the same samples
            out[t.name] = _signature_digest(t.shape, values[keep])
        return out

    def _nonfinite_across_ranks(self, nonfinite: dict[str, int]) -> dict[str, int]:
        if not self._distributed():
            return nonfinite
        merged: dict[str, int] = {}
        for rank_counts in self._exchange(nonfinite):
            for name, count in rank_counts.items():
                merged[name] = merged.get(name, 0) + count
        return merged

    def _full_mask(self, local: dict[str, torch.Tensor], kind: str) -> Mask:
        """Per-tensor local flat bool flags -> `Mask` of full tensors (gathered over ranks when sharded)."""
        by_name = {t.name: t for t in self.tracked}
        packed: dict[str, torch.Tensor] = {}
        sharded = [t for t in self.tracked if t.sharded]
        if sharded and self._distributed():
            if self._rank_layouts is None:
                self._rank_layouts = self._exchange([(t.layout.start, t.layout.local_count) for t in sharded])
            buffer = torch.cat([_pack_bits(local[t.name]) for t in sharded])
            sizes = [sum((count + 7) // 8 for _, count in rank) for rank in self._rank_layouts]
            device = _comm_device()
            padded = torch.zeros(max(sizes), dtype=torch.uint8, device=device)
            padded[: buffer.numel()] = buffer.to(device)
            gathered = [torch.empty_like(padded) for _ in sizes]
            torch.distributed.all_gather(gathered, padded)
            gathered = [g.cpu() for g in gathered]
            for i, t in enumerate(sharded):
                full = torch.zeros(t.layout.numel, dtype=torch.bool)
                for rank, rank_layout in enumerate(self._rank_layouts):
                    offset = sum((count + 7) // 8 for _, count in rank_layout[:i])
                    start, count = rank_layout[i]
                    flags = _unpack_bits(gathered[rank][offset : offset + (count + 7) // 8], count)
                    full[start : start + count] |= flags
                packed[t.name] = _pack_bits(full)
        for name, flags in local.items():
            if name not in packed:
                tracked = by_name[name]
                if tracked.sharded and flags.numel() != tracked.layout.numel:
                    raise RuntimeError(
                        f"{name!r} is sharded but torch.distributed is not initialised: cannot gather "
                        "its mask. HINT: call ever_changed_mask() while the process group is up."
                    )
                packed[name] = _pack_bits(flags)
        shapes = {t.name: t.shape for t in self.tracked}
        return Mask._from_packed(packed, shapes, self.signatures, self._mask_metadata(kind))

    def _primary_name(self, name: str) -> str:
        if name in self._states:
            return name
        for t in self.tracked:
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


def _human(n: float) -> str:
    """Bytes as GiB with the exact byte count (so small numbers never read as a bare "0.00 GiB")."""
    return f"{n / 2**30:.2f} GiB ({int(n):,} bytes)"


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _comm_device() -> torch.device:
    """Where collective buffers must live: the current CUDA device for NCCL, else the CPU (gloo)."""
    backend = str(torch.distributed.get_backend()).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _planar_to_bool_chunks(packed: torch.Tensor, chunk: int) -> torch.Tensor:
    """Planar-per-chunk packed bits of a whole tensor -> flat bool in element order."""
    step = chunk // 8
    pieces = [_planar_to_bool(packed[i : i + step]) for i in range(0, packed.numel(), step)]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.bool, device=packed.device)


def _repack(packed: torch.Tensor, old_chunk: int, new_chunk: int) -> torch.Tensor:
    """Re-pack planar bits written with another chunk size."""
    flags = _planar_to_bool_chunks(packed, old_chunk)
    step = new_chunk
    pieces = [_pack_planar(flags[i : i + step]) for i in range(0, flags.numel(), step)]
    return torch.cat(pieces) if pieces else packed.new_zeros(0)
