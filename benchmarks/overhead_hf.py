"""Overhead of `SparsityCallback` on a `transformers.Trainer` run, same process, alternating.

    python benchmarks/overhead_hf.py [--steps 200] [--logging-steps 10] [--repeats 5] [--hidden 192 --layers 4]
    python benchmarks/overhead_hf.py --every-n-steps 1      # measuring every step (delta-sync figures)

A Llama-style model built from config (default 3.2 M parameters in 39 tensors: vocab 4096, hidden 192,
4 layers), AdamW,
batch 8 x 64 tokens, on the CPU (or the GPU if there is one and ``--device cuda``). Each repeat trains the
same initial weights for ``--steps`` optimizer steps twice, once without and once with the callback at
the default cadence (``every_n_steps=None`` -> ``logging_steps``), in alternating order. Reported:

* ``steps``: wall time of the N training steps (first step begin -> last step end), which includes the
  periodic measurements and the MLflow logging (asynchronous, into a local sqlite store);
* ``train()``: the whole ``trainer.train()`` call, also including the snapshot at train begin and the
  final measurement + artifacts (mask, report, PNG plots) at train end: one-off costs.

The overhead ratio is median(with) / median(without) - 1 over the repeats; the target is <= 5 % for
``steps``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging as hf_logging

from sparsity_callbacks import SparsityCallback


class _StepTimer(TrainerCallback):
    """Wall time from the first ``on_step_begin`` to the last ``on_step_end``."""

    def __init__(self):
        self.start: float | None = None
        self.end: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.start is None:
            self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if args.use_cpu is False and torch.cuda.is_available():
            torch.cuda.synchronize()
        self.end = time.perf_counter()


def _model(args) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=int(args.hidden * 8 / 3) // 16 * 16,
            num_hidden_layers=args.layers,
            num_attention_heads=max(1, args.hidden // 64),
            num_key_value_heads=max(1, args.hidden // 128),
            max_position_embeddings=args.seq,
        )
    )


def _run(args, state_dict, dataset, with_callback: bool, workdir: str) -> tuple[float, float]:
    model = _model(args)
    model.load_state_dict(state_dict)
    timer = _StepTimer()
    options = {} if args.every_n_steps is None else {"every_n_steps": args.every_n_steps}
    callbacks = [timer] + ([SparsityCallback(**options)] if with_callback else [])
    training_args = TrainingArguments(
        output_dir=os.path.join(workdir, "out"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=1e-5,
        logging_steps=args.logging_steps,
        report_to="none",
        save_strategy="no",
        use_cpu=args.device == "cpu",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, callbacks=callbacks)
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    return timer.end - timer.start, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every-n-steps", type=int, default=None, help="default: logging_steps")
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--threads", type=int, default=None, help="intra-op threads (1 avoids OpenMP spin-waits on a busy machine)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()

    workdir = tempfile.mkdtemp(prefix="overhead_hf_")
    os.chdir(workdir)  # the callback's MLflow run goes to ./mlflow.db here (unless MLFLOW_TRACKING_URI is set)
    model = _model(args)
    n_params = sum(p.numel() for p in model.parameters())
    state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch * args.steps, args.seq), generator=g).tolist()
    dataset = Dataset.from_dict({"input_ids": ids, "labels": ids})
    print(
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"model {n_params / 1e6:.1f} M params, {args.steps} steps, measure every "
        f"{args.every_n_steps or args.logging_steps}, {args.repeats} repeats, device {args.device}; "
        f"load average {os.getloadavg()[0]:.1f}"
    )

    _run(args, state_dict, dataset, True, workdir)  # warm-up (imports, MLflow store creation, allocator)
    times: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for repeat in range(args.repeats):
        order = (False, True) if repeat % 2 == 0 else (True, False)
        for with_callback in order:
            times[with_callback].append(_run(args, state_dict, dataset, with_callback, workdir))
        print(f"  repeat {repeat + 1}: without {times[False][-1][0]:.3f} s, with {times[True][-1][0]:.3f} s (steps)")

    for index, what in ((0, "steps"), (1, "train()")):
        without = statistics.median(t[index] for t in times[False])
        with_cb = statistics.median(t[index] for t in times[True])
        print(
            f"{what:>8}: without {without:.3f} s, with {with_cb:.3f} s, overhead {with_cb / without - 1:+.1%} "
            f"({(with_cb - without) / args.steps * 1000:+.1f} ms per step)"
        )


if __name__ == "__main__":
    main()
