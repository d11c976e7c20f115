"""Which tensors are tracked, what they are called, and where their local data lives."""

from __future__ import annotations

import hashlib
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


def _local_tensor(param: torch.Tensor) -> torch.Tensor:
    """The elements this rank holds: the DTensor local shard (FSDP2), DeepSpeed ZeRO-3's
    ``ds_tensor``, or the parameter itself (single process, DDP replica, FSDP1 flat shard)."""
    ds_tensor = getattr(param, "ds_tensor", None)
    if ds_tensor is not None:
        return ds_tensor.data
    to_local = getattr(param, "to_local", None)
    if to_local is not None and type(param).__name__ != "Tensor" and hasattr(param, "placements"):
        return to_local().data if isinstance(param, torch.nn.Parameter) else to_local()
    data = getattr(param, "_local_tensor", None)
    if data is not None:
        return data
    return param.data


def _is_sharded(param: torch.Tensor) -> bool:
    """True when each rank holds a different part of ``param`` (so counts must be summed)."""
    if getattr(param, "ds_tensor", None) is not None:
        return True
    placements = getattr(param, "placements", None)
    return placements is not None and any(p.is_shard() for p in placements)


@dataclass
class _TrackedTensor:
    """One tracked parameter. ``aliases``: other names of the same (tied) parameter."""

    name: str
    param: torch.nn.Parameter
    aliases: list[str] = field(default_factory=list)

    @property
    def layer(self) -> int | None:
        return _layer_index(self.name)

    @property
    def module_type(self) -> str:
        return _module_type(self.name)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.param.shape)

    def local(self) -> torch.Tensor:
        return _local_tensor(self.param)


def _collect_parameters(
    model: torch.nn.Module, config: SparsityConfig
) -> tuple[list[_TrackedTensor], dict[str, str]]:
    """Tracked parameters (tied ones once, under their first name) and ``{name: reason}`` of skipped ones."""
    include = [re.compile(p) for p in config.include]
    exclude = [re.compile(p) for p in config.exclude]
    tracked: list[_TrackedTensor] = []
    by_id: dict[int, _TrackedTensor] = {}
    skipped: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in by_id:
            by_id[id(param)].aliases.append(name)
            continue
        if not (param.is_floating_point() or getattr(param, "ds_tensor", None) is not None):
            skipped[name] = f"not floating point ({param.dtype})"
        elif not param.requires_grad:
            skipped[name] = "requires_grad=False"
        elif include and not any(p.search(name) for p in include):
            skipped[name] = "not matched by `include`"
        elif any(p.search(name) for p in exclude):
            skipped[name] = "matched by `exclude`"
        else:
            entry = _TrackedTensor(name, param)
            by_id[id(param)] = entry
            tracked.append(entry)
    if not tracked:
        reasons = sorted(set(skipped.values())) or ["the model has no parameters"]
        raise ValueError(
            f"No parameter to track in {type(model).__name__}: {len(skipped)} skipped ({', '.join(reasons)}). "
            "HINT: make some parameters trainable (requires_grad=True), or loosen `include`/`exclude`."
        )
    return tracked, skipped


def _tensor_signature(tensor: torch.Tensor, samples: int = 4096) -> str:
    """Short content hash of ``tensor``: its shape and up to ``samples`` evenly spaced elements, rounded
    to bfloat16 so that fp32 and bf16 copies of the same weights agree. Cheap on any size."""
    flat = tensor.detach().reshape(-1)
    stride = max(1, flat.numel() // samples)
    sample = flat[::stride][:samples].to(device="cpu", dtype=torch.bfloat16).contiguous()
    digest = hashlib.sha256(str(tuple(tensor.shape)).encode())
    digest.update(sample.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def _architecture_signature(shapes: dict[str, tuple[int, ...]]) -> str:
    """Hash of the tracked names and shapes."""
    text = ";".join(f"{n}:{list(s)}" for n, s in sorted(shapes.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
