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
on the unsigned value instead (fewer eager kernels). Both give the same values.

One pass per chunk: `_kernel` converts to the compare dtype, compares, fingerprints, packs and counts
(changed, churn, ever-changed, a NaN/inf flag) together; compiled, that is one fused loop over the chunk.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import warnings

import torch

from sparsity_callbacks._bits import _popcount
from sparsity_callbacks._rules import (
    EXPONENT_MASKS,
    _any_nonfinite,
    _any_nonfinite_bits,
    _as_bits,
    _changed,
    _to_compare,
)

_log = logging.getLogger("sparsity_callbacks")

_MODULI = {8: 255, 16: 65535}
#: Per-element fingerprint dtype of saved tracker states (`_words_to_elements`); in memory, fingerprints are
#: packed into int32 words (`_fingerprint_words`).
_FINGERPRINT_DTYPES = {8: torch.uint8, 16: torch.int16}
_SHIFTS_CACHE: dict[torch.device, torch.Tensor] = {}


def _miss_probability(bits: int) -> float:
    """Probability that an unstructured change is not detected by a ``bits``-bit fingerprint."""
    return 1.0 / _MODULI[bits]


def _residue(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-element fingerprint value, same shape: (raw bits as an unsigned integer) mod ``2**bits - 1``,
    in ``[0, 2**bits - 2]``, as an integer tensor (int32, or int64 for eager 32/64-bit input)."""
    modulus = _MODULI[bits]
    x = _as_bits(values)
    width = 8 * values.element_size()
    if torch.compiler.is_compiling():
        if width < 32:
            x = x.to(torch.int32)
        # Sum of the k-bit digits of the unsigned bits (2**k = 1 mod m), folded twice to at most m.
        r = x & modulus
        for shift in range(bits, width, bits):
            r = r + ((x >> shift) & modulus)
        r = (r & modulus) + (r >> bits)
        r = (r & modulus) + (r >> bits)
        return torch.where(r >= modulus, r - modulus, r).to(torch.int32)
    if width < 64:
        # The unsigned value in a wider integer, then one remainder: in [0, m - 1] directly (measured
        # 1.6x faster than the signed remainder with its two corrections).
        wide = torch.int64 if width == 32 else torch.int32
        return torch.remainder(x.to(wide) & ((1 << width) - 1), modulus)
    # A signed x stands for x + 2**64, and 2**64 = 1 (mod m).
    r = torch.remainder(x, modulus) + (x < 0)
    return torch.where(r == modulus, 0, r)


def _fingerprint(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-element fingerprint (`_residue`) as stored in tracker state files: uint8 (k=8) or int16 (k=16,
    offset by -32768)."""
    r = _residue(values, bits)
    if bits == 8:
        return r.to(torch.uint8)
    return (r - 32768).to(torch.int16)


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


def _fingerprint_words(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Fingerprints of a chunk of ``8 * m`` values, packed planar into ``8 * m * bits / 32`` int32 words (the
    layout the kernel reads and writes: one narrowing conversion fewer per element, measured ~1.4x faster)."""
    rows = _residue(values, bits).to(torch.int32).view(8, -1)
    return _pack_words(list(rows), bits).reshape(-1)


def _words_to_elements(words: torch.Tensor, chunk: int, bits: int) -> torch.Tensor:
    """Word-packed fingerprints of a whole flat tensor (chunks of ``chunk`` elements) -> one per element,
    in element order, as `_fingerprint` gives them (the portable form saved in tracker state files)."""
    ratio = 32 // bits
    pieces = []
    for start in range(0, words.numel(), chunk // ratio):
        block = words[start : start + chunk // ratio].view(8 // ratio, -1)
        rows = torch.stack([_field(block, k, bits) for k in range(8)]).reshape(-1)
        pieces.append(rows.to(torch.uint8) if bits == 8 else (rows - 32768).to(torch.int16))
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=_FINGERPRINT_DTYPES[bits], device=words.device)


def _elements_to_words(elements: torch.Tensor, chunk: int, bits: int) -> torch.Tensor:
    """Inverse of `_words_to_elements`: per-element fingerprints -> word-packed, for chunks of ``chunk``."""
    values = elements.to(torch.int32) if bits == 8 else elements.to(torch.int32) + 32768
    pieces = [_pack_words(list(values[i : i + chunk].view(8, -1)), bits).reshape(-1) for i in range(0, values.numel(), chunk)]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int32, device=elements.device)


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of ``8 * m`` elements, one pass: the values as stored (``current``, any float dtype) are
    converted to ``compare_dtype`` and compared with the reference by `_rules` (or through their
    fingerprint in fingerprint mode), fingerprinted for churn, and counted.

    ``reference``: ``8 * m`` values in ``compare_dtype`` (exact mode) or word-packed fingerprints
    (`_fingerprint_words`; fingerprint mode). ``previous``: word-packed fingerprints of the previous
    measurement (churn), or None. ``native``: word-packed fingerprints of the reference in the parameters'
    own dtype (with a ``compare_dtype`` that differs from it), or None. ``ever``: ``m`` packed bytes.

    ``stored_dtype``: ``current`` (and an exact ``reference``) are the raw bits (integer views) of values
    stored in ``stored_dtype`` == ``compare_dtype``, with ``atol == 0``: rule 2 compares bits, so nothing
    needs the float values, and compiled code then has no float-to-int bitcast in its loop (measured
    1.6x faster on CPU).

    The chunk is processed as 8 planar rows of ``m`` (element ``b * m + j`` is row ``b``, column ``j``), so
    every output is an elementwise function of the column: compiled, one loop over ``m`` with flags, counts
    and words in int32 lanes (no per-element narrowing conversion); eager, whole-row tensor ops.

    Returns ``(changed, stats)``: packed changed bits (``m`` bytes) and int64 ``stats`` = [changed, some
    element NaN/inf (0/1), churn, ever-changed, changed in the own dtype] counts of the chunk. With
    ``update`` it also ORs changed into ``ever`` and stores the new fingerprints in ``previous`` (in place).
    """
    compiling = torch.compiler.is_compiling()
    m = ever.shape[0]
    values = current if stored_dtype is not None else _to_compare(current, compare_dtype)
    rows = values.view(8, m)
    fingerprints = None  # eager: all 8 rows at once
    if (fingerprint_reference or previous is not None) and not compiling:
        fingerprints = _residue(values, bits).to(torch.int32).view(8, m)
    own = _residue(current, bits).to(torch.int32).view(8, m) if native is not None and not compiling else None
    words_shape = (8 * bits // 32, m)
    flag = torch.int32 if compiling else torch.uint8
    packed = changed_count = churn_count = native_count = None
    new_rows = []
    for k in range(8):
        fingerprint = None
        if fingerprints is not None or (compiling and (fingerprint_reference or previous is not None)):
            fingerprint = fingerprints[k] if fingerprints is not None else _residue(rows[k], bits)
            new_rows.append(fingerprint)
        if fingerprint_reference:
            changed = fingerprint != _field(reference.view(words_shape), k, bits)
        else:
            changed = _changed(rows[k], reference.view(8, m)[k], atol)
        bit = changed.to(flag) << k
        packed = bit if packed is None else packed | bit
        counts = [changed]
        if previous is not None:
            counts.append(fingerprint != _field(previous.view(words_shape), k, bits))
        if native is not None:
            own_row = own[k] if own is not None else _residue(current.view(8, m)[k], bits)
            counts.append(own_row != _field(native.view(words_shape), k, bits))
        # compiled: int32 lanes summed once at the end; eager: one reduction per row
        row_counts = [c.to(torch.int32) if compiling else c.sum() for c in counts]
        changed_count = row_counts[0] if changed_count is None else changed_count + row_counts[0]
        if previous is not None:
            churn_count = row_counts[1] if churn_count is None else churn_count + row_counts[1]
        if native is not None:
            native_count = row_counts[-1] if native_count is None else native_count + row_counts[-1]
    zero = ever.new_zeros((), dtype=torch.int64)
    if compiling:
        merged = ever.to(torch.int32) | packed
        ever_count = _pop32(merged).sum()
        if update:
            ever.copy_(merged.to(torch.uint8))
        changed_out = packed.to(torch.uint8)
    else:
        changed_out = packed
        if update:
            ever.bitwise_or_(packed)
        ever_count = _popcount(ever)
    if update and previous is not None:
        previous.view(words_shape).copy_(_pack_words(new_rows, bits))
    if stored_dtype is None:
        nonfinite = _any_nonfinite(current)
    elif compiling:
        nonfinite = _any_nonfinite_bits(current, stored_dtype)
    else:
        nonfinite = _any_nonfinite(current.view(stored_dtype))  # eager: a view is free, a sum one pass
    stats = torch.stack(
        [
            changed_count.sum().to(torch.int64),
            nonfinite.to(torch.int64),
            zero if churn_count is None else churn_count.sum().to(torch.int64),
            ever_count.to(torch.int64),
            zero if native_count is None else native_count.sum().to(torch.int64),
        ]
    )
    return changed_out, stats


@functools.cache
def _compiled_kernel():
    return torch.compile(_kernel, dynamic=True)


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
    """True when a chunk can reach `_kernel` as raw bits (``stored_dtype``): no conversion, no atol."""
    return current_dtype == compare_dtype and atol == 0 and current_dtype in EXPONENT_MASKS


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
