"""Everything worth measuring on a CUDA machine, in one run, printed as one table.

    python benchmarks/gpu.py                       # on a CUDA machine (defaults: 200 M params, 7 repeats)
    python benchmarks/gpu.py --device cpu --small  # dry run of the same code on the CPU (seconds)

Three sections, each against a baseline in the same run (median of ``--repeats``):

1. ``measure``: one `SparsityTracker.measure()` of ``--params`` fp32 elements on the device (25 tensors,
   ~10 % changed between measurements) per configuration (the default config first; ``exact`` keeps the
   reference in pinned host RAM and streams it to the device in ``chunk_numel`` chunks; ``fingerprint``
   keeps k bits per element on the device), as a ratio to a device-to-device ``copy_`` of the same bytes
   and to a host-to-device copy from pinned memory. Device memory per parameter:
   ``torch.cuda.max_memory_allocated`` during snapshot + measure, minus the parameters themselves
   (persistent state and the transient peak of one measurement).
2. ``freeze``: the MaskFreezer exactness matrix on the device: every frozen element bit-identical
   (``torch.equal`` on the int view) after 3 steps of each optimizer (including ``fused=True`` AdamW /
   Adam / SGD and ``foreach``) x variants (plain, clip by norm, gradient accumulation, bf16 autocast), and
   the default compact optimizer state bit-identical to dense freezing (``compact_optimizer_state=False``)
   on every weight (this is where ``fused=True`` steps compact tensors: off the CPU).
3. ``trainer``: a `transformers.Trainer` run of a small Llama with and without the default
   `SparsityCallback()` (measuring every ``logging_steps``), alternating order; ratio of the medians.

Without CUDA and ``--device cuda`` (the default) it prints why and exits with status 2, measuring nothing.
The CPU dry run exercises the same code paths at toy sizes; its figures are not GPU figures.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch

from sparsity_callbacks import Mask, SparsityTracker
from sparsity_callbacks.freeze import MaskFreezer

_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --- 1. measure --------------------------------------------------------------------------------------
def _measure_section(args, device: torch.device, rows: list[tuple[str, str, str]]) -> None:
    torch.manual_seed(0)
    tensors = 25
    per = max(8, args.params // tensors)
    model = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(per, device=device) * 0.02) for _ in range(tensors)])
    numel = per * tensors
    nbytes = numel * 4
    targets = [torch.empty_like(p) for p in model]
    pinned = [torch.empty(per, pin_memory=device.type == "cuda") for _ in model]

    def device_copy():
        for dst, src in zip(targets, model):
            dst.copy_(src)

    def host_to_device_copy():
        for dst, src in zip(targets, pinned):
            dst.copy_(src, non_blocking=True)

    device_copy()
    host_to_device_copy()
    d2d = _median_seconds(device_copy, args.repeats, device)
    h2d = _median_seconds(host_to_device_copy, args.repeats, device)
    targets.clear()
    pinned.clear()
    rows.append(("measure", f"baseline: {device.type} copy_ of {nbytes / 1e9:.2f} GB", f"{d2d * 1e3:.2f} ms"))
    rows.append(("measure", "baseline: pinned host -> device copy_", f"{h2d * 1e3:.2f} ms"))

    configs = [
        ("default config", {}),
        ("exact (pinned host reference, streamed)", dict(mode="exact")),
        ("exact, no churn", dict(mode="exact", track_churn=False)),
        ("fingerprint (on the device)", dict(mode="fingerprint")),
        ("fingerprint, no churn", dict(mode="fingerprint", track_churn=False)),
        ("exact, compare bf16", dict(mode="exact", compare_dtype="bfloat16")),
        ("fingerprint, compare bf16", dict(mode="fingerprint", compare_dtype="bfloat16")),
    ]
    for label, options in configs:
        _sync(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        tracker = SparsityTracker(model, **options)
        tracker.snapshot()
        with torch.no_grad():
            for p in model:
                p[::10] += 1e-3
        tracker.measure()  # warm-up (and compilation, when the tracker compiles)
        seconds = _median_seconds(tracker.measure, args.repeats, device)
        if device.type == "cuda":
            persistent = (torch.cuda.memory_allocated(device) - before) / numel
            peak = (torch.cuda.max_memory_allocated(device) - before) / numel
            memory = f"device {persistent:.3f} B/param held, {peak:.3f} B/param peak"
        else:
            memory = "device memory: CUDA only"
        rows.append(
            (
                "measure",
                f"{label} [mode={tracker.mode}]",
                f"{seconds * 1e3:.2f} ms = {seconds / d2d:.2f}x device copy = {seconds / h2d:.2f}x H2D copy; {memory}",
            )
        )
        del tracker


# --- 2. freeze ---------------------------------------------------------------------------------------
def _optimizers(device: torch.device) -> dict[str, Callable]:
    optim = torch.optim
    table: dict[str, Callable] = {
        "sgd_momentum": lambda p: optim.SGD(p, lr=0.2, momentum=0.9, weight_decay=0.1),
        "sgd_foreach": lambda p: optim.SGD(p, lr=0.2, momentum=0.9, weight_decay=0.1, foreach=True),
        "adam": lambda p: optim.Adam(p, lr=1e-2, weight_decay=0.1),
        "adam_foreach": lambda p: optim.Adam(p, lr=1e-2, weight_decay=0.1, foreach=True),
        "adamw": lambda p: optim.AdamW(p, lr=1e-2, weight_decay=0.1),
        "adamw_foreach": lambda p: optim.AdamW(p, lr=1e-2, weight_decay=0.1, foreach=True),
        "adamw_fused": lambda p: optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True),
        "adamw_fused_amsgrad": lambda p: optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True, amsgrad=True),
        "adam_fused": lambda p: optim.Adam(p, lr=1e-2, weight_decay=0.1, fused=True),
        "sgd_fused": lambda p: optim.SGD(p, lr=0.2, momentum=0.9, weight_decay=0.1, fused=True),
        "rmsprop": lambda p: optim.RMSprop(p, lr=1e-2, momentum=0.9, centered=True, weight_decay=0.1),
        "adagrad": lambda p: optim.Adagrad(p, lr=0.1, weight_decay=0.1),
    }
    return table


def _tiny_llama(device: torch.device) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).to(device)


def _bits(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().view(_INT_VIEW[p.dtype]) for n, p in model.named_parameters()}


def _train(model, opt, steps: int, variant: str, device: torch.device, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    micro = 2 if variant == "accumulate" else 1
    for _ in range(steps):
        ids = torch.randint(0, 256, (4, 16), generator=gen).to(device)
        opt.zero_grad()
        for chunk in ids.chunk(micro):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=variant == "bf16_autocast"):
                loss = model(input_ids=chunk, labels=chunk).loss / micro
            loss.backward()
        if variant == "clip_norm":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()


def _freeze_section(args, device: torch.device, rows: list[tuple[str, str, str]]) -> bool:
    variants = ["plain", "clip_norm", "accumulate", "bf16_autocast"]
    optimizers = _optimizers(device)
    if args.small:
        optimizers = {k: optimizers[k] for k in ("adamw", "adamw_fused", "sgd_foreach")}
        variants = ["plain", "bf16_autocast"]
    failures = []
    cases = 0
    for name, make in optimizers.items():
        for variant in variants:
            cases += 1
            try:
                # the default (compact optimizer state where the optimizer allows it) and dense freezing, side by side
                runs = {}
                for compact in (True, False):
                    model = _tiny_llama(device)
                    opt = make(model.parameters())
                    _train(model, opt, 1, variant, device, seed=1)  # optimizer state exists before freezing
                    gen = torch.Generator().manual_seed(0)
                    mask = Mask({n: torch.rand(p.shape, generator=gen) < 0.3 for n, p in model.named_parameters()})
                    if compact:
                        before = _bits(model)
                    MaskFreezer(model, mask, compact_optimizer_state=compact).attach(opt)
                    _train(model, opt, 3, variant, device, seed=0)
                    runs[compact] = _bits(model)
                after = runs[True]
                differs = [n for n in after if not torch.equal(after[n], runs[False][n])]
                if differs:
                    raise AssertionError(f"compact optimizer state differs from dense freezing in {differs[:2]}")
                moved = 0
                for n, now in after.items():
                    keep = mask[n].to(device)
                    if not torch.equal(now[~keep], before[n][~keep]):
                        raise AssertionError(f"frozen elements of {n} changed")
                    moved += int((now[keep] != before[n][keep]).sum())
                if moved == 0:
                    raise AssertionError("no trainable element moved")
            except Exception as err:  # a row of the table, not a crash: report every case
                failures.append(f"{name}/{variant}: {type(err).__name__}: {err}")
    verdict = f"{cases - len(failures)}/{cases} bit-identical"
    rows.append(("freeze", f"{len(optimizers)} optimizers x {len(variants)} variants", verdict))
    for failure in failures:
        rows.append(("freeze", "FAILED", failure[:200]))
    return not failures


# --- 3. trainer --------------------------------------------------------------------------------------
def _trainer_section(args, device: torch.device, rows: list[tuple[str, str, str]]) -> None:
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments
    from transformers.utils import logging as hf_logging

    from sparsity_callbacks import SparsityCallback

    hf_logging.set_verbosity_error()
    hidden, layers, vocab, seq, batch = (64, 2, 512, 32, 4) if args.small else (512, 8, 32000, 256, 8)
    steps = 12 if args.small else args.trainer_steps

    def make_model():
        torch.manual_seed(0)
        return LlamaForCausalLM(
            LlamaConfig(
                vocab_size=vocab,
                hidden_size=hidden,
                intermediate_size=hidden * 8 // 3 // 16 * 16,
                num_hidden_layers=layers,
                num_attention_heads=max(1, hidden // 64),
                num_key_value_heads=max(1, hidden // 128),
                max_position_embeddings=seq,
            )
        )

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.start = self.end = None

        def on_step_begin(self, targs, state, control, **kwargs):
            if self.start is None:
                _sync(device)
                self.start = time.perf_counter()

        def on_step_end(self, targs, state, control, **kwargs):
            _sync(device)
            self.end = time.perf_counter()

    initial = {k: v.clone() for k, v in make_model().state_dict().items()}
    n_params = sum(v.numel() for v in initial.values())
    ids = torch.randint(0, vocab, (batch * steps, seq), generator=torch.Generator().manual_seed(0)).tolist()
    dataset = Dataset.from_dict({"input_ids": ids, "labels": ids})
    workdir = tempfile.mkdtemp(prefix="gpu_bench_")

    def run(with_callback: bool) -> float:
        model = make_model()
        model.load_state_dict(initial)
        timer = StepTimer()
        targs = TrainingArguments(
            output_dir=os.path.join(workdir, "out"),
            max_steps=steps,
            per_device_train_batch_size=batch,
            learning_rate=1e-5,
            logging_steps=10,
            report_to="none",
            save_strategy="no",
            use_cpu=device.type == "cpu",
            disable_tqdm=True,
            seed=0,
        )
        callbacks = [timer] + ([SparsityCallback()] if with_callback else [])
        Trainer(model=model, args=targs, train_dataset=dataset, callbacks=callbacks).train()
        return timer.end - timer.start

    cwd = os.getcwd()
    os.chdir(workdir)  # the callback's MLflow run goes to ./mlflow.db here unless MLFLOW_TRACKING_URI is set
    try:
        run(True)  # warm-up
        times: dict[bool, list[float]] = {False: [], True: []}
        for repeat in range(max(1, args.trainer_repeats)):
            for with_callback in (False, True) if repeat % 2 == 0 else (True, False):
                times[with_callback].append(run(with_callback))
    finally:
        os.chdir(cwd)
    without, with_cb = statistics.median(times[False]), statistics.median(times[True])
    rows.append(
        (
            "trainer",
            f"Llama {n_params / 1e6:.1f} M params, {steps} steps, measure every 10, SparsityCallback()",
            f"{with_cb:.2f} s vs {without:.2f} s without: {with_cb / without:.3f}x (median of {len(times[True])})",
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for a dry run")
    parser.add_argument("--params", type=int, default=200_000_000, help="elements in the measure section")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--trainer-steps", type=int, default=100)
    parser.add_argument("--trainer-repeats", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="toy sizes (a smoke test of the script)")
    parser.add_argument(
        "--sections", default="measure,freeze,trainer", help="comma-separated subset of measure,freeze,trainer"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            f"benchmarks/gpu.py: CUDA is not available (torch {torch.__version__}, "
            f"cuda build {torch.version.cuda}); nothing measured. HINT: run it on a CUDA machine, or "
            "`--device cpu --small` for a dry run of the script.",
            file=sys.stderr,
        )
        return 2
    if args.small:
        args.params = min(args.params, 2_000_000)
        args.repeats = min(args.repeats, 3)
        args.trainer_repeats = 1
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    unknown = sections - {"measure", "freeze", "trainer"}
    if unknown:
        parser.error(f"unknown --sections {sorted(unknown)}; allowed: measure, freeze, trainer")

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        where = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    else:
        where = f"CPU {platform.machine()}, {torch.get_num_threads()} threads (dry run: not GPU figures)"
    rows: list[tuple[str, str, str]] = []
    ok = True
    if "measure" in sections:
        _measure_section(args, device, rows)
    if "freeze" in sections:
        ok = _freeze_section(args, device, rows)
    if "trainer" in sections:
        _trainer_section(args, device, rows)

    print(f"\nbenchmarks/gpu.py: {where}; torch {torch.__version__}; median of {args.repeats} repeats\n")
    print("| section | what | result |\n|---|---|---|")
    for section, what, result in rows:
        print(f"| {section} | {what} | {result} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
