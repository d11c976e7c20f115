"""What "changed" means, in one place: the compare rules that `SparsityTracker`, `diff_checkpoints`,
`Mask` signatures and `MaskFreezer` all use.

The rules (``current`` vs ``reference``, element by element):

1. **Compare dtype.** Both are compared in one dtype: the stored dtype, or ``compare_dtype`` when set.
   Converting uses torch's own ``Tensor.to`` (round to nearest even). A conversion that changes the dtype
   maps every NaN to the compare dtype's canonical quiet NaN (``0x7FC0`` in bfloat16, ``0x7FC00000`` in
   float32): torch keeps NaN payloads on some code paths and not on others (contiguous vs strided input),
   so a payload that survived a cast would depend on memory layout. Values stored in the compare dtype
   are not converted and keep their payloads.
2. **atol == 0: changed iff the bits differ** (in the compare dtype). So ``+0.0 -> -0.0`` is a change,
   a NaN whose payload changes (``0x7FC00000 -> 0x7FC00001``) is a change, a NaN or an inf that keeps its
   bits is not, and subnormals are values like any other (no flush to zero). Fingerprint mode detects
   exactly these changes, up to its miss probability.
3. **atol > 0: changed iff the bits differ and not ``|current - reference| <= atol``**, with the
   difference taken in float64 (exact for inputs of 32 bits or less, and float64 itself for float64):
   ``+0.0 -> -0.0`` and a finite step of at most ``atol`` are unchanged; a NaN on either side whose bits
   differ, and ``inf -> -inf``, are changed. The ``atol`` mask is therefore a subset of the exact mask.
4. **Non-finite elements** are counted on the current values as stored (before any conversion).
5. **Signatures**: a tensor's content hash is its shape and up to 4096 evenly spaced elements converted
   to bfloat16 by rule 1, so fp32 and bf16 copies of the same weights agree.

Every function here works on flat chunks and is written so that ``torch.compile`` can fuse it.
"""

from __future__ import annotations

import hashlib

import torch

# Integer dtype of each element size: the raw bits of a float tensor, viewed without a copy.
INT_OF_SIZE: dict[int, torch.dtype] = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# The dtypes values can be compared in (``SparsityConfig.compare_dtype``, ``diff --compare-dtype``).
COMPARE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
SIGNATURE_SAMPLES = 4096


def _as_bits(values: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor as integers of the same width (same shape, no copy)."""
    return values.view(INT_OF_SIZE[values.element_size()])


def _to_compare(values: torch.Tensor, dtype: torch.dtype, finite: bool | None = None) -> torch.Tensor:
    """``values`` in the compare dtype (rule 1): unchanged when already in it, else ``Tensor.to`` with
    every NaN made the canonical quiet NaN. ``finite``: the caller already knows whether every element is
    finite (e.g. from `_any_nonfinite`); None checks with one reduction where that costs no device sync."""
    if values.dtype == dtype:
        return values
    converted = values.to(dtype)
    if finite is None:
        finite = (
            values.device.type == "cpu"
            and values.element_size() > 1
            and not torch.compiler.is_compiling()
            and bool(torch.isfinite(values.sum()))
        )
    if finite:
        return converted  # no NaN in `values`: nothing to canonicalise
    return converted.masked_fill_(converted.isnan(), float("nan"))


def _bfloat16_bits(float32_bits: torch.Tensor) -> torch.Tensor:
    """Rule 1 on raw bits: float32 bits (int32) -> the bits of their bfloat16 conversion, as int32 in
    ``[0, 2**16)``: round to nearest even (what ``Tensor.to`` does), every NaN the canonical ``0x7FC0``.
    Integer arithmetic only, so a compiled loop needs no float conversion (`tests/test_kernel_rules.py`
    checks it against ``Tensor.to`` on every special case)."""
    return (_bfloat16_high_bits(float32_bits) >> 16) & 0xFFFF


def _bfloat16_high_bits(float32_bits: torch.Tensor) -> torch.Tensor:
    """`_bfloat16_bits` in the high half of int32 lanes (low half zero): the float32 bits of the converted value
    (bfloat16 widens exactly). The compiled kernel compares and fingerprints this form: two ops fewer than
    shifting the result down."""
    u = float32_bits
    rounded = (u + (0x7FFF + ((u >> 16) & 1))) & -65536  # round to nearest even in the high half
    return torch.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC00000, rounded)


def _representable(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool per element: ``values`` converted to ``dtype`` and back give the same value, so a comparison in
    ``dtype`` starts from the element's own value (NaN and inf count as representable)."""
    if values.dtype == dtype:
        return torch.ones_like(values, dtype=torch.bool)
    return (values.to(dtype).to(values.dtype) == values) | values.isnan()


def _bits_differ(current: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Bool per element: the bits differ (rule 2). Both in the same dtype."""
    return _as_bits(current) != _as_bits(reference)


def _abs_delta(current: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``|current - reference|`` in float64 (rule 3): exact for inputs of 32 bits or less."""
    return (current.double() - reference.double()).abs()


def _beyond_atol(current: torch.Tensor, reference: torch.Tensor, atol: float) -> torch.Tensor:
    """Bool per element: not ``|current - reference| <= atol`` in float64 (true where NaN is involved)."""
    return ~(_abs_delta(current, reference) <= atol)


def _changed(current: torch.Tensor, reference: torch.Tensor, atol: float) -> torch.Tensor:
    """Bool per element: changed by rules 2 and 3. Both in the compare dtype, same shape."""
    differ = _bits_differ(current, reference)
    if atol == 0:
        return differ
    return differ & _beyond_atol(current, reference, atol)


def _any_nonfinite(values: torch.Tensor) -> torch.Tensor:
    """0-d bool tensor on ``values``' device (no sync): some element may be NaN or +-inf. One reduction:
    NaN/inf anywhere makes the sum non-finite; a sum that overflows only asks for the exact count."""
    if values.element_size() == 1:  # float8: no sum kernel
        values = values.float()
    return ~torch.isfinite(values.sum())


#: Exponent bits of the float dtypes whose raw bits `_nonfinite_magnitude` reads (all ones: NaN or +-inf).
EXPONENT_MASKS: dict[torch.dtype, int] = {
    torch.float32: 0x7F800000,
    torch.bfloat16: 0x7F80,
    torch.float16: 0x7C00,
    torch.float64: 0x7FF0000000000000,
}


def _magnitude(bits: torch.Tensor) -> torch.Tensor:
    """Raw float bits (integer view) without the sign bit, same dtype."""
    return bits & ((1 << (8 * bits.element_size() - 1)) - 1)


def _nonfinite_magnitude(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool per element of `_magnitude` bits of ``dtype``: an all-ones exponent (NaN or +-inf), i.e. the
    magnitude reaches ``EXPONENT_MASKS[dtype]`` (so the largest of several magnitudes answers for all)."""
    return magnitude >= EXPONENT_MASKS[dtype]


def _count_nonfinite(values: torch.Tensor) -> int:
    """NaN and +-inf elements of ``values`` (rule 4): one reduction, an exact count only when needed."""
    if not bool(_any_nonfinite(values)):
        return 0
    return int((~torch.isfinite(values)).sum())


# --- signatures (rule 5) --------------------------------------------------------------------------
def _signature_positions(numel: int, samples: int = SIGNATURE_SAMPLES) -> torch.Tensor:
    """Flat positions a signature samples: every ``max(1, numel // samples)``-th, at most ``samples``."""
    stride = max(1, numel // samples)
    return torch.arange(0, numel, stride, dtype=torch.int64)[:samples]


def _signature_bits(samples: torch.Tensor) -> torch.Tensor:
    """Sampled values (any float dtype, any device) -> their bfloat16 bits (int16, CPU), by rule 1."""
    return _as_bits(_to_compare(samples.detach().to("cpu").reshape(-1).contiguous(), torch.bfloat16))


def _signature_digest(shape: tuple[int, ...], sample_bits: torch.Tensor) -> str:
    """Digest of the shape and the samples' bfloat16 bits (int16, in position order)."""
    digest = hashlib.sha256(str(tuple(shape)).encode())
    digest.update(sample_bits.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _tensor_signature(tensor: torch.Tensor, samples: int = SIGNATURE_SAMPLES) -> str:
    """Short content hash of ``tensor``: its shape and up to ``samples`` evenly spaced elements in
    bfloat16 (rule 5). Cheap on any size. A sharded parameter gets the signature of its full tensor
    (`SparsityTracker` gathers the samples)."""
    flat = tensor.detach().reshape(-1)
    stride = max(1, flat.numel() // samples)
    return _signature_digest(tuple(tensor.shape), _signature_bits(flat[::stride][:samples]))
