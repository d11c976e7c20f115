"""Freeze a model to a `Mask`: every element outside the mask stays bit-identical to its value when
freezing began, after every optimizer step.

Users set ``SparsityConfig(freeze_mask=...)``; the adapters resolve the mask with
`_resolve_freeze_mask` and drive a `MaskFreezer`.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from sparsity_callbacks._rules import _abs_delta, _as_bits, _to_compare
from sparsity_callbacks.config import SparsityConfig
from sparsity_callbacks.masks import Mask
from sparsity_callbacks.params import _collect_parameters, _Layout, _local_tensor, _TrackedTensor

_log = logging.getLogger("sparsity_callbacks")

# Optimizer state entries of the parameter's shape that the dense mechanism leaves alone: ``step`` (a
# counter, 0-d like a 0-d parameter) and ASGD's ``ax`` (the running average of the weights).
_STATE_KEPT = frozenset({"step", "ax"})

# Optimizers whose update of an element reads only that element's gradient and state plus per-tensor
# scalars (step count, lr): stepping a 1-D tensor of the trainable elements gives each of them the same
# bits as stepping the full tensor. Exact classes: a subclass may override `step`.
_ELEMENTWISE_OPTIMIZERS = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
    torch.optim.Adamax,
    torch.optim.Adadelta,
    torch.optim.Rprop,
    torch.optim.ASGD,
)
_COUPLED_OPTIMIZERS = {
    "Adafactor": "its factored second moments couple every row and column",
    "Muon": "it orthogonalizes each whole matrix update",
    "LBFGS": "it takes one search direction over all elements",
}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The same memory viewed as integers of the same width (same shape, no copy).

    All masking is done on this view, branch-free: ``bits *= keep`` sets excluded elements to
    +0.0 whatever they held (NaN and inf included), and ``frozen_bits + bits * keep`` (one
    ``addcmul``; ``frozen_bits`` is 0 where ``keep``) selects bit-exactly. On CPU this is ~5x faster
    than ``torch.where`` or ``masked_fill_``, whose per-element branch mispredicts on random masks.
    """
    return tensor if not tensor.is_floating_point() else _as_bits(tensor)


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as a 1-D view in row-major order (the order of mask elements and of ``index``)."""
    return tensor.view(-1)


def _why_not_elementwise(optimizer: torch.optim.Optimizer) -> str | None:
    """Why ``optimizer`` cannot step a compact tensor of the trainable elements; None when it can."""
    name = type(optimizer).__name__
    if type(optimizer) not in _ELEMENTWISE_OPTIMIZERS:
        why = _COUPLED_OPTIMIZERS.get(
            name,
            "it is not one of the torch.optim optimizers known to update each element "
            "from its own gradient and state alone",
        )
        return f"{name}: {why}"
    if any(group.get("differentiable") for group in optimizer.param_groups):
        return f"{name}(differentiable=True): its step is part of an autograd graph over the full parameters"
    if any(
        group.get("fused") and any(p.device.type == "cpu" for p in group["params"]) for group in optimizer.param_groups
    ):
        return (
            f"{name}(fused=True) on the CPU: its kernel steps the last elements of each tensor on a scalar path that "
            "rounds differently from its vector path, so moving elements would change their bits (use foreach=True)"
        )
    return None


@dataclass
class _FrozenTensor:
    """One parameter with frozen elements (on this rank), frozen by one of two mechanisms.

    Dense (``frozen`` set): ``keep`` is the bool mask of the trainable elements on the parameter's device, in
    the shape of the local tensor (this rank's slice of a sharded one), None when all local elements are
    frozen; ``frozen`` the integer bits (see `_bits`) of the local values at freeze time, in ``dtype``; dense
    with 0 at the trainable elements, or with ``compact`` only the frozen elements (1-D, row-major). The
    optimizer steps every element and the frozen ones are written back after each step.

    Compact optimizer state (``frozen`` None): ``index`` holds the positions of the trainable elements in the
    local tensor's flat (row-major) view, sorted, int32 below 2^31 elements; None with ``fully_frozen``. The
    optimizer steps a 1-D tensor of those elements only (`gather` / `scatter`); nothing else is stored.

    ``layout``: where the local elements sit in the full tensor. ``mesh`` (FSDP2 compact state): the 1-D device
    mesh of the parameter; its compact tensor is then a 1-D ``Shard(0)`` DTensor of ``compact_numel`` elements
    (the sum over the ranks' trainable counts) whose local shard is this rank's trainable elements, so it
    joins the DTensor parameters' (foreach) step and the optimizer's elementwise ops on it stay local."""

    name: str
    param: torch.nn.Parameter
    keep: torch.Tensor | None
    frozen: torch.Tensor | None
    compact: bool
    dtype: torch.dtype
    shape: tuple[int, ...]
    layout: _Layout | None = None  # None: the full tensor (single process, DDP replica)
    index: torch.Tensor | None = None
    fully_frozen: bool = False
    mesh: Any = None
    compact_numel: int = 0

    @property
    def dense(self) -> bool:
        return self.frozen is not None

    @property
    def kind(self) -> str:
        """``full`` (single process, DDP), ``dtensor`` (FSDP2), ``fsdp1`` or ``zero3``."""
        return "full" if self.layout is None else self.layout.kind

    def data(self) -> torch.Tensor:
        """The parameter's local data, with the stored tensors on its device and in its dtype.

        Checked before every write, because writing the stored bits into storage of another width would
        corrupt the weights: a model moved to another device since freezing moves the stored tensors; a
        dtype change (``model.to(torch.bfloat16)``, ``.half()``, ``.double()``) re-freezes them in the new
        dtype (see `_convert`); a shape change raises ``ValueError`` naming the parameter.
        """
        data = _local_tensor(self.param)
        if tuple(data.shape) != self.shape:
            raise ValueError(
                f"Parameter {self.name!r} changed shape from {list(self.shape)} to {list(data.shape)} after freezing "
                "began; the freezer cannot restore its frozen elements. HINT: detach the freezer "
                "(`freezer.detach()`) before resizing, and freeze again with a mask of the new shape."
            )
        if self.frozen is not None and self.frozen.device != data.device:
            self.frozen = self.frozen.to(data.device)
            self.keep = None if self.keep is None else self.keep.to(data.device)
        if self.index is not None and self.index.device != data.device:
            self.index = self.index.to(data.device)
        if data.dtype != self.dtype:
            self._convert(data.dtype)
        return data

    def _convert(self, dtype: torch.dtype) -> None:
        """Re-freeze in ``dtype``: the stored values are cast as ``model.to(dtype)`` cast the weights (torch's
        round-to-nearest), so the frozen elements keep exactly the values that conversion gave them."""
        if not dtype.is_floating_point:
            raise ValueError(
                f"Parameter {self.name!r} changed dtype from {self.dtype} to {dtype} after freezing began; only "
                "floating-point dtypes can be frozen. HINT: detach the freezer (`freezer.detach()`) first."
            )
        if self.frozen is not None:  # compact optimizer state stores no values
            self.frozen = _bits(self.frozen.view(self.dtype).to(dtype))
        self.dtype = dtype

    def zero_frozen(self, tensor: torch.Tensor) -> None:
        """Set the frozen elements of a gradient or optimizer state tensor to 0 (in place). ``tensor`` is
        the parameter's shape: a DTensor (its local shard is used) or a local tensor, for ZeRO-3 this
        rank's flat partition (with its padding)."""
        local = _local_tensor(tensor)
        if self.fully_frozen or (self.keep is None and self.index is None):
            local.zero_()
            return
        if self.index is not None:
            self._zero_frozen_by_index(local)
            return
        if local.numel() != self.keep.numel():  # ZeRO-3: the flat partition is padded at the end
            local = local.reshape(-1).narrow(0, 0, self.keep.numel())
        _bits(local).mul_(self.keep.to(local.device).view(local.shape))

    def _zero_frozen_by_index(self, local: torch.Tensor) -> None:
        if self.index.numel() == local.numel():  # no frozen element on this rank (a shard)
            return
        index = self.index.to(local.device)
        if not local.is_contiguous():  # a gradient laid out unlike its parameter: through a temporary mask
            keep = torch.zeros(local.numel(), dtype=torch.bool, device=local.device)
            keep[index] = True
            _bits(local).mul_(keep.view(local.shape))
            return
        flat = _flat(local)
        kept = flat.index_select(0, index)
        flat.zero_()
        flat.index_put_((index,), kept)

    def zero_state(self, state: dict[str, Any]) -> None:
        """Dense mechanism: zero the frozen elements of the per-element optimizer state."""
        for key, value in state.items():
            if key not in _STATE_KEPT and torch.is_tensor(value) and value.shape == self.param.shape:
                self.zero_frozen(value)

    def make_dense(self, compact_storage: bool) -> None:
        """Switch to the dense mechanism, storing the frozen elements' current values."""
        if self.dense:
            return
        bits = _bits(self.data().detach())
        if self.fully_frozen:
            self.frozen = bits.clone()
            return
        keep = torch.zeros(bits.numel(), dtype=torch.bool, device=bits.device)
        keep[self.index] = True
        self.keep = keep.view(bits.shape)
        self.frozen = bits[~self.keep].clone() if compact_storage else bits * ~self.keep
        self.compact, self.index = compact_storage, None

    # --- compact optimizer state -------------------------------------------------------------------
    def kept_index(self) -> torch.Tensor:
        """The flat positions of the trainable elements (computed from ``keep`` under the dense mechanism)."""
        return self.index if self.index is not None else self.keep.reshape(-1).nonzero().reshape(-1)

    def is_dense_state(self, key: str, value: Any) -> bool:
        """A per-element state tensor of the parameter's shape (global shape for DTensors: a compact DTensor
        state has ``compact_numel`` elements, fewer than the parameter)."""
        return key != "step" and torch.is_tensor(value) and value.shape == self.param.shape

    def _wrap(self, local: torch.Tensor) -> torch.Tensor:
        """A compact local tensor as the optimizer sees it: itself, or (FSDP2) this rank's shard of a 1-D
        ``Shard(0)`` DTensor of ``compact_numel`` elements (no communication)."""
        if self.mesh is None:
            return local
        from torch.distributed.tensor import DTensor, Shard

        return DTensor.from_local(
            local, self.mesh, [Shard(0)], run_check=False, shape=torch.Size([self.compact_numel]), stride=(1,)
        )

    def compact_state(self, state: dict[str, Any]) -> None:
        """Replace every per-element state tensor of the parameter's shape by its trainable elements."""
        for key, value in state.items():
            if self.is_dense_state(key, value):
                local = _local_tensor(value)
                state[key] = self._wrap(_flat(local.contiguous()).index_select(0, self.index.to(local.device)))

    def expand_state(self, state: dict[str, Any]) -> None:
        """Inverse of `compact_state`: full-shape state, 0 at the frozen elements (ASGD's average of the
        weights ``ax``: the weights themselves), as the dense mechanism would hold it."""
        if self.fully_frozen:
            return
        data = self.data()
        index = None
        for key, value in state.items():
            if key == "step" or not torch.is_tensor(value) or value.ndim != 1 or value.shape == self.param.shape:
                continue
            index = self.kept_index() if index is None else index
            value = _local_tensor(value)
            if value.numel() == index.numel():
                full = data.detach().clone() if key == "ax" else torch.zeros_like(data, dtype=value.dtype)
                _flat(full).index_put_((index.to(full.device),), value.to(full.device))
                state[key] = self._like_param(full)

    def _like_param(self, local: torch.Tensor) -> torch.Tensor:
        """A tensor of this rank's elements in the parameter's form (a DTensor shard like it, for FSDP2)."""
        if self.mesh is None:
            return local
        from torch.distributed.tensor import DTensor

        param: Any = self.param  # a DTensor parameter
        return DTensor.from_local(
            local, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
        )

    def gather(self) -> torch.Tensor:
        """A new 1-D tensor of the trainable values, with ``.grad`` the trainable gradient elements."""
        data = self.data()
        compact = self._wrap(_flat(data).index_select(0, self.index))  # type: ignore[arg-type]  # compact state: set
        grad = self.param.grad
        if grad is not None:
            grad = _local_tensor(grad)
            compact.grad = self._wrap(grad.reshape(-1).index_select(0, self.index.to(grad.device)))
        return compact

    def scatter(self, compact: torch.Tensor) -> None:
        """Write the stepped trainable values back into the parameter."""
        _flat(self.data()).index_put_((self.index,), _local_tensor(compact))

    @property
    def nbytes(self) -> int:
        total = 0
        for tensor in (self.keep, self.frozen, self.index):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
        return total


def _restore_bits(entry: _FrozenTensor, bits: torch.Tensor) -> None:
    """Write the freeze-time bits into the frozen elements of ``bits`` (the integer view of local data)."""
    frozen: torch.Tensor = entry.frozen  # type: ignore[assignment]  # set for the dense mechanism, which calls this
    if entry.keep is None:
        bits.copy_(frozen)
    elif entry.compact:
        bits.masked_scatter_(~entry.keep, frozen)
    else:  # one pass: frozen bits (0 where trainable) + bits * keep (0 where frozen)
        torch.addcmul(frozen, bits, entry.keep, out=bits)


def _restore(entries: list[_FrozenTensor]) -> None:
    """Write the freeze-time bits into the frozen elements of the dense-mechanism ``entries`` (this rank's
    elements only; under compact optimizer state nothing moves a frozen element)."""
    entries = [e for e in entries if e.dense]
    converted = [e for e in entries if _local_tensor(e.param).dtype != e.dtype]
    if converted:
        names = ", ".join(repr(e.name) for e in converted[:3]) + (", ..." if len(converted) > 3 else "")
        changes = sorted({f"{e.dtype} -> {_local_tensor(e.param).dtype}" for e in converted})
        warnings.warn(
            f"MaskFreezer: {len(converted)} frozen parameter(s) changed dtype after freezing began ({names}: "
            f"{', '.join(changes)}); their frozen elements are re-frozen at their freeze-time values cast to the "
            "new dtype (the values the conversion gave them) and stay bit-identical to those from now on.",
            stacklevel=4,
        )
    for entry in entries:
        _restore_bits(entry, _bits(entry.data()))
        if entry.kind == "zero3":
            _restore_zero3_master(entry)


def _restore_zero3_master(entry: _FrozenTensor) -> None:
    """ZeRO-3 steps an fp32 master partition and copies it into the parameter's partition (then all-gathers
    the persistent small parameters) inside its ``step``: set the master's frozen elements to the freeze-time
    values (exact in fp32, and exact back in the parameter's dtype), through DeepSpeed's local API."""
    from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

    if getattr(entry.param, "_z3_optimizer", None) is None:  # before deepspeed.initialize: no master yet
        return
    master = safe_get_local_fp32_param(entry.param)
    local = master.narrow(0, 0, entry.data().numel())
    values = entry.frozen.view(entry.dtype).to(local.dtype)
    if entry.keep is None:
        local.copy_(values)
    elif entry.compact:
        local.masked_scatter_(~entry.keep, values)
    else:
        local.copy_(torch.where(entry.keep, local, values))
    safe_set_local_fp32_param(entry.param, master)


def _zero3_optimizer(optimizer: Any) -> Any | None:
    """DeepSpeed's ZeRO-3 optimizer in a chain of wrappers (engine, accelerate's wrapper), else None."""
    for _ in range(8):
        if optimizer is None:
            return None
        if hasattr(optimizer, "fp32_partitioned_groups_flat") and hasattr(optimizer, "step"):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
    return None


def _local_mask(keep: torch.Tensor, layout: _Layout, local: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a full-tensor mask, in the shape of the local tensor ``local`` (a copy: a view
    would keep the full mask alive)."""
    if not layout.sharded:
        return keep
    return keep.reshape(-1)[layout.start : layout.start + layout.local_count].view(local.shape).clone()


def _compact_mesh(param: torch.Tensor) -> Any | None:
    """The device mesh of an FSDP2 parameter whose trainable elements can step as a compact 1-D ``Shard(0)``
    DTensor (a 1-D mesh, ``Shard(0)``; its local shard, whole rows, is contiguous); None otherwise. Decided
    from the parameter's spec alone, the same on every rank (the compact entries join a collective)."""
    mesh = getattr(param, "device_mesh", None)
    placements = getattr(param, "placements", None)
    if mesh is None or placements is None or mesh.ndim != 1:
        return None
    from torch.distributed.tensor import Shard

    return mesh if tuple(placements) == (Shard(0),) else None


def _size_compact_dtensors(entries: list[_FrozenTensor]) -> None:
    """Set each FSDP2 compact entry's global size, the sum of the ranks' trainable counts: one all-gather
    per mesh, which every rank joins (the entries are the same, in the same order, on every rank)."""
    by_mesh: dict[int, list[_FrozenTensor]] = {}
    for entry in entries:
        by_mesh.setdefault(id(entry.mesh), []).append(entry)
    for group in by_mesh.values():
        mesh = group[0].mesh
        counts = torch.tensor([0 if e.fully_frozen else e.index.numel() for e in group], dtype=torch.int64)
        device = mesh.device_type if mesh.device_type != "cpu" else "cpu"
        counts = counts.to(device)
        gathered = [torch.empty_like(counts) for _ in range(mesh.size())]
        torch.distributed.all_gather(gathered, counts, group=mesh.get_group())
        totals = torch.stack(gathered).sum(0).tolist()
        for entry, total in zip(group, totals, strict=True):
            entry.compact_numel = int(total)


def _queue_after_backward(callback: Any) -> None:
    """Run ``callback`` at the very end of the current backward pass, after the callbacks already queued
    (FSDP's, which finish the gradient reduce-scatter): the engine runs callbacks queued by callbacks."""
    engine = torch.autograd.Variable._execution_engine
    engine.queue_callback(lambda: engine.queue_callback(callback))


def _state_bytes(optimizers: list[torch.optim.Optimizer]) -> int:
    """Bytes of the tensors in the optimizers' state (each storage counted once; this rank's shards of
    DTensor state)."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for optimizer in optimizers:
        for state in getattr(optimizer, "state", {}).values():
            for value in state.values():
                if not torch.is_tensor(value):
                    continue
                value = _local_tensor(value)
                key = (str(value.device), value.untyped_storage().data_ptr())
                if key in seen:
                    continue
                seen.add(key)
                total += value.untyped_storage().nbytes()
    return total


def _can_stop_gradients(model: torch.nn.Module) -> str | None:
    """Why fully frozen tensors must keep ``requires_grad`` in ``model``; None when they need not."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            return "a multi-process run (DDP expects a gradient for every parameter it was built with)"
    if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        return "gradient checkpointing (reentrant checkpoints lose the gradients behind a frozen input)"
    return None


def _select_parameters(
    model: torch.nn.Module, selection: Iterable[str | torch.nn.Parameter] | None
) -> list[_TrackedTensor]:
    """The trainable floating-point parameters of ``model``, or those of them ``selection`` names (by any
    name of a tied parameter, or by the `Parameter` object itself), each once."""
    everything = _collect_parameters(model, SparsityConfig())[0]
    if selection is None:
        return everything
    if isinstance(selection, (str, torch.Tensor)):
        raise TypeError(
            f"`tracked` must be a list of parameter names or parameters, got a single {type(selection).__name__}. "
            "HINT: tracked=tracker.names."
        )
    by_name = {n: t for t in everything for n in (t.name, *t.aliases)}
    by_id = {id(t.param): t for t in everything}
    chosen: dict[int, _TrackedTensor] = {}
    for item in selection:
        if isinstance(item, str):
            entry = by_name.get(item)
        elif isinstance(item, torch.Tensor):
            entry = by_id.get(id(item))
        else:
            raise TypeError(f"`tracked` must hold parameter names or parameters, got {type(item).__name__}: {item!r}.")
        if entry is None:
            shown = item if isinstance(item, str) else f"a parameter of shape {list(item.shape)}"
            raise ValueError(
                f"`tracked` names {shown!r}, which is not a trainable floating-point parameter of "
                f"{type(model).__name__}. HINT: pass tracker.names, or names from model.named_parameters()."
            )
        chosen.setdefault(id(entry.param), entry)
    return list(chosen.values())


class MaskFreezer:
    """Keep every element outside ``mask`` (bit 0) bit-identical to its value at construction.

    Two mechanisms, chosen per optimizer in `attach`; both give the trainable elements the same bits after
    every step (tested bit-exact against each other), and both zero the frozen elements of every gradient
    in a post-accumulate-grad hook, so gradient clipping sees the subnetwork's norm.

    Compact optimizer state (``compact_optimizer_state=True``, default, for the elementwise ``torch.optim``
    optimizers SGD, Adam, AdamW, NAdam, RAdam, RMSprop, Adagrad, Adamax, Adadelta, Rprop, ASGD, for-loop,
    ``foreach`` and, off the CPU, ``fused``; unsharded parameters and FSDP2 ``Shard(0)`` shards on a 1-D mesh,
    where the compact tensor is a 1-D ``Shard(0)`` DTensor of each rank's trainable elements and the saved
    ``state_dict`` is expanded to the parameter's shape for distributed checkpointing): fully frozen tensors
    leave the step (no state, no work); for a partly frozen tensor the optimizer steps a 1-D tensor of its
    trainable elements, gathered with their gradients right before the step and scattered back right after it,
    so its state holds only those elements. The optimizer's ``param_groups`` hold the model's own parameters at
    every other moment (clipping through the optimizer, ``zero_grad``, LR schedulers, ``state_dict`` all see
    them); the state stays keyed by the model's parameter, so ``state_dict()`` / ``load_state_dict()``
    round-trip (a state saved by either mechanism loads into either; it is converted at `attach` or the next
    step). Nothing else moves a frozen element, so no values are stored: per partly frozen tensor 4 bytes per trainable
    element (the index), 0 for fully frozen ones. With ``stop_gradients=True`` fully frozen tensors also get
    ``requires_grad=False`` (no backward work, no gradient memory; restored by `detach`) unless that is
    unsafe (multi-process runs, gradient checkpointing). That drops their zero gradients from
    ``clip_grad_norm_``'s sum: the same norm, which can differ from dense freezing in the last bit, so the
    adapters turn it on only when the trainer does not clip by norm.

    Dense (``compact_optimizer_state=False``; any other optimizer: Adafactor, Muon, LBFGS, ``fused=True`` on
    the CPU, unknown classes, with a one-line note saying why; FSDP1 shards, whose ``FSDP.optim_state_dict``
    expects state shaped like each shard; ZeRO-3, whose partitioned optimizer steps flat fp32 partitions): the
    optimizer keeps full state and steps every element; `attach` zeroes the state of frozen elements and a
    step post-hook restores them from a stored copy (weight decay, momentum and ``eps`` terms cannot move
    them). Extra memory per element:
    fully frozen tensor ``itemsize``; partly frozen ``itemsize + 1`` (the frozen bits, dense, 0 at
    trainable elements, plus the trainable mask as ``torch.bool``), or with ``compact=True``
    ``itemsize * frozen_fraction + 1`` (only the frozen values; the restore uses ``masked_scatter_``, ~10x
    slower on CPU). See `extra_bytes` and `optimizer_state_bytes`. If the model changes dtype after freezing
    began (``model.to(torch.bfloat16)``, ``.half()``), the stored values are cast the same way before the next
    write (one warning), so frozen elements keep the values the cast gave them; never are bits of one width
    written into storage of another.

    Time per step (``benchmarks/freeze_overhead.py``, ``benchmarks/freeze_memory.py``): dense: two
    branch-free elementwise passes over the partly frozen tensors (gradient masking, restore); on CPU
    prefer ``AdamW(fused=True)`` there (the default for-loop AdamW runs ~1.6x slower once the frozen
    elements' state is zero). Compact: gradient masking, a gather of the trainable values and gradients,
    the optimizer on the trainable elements only, and a scatter back.

    Args:
        model: the model whose parameters are frozen to ``mask``.
        mask: 1 = trainable (in the subnetwork), 0 = frozen; names are tracked parameter names
            (a tied parameter under any of its names).
        tracked: the parameters the mask must cover exactly, as names (any name of a tied parameter)
            or `torch.nn.Parameter` objects, e.g. ``tracker.names``; a mask that leaves one out is
            refused. Default: every trainable floating-point parameter of ``model`` that ``mask`` names.
        compact: dense mechanism: store only the frozen values (less memory, slower restore).
        compact_optimizer_state: let elementwise optimizers step only the trainable elements (see above).
        stop_gradients: with compact optimizer state, also stop the gradients of fully frozen tensors.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        mask: Mask,
        *,
        tracked: Iterable[str | torch.nn.Parameter] | None = None,
        compact: bool = False,
        compact_optimizer_state: bool = True,
        stop_gradients: bool = False,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
        if not isinstance(mask, Mask):
            raise TypeError(f"`mask` must be a Mask, got {type(mask).__name__}. HINT: Mask.load(path) reads a file.")
        explicit = tracked is not None
        entries = _select_parameters(model, tracked)
        by_name = {n: t for t in entries for n in (t.name, *t.aliases)}
        unknown = [n for n in mask.names if n not in by_name]
        if unknown:
            raise ValueError(
                f"The mask was made for another model: {len(unknown)} mask tensor(s) are not trainable "
                f"parameters of {type(model).__name__} (e.g. {unknown[:3]}). HINT: use a mask recorded on "
                "this model with the same `include`/`exclude` options."
            )
        if explicit:
            missing = [t.name for t in entries if not any(n in mask for n in (t.name, *t.aliases))]
            if missing:
                raise ValueError(
                    f"The mask was made for another model: {len(missing)} tracked tensor(s) are not in the mask "
                    f"(e.g. {missing[:3]}). HINT: use a mask recorded with the same `include`/`exclude` options."
                )
        self._model = model
        self._compact_storage = compact
        self._compact_optimizer_state = compact_optimizer_state
        self._stop_gradients = stop_gradients
        self._entries: dict[int, _FrozenTensor] = {}
        self._numel = 0
        self._frozen_numel = 0
        for name in mask.names:
            entry = by_name[name]
            if id(entry.param) in self._entries:
                raise ValueError(f"The mask names the tied parameter {entry.name!r} twice ({name!r}); keep one name.")
            if tuple(mask.shapes[name]) != entry.shape:
                raise ValueError(
                    f"The mask was made for another model: tensor {name!r} has shape {list(mask.shapes[name])} "
                    f"in the mask but {list(entry.shape)} in the model."
                )
            keep = mask[name]  # the full mask of one tensor, read once, sliced to this rank's elements below
            kept = int(keep.sum())
            self._numel += keep.numel()
            self._frozen_numel += keep.numel() - kept
            if kept == keep.numel():
                continue  # fully trainable: nothing stored, no hooks
            layout = entry.layout
            data = _local_tensor(entry.param)
            # Compact state on FSDP2 shards: every rank of a parameter with frozen elements takes part (its
            # compact DTensor spans the ranks), also with no frozen (or no trainable) element locally.
            sharded_compact = compact_optimizer_state and _compact_mesh(entry.param) is not None
            fully_frozen = kept == 0
            if layout.sharded:
                keep = _local_mask(keep, layout, data)
                kept = int(keep.sum())
                if kept == keep.numel() and not sharded_compact:
                    continue  # no frozen element on this rank (e.g. an empty FSDP1 slice)
            with torch.no_grad():
                bits = _bits(data.detach())
                held = (data.dtype, tuple(data.shape))
                # Other sharded parameters keep the dense mechanism: FSDP1's FSDP.optim_state_dict expects state
                # shaped like each shard, ZeRO-3 steps DeepSpeed's flat fp32 partitions.
                if compact_optimizer_state and (layout.kind == "full" or sharded_compact) and fully_frozen:
                    frozen_entry = _FrozenTensor(
                        entry.name, entry.param, None, None, False, *held, layout, fully_frozen=True
                    )
                elif sharded_compact or (compact_optimizer_state and layout.kind == "full" and data.is_contiguous()):
                    index_dtype = torch.int32 if keep.numel() < 2**31 else torch.int64
                    index = keep.reshape(-1).nonzero().reshape(-1).to(device=data.device, dtype=index_dtype)
                    frozen_entry = _FrozenTensor(entry.name, entry.param, None, None, False, *held, layout, index=index)
                    if sharded_compact:
                        frozen_entry.mesh = _compact_mesh(entry.param)
                elif kept == 0:
                    frozen_entry = _FrozenTensor(
                        entry.name, entry.param, None, bits.clone(), False, *held, layout, fully_frozen=True
                    )
                else:
                    keep = keep.to(data.device)
                    values = bits[~keep].clone() if compact else bits * ~keep
                    frozen_entry = _FrozenTensor(entry.name, entry.param, keep, values, compact, *held, layout)
                if entry.param.grad is not None and layout.kind != "zero3":  # freezing between backward and step
                    frozen_entry.zero_frozen(entry.param.grad)
            self._entries[id(entry.param)] = frozen_entry
        _size_compact_dtensors([e for e in self._entries.values() if e.mesh is not None])
        _refuse_sparse_gradients(model, self._entries)
        # Gradients. Unsharded parameters: autograd accumulates into them, a post-accumulate-grad hook masks
        # each gradient. FSDP2 / FSDP1: autograd accumulates into the unsharded parameters and the framework
        # reduce-scatters them into the local gradient shard during backward; the shards are masked at the end
        # of backward (before any clipping), armed from forward hooks on the modules owning frozen parameters.
        # ZeRO-3: DeepSpeed's optimizer masks them before its step (see `attach`).
        frozen = list(self._entries.values())
        self._grad_handles = [
            e.param.register_post_accumulate_grad_hook(self._grad_hook) for e in frozen if e.kind == "full"
        ]
        self._shard_entries = [e for e in frozen if e.kind in ("dtensor", "fsdp1")]
        if self._shard_entries:
            owned = {id(e.param) for e in self._shard_entries}
            owners = [m for m in model.modules() if any(id(p) in owned for p in m._parameters.values())]
            self._grad_handles += [m.register_forward_hook(self._arm_shard_masking) for m in owners]
        self._armed = False
        self._step_handles: dict[int, Any] = {}
        self._optimizers: dict[int, Any] = {}
        self._compact_optimizers: set[int] = set()
        # id(optimizer) -> ([(param group, its own params list)], [(entry, compact tensor)]) during a step
        self._swapped: dict[int, tuple[list[tuple[dict, list]], list[tuple[_FrozenTensor, torch.Tensor]]]] = {}
        self._stopped: list[torch.nn.Parameter] = []

    # --- hooks -----------------------------------------------------------------------------------
    def _grad_hook(self, param: torch.Tensor) -> None:
        entry = self._entries.get(id(param))
        if entry is not None and param.grad is not None:
            with torch.no_grad():
                entry.zero_frozen(param.grad)

    def _arm_shard_masking(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        """Forward hook: mask the local gradient shards once the backward through ``output`` ends."""
        if not torch.is_grad_enabled():
            return
        for tensor in torch.utils._pytree.tree_leaves(output):
            if torch.is_tensor(tensor) and tensor.requires_grad:
                tensor.register_hook(self._on_output_grad)

    def _on_output_grad(self, grad: torch.Tensor) -> None:
        if not self._armed:
            self._armed = True
            _queue_after_backward(self._mask_shard_grads)

    def _mask_shard_grads(self) -> None:
        self._armed = False
        with torch.no_grad():
            for entry in self._shard_entries:
                if entry.param.grad is not None:
                    entry.zero_frozen(entry.param.grad)

    def _step_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """After a step: scatter the compact tensors back, then restore the dense-mechanism entries."""
        with torch.no_grad():
            self._swap_out(optimizer)
            entries = [
                self._entries[id(p)] for g in optimizer.param_groups for p in g["params"] if id(p) in self._entries
            ]
            _restore(entries)

    def _pre_step_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> Any:
        """Before a step: swap the compact tensors in. A step with a closure (Lightning) computes the
        gradients inside ``step``: the swap then runs when the closure returns."""
        # ``args`` is ``(optimizer, *step_args)``: a positional closure is ``args[1]``.
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self._swap_in(optimizer)
            return None

        def closure_then_swap_in() -> Any:
            loss = closure()
            self._swap_in(optimizer)
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_swap_in}
        return (args[0], closure_then_swap_in, *args[2:]), kwargs

    def _swap_in(self, optimizer: torch.optim.Optimizer) -> None:
        """Replace, in each param group, every partly frozen parameter by a 1-D tensor of its trainable
        elements (carrying the parameter's state) and drop the fully frozen ones."""
        with torch.no_grad():
            self._swap_out(optimizer)  # a step that raised left its swap in place
            groups, compacts = [], []
            state = optimizer.state
            for group in optimizer.param_groups:
                params, stepped, swapped = group["params"], [], False
                for param in params:
                    entry = self._entries.get(id(param))
                    if entry is None or entry.dense:
                        stepped.append(param)
                        continue
                    swapped = True
                    if entry.fully_frozen:
                        state.pop(param, None)  # e.g. a dense state loaded after attach
                        continue
                    compact = entry.gather()
                    param_state = state.pop(param, None)
                    if param_state:
                        entry.compact_state(param_state)
                        state[compact] = param_state
                    stepped.append(compact)
                    compacts.append((entry, compact))
                if swapped:
                    groups.append((group, params))
                    group["params"] = stepped
            if groups:
                self._swapped[id(optimizer)] = (groups, compacts)

    def _swap_out(self, optimizer: torch.optim.Optimizer) -> None:
        swapped = self._swapped.pop(id(optimizer), None)
        if swapped is None:
            return
        groups, compacts = swapped
        state = optimizer.state
        for entry, compact in compacts:
            entry.scatter(compact)
            param_state = state.pop(compact, None)
            if param_state:
                state[entry.param] = param_state
        for group, params in groups:
            group["params"] = params

    def _zero3_entries(self) -> list[_FrozenTensor]:
        return [e for e in self._entries.values() if e.kind == "zero3"]

    def _attach_zero3(self, optimizer: Any) -> None:
        """DeepSpeed ZeRO-3: its optimizer is no torch optimizer (no hooks) and steps flat fp32 partitions of
        several parameters; each parameter's local partition is reached through DeepSpeed's local API
        (``deepspeed.utils.safe_get_local_*``). Its ``step`` is wrapped to mask the local gradient partitions
        (before DeepSpeed computes the clip norm); a post-hook on the inner torch optimizer restores the frozen
        elements of the fp32 master, which DeepSpeed then copies into the parameter (and all-gathers).
        Dense mechanism: the partitioned optimizer's flat state cannot be made compact."""
        from deepspeed.utils import (
            safe_get_local_grad,
            safe_get_local_optimizer_state,
            safe_set_local_grad,
            safe_set_local_optimizer_state,
        )

        entries = [e for e in self._zero3_entries() if getattr(e.param, "_z3_optimizer", None) is optimizer]
        state_keys = sorted(
            {
                key
                for state in optimizer.optimizer.state.values()
                for key, value in state.items()
                if key not in _STATE_KEPT and torch.is_tensor(value) and value.dim() > 0
            }
        )
        with torch.no_grad():
            for entry in entries:
                for key in state_keys:
                    value = safe_get_local_optimizer_state(entry.param, key)
                    entry.zero_frozen(value)
                    safe_set_local_optimizer_state(entry.param, value, key)
                _restore_zero3_master(entry)
        original = optimizer.step

        def step(*args: Any, **kwargs: Any) -> Any:
            with torch.no_grad():
                for entry in entries:
                    grad = safe_get_local_grad(entry.param)
                    if grad is not None:
                        entry.zero_frozen(grad)
                        safe_set_local_grad(entry.param, grad)
            return original(*args, **kwargs)

        def restore_masters(*_: Any) -> None:  # between the inner step and DeepSpeed's copy into the model
            with torch.no_grad():
                for entry in entries:
                    _restore_zero3_master(entry)

        optimizer.step = step
        inner_hook = optimizer.optimizer.register_step_post_hook(restore_masters)

        class _Unwrap:
            def remove(self) -> None:
                inner_hook.remove()
                if optimizer.__dict__.get("step") is step:
                    del optimizer.step

        self._step_handles[id(optimizer)] = _Unwrap()
        self._optimizers[id(optimizer)] = optimizer

    # --- public ----------------------------------------------------------------------------------
    def attach(self, optimizer: Any) -> torch.optim.Optimizer:
        """Hook into ``optimizer``'s steps (compact or dense mechanism, see the class) and convert its
        state: compact state keeps only the trainable elements' state, the dense mechanism zeroes the frozen
        elements' state.

        Accepts a ``torch.optim.Optimizer`` or a wrapper holding one (accelerate's
        ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``); returns the torch optimizer.
        Attaching the same optimizer twice is a no-op.
        """
        zero3 = _zero3_optimizer(optimizer)
        if zero3 is not None:
            if id(zero3) not in self._step_handles:
                self._attach_zero3(zero3)
            return zero3
        inner = _unwrap_optimizer(optimizer)
        if id(inner) in self._step_handles:
            return inner
        compact = self._compact_optimizer_state
        if compact:
            reason = _why_not_elementwise(inner)
            if reason is not None:
                compact = False
                note = f"MaskFreezer: dense freezing (full optimizer state) for {reason}."
                if type(inner) in _ELEMENTWISE_OPTIMIZERS or type(inner).__name__ in _COUPLED_OPTIMIZERS:
                    _log.info(note)
                else:
                    warnings.warn(note + " Pass compact_optimizer_state=False to silence this.", stacklevel=2)
        stop = []
        with torch.no_grad():
            for group in inner.param_groups:
                for param in group["params"]:
                    entry = self._entries.get(id(param))
                    if entry is None:
                        continue
                    param_state = inner.state.get(param)
                    if compact and not entry.dense:
                        if entry.fully_frozen:
                            inner.state.pop(param, None)
                            stop.append(param)
                        elif param_state:
                            entry.compact_state(param_state)
                        continue
                    if param_state:
                        if entry.kind in ("full", "dtensor"):
                            entry.expand_state(param_state)  # a compact state from a checkpoint
                        entry.zero_state(param_state)
                    entry.make_dense(self._compact_storage)
        if compact and self._stop_gradients and stop:
            self._stop(stop)
        handles = [inner.register_step_post_hook(self._step_hook)]
        if compact:
            handles.append(inner.register_step_pre_hook(self._pre_step_hook))
            if any(e.kind == "dtensor" and not e.dense for e in self._entries.values()):
                handles.append(inner.register_state_dict_post_hook(self._save_sharded_state_full))
            self._compact_optimizers.add(id(inner))
        self._step_handles[id(inner)] = handles
        self._optimizers[id(inner)] = inner
        return inner

    def _stop(self, params: list[torch.nn.Parameter]) -> None:
        """``requires_grad=False`` on fully frozen ``params`` where safe (see `_can_stop_gradients`)."""
        reason = _can_stop_gradients(self._model)
        if reason is None:
            stopping = {id(p) for p in params if p.requires_grad and p.is_leaf}
            if not any(p.requires_grad and id(p) not in stopping for p in self._model.parameters()):
                reason = "every trainable parameter would stop (backward would have nothing to do)"
        if reason is not None:
            _log.info("MaskFreezer: fully frozen tensors keep receiving (zeroed) gradients: %s.", reason)
            return
        for param in params:
            if param.requires_grad and param.is_leaf:
                param.requires_grad_(False)
                param.grad = None
                self._stopped.append(param)

    def restore(self) -> None:
        """Write the freeze-time values back into every frozen element of the dense-mechanism tensors now
        (with compact optimizer state nothing moves a frozen element and no values are stored; their shape is
        checked)."""
        for entry in self._entries.values():
            if not entry.dense:
                entry.data()  # raises if the parameter changed shape
        with torch.no_grad():
            _restore(list(self._entries.values()))

    def detach(self, expand_state: bool = True) -> None:
        """Remove every gradient and optimizer hook, give stopped tensors back their ``requires_grad`` and
        free the stored values.

        Args:
            expand_state: give the compact optimizers full-shape state again (0 at the frozen elements, as
                dense freezing leaves it), so they can go on stepping the whole model. ``False`` leaves the
                compact state (e.g. at the end of training, where expanding would allocate the full state);
                such an optimizer can only step again with a `MaskFreezer` attached.
        """
        with torch.no_grad():
            for key in list(self._compact_optimizers):
                optimizer = self._optimizers[key]
                self._swap_out(optimizer)
                if expand_state:
                    self._expand_states(optimizer)
        for param in self._stopped:
            param.requires_grad_(True)
        for handle in [*self._grad_handles, *(h for hs in self._step_handles.values() for h in _handles(hs))]:
            handle.remove()
        self._grad_handles, self._step_handles, self._optimizers = [], {}, {}
        self._compact_optimizers, self._stopped = set(), []
        self._entries = {}

    def _expand_states(self, optimizer: torch.optim.Optimizer) -> None:
        """Full-shape state for every compact entry; fully frozen tensors get a zero state modelled on a
        sibling's (optimizers such as Adagrad create state for every parameter up front)."""
        for group in optimizer.param_groups:
            template = next((optimizer.state[p] for p in group["params"] if optimizer.state.get(p)), None)
            for param in group["params"]:
                entry = self._entries.get(id(param))
                if entry is None or entry.dense:
                    continue
                full = _full_state(entry, optimizer.state.get(param), template)
                if full is not None:
                    optimizer.state[param] = full

    def _save_sharded_state_full(self, optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
        """``state_dict`` post-hook (FSDP2 compact state): distributed checkpointing loads state into tensors
        shaped like each parameter (Lightning's and accelerate's resume), so the saved state of the compact
        DTensor entries is expanded to the parameter's shape (0 at the frozen elements, as dense freezing
        holds it; a zero state for fully frozen ones). New tensors in new dicts: the optimizer stays compact.
        It loads into either mechanism, any mask and world size; the cost is one full state at save time."""
        saved = state_dict["state"]
        index = 0
        for group in optimizer.param_groups:
            params = group["params"]
            template = next((saved[index + i] for i in range(len(params)) if saved.get(index + i)), None)
            for i, param in enumerate(params):
                entry = self._entries.get(id(param))
                if entry is not None and entry.kind == "dtensor" and not entry.dense:
                    full = _full_state(entry, saved.get(index + i), template)
                    if full is not None:
                        saved[index + i] = full
            index += len(params)

    @property
    def extra_bytes(self) -> int:
        """Bytes held for freezing (stored values, masks and indices, on the parameters' devices)."""
        return sum(e.nbytes for e in self._entries.values())

    @property
    def optimizer_state_bytes(self) -> int:
        """Bytes of the attached optimizers' state tensors (each storage once)."""
        return _state_bytes(list(self._optimizers.values()))

    @property
    def frozen_fraction(self) -> float:
        """Frozen elements / elements named by the mask, in [0, 1]."""
        return self._frozen_numel / self._numel if self._numel else 0.0

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The attached (unwrapped) torch optimizers."""
        return list(self._optimizers.values())

    @property
    def compact_optimizers(self) -> list[torch.optim.Optimizer]:
        """The attached optimizers that step compact tensors (the others use the dense mechanism)."""
        return [self._optimizers[k] for k in self._compact_optimizers]

    def __repr__(self) -> str:
        return (
            f"MaskFreezer({len(self._entries)} tensors with frozen elements, frozen_fraction="
            f"{self.frozen_fraction:.4f}, extra_bytes={self.extra_bytes:,}, "
            f"compact optimizers={len(self._compact_optimizers)}/{len(self._optimizers)})"
        )


def _full_state(entry: _FrozenTensor, state: dict | None, template: dict | None) -> dict | None:
    """A new state dict for ``entry``'s parameter in the parameter's shape: ``state`` expanded (see
    `_FrozenTensor.expand_state`), or for a fully frozen tensor without state a zero state modelled on a
    sibling's ``template``; None when there is nothing to expand."""
    if state:
        full = dict(state)
        entry.expand_state(full)
        return full
    if entry.fully_frozen and template is not None:
        return {
            key: torch.zeros_like(entry.param.detach(), dtype=value.dtype)
            if torch.is_tensor(value) and key != "step" and value.ndim > 0
            else (value.clone() if torch.is_tensor(value) else value)
            for key, value in template.items()
        }
    return None


def _handles(handles: Any) -> list[Any]:
    return handles if isinstance(handles, list) else [handles]


def _refuse_sparse_gradients(model: torch.nn.Module, entries: dict[int, Any]) -> None:
    """`ValueError` naming the module when a parameter with frozen elements gets sparse gradients
    (``nn.Embedding(sparse=True)``, ``nn.EmbeddingBag(sparse=True)``): they cannot be masked element-wise."""
    for module_name, module in model.named_modules():
        if isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and module.sparse:
            if id(module.weight) in entries:
                raise ValueError(
                    f"`{module_name or type(model).__name__}` is an {type(module).__name__}(sparse=True) and its "
                    "weight has frozen elements: sparse gradients cannot be masked element by element, so the "
                    "freezer cannot keep them bit-identical. HINT: build it with sparse=False, or leave its weight "
                    f"out of freezing (SparsityConfig(exclude=[{(module_name + '.weight')!r}]))."
                )


def _unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate/Lightning wrappers (``.optimizer`` / ``._optimizer``).

    Lightning's ``LightningOptimizer`` is itself an instance of a dynamic subclass of the optimizer's
    class, so the wrapped object is looked for before the ``isinstance`` check.
    """
    for _ in range(8):
        inner = getattr(optimizer, "_optimizer", None)
        if inner is None:
            inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer or not hasattr(inner, "param_groups"):
            break
        optimizer = inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"Cannot freeze through {type(optimizer).__name__}: it is not a torch.optim.Optimizer and wraps none "
            "in `.optimizer` or `._optimizer`. HINT: pass the torch optimizer itself."
        )
    return optimizer


def _resolve_freeze_mask(config: SparsityConfig, tracker: Any) -> Mask:
    """The trainable mask ``config.freeze_mask`` asks for, checked against ``tracker``'s model.

    ``"discover"``: ``tracker.ever_changed_mask()``. A path or MLflow URI: `Mask.load`, then
    ``check_matches`` on names, shapes and reference-weight signatures (a mask for another model is
    refused, naming the tensor). With ``config.mask_density_cap=f`` and a denser mask, only the
    ``floor(f * N)`` mask elements (N = tracked elements) with the largest ``|w - ref|`` stay trainable
    (see `_cap_density`); this needs the reference values of ``mode='exact'``.
    """
    source = config.freeze_mask
    if source is None:
        raise ValueError("`freeze_mask` is None: nothing to freeze. HINT: set freeze_mask='discover' or a mask path.")
    if source == "discover":
        mask = tracker.ever_changed_mask()
    else:
        mask = Mask.load(source)
        mask.check_matches(tracker.shapes, tracker.signatures)
        unsigned = [n for n in mask.names if not mask.signatures.get(n)]
        if unsigned and not config.allow_unsigned_mask:
            raise ValueError(
                f"The mask {source!r} has no reference-weight signature for {len(unsigned)} of its {len(mask.names)} "
                f"tensor(s) (e.g. {unsigned[:3]}), so nothing shows it was made for this model's base weights; a mask "
                "of another base model would freeze the wrong elements. HINT: use a mask saved by the tracker or by "
                "`sparsity-callbacks diff --mask`, or opt in with SparsityConfig(allow_unsigned_mask=True)."
            )
    if config.mask_density_cap is not None:
        mask = _cap_density(mask, tracker, config.mask_density_cap)
    return mask


def _cap_density(mask: Mask, tracker: Any, cap: float) -> Mask:
    """Keep the ``k = floor(cap * N)`` elements of ``mask`` with the largest ``|w - ref|`` (N = all elements).

    Exact global selection, no sampling: scores are |w - ref| in float32 (NaN counts as +inf), whose
    int32 bit patterns sort like the values; a two-pass radix select (a 2^15-bin histogram of the high
    16 bits, then 2^16 bins of the low 16 bits within the boundary bin) finds the k-th largest score
    with O(largest tensor) memory. Ties at the threshold are broken deterministically: the first ones
    in mask tensor order, then row-major element order.
    """
    names = mask.names
    if not names or tracker.reference(names[0]) is None:
        raise ValueError(
            "`mask_density_cap` ranks elements by |w - ref| and needs the reference values, which "
            f"mode={getattr(tracker, 'mode', 'fingerprint')!r} does not keep. HINT: use mode='exact' "
            "(SparsityConfig(mode='exact')), or drop `mask_density_cap`."
        )
    k = math.floor(cap * mask.numel())
    if mask.count() <= k:
        return mask
    params = {n: t.param for t in tracker._tracked for n in (t.name, *t.aliases)}

    def scores(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(int32 score bits of the mask's elements, flat bool mask) of one tensor, on the CPU."""
        ref = tracker.reference(name)
        if ref is None:
            raise ValueError(f"No reference values for {name!r}; `mask_density_cap` needs mode='exact'.")
        weight = _to_compare(_local_tensor(params[name]).detach().cpu(), ref.dtype)
        diff = _abs_delta(weight, ref).float().nan_to_num(nan=math.inf).reshape(-1)
        keep = mask[name].reshape(-1)
        return diff.view(torch.int32)[keep], keep

    def boundary(hist: torch.Tensor, rank: int) -> tuple[int, int]:
        """(bin holding the rank-th largest (1-based), count strictly above that bin)."""
        above = hist.flip(0).cumsum(0).flip(0)  # above[b] = count in bins >= b
        b = int((above >= rank).nonzero().max())
        return b, int(above[b + 1]) if b + 1 < hist.numel() else 0

    hi_hist = torch.zeros(1 << 15, dtype=torch.int64)
    for name in names:
        bits, _ = scores(name)
        hi_hist += torch.bincount(bits >> 16, minlength=1 << 15)
    hi, above_hi = boundary(hi_hist, k)
    lo_hist = torch.zeros(1 << 16, dtype=torch.int64)
    for name in names:
        bits, _ = scores(name)
        lo_hist += torch.bincount(bits[(bits >> 16) == hi] & 0xFFFF, minlength=1 << 16)
    lo, above_lo = boundary(lo_hist, k - above_hi)
    threshold = (hi << 16) | lo
    ties_left = k - above_hi - above_lo  # elements equal to the threshold still to keep, >= 1
    capped = {}
    for name in names:
        bits, keep = scores(name)
        chosen = bits > threshold
        tie = (bits == threshold).nonzero().reshape(-1)[:ties_left]
        chosen[tie] = True
        ties_left -= tie.numel()
        flat = torch.zeros_like(keep)
        flat[keep.nonzero().reshape(-1)[chosen]] = True
        capped[name] = flat.view(mask.shapes[name])
    metadata = {**mask.metadata, "mask_density_cap": cap, "uncapped_density": mask.density}
    return Mask(capped, signatures=mask.signatures, metadata=metadata)
