"""Memory and step time of freezing with compact optimizer state vs dense freezing vs no freezing (AdamW).

A stack of ``--layers`` x Linear(``--width``) (default 5 x 2048 = 21 M fp32 parameters) and random masks of
``--densities`` (default 5 %, 20 %, 50 % trainable). Two parts, ratios against baselines of the same run:

1. Memory, one fresh subprocess per configuration (3 training steps each, so the optimizer state exists):
   bytes of AdamW state + the freezer's own bytes (`MaskFreezer.extra_bytes`), as a ratio to the state of
   AdamW without any freezing; and the process's peak RSS (``VmHWM``: model, gradients, activations, state,
   freezer, the mask and the interpreter with torch), as a ratio to the run without freezing.
2. Step time, in this process: the model with compact state and the same model with dense freezing
   (``compact_optimizer_state=False``) step in turns (alternating order, warm-up, median of
   ``--repeats``): the optimizer step alone (with the freezer's hooks) and the full step
   (forward + backward + step, ``--rows`` rows).

    python benchmarks/freeze_memory.py                   # the README table
    python benchmarks/freeze_memory.py --clock thread    # one intra-op thread, CPU time: for a busy machine
    python benchmarks/freeze_memory.py --foreach         # AdamW(foreach=True) instead of the for-loop AdamW
    python benchmarks/freeze_memory.py --dense-fused     # time dense freezing with AdamW(fused=True), the
                                                         # fastest dense CPU step (compact keeps foreach/for-loop)
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

from sparsity_callbacks.freeze import MaskFreezer
from sparsity_callbacks.masks import Mask


def _model(width: int, layers: int) -> torch.nn.Sequential:
    torch.manual_seed(0)
    blocks = []
    for _ in range(layers):
        blocks += [torch.nn.Linear(width, width), torch.nn.GELU()]
    return torch.nn.Sequential(*blocks)


def _mask(model: torch.nn.Module, density: float) -> Mask:
    gen = torch.Generator().manual_seed(1)
    return Mask({n: torch.rand(p.shape, generator=gen) < density for n, p in model.named_parameters()})


def _optimizer(model: torch.nn.Module, foreach: bool, fused: bool = False) -> torch.optim.AdamW:
    if fused:
        return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, fused=True)
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, foreach=foreach)


def _rss_bytes() -> int:
    """Peak resident set size of this process: ``VmHWM`` (``ru_maxrss`` would include the parent's peak at
    fork, which Linux carries across ``exec``)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _memory_child(args: argparse.Namespace, mode: str, density: float) -> dict:
    """One configuration in this (fresh) process: ``none`` (AdamW, no freezing), ``dense``, ``compact``."""
    torch.set_num_threads(1)
    model = _model(args.width, args.layers)
    x = torch.randn(args.rows, args.width, generator=torch.Generator().manual_seed(2))
    before = _rss_bytes()
    freezer = None
    if mode != "none":
        freezer = MaskFreezer(model, _mask(model, density), compact_optimizer_state=mode == "compact")
    opt = _optimizer(model, args.foreach)
    if freezer is not None:
        freezer.attach(opt)
    for _ in range(3):
        opt.zero_grad(set_to_none=False)
        model(x).square().mean().backward()
        opt.step()
    state = sum(v.untyped_storage().nbytes() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    return {
        "state": state,
        "extra": 0 if freezer is None else freezer.extra_bytes,
        "rss": _rss_bytes(),
        "rss_growth": _rss_bytes() - before,
    }


def _run_child(args: argparse.Namespace, mode: str, density: float) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--child-density", str(density)]
    command += ["--width", str(args.width), "--layers", str(args.layers), "--rows", str(args.rows)]
    command += ["--foreach"] if args.foreach else []
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _time_steps(args: argparse.Namespace, density: float, clock) -> dict[str, dict[str, list[float]]]:
    models = {"dense": _model(args.width, args.layers), "compact": _model(args.width, args.layers)}
    mask = _mask(models["dense"], density)
    opts = {}
    for mode, model in models.items():
        freezer = MaskFreezer(model, mask, compact_optimizer_state=mode == "compact")
        opts[mode] = _optimizer(model, args.foreach, fused=args.dense_fused and mode == "dense")
        freezer.attach(opts[mode])
    x = torch.randn(args.rows, args.width, generator=torch.Generator().manual_seed(2))
    times: dict[str, dict[str, list[float]]] = {m: {"step": [], "full": []} for m in models}
    for i in range(args.warmup + args.repeats):
        for mode in ("dense", "compact") if i % 2 == 0 else ("compact", "dense"):
            model, opt = models[mode], opts[mode]
            opt.zero_grad(set_to_none=False)
            t0 = clock()
            model(x).square().mean().backward()
            t1 = clock()
            opt.step()
            t2 = clock()
            if i >= args.warmup:
                times[mode]["step"].append(t2 - t1)
                times[mode]["full"].append(t2 - t0)
    same = all(torch.equal(a, b) for a, b in zip(models["dense"].parameters(), models["compact"].parameters()))
    assert same or args.dense_fused, "compact and dense freezing diverged"  # the guarantee, on these very runs
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--rows", type=int, default=128, help="rows (tokens) per forward pass")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.2, 0.5])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--foreach", action="store_true", help="AdamW(foreach=True)")
    parser.add_argument("--dense-fused", action="store_true", help="time dense freezing with AdamW(fused=True)")
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall")
    parser.add_argument("--child", choices=("none", "dense", "compact"), help=argparse.SUPPRESS)
    parser.add_argument("--child-density", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_memory_child(args, args.child, args.child_density)))
        return
    if args.clock == "thread":
        torch.set_num_threads(1)
    clock = time.thread_time if args.clock == "thread" else time.perf_counter

    numel = args.layers * (args.width * args.width + args.width)
    print(
        f"model: {args.layers} x Linear({args.width}, {args.width}) = {numel / 1e6:.1f} M fp32 params; "
        f"AdamW(foreach={args.foreach}{'; dense: fused=True' if args.dense_fused else ''}, weight_decay=0.01); "
        f"{platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; {args.clock} clock, median of {args.repeats}"
    )
    base = _run_child(args, "none", 0.0)
    print(f"AdamW without freezing: state {base['state'] / numel:.2f} B/param, peak RSS {base['rss'] / 2**20:.0f} MiB")
    print(
        "| density | mechanism | optimizer state + freezer | vs AdamW state | peak RSS (vs no freezing) "
        "| optimizer step | full step |"
    )
    print("|---|---|---|---|---|---|---|")
    for density in args.densities:
        times = _time_steps(args, density, clock)
        for mode in ("dense", "compact"):
            mem = _run_child(args, mode, density)
            held = mem["state"] + mem["extra"]
            step = statistics.median(times[mode]["step"]) * 1e3
            full = statistics.median(times[mode]["full"]) * 1e3
            if mode == "dense":
                step_ratio = full_ratio = ""
                dense_step, dense_full = step, full
            else:
                step_ratio = f" ({step / dense_step:.2f}x dense)"
                full_ratio = f" ({full / dense_full:.2f}x dense)"
            print(
                f"| {density:.0%} | {mode} | {held / numel:.2f} B/param | {held / base['state']:.2f}x "
                f"| {mem['rss'] / 2**20:.0f} MiB ({mem['rss'] / base['rss']:.2f}x) "
                f"| {step:.1f} ms{step_ratio} | {full:.1f} ms{full_ratio} |"
            )


if __name__ == "__main__":
    main()
