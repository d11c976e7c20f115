"""The public surface: what `import *` pulls in, the attributes both framework adapters share, what
`MaskFreezer(tracked=...)` accepts, and the one place that reads transformers' internals."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

from sparsity_callbacks import Mask, MaskFreezer, SparsityTracker

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAMEWORKS = ("transformers", "lightning", "pytorch_lightning", "mlflow", "trl", "matplotlib", "rich")


def test_import_star_imports_no_framework():
    code = (
        "import sys, json\n"
        "from sparsity_callbacks import *\n"
        f"print(json.dumps(sorted(m for m in {FRAMEWORKS!r} if m in sys.modules)))\n"
        "print(json.dumps(sorted(k for k in dir() if not k.startswith('_'))))\n"
    )
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    loaded, names = (json.loads(line) for line in proc.stdout.splitlines()[-2:])
    assert loaded == []
    assert {"SparsityTracker", "Mask", "MaskFreezer", "SparsityConfig", "Measurement"} <= set(names)


def test_both_adapters_expose_the_same_read_only_attributes():
    from sparsity_callbacks.integrations.lightning import SparsityCallback as LightningCallback
    from sparsity_callbacks.integrations.transformers import SparsityCallback as HFCallback

    views = {"tracker", "freezer", "last_measurement", "run_id"}
    for cls in (HFCallback, LightningCallback):
        callback = cls()
        for name in views:
            assert isinstance(inspect.getattr_static(cls, name), property), (cls, name)
            assert getattr(callback, name) is None  # before training
            with pytest.raises(AttributeError):
                setattr(callback, name, 1)
        assert not hasattr(callback, "session")  # the engine glue is private


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


def test_mask_freezer_takes_names_or_parameters():
    model = _model()
    mask = Mask({n: torch.rand(p.shape) < 0.5 for n, p in model.named_parameters()})
    tracker = SparsityTracker(model, mode="exact")
    by_name = MaskFreezer(model, mask, tracked=tracker.names)
    by_param = MaskFreezer(model, mask, tracked=list(model.parameters()))
    assert by_name.extra_bytes == by_param.extra_bytes > 0


def test_mask_freezer_tracked_errors_name_the_problem():
    model = _model()
    full = Mask({n: torch.ones(p.shape, dtype=torch.bool) for n, p in model.named_parameters()})
    with pytest.raises(ValueError, match=r"`tracked` names 'nope', which is not a trainable floating-point parameter"):
        MaskFreezer(model, full, tracked=["nope"])
    with pytest.raises(TypeError, match="`tracked` must be a list of parameter names or parameters, got a single str"):
        MaskFreezer(model, full, tracked="0.weight")
    with pytest.raises(TypeError, match="`tracked` must hold parameter names or parameters, got int"):
        MaskFreezer(model, full, tracked=[3])
    partial = Mask({"0.weight": torch.ones(3, 4, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"tracked tensor\(s\) are not in the mask"):
        MaskFreezer(model, partial, tracked=["0.weight", "1.weight"])


def test_running_training_loop_reads_the_inner_training_loop_frame():
    """transformers has no supported way to give callbacks the Trainer or the checkpoint being resumed; the
    adapter reads both from `Trainer._inner_training_loop`'s frame, in one function. This fails if
    transformers renames it or its argument."""
    transformers = pytest.importorskip("transformers")
    from sparsity_callbacks.integrations.transformers import _running_training_loop

    params = inspect.signature(transformers.Trainer._inner_training_loop).parameters
    assert "resume_from_checkpoint" in params, transformers.__version__

    class _Trainer:  # stands for the Trainer whose frame is on the stack
        def _inner_training_loop(self, resume_from_checkpoint=None):
            return _running_training_loop()

    trainer = _Trainer()
    assert trainer._inner_training_loop("runs/checkpoint-7") == (trainer, "runs/checkpoint-7")
    assert trainer._inner_training_loop(None) == (trainer, None)
    assert _running_training_loop() == (None, None)  # no Trainer on the stack
