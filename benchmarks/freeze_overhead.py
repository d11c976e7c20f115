"""Step-time overhead of dense freezing (`MaskFreezer(compact_optimizer_state=False)`; AdamW, a ~21M-parameter
stack of Linear layers, CPU by default). Compact optimizer state: ``benchmarks/freeze_memory.py``.

Times the optimizer step alone and the full step (forward + backward + step) with and without the
freezer, in the same process, repeats interleaved, median of ``--repeats`` after warm-up. Prints one
line per figure with the ratio, plus the freezer's extra bytes per parameter.

    python benchmarks/freeze_overhead.py [--width 2048 --layers 5 --rows 512 --density 0.3 --repeats 9]
    python benchmarks/freeze_overhead.py --clock thread   # on a busy machine
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sparsity_callbacks.freeze import MaskFreezer
from sparsity_callbacks.masks import Mask


def _model(width: int, layers: int, device: str) -> torch.nn.Sequential:
    torch.manual_seed(0)
    blocks = []
    for _ in range(layers):
        blocks += [torch.nn.Linear(width, width), torch.nn.GELU()]
    return torch.nn.Sequential(*blocks).to(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--rows", type=int, default=512, help="rows (tokens) per forward pass")
    parser.add_argument("--density", type=float, default=0.3, help="trainable fraction of the mask")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compact", action="store_true", help="MaskFreezer(compact=True)")
    parser.add_argument("--fused", action="store_true", help="AdamW(fused=True)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--clock",
        choices=("wall", "thread"),
        default="wall",
        help="thread: one intra-op thread, timed by time.thread_time (CPU time of this "
        "thread), robust to other processes competing for the cores",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads (default: torch's); 1 avoids OpenMP spin-waiting on a busy machine",
    )
    args = parser.parse_args()
    if args.clock == "thread" or args.threads:
        torch.set_num_threads(1 if args.clock == "thread" else args.threads)
    clock = time.thread_time if args.clock == "thread" else time.perf_counter

    base, frozen = _model(args.width, args.layers, args.device), _model(args.width, args.layers, args.device)
    gen = torch.Generator().manual_seed(1)
    mask = Mask({n: torch.rand(p.shape, generator=gen) < args.density for n, p in frozen.named_parameters()})
    freezer = MaskFreezer(
        frozen, mask, compact=args.compact, compact_optimizer_state=False
    )  # dense: see freeze_memory.py
    optimizers = {}
    for label, model in (("baseline", base), ("freezer", frozen)):
        optimizers[label] = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, fused=args.fused or None)
    freezer.attach(optimizers["freezer"])
    x = torch.randn(args.rows, args.width, generator=gen).to(args.device)
    models = {"baseline": base, "freezer": frozen}
    times: dict[str, dict[str, list[float]]] = {k: {"step": [], "full": []} for k in models}

    def one(label: str, record: bool) -> None:
        model, opt = models[label], optimizers[label]
        opt.zero_grad(set_to_none=False)
        _sync(args.device)
        t0 = clock()
        model(x).square().mean().backward()
        _sync(args.device)
        t1 = clock()
        opt.step()
        _sync(args.device)
        t2 = clock()
        if record:
            times[label]["step"].append(t2 - t1)
            times[label]["full"].append(t2 - t0)

    for i in range(args.warmup + args.repeats):
        order = ("baseline", "freezer") if i % 2 == 0 else ("freezer", "baseline")
        for label in order:  # interleaved, alternating order: drift and caches hit both alike
            one(label, record=i >= args.warmup)

    numel = sum(p.numel() for p in frozen.parameters())
    print(
        f"model: {args.layers} x Linear({args.width}, {args.width}) = {numel:,} params, fp32, {args.device}, "
        f"{torch.get_num_threads()} threads, {args.clock} clock; AdamW(fused={args.fused}); "
        f"mask density {mask.density:.3f}, frozen_fraction {freezer.frozen_fraction:.3f}, compact={args.compact}"
    )
    print(f"freezer extra memory: {freezer.extra_bytes:,} bytes = {freezer.extra_bytes / numel:.3f} bytes/param")
    for key, what in (("step", "optimizer step alone"), ("full", f"full step (fwd+bwd+step, {args.rows} rows)")):
        b = statistics.median(times["baseline"][key]) * 1e3
        f = statistics.median(times["freezer"][key]) * 1e3
        pairs = statistics.median(x / y for x, y in zip(times["freezer"][key], times["baseline"][key]))
        print(
            f"{what}: baseline {b:.1f} ms, freezer {f:.1f} ms, ratio {f / b:.3f} "
            f"(overhead {100 * (f / b - 1):+.1f} %; median of paired ratios {pairs:.3f}), median of {args.repeats}"
        )

    # The freezer's own work, timed alone on the same tensors: the restore (step post-hook) and the
    # gradient masking (post-accumulate-grad hooks). The rest of any difference above is the
    # optimizer itself running slower on the frozen elements' zero gradients and state (on CPU,
    # e.g. AdamW's vectorized sqrt is ~2x slower on a random mix of zeros and non-zeros).
    entries = list(freezer._entries.values())
    grads = [e.param.grad for e in entries]
    own = {
        "restore (step post-hook)": freezer.restore,
        "gradient masking (grad hooks)": lambda: [e.zero_frozen(g) for e, g in zip(entries, grads)],
    }
    for what, fn in own.items():
        samples = []
        for _ in range(args.warmup + args.repeats):
            _sync(args.device)
            t0 = clock()
            fn()
            _sync(args.device)
            samples.append(clock() - t0)
        ms = statistics.median(samples[args.warmup :]) * 1e3
        b = statistics.median(times["baseline"]["step"]) * 1e3
        print(f"freezer's own work, {what}: {ms:.1f} ms = {100 * ms / b:.1f} % of the baseline optimizer step")


if __name__ == "__main__":
    main()
