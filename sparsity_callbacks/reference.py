"""How the reference is held and compared: per-chunk kernels for `exact` and `fingerprint` modes. What
counts as changed is `_rules`; this module applies it chunk by chunk (the hot loop of `measure()` is
`_kernel`, called once per chunk from `SparsityTracker._run_chunk`).

Layout: every per-tensor state is a flat tensor padded to a multiple of 8 elements and processed in
chunks of ``chunk`` elements (a multiple of 8). Bit masks (changed, ever-changed) are packed *planar
per chunk*: in a chunk of ``8 * m`` elements, element ``b * m + j`` is bit ``b`` of byte ``j``. Packing
this way reads 8 contiguous streams, which vectorises (grouping 8 neighbours into a byte does not:
measured 30x slower on CPU). `Mask` files use the conventional order; `_planar_to_bool` converts.

Fingerprint: the element's bits, read as an unsigned integer x, modulo m = 2**k - 1 (255 for k=8,
65535 for k=16). Any change of x by 0 < |d| < m (fewer than 255 ulps for k=8) changes x mod m, so the
small updates of training are always detected; a larger change is missed only when d is a multiple of
m, with probability about 1/m for an unstructured change. Single-bit flips (2**j mod m != 0) are always
detected. Since 2**k = 1 (mod m), x mod m is the sum of x's k-bit digits folded to k bits: shifts, masks
and adds, which `torch.compile` fuses into one vectorised pass; eager torch uses `torch.remainder`
instead (one pass; fewer eager kernels). Both give the same values.
"""

from __future__ import annotations

import functools
import logging
import warnings

import torch

from sparsity_callbacks._rules import _as_bits, _changed, _to_compare

_log = logging.getLogger("sparsity_callbacks")

_MODULI = {8: 255, 16: 65535}
_FINGERPRINT_DTYPES = {8: torch.uint8, 16: torch.int16}
_SHIFTS_CACHE: dict[torch.device, torch.Tensor] = {}


def _miss_probability(bits: int) -> float:
    """Probability that an unstructured change is not detected by a ``bits``-bit fingerprint."""
    return 1.0 / _MODULI[bits]


def _fingerprint(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-element fingerprint, same shape: (raw bits as an unsigned integer) mod ``2**bits - 1``, as
    uint8 (k=8) or int16 (k=16, offset by -32768)."""
    modulus = _MODULI[bits]
    x = _as_bits(values)
    if x.element_size() < 4:
        x = x.to(torch.int32)
    if torch.compiler.is_compiling():
        # Sum of the k-bit digits of the unsigned bits (2**k = 1 mod m), folded twice to at most m.
        r = x & modulus
        for shift in range(bits, 8 * values.element_size(), bits):
            r = r + ((x >> shift) & modulus)
        r = (r & modulus) + (r >> bits)
        r = (r & modulus) + (r >> bits)
    else:
        # A signed x stands for x + 2**width, and 2**width = 1 (mod m).
        r = torch.remainder(x, modulus) + (x < 0)
    r = torch.where(r == modulus, 0, r)
    if bits == 8:
        return r.to(torch.uint8)
    return (r - 32768).to(torch.int16)


def _pack_planar(flags: torch.Tensor) -> torch.Tensor:
    """Flat bool tensor of ``8 * m`` elements -> ``m`` bytes, element ``b * m + j`` in bit ``b`` of byte ``j``."""
    rows = flags.view(8, -1)
    packed = rows[0].to(torch.uint8)
    for b in range(1, 8):
        packed = packed | (rows[b].to(torch.uint8) << b)
    return packed


def _planar_to_bool(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `_pack_planar`: ``m`` bytes -> flat bool tensor of ``8 * m`` elements."""
    device = packed.device
    if device not in _SHIFTS_CACHE:
        _SHIFTS_CACHE[device] = torch.arange(8, dtype=torch.uint8, device=device).view(8, 1)
    return ((packed.view(1, -1) >> _SHIFTS_CACHE[device]) & 1).reshape(-1).bool()


def _kernel(
    current: torch.Tensor,
    reference: torch.Tensor,
    previous: torch.Tensor | None,
    ever: torch.Tensor,
    *,
    fingerprint_reference: bool,
    bits: int,
    atol: float,
    update: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk: returns packed (changed, churn or None); with ``update`` also ORs changed into
    ``ever`` and stores the current fingerprint in ``previous`` (both in place)."""
    fingerprint = _fingerprint(current, bits) if (fingerprint_reference or previous is not None) else None
    if fingerprint_reference:
        changed = _pack_planar(fingerprint != reference)
    else:
        changed = _pack_planar(_changed(current, reference, atol))
    churn = None
    if previous is not None:
        churn = _pack_planar(fingerprint != previous)
        if update:
            previous.copy_(fingerprint)
    if update:
        ever.bitwise_or_(changed)
    return changed, churn


@functools.cache
def _compiled_kernel():
    return torch.compile(_kernel, dynamic=True)


class _KernelRunner:
    """Calls `_kernel` eagerly or compiled; falls back to eager (once, with a warning) if compiling fails."""

    def __init__(self, use_compile: bool) -> None:
        self.use_compile = use_compile

    def __call__(self, *args, **kwargs):
        if self.use_compile:
            try:
                return _compiled_kernel()(*args, **kwargs)
            except Exception as err:  # inductor needs a C++ compiler; never fail a training run for speed
                warnings.warn(
                    f"torch.compile of the sparsity kernel failed ({type(err).__name__}: {err}); "
                    "measuring eagerly (slower). Set compile=False to silence this.",
                    stacklevel=3,
                )
                self.use_compile = False
        return _kernel(*args, **kwargs)


def _chunks(padded_numel: int, chunk: int):
    """(start, end) of each chunk of a padded flat tensor."""
    for start in range(0, padded_numel, chunk):
        yield start, min(start + chunk, padded_numel)


def _padded(numel: int) -> int:
    return (numel + 7) // 8 * 8


def _flat_chunk(flat: torch.Tensor, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
    """``flat[start:end]`` in the compare ``dtype`` (`_rules._to_compare`), zero-padded when ``end`` runs past
    the tensor (the last chunk)."""
    piece = _to_compare(flat[start:end], dtype)
    if piece.numel() < end - start:
        piece = torch.cat([piece, piece.new_zeros(end - start - piece.numel())])
    return piece


def _new_host_buffer(numel: int, dtype: torch.dtype, pin: bool, path: str | None) -> torch.Tensor:
    """Host tensor for an exact reference: memory-mapped file at ``path``, pinned, or plain RAM."""
    if path is not None:
        return torch.from_file(path, shared=True, size=numel, dtype=dtype)
    buffer = torch.empty(numel, dtype=dtype)
    return buffer.pin_memory() if pin else buffer


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
