"""Memory policy: the bytes each mode needs, the host RAM and device memory available, and which mode
(``exact`` or ``fingerprint``) a `SparsityTracker` uses. Raises `MemoryError` with the numbers and the
alternatives when the requested mode cannot fit."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from sparsity_callbacks.config import SparsityConfig
from sparsity_callbacks.params import _TrackedTensor
from sparsity_callbacks.reference import _padded

HOST_RAM_LIMIT_ENV = "SPARSITY_CALLBACKS_HOST_RAM_LIMIT"


def _available_host_bytes() -> int:
    """Host RAM available to this process now, in bytes: MemAvailable on Linux, capped by the environment
    variable ``SPARSITY_CALLBACKS_HOST_RAM_LIMIT`` (bytes; e.g. a container's share, or a test) when set."""
    limit = os.environ.get(HOST_RAM_LIMIT_ENV)
    available = _system_available_bytes()
    if limit:
        try:
            value = int(float(limit))
        except ValueError:
            raise ValueError(f"{HOST_RAM_LIMIT_ENV}={limit!r} must be a number of bytes (e.g. 8e9).") from None
        if value < 0:
            raise ValueError(f"{HOST_RAM_LIMIT_ENV}={limit!r} must be >= 0 bytes.")
        available = min(available, value)
    return available


def _system_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _human(n: float) -> str:
    """Bytes as GiB with the exact byte count (so small numbers never read as a bare "0.00 GiB")."""
    return f"{n / 2**30:.2f} GiB ({int(n):,} bytes)"


def _choose_mode(
    config: SparsityConfig, tracked: Sequence[_TrackedTensor], dtypes: Sequence[torch.dtype]
) -> tuple[str, str]:
    """``(mode, reason)`` for ``tracked`` compared in ``dtypes`` (one per tensor) under ``config``."""
    cfg = config
    need = sum(_padded(t.local().numel()) * dtype.itemsize for t, dtype in zip(tracked, dtypes))
    if cfg.reference_dir is not None:
        if cfg.mode == "fingerprint":
            return "fingerprint", "mode='fingerprint' requested (reference_dir is ignored)"
        return "exact", f"exact reference memory-mapped in {cfg.reference_dir} ({_human(need)} on disk)"
    available = _available_host_bytes()
    text = (
        f"{need / 2**30:.2f} GiB of host RAM needed for an exact reference ({need:,} bytes), "
        f"{_human(available)} available"
    )
    if os.environ.get(HOST_RAM_LIMIT_ENV):
        text += f" ({HOST_RAM_LIMIT_ENV}={os.environ[HOST_RAM_LIMIT_ENV]})"
    if cfg.mode == "fingerprint":
        _check_device_memory(config, tracked)
        return "fingerprint", "mode='fingerprint' requested"
    if cfg.mode == "exact":
        if need > 0.9 * available:
            raise MemoryError(
                f"mode='exact' cannot fit: {text}. HINT: use mode='fingerprint' "
                f"({cfg.fingerprint_bits // 8} byte(s) per element on the device), or reference_dir=<a folder on "
                "a disk with room> for a memory-mapped exact reference."
            )
        return "exact", f"mode='exact' requested; {text}"
    if need <= 0.5 * available:
        return "exact", f"auto: {text}"
    if cfg.atol > 0:
        raise MemoryError(
            f"atol={cfg.atol} needs an exact reference, which cannot fit: {text}. HINT: set "
            "reference_dir=<folder> for a memory-mapped reference, or atol=0 with mode='fingerprint'."
        )
    _check_device_memory(config, tracked)
    return "fingerprint", f"auto: {text} (more than half), so {cfg.fingerprint_bits}-bit fingerprints on the device"


def _check_device_memory(config: SparsityConfig, tracked: Sequence[_TrackedTensor]) -> None:
    """``fingerprint`` keeps its state on the parameters' device: check it fits in the free CUDA memory."""
    bytes_per_element = config.fingerprint_bits / 8 * (1 + config.track_churn) + 1 / 8
    need: dict[torch.device, float] = {}
    for t in tracked:
        device = t.local().device
        if device.type == "cuda":
            need[device] = need.get(device, 0.0) + _padded(t.local().numel()) * bytes_per_element
    for device, needed in need.items():
        free, _ = torch.cuda.mem_get_info(device)
        if needed > 0.9 * free:
            raise MemoryError(
                f"mode='fingerprint' cannot fit on {device}: {needed / 2**30:.2f} GiB needed, "
                f"{free / 2**30:.2f} GiB free. HINT: fingerprint_bits=8, track_churn=False, mode='exact' "
                "(host RAM) with reference_dir for a memory-mapped reference, "
                "or track fewer tensors with include/exclude."
            )
