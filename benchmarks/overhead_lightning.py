"""Overhead of `SparsityCallback` on a Lightning fit: the same fit with and without the callback, alternating.

A ~8 M parameter Llama-style model (built from config), AdamW, ``--steps`` optimizer steps per fit; the
callback measures every ``--every`` steps (exact mode, churn on; MLflow off unless ``--mlflow``). Two figures:

* loop: wall time of the training loop (first batch start to last batch end), which contains the periodic
  measurements -- the steady-state cost per step;
* fit: the whole ``trainer.fit`` including the snapshot at train start and the final measurement (and, with
  ``--mlflow``, the artifacts) -- one-off costs that shrink relative to longer runs.

Each is the median over ``--repeats`` (>= 5) alternating pairs, after one warm-up pair, in process CPU time
by default (``--clock wall`` for elapsed time; CPU time is the robust one on a shared machine).

    python benchmarks/overhead_lightning.py            # target: loop overhead <= 5 %
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

try:
    import lightning.pytorch as pl
except ImportError:
    import pytorch_lightning as pl
from transformers import LlamaConfig, LlamaForCausalLM

from sparsity_callbacks.integrations.lightning import SparsityCallback


class LM(pl.LightningModule):
    def __init__(self, hidden: int, layers: int, vocab: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=vocab,
                hidden_size=hidden,
                intermediate_size=4 * hidden,
                num_hidden_layers=layers,
                num_attention_heads=max(1, hidden // 64),
                num_key_value_heads=max(1, hidden // 128),
                max_position_embeddings=256,
            )
        )

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids, use_cache=False).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


def _clock() -> float:
    return time.process_time() if CLOCK == "cpu" else time.perf_counter()


CLOCK = "cpu"


class LoopTimer(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.start = _clock()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.end = _clock()


def fit_once(args, with_callback: bool, data: DataLoader, root: str) -> tuple[float, float]:
    module = LM(args.hidden, args.layers, args.vocab)
    timer = LoopTimer()
    callbacks: list[pl.Callback] = [timer]
    if with_callback:
        callbacks.append(
            SparsityCallback(
                mode="exact", every_n_steps=args.every, log_to_mlflow=args.mlflow, log_artifacts=args.mlflow
            )
        )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=args.steps,
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        num_sanity_val_steps=0,
    )
    start = _clock()
    trainer.fit(module, data)
    return timer.end - timer.start, _clock() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument(
        "--every",
        type=int,
        default=25,
        help="measure every N optimizer steps (Lightning's default log_every_n_steps is 50)",
    )
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="cpu: process CPU time (robust on a shared machine); wall: elapsed time",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--mlflow", action="store_true", help="also log to MLflow (local sqlite in a temp dir)")
    args = parser.parse_args()
    global CLOCK
    CLOCK = args.clock
    if args.repeats < 5:
        parser.error("--repeats must be >= 5")

    root = tempfile.mkdtemp(prefix="overhead_lightning_")
    if args.mlflow:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root}/mlflow.db"
    ids = torch.randint(0, args.vocab, (args.steps * args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    data = DataLoader(TensorDataset(ids), batch_size=args.batch)
    n_params = sum(p.numel() for p in LM(args.hidden, args.layers, args.vocab).parameters())
    print(
        f"model: {n_params / 1e6:.1f} M parameters; {args.steps} steps/fit, measure every {args.every}; "
        f"torch threads {torch.get_num_threads()}; MLflow {'on' if args.mlflow else 'off'}; clock {args.clock}"
    )

    fit_once(args, False, data, root), fit_once(args, True, data, root)  # warm-up pair
    loops: dict[bool, list[float]] = {False: [], True: []}
    fits: dict[bool, list[float]] = {False: [], True: []}
    for i in range(args.repeats):
        for with_callback in (False, True) if i % 2 == 0 else (True, False):
            loop, fit = fit_once(args, with_callback, data, root)
            loops[with_callback].append(loop)
            fits[with_callback].append(fit)
        print(
            f"repeat {i + 1}: loop {loops[False][-1]:.2f} s / {loops[True][-1]:.2f} s with callback; "
            f"fit {fits[False][-1]:.2f} s / {fits[True][-1]:.2f} s",
            flush=True,
        )

    for name, values in (("loop", loops), ("fit", fits)):
        base, with_cb = statistics.median(values[False]), statistics.median(values[True])
        print(
            f"{name}: median {base:.3f} s without, {with_cb:.3f} s with -> overhead ratio {with_cb / base:.4f} "
            f"({100 * (with_cb / base - 1):+.2f} %)"
        )
    per_step = (statistics.median(loops[True]) - statistics.median(loops[False])) / (args.steps // args.every)
    print(f"cost of one measurement (loop difference / measurements): {1000 * per_step:.1f} ms")


if __name__ == "__main__":
    main()
