"""Cost of one `SparsityTracker.measure()` per mode vs a plain copy of the same bytes, same run.

    python benchmarks/measure.py [--params 100_000_000] [--repeats 7]

A stack of fp32 tensors (default 100 M elements, 400 MB), ~10 % of the elements changed between
measurements. Prints one line per figure: median time of `measure()` / median time of
`torch.Tensor.copy_` of the tracked bytes, and the extra memory per tracked parameter.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from sparsity_callbacks import SparsityTracker


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _extra_bytes(tracker: SparsityTracker) -> tuple[int, int]:
    """(host bytes, device bytes) the tracker holds."""
    host = device = 0
    for state in tracker._states.values():
        ref = state.reference.numel() * state.reference.element_size()
        if tracker.mode == "exact":
            host += ref
        else:
            device += ref
        device += state.ever.numel()
        if state.previous is not None:
            device += state.previous.numel() * state.previous.element_size()
    return host, device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, default=100_000_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    rows = 25
    per = args.params // rows
    model = torch.nn.ParameterList(
        [torch.nn.Parameter(torch.randn(per, device=args.device) * 0.02) for _ in range(rows)]
    )
    numel = per * rows
    copy_target = [torch.empty_like(p) for p in model]

    def memcpy():
        for dst, src in zip(copy_target, model):
            dst.copy_(src)
        if args.device == "cuda":
            torch.cuda.synchronize()

    memcpy()
    baseline = _median_seconds(memcpy, args.repeats)
    print(
        f"machine: {platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"device {args.device}; {numel / 1e6:.0f} M fp32 params ({numel * 4 / 1e9:.2f} GB)"
    )
    print(f"memcpy of the tracked bytes: {baseline * 1e3:.1f} ms (median of {args.repeats})")

    configs = [
        ("exact", dict(mode="exact")),
        ("exact, no churn", dict(mode="exact", track_churn=False)),
        ("fingerprint", dict(mode="fingerprint")),
        ("fingerprint, no churn", dict(mode="fingerprint", track_churn=False)),
        ("exact, compare bf16", dict(mode="exact", compare_dtype="bfloat16")),
    ]
    for label, options in configs:
        for use_compile in (True, False):
            tracker = SparsityTracker(model, compile=use_compile, **options)
            tracker.snapshot()
            with torch.no_grad():
                for p in model:
                    p[::10] += 1e-3
            tracker.measure()  # warm-up (and compilation)

            def measure(tracker=tracker):
                tracker.measure()
                if args.device == "cuda":
                    torch.cuda.synchronize()

            seconds = _median_seconds(measure, args.repeats if use_compile else max(3, args.repeats // 2))
            host, device = _extra_bytes(tracker)
            print(
                f"{label:24s} compile={str(use_compile):5s}: {seconds * 1e3:8.1f} ms = "
                f"{seconds / baseline:5.2f}x memcpy; "
                f"extra memory {host / numel:.3f} B/param host + {device / numel:.3f} B/param device"
            )
            del tracker


if __name__ == "__main__":
    main()
