"""Update sparsity under plain supervised fine-tuning: `transformers.Trainer` + one callback.

    python examples/hf_trainer.py          # under a minute on a laptop CPU
    mlflow ui --backend-store-uri sqlite:///mlflow.db

A tiny Llama-style model (built from config) learns "next word = this word + 1" with the Trainer's
defaults (AdamW, linear schedule). ``report_to="mlflow"``: the Trainer's own MLflowCallback opens the run
and the ``sparsity/...`` metrics are logged into that same run, at the same global steps as ``loss``.
The ever-changed mask is also saved beside each checkpoint (``sparsity_tracker.safetensors``), so
``trainer.train(resume_from_checkpoint=True)`` continues the cumulative curve.

MLflow: ``MLFLOW_TRACKING_URI`` if set, else MLflow's default local store ``mlflow.db`` in this folder.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerFast, Trainer, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _models import TINY_WORDS as N_WORDS  # noqa: E402  (the examples' shared tiny model, next to this file)
from _models import tiny_model, tiny_tokenizer  # noqa: E402

from sparsity_callbacks import SparsityCallback  # noqa: E402


def counting_dataset(tokenizer: PreTrainedTokenizerFast, n: int = 512, length: int = 16, seed: int = 0) -> Dataset:
    """Sequences ``w(s) w(s+1) ... `` (mod 60), tokenized; labels = inputs (the model shifts them)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, N_WORDS, (n,), generator=g).tolist()
    texts = [" ".join(f"w{(s + i) % N_WORDS}" for i in range(length)) for s in starts]
    ids = tokenizer(texts)["input_ids"]
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def main(max_steps: int = 40, learning_rate: float = 1e-5, output_dir: str | None = None) -> SparsityCallback:
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    args = TrainingArguments(
        output_dir=output_dir or tempfile.mkdtemp(prefix="hf_trainer_"),
        max_steps=max_steps,
        learning_rate=learning_rate,
        per_device_train_batch_size=16,
        gradient_accumulation_steps=2,  # one sparsity measurement per optimizer step, not per micro-batch
        logging_steps=5,  # the callback measures at the same cadence (every_n_steps=None)
        save_steps=20,
        report_to="mlflow",
        run_name="hf_trainer_sparsity",
        use_cpu=True,
        seed=0,
    )
    callback = SparsityCallback(compare_dtype="bfloat16")
    Trainer(model=model, args=args, train_dataset=counting_dataset(tokenizer), callbacks=[callback]).train()

    final = callback.last_measurement
    print(f"\nafter {final.step} optimizer steps at lr={learning_rate:g}, compared in bfloat16:")
    print(
        f"  changed now:   {final.changed_fraction:7.2%} of {final.numel:,} weights "
        f"(update sparsity {final.update_sparsity:.2%})"
    )
    print(f"  ever changed:  {final.ever_changed_fraction:7.2%}")
    print(f"  tracker state saved beside the checkpoints in {args.output_dir}")
    import mlflow

    print(f"\nMLflow run {callback.run_id} at {mlflow.get_tracking_uri()}")
    print(
        "look at it with:  mlflow ui --backend-store-uri "
        f"{os.environ.get('MLFLOW_TRACKING_URI') or 'sqlite:///mlflow.db'}"
    )
    return callback


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--output-dir", default=None, help="Trainer output folder (default: a temporary one)")
    options = parser.parse_args()
    main(options.max_steps, options.learning_rate, options.output_dir)
