"""sparsity_callbacks: see and use the sparse subnetwork that RL fine-tuning updates."""

from sparsity_callbacks.config import SparsityConfig
from sparsity_callbacks.freeze import MaskFreezer
from sparsity_callbacks.masks import Mask, Overlap
from sparsity_callbacks.measurement import Measurement, TensorCounts
from sparsity_callbacks.tracker import SparsityTracker

# `SparsityCallback` is importable by name (lazily, below) but not in `__all__`: `import *` imports no framework.
__all__ = [
    "Mask",
    "MaskFreezer",
    "Measurement",
    "Overlap",
    "SparsityConfig",
    "SparsityTracker",
    "TensorCounts",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # `from sparsity_callbacks import SparsityCallback` is the HF/TRL callback, imported only on use so
    # that the core needs torch alone.
    if name == "SparsityCallback":
        from sparsity_callbacks.integrations.transformers import SparsityCallback

        return SparsityCallback
    raise AttributeError(f"module 'sparsity_callbacks' has no attribute {name!r}")
