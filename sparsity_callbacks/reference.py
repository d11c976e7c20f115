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
        r = torch.where(r == modulus, 0, r)
    elif width < 64:
        # The unsigned value in a wider integer, then one remainder: in [0, m - 1] directly (measured
        # 1.6x faster than the signed remainder with its two corrections).
        wide = torch.int64 if width == 32 else torch.int32
        r = torch.remainder(x.to(wide) & ((1 << width) - 1), modulus)
    else:
        # A signed x stands for x + 2**64, and 2**64 = 1 (mod m).
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
    compare_dtype: torch.dtype,
    fingerprint_reference: bool,
    bits: int,
    atol: float,
    update: bool,
    stored_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One chunk of ``8 * m`` elements, one pass: the values as stored (``current``, any float dtype) are
    converted to ``compare_dtype`` and compared with the reference by `_rules` (or through their
    fingerprint in fingerprint mode), fingerprinted for churn, and counted.

    ``stored_dtype``: ``current`` (and an exact ``reference``) are the raw bits (integer views) of values
    stored in ``stored_dtype`` == ``compare_dtype``, with ``atol == 0``: rule 2 compares bits, so nothing
    needs the float values, and compiled code then has no float-to-int bitcast in its loop (measured
    1.6x faster on CPU).

    Returns ``(changed, churn, stats)``: packed changed bits (``m`` bytes), packed churn bits or None,
    and int64 ``stats`` = [changed, some element NaN/inf (0/1), churn, ever-changed] counts of the chunk.
    With ``update`` it also ORs changed into ``ever`` and stores the fingerprint in ``previous`` (in place).
    """
    values = current if stored_dtype is not None else _to_compare(current, compare_dtype)
    fingerprint = _fingerprint(values, bits) if (fingerprint_reference or previous is not None) else None
    if fingerprint_reference:
        assert fingerprint is not None
        changed = _pack_planar(fingerprint != reference)
    else:
        changed = _pack_planar(_changed(values, reference, atol))
    churn = None
    churn_count = changed.new_zeros((), dtype=torch.int64)
    if previous is not None:
        assert fingerprint is not None
        churn = _pack_planar(fingerprint != previous)
        churn_count = _popcount(churn)
        if update:
            previous.copy_(fingerprint)
    if update:
        ever.bitwise_or_(changed)
    if stored_dtype is None:
        nonfinite = _any_nonfinite(current)
    elif torch.compiler.is_compiling():
        nonfinite = _any_nonfinite_bits(current, stored_dtype)
    else:
        nonfinite = _any_nonfinite(current.view(stored_dtype))  # eager: a view is free, a sum one pass
    stats = torch.stack([_popcount(changed), nonfinite.to(torch.int64), churn_count, _popcount(ever)])
    return changed, churn, stats


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
