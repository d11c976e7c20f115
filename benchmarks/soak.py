"""Long soak of `SparsityTracker.measure()`: prints RSS, history length and metric-key count over time.

    python benchmarks/soak.py --calls 200000 --every 10000 [--mode exact] [--model llama]

A leak shows as RSS rising steadily after the warm-up; the history stays <= 4096 points and the metrics
dict size stays constant (per_tensor_metrics=False). The short version runs in tests/test_hardening.py.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import psutil
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from sparsity_callbacks import SparsityTracker  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50_000)
    parser.add_argument("--every", type=int, default=5_000)
    parser.add_argument("--mode", choices=["exact", "fingerprint"], default="fingerprint")
    parser.add_argument("--model", choices=["linear", "llama"], default="linear")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.model == "llama":
        from helpers import tiny_llama

        model = tiny_llama()
    else:
        model = torch.nn.Sequential(torch.nn.Linear(24, 16), torch.nn.Linear(16, 4))
    tracker = SparsityTracker(model, mode=args.mode, per_tensor_metrics=False)
    tracker.snapshot()
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(0)
    process = psutil.Process()
    start = time.perf_counter()
    first_rss = None
    print(f"{'calls':>9} {'rss MiB':>9} {'delta MiB':>10} {'history':>8} {'keys':>5} {'ms/call':>8}")
    for step in range(1, args.calls + 1):
        with torch.no_grad():
            p = params[step % len(params)]
            index = torch.randint(0, p.numel(), (3,), generator=generator)
            p.view(-1)[index] += torch.randn(3, generator=generator) * 1e-3
        m = tracker.measure(step)
        if step % args.every == 0 or step == args.calls:
            gc.collect()
            rss = process.memory_info().rss / 2**20
            first_rss = first_rss if first_rss is not None else rss
            elapsed = (time.perf_counter() - start) / step * 1e3
            print(
                f"{step:>9} {rss:>9.1f} {rss - first_rss:>10.2f} {len(tracker.history):>8} "
                f"{len(m.to_metrics()):>5} {elapsed:>8.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
