"""Tracker state I/O: the per-tensor state a `SparsityTracker` holds (`_TensorState`), its ``state_dict``
format (JSON meta + CPU tensors, keyed by parameter names), the checks that refuse a foreign or corrupt
state before anything changes, and the safetensors file it is saved in (no pickle)."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from sparsity_callbacks.reference import (
    _FINGERPRINT_DTYPES,
    _elements_to_words,
    _new_host_buffer,
    _padded,
    _repack,
    _words_to_elements,
)

if TYPE_CHECKING:
    from sparsity_callbacks.tracker import SparsityTracker

_STATE_FORMAT = "sparsity_callbacks.tracker_state"
_STATE_VERSION = 1


@dataclass
class _TensorState:
    """Per tracked tensor: reference (host values or device fingerprints), previous fingerprint,
    planar-packed ever-changed bits. All flat, padded to a multiple of 8 elements; fingerprints are packed
    into int32 words per chunk (`reference._fingerprint_words`), saved one per element."""

    numel: int
    shape: tuple[int, ...]
    dtype: torch.dtype  # compare dtype
    reference: torch.Tensor
    previous: torch.Tensor | None
    ever: torch.Tensor
    signature: str
    native: torch.Tensor | None = None  # fingerprint of the values in the parameter's own dtype (compare_dtype set)


def _state_dict(tracker: SparsityTracker) -> dict[str, Any]:
    """Everything needed to continue after a restart: ``{"meta": json str, "tensors": {key: tensor}}``.
    Tensors are on the CPU. Keyed by parameter names."""
    meta = {
        "format": _STATE_FORMAT,
        "version": _STATE_VERSION,
        "mode": tracker.mode,
        "mode_reason": tracker.mode_reason,
        "chunk": tracker._chunk,
        "has_previous": tracker._has_previous,
        "previous_step": tracker._previous_step,
        "reference_nonfinite": tracker._reference_nonfinite,
        "reference_representable_fraction": tracker.reference_representable_fraction,
        "fingerprint_bits": tracker.config.fingerprint_bits,
        "history": tracker.history,
        "tensors": {
            name: {"shape": list(s.shape), "dtype": str(s.dtype), "numel": s.numel, "signature": s.signature}
            for name, s in tracker._states.items()
        },
    }
    tensors = {}
    chunk, bits = tracker._chunk, tracker.config.fingerprint_bits

    def per_element(words: torch.Tensor) -> torch.Tensor:  # the chunk-independent form of a fingerprint
        return _words_to_elements(words.detach(), chunk, bits).cpu()

    for name, s in tracker._states.items():
        tensors[f"reference/{name}"] = (
            s.reference.detach().cpu() if tracker.mode == "exact" else per_element(s.reference)
        )
        tensors[f"ever/{name}"] = s.ever.detach().cpu()
        if s.previous is not None:
            tensors[f"previous/{name}"] = per_element(s.previous)
        if s.native is not None:
            tensors[f"native/{name}"] = per_element(s.native)
    return {"meta": json.dumps(meta), "tensors": tensors}


def _load_state_dict(tracker: SparsityTracker, state: dict[str, Any]) -> None:
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
    current = {t.name: t for t in tracker._tracked}
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
    if meta["fingerprint_bits"] != tracker.config.fingerprint_bits and mode == "fingerprint":
        raise ValueError(
            f"The tracker state uses {meta['fingerprint_bits']}-bit fingerprints but the config asks "
            f"for {tracker.config.fingerprint_bits}; use the same `fingerprint_bits` to resume."
        )
    fp_dtype = _FINGERPRINT_DTYPES.get(meta["fingerprint_bits"])
    # validate every tensor before touching any state, so a corrupt file leaves the tracker as it was
    for tracked in tracker._tracked:
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
    tracker.mode = mode  # before allocating: `_reference_path` needs it (memory-mapped exact reference)
    tracker._choose_compile()
    chunk, bits = tracker._chunk, tracker.config.fingerprint_bits
    states = {}
    for tracked in tracker._tracked:
        info = saved[tracked.name]
        device = tracked.local().device
        padded = _padded(info["numel"])
        reference = tensors[f"reference/{tracked.name}"]
        ever = tensors[f"ever/{tracked.name}"]
        previous = tensors.get(f"previous/{tracked.name}") if tracker.config.track_churn else None
        if meta["chunk"] != tracker._chunk:
            ever = _repack(ever, meta["chunk"], tracker._chunk)
        if mode == "exact":
            pin = device.type == "cuda"
            host = _new_host_buffer(padded, reference.dtype, pin, tracker._reference_path(tracked.name))
            host.copy_(reference)
            reference = host
        else:
            reference = _elements_to_words(reference, chunk, bits).to(device)
        if previous is not None:
            previous = _elements_to_words(previous, chunk, bits).to(device)
        native = tensors.get(f"native/{tracked.name}")
        if native is not None and (native.numel() != padded or native.dtype != fp_dtype):
            native = None  # not this config's fingerprints: the native count is not reported after resume
        if native is not None:
            native = _elements_to_words(native, chunk, bits)
        states[tracked.name] = _TensorState(
            numel=info["numel"],
            shape=tuple(info["shape"]),
            dtype=reference.dtype if mode == "exact" else getattr(torch, str(info["dtype"]).removeprefix("torch.")),
            reference=reference,
            previous=previous,
            ever=ever.to(device),
            signature=info["signature"],
            native=None if native is None else native.to(device),
        )
    _drop_incomplete_native(tracker, states)
    tracker._states = states
    tracker.reference_representable_fraction = meta.get("reference_representable_fraction")
    tracker.mode_reason = meta["mode_reason"] + " (restored)"
    tracker._reference_nonfinite = int(meta.get("reference_nonfinite", 0))
    tracker._has_previous = bool(meta["has_previous"]) and all(s.previous is not None for s in states.values())
    tracker._previous_step = meta.get("previous_step") if tracker._has_previous else None
    tracker.history = list(meta["history"])
    tracker.last_measurement = None
    if tracker.config.track_churn and not all(s.previous is not None for s in states.values()):
        for s in states.values():
            s.previous = torch.zeros(s.ever.numel() * 8 * bits // 32, dtype=torch.int32, device=s.ever.device)
        tracker._has_previous = False


def _drop_incomplete_native(tracker: SparsityTracker, states: dict[str, _TensorState]) -> None:
    """Keep the own-dtype fingerprints only when every tensor has them; otherwise drop them all, with a
    one-time note when this config would report ``sparsity/changed_fraction_native``.

    A state saved before the native fingerprints existed (or with other fingerprint bits) cannot have them
    rebuilt exactly: it keeps the reference only in ``compare_dtype`` (values or fingerprints), and the
    own-dtype values it was rounded from are gone. So the run continues with every other figure and
    without the native one, rather than report a native figure against the wrong reference."""
    if all(s.native is not None for s in states.values()):
        return
    for s in states.values():
        s.native = None
    wanted = any(tracker._compare_dtype(t) != t.local().dtype for t in tracker._tracked)
    if wanted and "native_missing" not in tracker._warned:
        tracker._warned.add("native_missing")
        warnings.warn(
            "The tracker state was saved without the fingerprints of the weights in their own dtype (by a "
            "version before sparsity/changed_fraction_native existed, or with other fingerprint_bits): this "
            "run continues with every other sparsity figure but without sparsity/changed_fraction_native. "
            "It cannot be rebuilt: the state keeps the reference only in compare_dtype. HINT: to get it, "
            "start a new tracker with snapshot() from the base weights.",
            stacklevel=4,
        )


def _save(tracker: SparsityTracker, path: str | os.PathLike) -> None:
    """Write `state_dict` to a safetensors file (atomic rename). No pickle."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"Cannot save the tracker state to {path!r}: it is a folder. HINT: give a file name.")
    state = _state_dict(tracker)
    tmp = f"{path}.tmp{os.getpid()}"
    save_file({k: v.contiguous() for k, v in state["tensors"].items()}, tmp, metadata={"meta": state["meta"]})
    os.replace(tmp, path)


def _read_file(path: str | os.PathLike) -> dict[str, Any]:
    """``{"meta", "tensors"}`` read from a file written by `_save`. Raises `ValueError` for a corrupt or
    foreign file, `FileNotFoundError` for a missing one."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Tracker state file {path!r} does not exist.")
    if not os.path.isfile(path):  # a folder, or a FIFO / device that would block the reader
        kind = "folder" if os.path.isdir(path) else "special file (not a regular file)"
        raise ValueError(f"{path!r} is a {kind}, not a tracker state file.")
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
    return {"meta": meta, "tensors": tensors}
