"""Bit packing: 8 bools per uint8, little-endian bit order (element ``8*i + b`` is bit ``b`` of byte ``i``)."""

from __future__ import annotations

import torch

_SHIFTS = torch.arange(8, dtype=torch.uint8)


def _packed_numel(numel: int) -> int:
    return (numel + 7) // 8


def _pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """Bool tensor of any shape -> uint8 tensor of ``ceil(numel / 8)`` bytes (on the same device)."""
    flat = flags.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) << _SHIFTS.to(flat.device)).sum(1, dtype=torch.uint8)


def _unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 bytes from `_pack_bits` -> flat bool tensor of ``numel`` elements."""
    bits = (packed.reshape(-1, 1) >> _SHIFTS.to(packed.device)) & 1
    return bits.reshape(-1)[:numel].bool()


def _popcount(packed: torch.Tensor) -> torch.Tensor:
    """Number of set bits in a uint8 tensor, as a 0-d int64 tensor on its device (SWAR bit counting:
    a few vectorised passes over the bytes, no lookup table or widening to int64 indices)."""
    x = packed - ((packed >> 1) & 0x55)
    x = (x & 0x33) + ((x >> 2) & 0x33)
    return ((x + (x >> 4)) & 0x0F).sum(dtype=torch.int64)
