"""Update sparsity under DPO: TRL's DPOTrainer on synthetic preference pairs + one callback.

    python examples/trl_dpo.py             # about 1 minute on a laptop CPU
    mlflow ui --backend-store-uri sqlite:///mlflow.db

A tiny Llama-style model (built from config) is taught to prefer "counting up" continuations
(``w3 w4 w5`` after ``w0 w1 w2``) over random ones. The comparison is done in bfloat16, as the papers
measured published checkpoints, so fp32 drift below one bf16 ulp does not count as a change.

MLflow: ``MLFLOW_TRACKING_URI`` if set, else MLflow's default local store ``mlflow.db`` in this folder.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile

from datasets import Dataset
from trl import DPOConfig, DPOTrainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _models import TINY_WORDS as N_WORDS  # noqa: E402  (the examples' shared tiny model, next to this file)
from _models import tiny_model, tiny_tokenizer  # noqa: E402

from sparsity_callbacks import SparsityCallback  # noqa: E402


def preference_pairs(n: int = 256, seed: int = 0) -> Dataset:
    """``prompt`` = three consecutive words, ``chosen`` = the next three, ``rejected`` = three random words."""
    rng = random.Random(seed)
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(n):
        start = rng.randrange(N_WORDS - 6)
        rows["prompt"].append(" ".join(f"w{start + i}" for i in range(3)))
        rows["chosen"].append(" " + " ".join(f"w{start + 3 + i}" for i in range(3)))
        rows["rejected"].append(" " + " ".join(f"w{rng.randrange(N_WORDS)}" for _ in range(3)))
    return Dataset.from_dict(rows)


def main(max_steps: int = 40, learning_rate: float = 5e-6, output_dir: str | None = None) -> SparsityCallback:
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    ref_model = tiny_model(tokenizer)  # the same weights (same seed): the frozen DPO reference policy
    args = DPOConfig(
        output_dir=output_dir or tempfile.mkdtemp(prefix="trl_dpo_"),
        max_steps=max_steps,
        learning_rate=learning_rate,
        per_device_train_batch_size=16,
        beta=0.1,
        max_length=16,
        logging_steps=5,
        save_strategy="no",
        report_to="mlflow",
        run_name="trl_dpo_sparsity",
        use_cpu=True,
        seed=0,
    )
    callback = SparsityCallback(compare_dtype="bfloat16")
    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=preference_pairs(),
        processing_class=tokenizer,
        callbacks=[callback],
    )
    trainer.train()

    final = callback.last_measurement
    print(f"\nafter {final.step} DPO steps at lr={learning_rate:g}, compared in bfloat16:")
    print(
        f"  changed now:   {final.changed_fraction:7.2%} of {final.numel:,} weights "
        f"(update sparsity {final.update_sparsity:.2%})"
    )
    print(f"  ever changed:  {final.ever_changed_fraction:7.2%}")
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
    parser.add_argument("--learning-rate", type=float, default=5e-6)
    parser.add_argument("--output-dir", default=None, help="Trainer output folder (default: a temporary one)")
    options = parser.parse_args()
    main(options.max_steps, options.learning_rate, options.output_dir)
