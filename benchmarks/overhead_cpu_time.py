"""The callback's cost in CPU time, phase by phase, against the CPU time of a training step: a figure that
a busy, shared machine does not distort the way it distorts wall-clock ratios.

    python benchmarks/overhead_cpu_time.py [--steps 200] [--every 10] [--repeats 5]

The model and batch of `benchmarks/overhead_hf.py` (Llama from config, 3.2 M parameters in 39 tensors,
AdamW, batch 8 x 64 tokens), one intra-op thread, CPU. Timed with ``time.thread_time`` (CPU time of the
training thread) and ``time.process_time`` (all threads: the MLflow sink's worker too), medians of
``--repeats``, the engine session exactly as the HF and Lightning callbacks drive it, logging into a local
MLflow sqlite store (created before timing):

* one training step (forward, backward, AdamW step);
* ``start`` (snapshot + opening the MLflow run), one ``measure`` + logging (not the last one, which as
  in the HF callback also starts writing the artifacts on a background thread; and, inside it, the
  ``tracker.measure()`` kernel alone), one step that does not measure (the callback's cost on the other
  steps), ``end`` (final measurement skipped when the last step was measured, mask, report and plots as
  artifacts, flush; also its wall time, which includes waiting for MLflow), and the CPU time the other
  threads used over the whole session (the MLflow sink's worker, the plots' warm-up).

The estimated overhead of a run of ``--steps`` steps measured every ``--every`` steps is
(start + (steps/every - 1) x measure + last measure + the other steps x quiet step + end + other threads)
/ (steps x step).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
import warnings

import torch


def _median(fn, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.thread_time()
        fn()
        samples.append(time.thread_time() - start)
    return statistics.median(samples)


def _timed(fn, samples: list[float]):
    """``fn`` that appends the CPU time of each call to ``samples``."""

    def timed(*args, **kwargs):
        began = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            samples.append(time.thread_time() - began)

    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    os.chdir(tempfile.mkdtemp(prefix="overhead_cpu_"))

    from transformers import LlamaConfig, LlamaForCausalLM

    from sparsity_callbacks import SparsityConfig
    from sparsity_callbacks.session import _SparsitySession

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=3,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, 4096, (8, 64), generator=torch.Generator().manual_seed(0))

    def train_step():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    train_step()
    step = _median(train_step, args.repeats)

    phases: dict[str, list[float]] = {
        "start": [],
        "measure": [],
        "tracker.measure": [],
        "last measure": [],
        "quiet step": [],
        "end": [],
        "end (wall)": [],
        "other threads": [],
    }
    for repeat in range(args.repeats + 1):  # the first: imports and the MLflow store, not timed
        session = _SparsitySession(SparsityConfig(), is_rank_zero=True, default_every_n_steps=args.every)
        process, thread = time.process_time(), time.thread_time()
        t = time.thread_time()
        session.start(model, [optimizer], 0)
        start = time.thread_time() - t
        kernel: list[float] = []
        session.tracker.measure = _timed(session.tracker.measure, kernel)
        measures, quiet = [], []
        for i in range(1, 6):
            train_step()
            if args.every > 1:  # the steps between two measurements: an integer compare each
                for quiet_step in range(args.every * (i - 1) + 1, args.every * i):
                    t = time.thread_time()
                    session.on_optimizer_step(quiet_step)
                    quiet.append(time.thread_time() - t)
            t = time.thread_time()
            session.on_optimizer_step(args.every * i, last=i == 5)  # HF: the last step starts the artifacts
            measures.append(time.thread_time() - t)
        t, wall = time.thread_time(), time.perf_counter()
        session.end(args.every * 5)
        end, end_wall = time.thread_time() - t, time.perf_counter() - wall
        others = (time.process_time() - process) - (time.thread_time() - thread)
        if repeat:
            phases["start"].append(start)
            phases["measure"].append(statistics.median(measures[1:-1]))  # the first has no churn yet
            phases["tracker.measure"].append(statistics.median(kernel[1:-1]))
            phases["last measure"].append(measures[-1])
            phases["quiet step"].append(statistics.median(quiet) if quiet else 0.0)
            phases["end"].append(end)
            phases["end (wall)"].append(end_wall)
            phases["other threads"].append(max(0.0, others))
    median = {k: statistics.median(v) for k, v in phases.items()}
    measurements = args.steps // args.every
    extra = (
        median["start"]
        + (measurements - 1) * median["measure"]
        + median["last measure"]
        + (args.steps - measurements) * median["quiet step"]
        + median["end"]
        + median["other threads"]
    )
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"{platform.machine()}, {os.cpu_count()} cores (1 intra-op thread), torch {torch.__version__}, load average "
        f"{os.getloadavg()[0]:.1f}; Llama {n_params / 1e6:.1f} M params in {len(list(model.parameters()))} tensors; "
        f"CPU time, median of {args.repeats}"
    )
    print(f"training step: {step * 1e3:.1f} ms")
    for key, value in median.items():
        print(f"{key:>15}: {value * 1e3:9.3f} ms")
    print(
        f"estimated overhead of {args.steps} steps measured every {args.every}: {extra:.2f} s CPU on "
        f"{args.steps * step:.1f} s of training = {extra / (args.steps * step):+.1%}; measuring every step: "
        f"{median['measure'] / step:+.1%} per step"
    )


if __name__ == "__main__":
    main()
