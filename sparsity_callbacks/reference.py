"""How the reference is held and compared: per-chunk kernels for `exact` and `fingerprint` modes. What
counts as changed is `_rules`; this module applies it chunk by chunk (the hot loop of `measure()` is
`_kernel`, called once per chunk from `SparsityTracker._run_chunk`; eagerly, small tensors go together
through `_kernel_eager` from `SparsityTracker._run_group`).

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
and adds, which `torch.compile` fuses into the measuring loop; eager torch looks the sum of the two
16-bit halves up in a table instead (fewer eager kernels). Both give the same values. In memory the
fingerprints of a chunk are packed into int32 words, planar like the bits (`_pack_words`: word ``[h, j]``
holds rows ``4h..4h+3`` of column ``j`` for k=8; eager code reads and writes them through a byte view,
`_fields_view`); tracker state files keep one per element (`_words_to_elements`), so they do not depend on
the chunk size.

One pass per chunk: `_kernel` converts to the compare dtype, compares, fingerprints, packs and counts
(changed, churn, ever-changed, own-dtype changed, a NaN/inf flag) together; compiled, that is a fused
loop over the chunk's columns.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import time
import warnings

import torch

from sparsity_callbacks._bits import _popcount
from sparsity_callbacks._rules import (
    EXPONENT_MASKS,
    _any_nonfinite,
    _as_bits,
    _bfloat16_high_bits,
    _changed,
    _magnitude,
    _nonfinite_magnitude,
    _to_compare,
)

_log = logging.getLogger("sparsity_callbacks")

_MODULI = {8: 255, 16: 65535}
#: Per-element fingerprint dtype of saved tracker states (`_words_to_elements`); in memory, fingerprints are
#: packed into int32 words (`_fingerprint_words`).
_FINGERPRINT_DTYPES = {8: torch.uint8, 16: torch.int16}
#: Dtype of one fingerprint field of an int32 word (`_fields_view`); k=16 fields hold the residue's raw 16 bits.
_FIELD_DTYPES = {8: torch.uint8, 16: torch.int16}
_SHIFTS_CACHE: dict[torch.device, torch.Tensor] = {}
_RESIDUE_TABLES: dict[torch.device, torch.Tensor] = {}


def _miss_probability(bits: int) -> float:
    """Probability that an unstructured change is not detected by a ``bits``-bit fingerprint."""
    return 1.0 / _MODULI[bits]


def _digit_residue(
    values: torch.Tensor, bits: int, width: int | None = None, below_all_ones: bool = False
) -> torch.Tensor:
    """`_residue` in shifts, masks and adds (int32; the compiled kernel's form, which inductor fuses): the sum
    of the k-bit digits of the unsigned bits (2**k = 1 mod m), folded and reduced without comparisons or
    selects (each costs mask conversions in inductor's vector code). ``width``: the bits that can be set (fewer
    digits to add), e.g. 16 for bfloat16 bits held in int32, which are then non-negative;
    ``below_all_ones``: those ``width`` bits are never all set (bfloat16 bits from `_rules._bfloat16_bits`,
    whose NaN is canonical), which bounds the digit sum below ``2 * m``: no fold."""
    modulus = _MODULI[bits]
    x = _as_bits(values)
    bounded = width is not None  # the caller promises 0 <= x < 2**width: the top digit needs no mask
    width = width or 8 * values.element_size()
    if x.element_size() < 4:
        x = x.to(torch.int32)
    if bits == 8 and width == 32:  # SWAR: byte pairs in two 16-bit lanes, then the lanes
        pairs = (x & 0x00FF00FF) + ((x >> 8) & 0x00FF00FF)
        r = (pairs & 0xFFFF) + (pairs >> 16)
    else:
        r = x & modulus
        for shift in range(bits, width, bits):
            digit = x >> shift
            r = r + (digit if bounded and shift + bits >= width else digit & modulus)
    bound = -(-width // bits) * modulus - int(below_all_ones)  # the largest digit sum
    if bound >= 2 * modulus:  # one fold leaves at most m + bound // 2**k < 2 * m
        r = (r & modulus) + (r >> bits)
        bound = modulus + (bound >> bits)
    if bound >= modulus:  # r - m where r >= m: the smaller of r and (r - m) with a negative made huge
        r = torch.minimum(r, (r - modulus) & 0x7FFFFFFF)
    return r.to(torch.int32)


def _residue(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-element fingerprint value, same shape: (raw bits as an unsigned integer) mod ``2**bits - 1``,
    in ``[0, 2**bits - 2]``, as an integer tensor (int32, or int64 for 32/64-bit input); eager."""
    modulus = _MODULI[bits]
    x = _as_bits(values)
    width = 8 * values.element_size()
    if bits == 8 and width <= 32:
        return _residue_fields(values, bits).to(torch.int32)
    if width < 64:
        # The unsigned value in a wider integer, then one remainder: in [0, m - 1] directly.
        wide = torch.int64 if width == 32 else torch.int32
        return torch.remainder(x.to(wide) & ((1 << width) - 1), modulus)
    # A signed x stands for x + 2**64, and 2**64 = 1 (mod m).
    r = torch.remainder(x, modulus) + (x < 0)
    return torch.where(r == modulus, 0, r)


def _residue_fields(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Eager `_residue` in the dtype of a word's fields (`_FIELD_DTYPES`; for k=16 the int16 holding the
    residue's 16 bits), same shape. For k=8 the sum of the two 16-bit halves (2**16 = 1 mod 255) is looked up
    in a uint8 table of residues: one gather instead of an integer division (measured 2-3x faster than an
    int64 remainder on CPU), and a 1-byte result."""
    x = _as_bits(values)
    width = 8 * values.element_size()
    if bits == 8 and width <= 32:
        if width < 32:
            halves = x.to(torch.int32) & ((1 << width) - 1)
        else:  # x >> 16 sign-extends: mask it to the unsigned high half
            halves = torch.bitwise_right_shift(x, 16).bitwise_and_(0xFFFF).add_(x & 0xFFFF)
        return torch.index_select(_residue_table(x.device), 0, halves.reshape(-1)).view(x.shape)
    return _residue(values, bits).to(_FIELD_DTYPES[bits])


def _residue_table(device: torch.device) -> torch.Tensor:
    """``s mod 255`` for every sum ``s`` of two 16-bit halves (``0 <= s < 2**17``), uint8, cached per device."""
    if device not in _RESIDUE_TABLES:
        table = torch.remainder(torch.arange(1 << 17, dtype=torch.int32), 255).to(torch.uint8)
        _RESIDUE_TABLES[device] = table.to(device)
    return _RESIDUE_TABLES[device]


def _fingerprint(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-element fingerprint (`_residue`) as stored in tracker state files: uint8 (k=8) or int16 (k=16,
    offset by -32768)."""
    return _saved_form(_residue_fields(values, bits), bits)


def _saved_form(fields: torch.Tensor, bits: int) -> torch.Tensor:
    """Fingerprints in the field dtype -> the per-element form of state files: k=8 unchanged; k=16 the residue
    r as ``r - 32768`` (the 16 bits with the top one flipped)."""
    return fields if bits == 8 else fields ^ -32768


def _words_per_row(bits: int) -> int:
    """Fingerprints per int32 word: 4 (k=8) or 2 (k=16)."""
    return 32 // bits


def _field(words: torch.Tensor, row: int, bits: int) -> torch.Tensor:
    """Fingerprints of planar row ``row`` (of 8) from a ``(8 // per, m)`` int32 word block."""
    per = _words_per_row(bits)
    return (words[row // per] >> (bits * (row % per))) & _MODULI[bits]


def _pack_words(rows: list[torch.Tensor], bits: int) -> torch.Tensor:
    """8 rows of ``m`` fingerprints (int32) -> ``(8 // per, m)`` int32 words: word ``[h, j]`` holds the
    fingerprints of elements ``(per * h + q) * m + j`` in its bits ``[bits * q, bits * (q + 1))``."""
    per = _words_per_row(bits)
    words = []
    for h in range(8 // per):
        word = rows[per * h]
        for q in range(1, per):
            word = word | (rows[per * h + q] << (bits * q))
        words.append(word)
    return torch.stack(words)


def _fields_view(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Contiguous int32 words of one chunk (``8 // per * m``, any shape) -> a ``(8 // per, per, m)`` view of
    their fingerprint fields in `_FIELD_DTYPES` (``per`` = `_words_per_row`): ``[h, q, j]`` is the field at
    bits ``[bits * q, bits * (q + 1))`` of word ``[h, j]``, i.e. row ``per * h + q``, column ``j``
    (`_pack_words`). A view, so reading, comparing and storing fingerprints eagerly is a strided byte copy
    instead of shifts and masks on int32 (measured 3x faster). Field ``q`` is byte/half ``q`` of the word on a
    little-endian machine, which every platform torch builds for is."""
    if sys.byteorder != "little":
        raise RuntimeError("sparsity_callbacks' fingerprint layout needs a little-endian machine.")
    per = _words_per_row(bits)
    return words.reshape(-1).view(_FIELD_DTYPES[bits]).view(8 // per, -1, per).permute(0, 2, 1)


def _fingerprint_words(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Fingerprints of a chunk of ``8 * m`` values, packed planar into ``8 * m * bits / 32`` int32 words (the
    layout the kernel reads and writes: one narrowing conversion fewer per element, measured ~1.4x faster)."""
    per = _words_per_row(bits)
    words = torch.empty(values.numel() // per, dtype=torch.int32, device=values.device)
    _fields_view(words, bits).copy_(_residue_fields(values, bits).view(8 // per, per, -1))
    return words


def _words_to_elements(words: torch.Tensor, chunk: int, bits: int) -> torch.Tensor:
    """Word-packed fingerprints of a whole flat tensor (chunks of ``chunk`` elements) -> one per element,
    in element order, as `_fingerprint` gives them (the portable form saved in tracker state files)."""
    step = chunk * bits // 32
    pieces = [
        _saved_form(_fields_view(words[start : start + step], bits).reshape(-1), bits)
        for start in range(0, words.numel(), step)
    ]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=_FINGERPRINT_DTYPES[bits], device=words.device)


def _elements_to_words(elements: torch.Tensor, chunk: int, bits: int) -> torch.Tensor:
    """Inverse of `_words_to_elements`: per-element fingerprints -> word-packed, for chunks of ``chunk``."""
    per = _words_per_row(bits)
    words = torch.empty(elements.numel() // per, dtype=torch.int32, device=elements.device)
    for start in range(0, elements.numel(), chunk):
        fields = _saved_form(elements[start : start + chunk], bits)  # the offset flip is its own inverse
        _fields_view(words[start // per : (start + fields.numel()) // per], bits).copy_(fields.view(8 // per, per, -1))
    return words


def _pack_planar(flags: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Flat bool tensor of ``8 * m`` elements -> ``m`` bytes (into ``out`` when given), element ``b * m + j``
    in bit ``b`` of byte ``j``."""
    shifted = flags.view(8, -1).view(torch.uint8) << _bit_shifts(flags.device)
    return torch.sum(shifted, 0, dtype=torch.uint8, out=out) if out is not None else shifted.sum(0, dtype=torch.uint8)


def _planar_to_bool(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `_pack_planar`: ``m`` bytes -> flat bool tensor of ``8 * m`` elements."""
    return ((packed.view(1, -1) >> _bit_shifts(packed.device)) & 1).reshape(-1).bool()


def _bit_shifts(device: torch.device) -> torch.Tensor:
    """``[[0], [1], ..., [7]]`` (uint8, cached per device): the bit of each planar row."""
    if device not in _SHIFTS_CACHE:
        _SHIFTS_CACHE[device] = torch.arange(8, dtype=torch.uint8, device=device).view(8, 1)
    return _SHIFTS_CACHE[device]


def _pop32(x: torch.Tensor) -> torch.Tensor:
    """Set bits of each element of an int32 tensor holding a byte (0..255): SWAR, int32 throughout."""
    x = x - ((x >> 1) & 0x55)
    x = (x & 0x33) + ((x >> 2) & 0x33)
    return (x + (x >> 4)) & 0x0F


def _kernel(
    current: torch.Tensor,
    reference: torch.Tensor,
    previous: torch.Tensor | None,
    native: torch.Tensor | None,
    ever: torch.Tensor,
    *,
    compare_dtype: torch.dtype,
    fingerprint_reference: bool,
    bits: int,
    atol: float,
    update: bool,
    stored_dtype: torch.dtype | None = None,
    compiled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of ``8 * m`` elements, one pass: the values as stored (``current``, any float dtype) are
    converted to ``compare_dtype`` and compared with the reference by `_rules` (or through their
    fingerprint in fingerprint mode), fingerprinted for churn, and counted.

    ``reference``: ``8 * m`` values in ``compare_dtype`` (exact mode) or word-packed fingerprints
    (`_fingerprint_words`; fingerprint mode). ``previous``: word-packed fingerprints of the previous
    measurement (churn), or None. ``native``: word-packed fingerprints of the reference in the parameters'
    own dtype (with a ``compare_dtype`` that differs from it), or None. ``ever``: ``m`` packed bytes.

    ``stored_dtype``: ``current`` and an exact ``reference`` are raw bits (integer views) and ``atol == 0``:
    rule 2 compares bits, so nothing needs the float values, and compiled code then has no float-to-int
    bitcast in its loop (measured 1.6x faster on CPU). Either ``stored_dtype == compare_dtype``, or float32
    compared in bfloat16: compiled, the conversion is `_rules._bfloat16_bits` in integer lanes (measured
    ~1.3x faster than a float conversion in the loop), and the exact ``reference`` is best passed as
    bfloat16, not as its int16 bits: inductor does not vectorise int16 loads, and one int16 operand made
    the whole fused loop scalar (measured 1.8x slower per `measure()`); bfloat16 widens exactly to float32
    in vector lanes, whose bits hold the bfloat16 bits in their high half.

    The chunk is 8 planar rows of ``m`` (element ``b * m + j`` is row ``b``, column ``j``), so every output
    is an elementwise function of the column: `_kernel_rows` when compiled, `_kernel_eager` eagerly.

    Returns ``(changed, stats)``: packed changed bits (``m`` bytes) and int64 ``stats`` = [changed, some
    element NaN/inf (0/1), churn, ever-changed, changed in the own dtype] counts of the chunk. With
    ``update`` it also ORs changed into ``ever`` and stores the new fingerprints in ``previous`` (in place).
    """
    if not compiled:
        changed, stats = _kernel_eager(
            [(current, reference, previous, native, ever)],
            compare_dtype=compare_dtype,
            fingerprint_reference=fingerprint_reference,
            bits=bits,
            atol=atol,
            update=update,
            stored_dtype=stored_dtype,
        )
        return changed, stats[0]
    rows_options = {}
    if stored_dtype is None:
        values = _to_compare(current, compare_dtype)
        nonfinite = _any_nonfinite(current)
    else:  # no bitcast, and the NaN/inf check fused into the loop over the columns
        nonfinite = _any_nonfinite_columns(current, stored_dtype, ever.shape[0])
        values = current
        if stored_dtype != compare_dtype:  # float32 bits compared in bfloat16: in int32 lanes
            values = _bfloat16_high_bits(current)
            rows_options["high_half"] = True
            if not fingerprint_reference:  # exact: the bfloat16 reference widened, its bits in the high half
                reference = reference.view(torch.bfloat16).to(torch.float32).view(torch.int32)
    changed, counts = _kernel_rows(
        current, values, reference, previous, native, ever, fingerprint_reference, bits, atol, update, **rows_options
    )
    changed_count, churn_count, ever_count, native_count = counts
    return changed, torch.stack([changed_count, nonfinite.to(torch.int64), churn_count, ever_count, native_count])


def _any_nonfinite_columns(bits: torch.Tensor, dtype: torch.dtype, m: int) -> torch.Tensor:
    """`_rules._any_nonfinite` of a chunk of ``8 * m`` values of ``dtype`` given as raw bits (integer view) in
    8 planar rows, exactly (`_rules._nonfinite_magnitude`), without a bitcast: the largest magnitude
    (bits without the sign) over the rows, compared once per column and reduced over the ``m`` columns, which
    inductor fuses into the kernel's loop over the columns (a reduction over all ``8 * m`` elements is a
    second pass over the chunk). NaN or inf iff the magnitude reaches the all-ones exponent."""
    rows = bits.view(8, m)
    magnitude = _magnitude(rows[0])
    for k in range(1, 8):
        magnitude = torch.maximum(magnitude, _magnitude(rows[k]))
    return _nonfinite_magnitude(magnitude, dtype).any()


def _fields_differing(words: torch.Tensor, other: torch.Tensor, bits: int) -> torch.Tensor:
    """Per column: how many of the 8 fingerprint fields differ between two ``(8 // per, m)`` word blocks
    (int32 in [0, 8]). Each field of ``words ^ other`` is ORed down into its lowest bit (shifts within the
    field only), and the fields' bits are added across the words, then across the fields: about a third of
    the ops of comparing field by field."""

    def lowest_bits(h: int) -> torch.Tensor:  # one bit per field of word row h: the field differs
        x = words[h] ^ other[h]
        for shift in (4, 2, 1) if bits == 8 else (8, 4, 2, 1):
            x = x | (x >> shift)
        return x & (0x01010101 if bits == 8 else 0x00010001)

    flags = lowest_bits(0)
    for h in range(1, words.shape[0]):
        flags = flags + lowest_bits(h)
    flags = flags + (flags >> 16)
    if bits == 8:
        flags = flags + (flags >> 8)
    return flags & 0xFF


def _kernel_rows(
    current, values, reference, previous, native, ever, fingerprint_reference, bits, atol, update, high_half=False
):
    """`_kernel`'s compiled form: a loop over the 8 planar rows with flags, counts and fingerprint words in
    int32 lanes, which inductor fuses into loops over ``m`` without a per-element narrowing conversion
    (measured 2x faster than uint8 flags on CPU). ``high_half``: ``values`` are bfloat16 bits in the high half
    of int32 lanes (`_rules._bfloat16_high_bits`), compared as they are with a widened reference and
    fingerprinted from their low 16 bits. Churn and own-dtype changes are counted on packed words
    (`_fields_differing`). Returns packed changed bits and the int64 counts (changed, churn, ever-changed,
    own-dtype changed)."""
    m = ever.shape[0]
    rows, words_shape = values.view(8, m), (8 * bits // 32, m)
    packed = changed_count = None
    fingerprints, owns = [], []
    for k in range(8):
        if fingerprint_reference or previous is not None:
            if high_half:
                fingerprints.append(_digit_residue((rows[k] >> 16) & 0xFFFF, bits, 16, below_all_ones=True))
            else:
                fingerprints.append(_digit_residue(rows[k], bits))
        if fingerprint_reference:
            changed = (fingerprints[k] != _field(reference.view(words_shape), k, bits)).to(torch.int32)
        else:
            changed = _changed(rows[k], reference.view(8, m)[k], atol).to(torch.int32)
        packed = changed if packed is None else packed | (changed << k)
        changed_count = changed if changed_count is None else changed_count + changed
        if native is not None:
            owns.append(_digit_residue(current.view(8, m)[k], bits))
    merged = ever.to(torch.int32) | packed
    ever_count = _pop32(merged).sum(dtype=torch.int64)
    zero = ever.new_zeros((), dtype=torch.int64)
    churn_count = native_count = zero
    if previous is not None:
        new_words = _pack_words(fingerprints, bits)
        churn_count = _fields_differing(new_words, previous.view(words_shape), bits).sum(dtype=torch.int64)
    if native is not None:
        native_count = _fields_differing(_pack_words(owns, bits), native.view(words_shape), bits).sum(dtype=torch.int64)
    if update:
        ever.copy_(merged.to(torch.uint8))
        if previous is not None:
            previous.view(words_shape).copy_(new_words)
    counts = (changed_count.sum(dtype=torch.int64), churn_count, ever_count, native_count)
    return packed.to(torch.uint8), counts


#: Set bits of every byte value (uint8): popcount as one gather.
_BYTE_POPCOUNTS: dict[torch.device, torch.Tensor] = {}


def _byte_popcounts(device: torch.device) -> torch.Tensor:
    if device not in _BYTE_POPCOUNTS:
        table = torch.tensor([bin(v).count("1") for v in range(256)], dtype=torch.uint8)
        _BYTE_POPCOUNTS[device] = table.to(device)
    return _BYTE_POPCOUNTS[device]


def _kernel_eager(
    members: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]],
    *,
    compare_dtype: torch.dtype,
    fingerprint_reference: bool,
    bits: int,
    atol: float,
    update: bool,
    stored_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_kernel`'s eager form, for one chunk or for several small tensors at once: ``members`` are
    ``(current, reference, previous, native, ever)`` of chunks as `_kernel` takes them (several: each a whole
    tensor, with the same options). The elementwise work (conversion, comparison, fingerprints) runs once on
    their concatenation; per member remain the few ops that depend on its planar layout (packing, fingerprint
    fields, counts). Per-op dispatch costs microseconds, so this is what makes a model of many small tensors
    cheap: measured 183 -> 58 us per tensor (400 tensors of 64 elements, CPU). Fingerprints are compared and
    stored in place through `_fields_view`; flags are counted with ``count_nonzero`` (measured 7x faster than
    ``bool.sum()`` on CPU).

    Returns the packed changed bits of every member, concatenated, and int64 stats of shape
    ``(len(members), 5)`` as `_kernel` counts them; the NaN/inf flag is the group's (set on every member
    when any has one: the tracker then counts each member exactly).
    """

    def joined(tensors: list[torch.Tensor]) -> torch.Tensor:
        return tensors[0] if len(tensors) == 1 else torch.cat(tensors)

    current = joined([member[0] for member in members])
    reference = None if fingerprint_reference else joined([member[1] for member in members])
    stored = current if stored_dtype is None else current.view(stored_dtype)  # raw bits: a view is free
    nonfinite = _any_nonfinite(stored)
    # the conversion's NaN check is this same reduction: reuse it where reading it costs no device sync
    finite = not bool(nonfinite) if current.device.type == "cpu" else None
    values = current
    if stored_dtype is None:
        values = _to_compare(current, compare_dtype, finite)
    elif stored_dtype != compare_dtype:
        values = _as_bits(_to_compare(stored, compare_dtype, finite))
        reference = None if reference is None else _as_bits(reference)
    per = _words_per_row(bits)
    # (empty when nothing reads them)
    fingerprints = own = current.new_empty(0, dtype=_FIELD_DTYPES[bits])
    if fingerprint_reference or any(member[2] is not None for member in members):
        fingerprints = _residue_fields(values, bits)
    if any(member[3] is not None for member in members):
        own = _residue_fields(current, bits)
    if reference is None:
        flags = torch.empty(current.shape, dtype=torch.bool, device=current.device)
    else:
        flags = _changed(values, reference, atol)
    packed = torch.empty(current.numel() // 8, dtype=torch.uint8, device=current.device)
    zero = packed.new_zeros((), dtype=torch.int64)
    counts: list[torch.Tensor] = []
    start = 0
    for _, member_reference, previous, native, ever in members:
        m = ever.shape[0]
        at, bytes_at, fields_shape = slice(start, start + 8 * m), slice(start // 8, start // 8 + m), (8 // per, per, m)
        start += 8 * m
        if fingerprint_reference:  # the contiguous operand first: the result is laid out like it
            torch.ne(
                fingerprints[at].view(fields_shape),
                _fields_view(member_reference, bits),
                out=flags[at].view(fields_shape),
            )
        _pack_planar(flags[at], out=packed[bytes_at])
        churn_count = native_count = zero
        if previous is not None:
            churn_count = torch.count_nonzero(
                torch.ne(fingerprints[at].view(fields_shape), _fields_view(previous, bits))
            )
        if native is not None:
            native_count = torch.count_nonzero(torch.ne(own[at].view(fields_shape), _fields_view(native, bits)))
        if update:
            ever.bitwise_or_(packed[bytes_at])
            if previous is not None:
                _fields_view(previous, bits).copy_(fingerprints[at].view(fields_shape))
        counts += [torch.count_nonzero(flags[at]), churn_count, native_count]
    evers = [member[4] for member in members]
    ever_counts = _segment_popcounts(joined(evers), [ever.numel() for ever in evers])
    stats = torch.stack(counts).view(-1, 3)
    group_nonfinite = nonfinite.to(torch.int64).expand(len(members))
    return packed, torch.stack([stats[:, 0], group_nonfinite, stats[:, 1], ever_counts, stats[:, 2]], dim=1)


def _segment_popcounts(packed: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Set bits in each of consecutive segments of ``lengths`` bytes of ``packed``: int64, one per segment
    (a table gather and one cumulative sum for all segments)."""
    if len(lengths) == 1:
        return _popcount(packed).view(1)
    per_byte = torch.index_select(_byte_popcounts(packed.device), 0, packed.to(torch.int32))
    running = torch.cumsum(per_byte, 0, dtype=torch.int64)
    ends = torch.tensor(lengths, device=packed.device).cumsum(0)
    totals = torch.cat([running.new_zeros(1), running])[ends]
    return torch.diff(totals, prepend=totals.new_zeros(1))


#: Variants of `_kernel` (dtypes, options, size specialisations) one process may compile. torch's default
#: limit, 8 per function, silently runs every further variant eagerly (a process with several trackers, or
#: this project's test suite, reached it); raising it only allows more compilations.
_RECOMPILE_LIMIT = 64


@functools.cache
def _compiled_kernel():
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    setattr(config, name, max(getattr(config, name), _RECOMPILE_LIMIT))
    return torch.compile(_compiled_form, dynamic=True)


def _compiled_form(*args, **kwargs):
    """`_kernel`'s compiled form, selected explicitly: torch.compiler.is_compiling() is process-wide, so
    while the background thread compiles, it would also send the training thread's eager calls there. (Its
    code object holds the compiled variants: `_RECOMPILE_LIMIT`.)"""
    return _kernel(*args, compiled=True, **kwargs)


#: Seconds one compilation of `_kernel` is taken to cost until one was measured in this process.
_COMPILE_SECONDS_ESTIMATE = 10.0
#: Eager measurements faster than this are per-call Python overhead, which compiling does not remove:
#: they do not count towards paying for a compilation (a tiny model measured thousands of times).
_PYTHON_BOUND_SECONDS = 0.02
_measured_compile_seconds: list[float] = []


class _KernelRunner:
    """Runs `_kernel` eagerly or compiled.

    ``use_compile``: True compiles at the first call; False never compiles; None decides by measurement
    (rent-or-buy): measurements run eagerly and their time is added up; once it reaches the cost of one
    compilation (the last one measured in this process, else `_COMPILE_SECONDS_ESTIMATE`), the kernel is
    compiled on a background thread (off the training thread's critical path) and used from the first
    measurement after it is ready. Total cost is then at most about twice the better of "never compile"
    and "compile at once", without knowing the number of measurements in advance: a small model measured
    a few times never compiles, a large one measured often compiles early. Measurements faster than
    `_PYTHON_BOUND_SECONDS` do not count. A failed compilation warns once and stays eager.
    """

    def __init__(self, use_compile: bool | None) -> None:
        self.use_compile = use_compile
        self.compiled = False  # the compiled kernel is ready and used
        self.eager_seconds = 0.0
        self._thread: threading.Thread | None = None
        self._failure: str | None = None

    def __call__(self, *args, **kwargs):
        if self._failure is not None:
            warnings.warn(
                f"torch.compile of the sparsity kernel failed ({self._failure}); measuring eagerly (slower). "
                "Set compile=False to silence this.",
                stacklevel=3,
            )
            self._failure = None
        # The warmed-up graph is the measuring one (update=True); another variant would compile on this
        # thread, so under the measured decision `changed_mask` (update=False) stays eager.
        if self.use_compile is True or (self.compiled and kwargs.get("update", True)):
            try:
                out = _compiled_kernel()(*args, **kwargs)
                self.compiled = True
                return out
            except Exception as err:  # inductor needs a C++ compiler; never fail a training run for speed
                warnings.warn(
                    f"torch.compile of the sparsity kernel failed ({type(err).__name__}: {err}); "
                    "measuring eagerly (slower). Set compile=False to silence this.",
                    stacklevel=3,
                )
                self.use_compile = False
                self.compiled = False
        return _kernel(*args, **kwargs)

    def record_eager(self, seconds: float, warm_up) -> None:
        """Add the wall time of one eager measurement; start the background compilation once the eager
        time spent reaches the cost of compiling. ``warm_up()`` runs the compiled kernel on small inputs
        of every signature the tracker uses."""
        if self.use_compile is not None or self.compiled or self._thread is not None:
            return
        if seconds < _PYTHON_BOUND_SECONDS:
            return
        self.eager_seconds += seconds
        cost = _measured_compile_seconds[-1] if _measured_compile_seconds else _COMPILE_SECONDS_ESTIMATE
        if self.eager_seconds < cost:
            return
        # Not a daemon: the interpreter waits for it at exit. A daemon thread still inside inductor's C++
        # when Python finalises aborts the process ("terminate called without an active exception").
        self._thread = threading.Thread(target=self._compile, args=(warm_up,), name="sparsity-compile", daemon=False)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for a background compilation started by `record_eager`; True when the compiled kernel is in use."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.compiled

    def _compile(self, warm_up) -> None:
        start = time.perf_counter()
        try:
            warm_up()
        except Exception as err:
            self._failure = f"{type(err).__name__}: {err}"
            self.use_compile = False
            return
        _measured_compile_seconds.append(time.perf_counter() - start)
        self.compiled = True
        _log.info("sparsity_callbacks: measurement kernel compiled in %.1f s", _measured_compile_seconds[-1])


def _bits_input(current_dtype: torch.dtype, compare_dtype: torch.dtype, atol: float) -> bool:
    """True when a chunk can reach `_kernel` as raw bits (``stored_dtype``): no atol, and no conversion or
    the one from float32 to bfloat16 (`_rules._bfloat16_bits`)."""
    converts = current_dtype == torch.float32 and compare_dtype == torch.bfloat16
    return atol == 0 and current_dtype in EXPONENT_MASKS and (current_dtype == compare_dtype or converts)


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
