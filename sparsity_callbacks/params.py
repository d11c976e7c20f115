"""Which tensors are tracked, what they are called, and where their local data lives."""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field

import torch

from sparsity_callbacks.config import SparsityConfig

# `model.layers.3.`, `transformer.h.3.`, `gpt_neox.layers.3.`, `encoder.block.3.`: the block index.
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
# PEFT inserts the adapter name (`lora_A.default.weight`); it is not part of the module type.
_ADAPTER_NAME_RE = re.compile(r"\.(lora_[AB]|lora_embedding_[AB]|lora_magnitude_vector)\.[^.]+")


def _layer_index(name: str) -> int | None:
    """Block index in a parameter name (``model.layers.3.mlp.up_proj.weight`` -> 3), else None."""
    match = _LAYER_RE.search(name)
    return int(match.group(1)) if match else None


def _module_type(name: str) -> str:
    """Architecture-independent module type of a parameter name.

    ``model.layers.3.self_attn.q_proj.weight`` -> ``self_attn.q_proj``;
    ``transformer.h.0.mlp.c_fc.bias`` -> ``mlp.c_fc.bias``; ``model.embed_tokens.weight`` -> ``embed_tokens``;
    ``...q_proj.lora_A.default.weight`` -> ``self_attn.q_proj.lora_A``.
    """
    name = _ADAPTER_NAME_RE.sub(r".\1", name)
    match = _LAYER_RE.search(name)
    rest = name[match.end() :] if match else name
    rest = rest.removesuffix(".weight")
    if match is None:
        # Outside the blocks: the innermost module name (`model.norm.weight` -> `norm`, `lm_head`).
        parts = rest.split(".")
        rest = ".".join(parts[-2:]) if parts[-1] == "bias" and len(parts) > 1 else parts[-1]
    return rest


# Prefixes inserted by module wrappers that are not part of the model's own parameter names.
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _clean_name(name: str) -> str:
    """The parameter name without FSDP1 / activation-checkpointing / torch.compile wrapper prefixes,
    so that names (and masks) are the same with and without those wrappers."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


@dataclass(frozen=True)
class _Layout:
    """Where this rank's elements of a parameter sit in the full tensor.

    Every supported sharding keeps a rank's elements contiguous in the *flattened* full tensor
    (row-major): FSDP2 ``Shard(0)`` (whole rows), FSDP1 ``use_orig_params=True`` (a slice of the
    flattened parameter, possibly empty) and DeepSpeed ZeRO-3 (a slice of the flattened parameter,
    the last one padded). So a shard is ``global_flat[start : start + local_numel]``.
    """

    shape: tuple[int, ...]  # the full (global) shape
    start: int = 0
    local_numel: int = -1  # -1: the full tensor
    kind: str = "full"  # "full" (single process, DDP replica), "dtensor", "fsdp1", "zero3"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def sharded(self) -> bool:
        return self.kind != "full"

    @property
    def local_count(self) -> int:
        return self.numel if self.local_numel < 0 else self.local_numel


# FSDP1 (``use_orig_params=True``) parameters are plain `nn.Parameter`s whose ``.data`` is a 1-D slice of
# the rank's flat shard; their layout is only known from the FSDP handle, so it is recorded here.
_FSDP1_LAYOUTS: torch.utils.weak.WeakIdKeyDictionary = torch.utils.weak.WeakIdKeyDictionary()


def _register_fsdp1(model: torch.nn.Module) -> None:
    """Record the layout of every original parameter of the FSDP1 instances in ``model``."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # torch built without distributed
        return
    for module in model.modules():
        if not isinstance(module, FullyShardedDataParallel):
            continue
        handle = getattr(module, "_handle", None)
        flat = getattr(handle, "flat_param", None)
        if flat is None:
            continue
        if getattr(flat, "_params", None) is None:
            raise ValueError(
                f"FSDP1 module {type(module.module).__name__} wraps its parameters in a FlatParameter "
                "(use_orig_params=False): the original parameters are not visible. HINT: wrap with "
                "FullyShardedDataParallel(..., use_orig_params=True), or use FSDP2 (fully_shard)."
            )
        sharded = bool(getattr(handle, "uses_sharded_strategy", True))
        for param, info, shape in zip(flat._params, flat._shard_param_infos, flat._shapes):
            if not sharded:
                _FSDP1_LAYOUTS[param] = _Layout(tuple(shape))
                continue
            start = int(info.intra_param_start_idx) if info.in_shard else 0
            numel = int(info.numel_in_shard) if info.in_shard else 0
            _FSDP1_LAYOUTS[param] = _Layout(tuple(shape), start, numel, "fsdp1")


# DeepSpeed ZeRO-3 (checked with deepspeed 0.19.8, torch 2.13, CPU accelerator + gloo, 2 processes): works,
# see tests/test_distributed.py. Two things DeepSpeed needs there, not us: `torch._dynamo` (imported by
# transformers' generation utils) must be imported *before* `deepspeed.zero.Init()` patches
# `torch.Tensor.__new__` (else "TypeError: Signature mismatch ... tensor_pynew"), and a torch optimizer
# needs `"zero_allow_untested_optimizer": true`. ZeRO-3 parameters have ``param.shape == (0,)`` outside
# forward; ``ds_shape`` is the full shape and ``ds_tensor`` this rank's padded flat partition.
def _layout(param: torch.Tensor) -> _Layout:
    """`_Layout` of ``param`` on this rank. Raises `NotImplementedError` for shardings whose local
    elements are not one contiguous slice of the flattened full tensor."""
    if getattr(param, "ds_tensor", None) is not None:  # DeepSpeed ZeRO-3
        import torch.distributed as dist

        shape = tuple(param.ds_shape)  # type: ignore[attr-defined]  # DeepSpeed's attributes
        total = math.prod(shape)
        ds_tensor: torch.Tensor = param.ds_tensor  # type: ignore[attr-defined]
        partition = int(getattr(ds_tensor, "ds_numel", ds_tensor.numel()))
        group = getattr(param, "ds_process_group", None)
        rank = dist.get_rank(group=group) if dist.is_initialized() else 0
        start = min(rank * partition, total)
        return _Layout(shape, start, max(0, min(partition, total - start)), "zero3")
    placements = getattr(param, "placements", None)
    if placements is not None and hasattr(param, "device_mesh"):  # DTensor (FSDP2, tensor parallel)
        shape = tuple(param.shape)
        shard_dims = [p.dim for p in placements if p.is_shard()]
        if not shard_dims:
            return _Layout(shape)
        if (
            any(d != 0 for d in shard_dims)
            or len(shard_dims) > 1
            or any(not (p.is_shard() or p.is_replicate()) for p in placements)
        ):
            raise NotImplementedError(
                f"DTensor placements {tuple(placements)} are not supported: only Shard(0) (FSDP2's default, also "
                "combined with Replicate for HSDP) keeps a rank's elements contiguous. HINT: track the model "
                "before tensor parallelism, or exclude these parameters with `exclude`."
            )
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local_shape, offset = compute_local_shape_and_global_offset(shape, param.device_mesh, placements)
        row = math.prod(shape[1:])
        return _Layout(shape, int(offset[0]) * row if math.prod(local_shape) else 0, math.prod(local_shape), "dtensor")
    layout = _FSDP1_LAYOUTS.get(param)
    if layout is not None:
        return layout
    return _Layout(tuple(param.shape))


def _local_tensor(param: torch.Tensor) -> torch.Tensor:
    """The elements this rank holds: the DTensor local shard (FSDP2), DeepSpeed ZeRO-3's
    ``ds_tensor`` (without its padding), an FSDP1 parameter's slice of the flat shard, or the
    parameter itself (single process, DDP replica)."""
    ds_tensor = getattr(param, "ds_tensor", None)
    if ds_tensor is not None:
        # ZeRO-3 partitions are flat and the last one is padded: keep the real elements only.
        return ds_tensor.data.reshape(-1)[: _layout(param).local_count]
    to_local = getattr(param, "to_local", None)
    if to_local is not None and type(param).__name__ != "Tensor" and hasattr(param, "placements"):
        return to_local().data if isinstance(param, torch.nn.Parameter) else to_local()
    data = getattr(param, "_local_tensor", None)
    if data is not None:
        return data
    layout = _FSDP1_LAYOUTS.get(param)
    if layout is not None and layout.sharded and param.numel() == layout.numel and layout.local_numel != layout.numel:
        # Inside `summon_full_params` / forward the parameter is the full tensor: take this rank's slice.
        return param.data.reshape(-1)[layout.start : layout.start + layout.local_numel]
    return param.data


def _is_sharded(param: torch.Tensor) -> bool:
    """True when each rank holds a different part of ``param`` (so counts must be summed)."""
    if getattr(param, "ds_tensor", None) is not None:
        return True
    placements = getattr(param, "placements", None)
    if placements is not None:
        return any(p.is_shard() for p in placements)
    layout = _FSDP1_LAYOUTS.get(param)
    return layout is not None and layout.sharded


@dataclass
class _TrackedTensor:
    """One tracked parameter. ``aliases``: other names of the same (tied) parameter. ``layout``:
    its full shape and this rank's slice of it (see `_Layout`)."""

    name: str
    param: torch.nn.Parameter
    aliases: list[str] = field(default_factory=list)
    layout: _Layout = None  # type: ignore[assignment]  # set from `param` in __post_init__

    def __post_init__(self) -> None:
        if self.layout is None:
            self.layout = _layout(self.param)

    @property
    def layer(self) -> int | None:
        return _layer_index(self.name)

    @property
    def module_type(self) -> str:
        return _module_type(self.name)

    @property
    def shape(self) -> tuple[int, ...]:
        """The full (global) shape, also for sharded parameters."""
        return self.layout.shape

    @property
    def sharded(self) -> bool:
        return self.layout.sharded

    def local(self) -> torch.Tensor:
        return _local_tensor(self.param)


def _skip_reason(name: str, param: torch.Tensor, include: list, exclude: list) -> str | None:
    """Why ``param`` is not tracked, or None when it is."""
    if type(param).__name__ == "FlatParameter":
        raise ValueError(
            f"{name!r} is an FSDP1 FlatParameter (use_orig_params=False): the original parameters are not "
            "visible. HINT: FullyShardedDataParallel(..., use_orig_params=True), or FSDP2 (fully_shard)."
        )
    if not (param.is_floating_point() or getattr(param, "ds_tensor", None) is not None):
        return f"not floating point ({param.dtype})"
    if not param.requires_grad:
        return "requires_grad=False"
    if include and not any(p.search(name) for p in include):
        return "not matched by `include`"
    if any(p.search(name) for p in exclude):
        return "matched by `exclude`"
    return None


def _global_shape(param: torch.Tensor) -> tuple[int, ...]:
    """Full shape of a parameter, also for ZeRO-3 (``ds_shape``) and FSDP1 (whose ``param.shape`` is local)."""
    if getattr(param, "ds_tensor", None) is not None:
        return tuple(param.ds_shape)  # type: ignore[attr-defined]
    layout = _FSDP1_LAYOUTS.get(param)
    return layout.shape if layout is not None else tuple(param.shape)


def _collect_parameters(model: torch.nn.Module, config: SparsityConfig) -> tuple[list[_TrackedTensor], dict[str, str]]:
    """Tracked parameters (tied ones once, under their first name) and ``{name: reason}`` of skipped ones."""
    include = [re.compile(p) for p in config.include]
    exclude = [re.compile(p) for p in config.exclude]
    tracked: list[_TrackedTensor] = []
    by_id: dict[int, _TrackedTensor] = {}
    skipped: dict[str, str] = {}
    _register_fsdp1(model)
    for name, param in model.named_parameters(remove_duplicate=False):
        name = _clean_name(name)
        if id(param) in by_id:
            by_id[id(param)].aliases.append(name)
            continue
        reason = _skip_reason(name, param, include, exclude)
        if reason is not None:
            skipped[name] = reason
        else:
            entry = _TrackedTensor(name, param)
            by_id[id(param)] = entry
            tracked.append(entry)
    if not tracked:
        reasons = sorted(set(skipped.values())) or ["the model has no parameters"]
        peft = ""
        if hasattr(model, "peft_config") or any("lora_" in n for n in skipped):
            peft = (
                " This is a PEFT model with no trainable adapter (only adapters are tracked, never the frozen "
                "base weights): create it with `get_peft_model(...)` or load it with "
                "`PeftModel.from_pretrained(..., is_trainable=True)`; or `merge_and_unload()` and track the "
                "merged model with its parameters trainable."
            )
        raise ValueError(
            f"No parameter to track in {type(model).__name__}: {len(skipped)} skipped ({', '.join(reasons)}). "
            "HINT: make some parameters trainable (requires_grad=True), or loosen `include`/`exclude`." + peft
        )
    return tracked, skipped


def _architecture_signature(shapes: dict[str, tuple[int, ...]]) -> str:
    """Hash of the tracked names and shapes."""
    text = ";".join(f"{n}:{list(s)}" for n, s in sorted(shapes.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
