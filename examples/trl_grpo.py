"""Watch update sparsity appear during GRPO, live in MLflow: TRL's GRPOTrainer + one callback.

    python examples/trl_grpo.py            # about 1-2 minutes on a laptop CPU
    mlflow ui --backend-store-uri sqlite:///mlflow.db

A tiny Llama-style model (built from config, random weights) learns to say a target word: the verifiable
reward is the fraction of completion tokens equal to it. With a realistic RL learning rate (5e-6) and the
comparison done in bfloat16 (as a bf16 checkpoint would be saved), most weights never change: the
``sparsity/...`` charts of the run show the changed fraction now, the ever-changed fraction, churn, and
the split per layer and per module type. At the end, the ever-changed mask, ``report.json``, a heatmap and
the curves are attached to the run under ``sparsity/``.

MLflow: ``MLFLOW_TRACKING_URI`` if set, else MLflow's default local store ``mlflow.db`` in this folder.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import GRPOConfig, GRPOTrainer

from sparsity_callbacks import SparsityCallback

TARGET = "w7"


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``w0 .. w59`` and four special tokens, built in code (no download)."""
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i + 4 for i in range(60)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )


def make_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A 4-layer Llama-style causal LM (~0.2 M parameters) with random weights."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    return LlamaForCausalLM(config)


def target_word_reward(completions: list[str], **kwargs) -> list[float]:
    """Verifiable reward in [0, 1]: the fraction of completion words equal to ``TARGET``."""
    rewards = []
    for completion in completions:
        words = completion.split()
        rewards.append(words.count(TARGET) / len(words) if words else 0.0)
    return rewards


def main(max_steps: int = 20, learning_rate: float = 5e-6, output_dir: str | None = None) -> SparsityCallback:
    tokenizer = make_tokenizer()
    model = make_model(tokenizer)
    prompts = Dataset.from_dict({"prompt": [" ".join(f"w{(5 * i + j) % 60}" for j in range(6)) for i in range(64)]})
    args = GRPOConfig(
        output_dir=output_dir or tempfile.mkdtemp(prefix="trl_grpo_"),
        max_steps=max_steps,
        learning_rate=learning_rate,
        per_device_train_batch_size=8,
        num_generations=8,
        max_completion_length=12,
        temperature=1.0,
        logging_steps=2,
        save_strategy="no",
        report_to="mlflow",  # the sparsity metrics go into the same run as the loss and the reward
        run_name="trl_grpo_sparsity",
        use_cpu=True,
        seed=0,
    )
    callback = SparsityCallback(compare_dtype="bfloat16")
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=target_word_reward,
        args=args,
        train_dataset=prompts,
        processing_class=tokenizer,
        callbacks=[callback],
    )
    trainer.train()

    final = callback.last_measurement
    print(f"\nafter {final.step} GRPO steps at lr={learning_rate:g}, compared in bfloat16:")
    print(
        f"  changed now:   {final.changed_fraction:7.2%} of {final.numel:,} weights "
        f"(update sparsity {final.update_sparsity:.2%})"
    )
    print(f"  ever changed:  {final.ever_changed_fraction:7.2%}")
    by_module = final.by_module_type()
    for name, counts in sorted(by_module.items(), key=lambda kv: -kv[1].changed / kv[1].numel)[:4]:
        print(f"  {name:<22} {counts.changed / counts.numel:7.2%} changed")
    import mlflow

    print(f"\nMLflow run {callback.run_id} at {mlflow.get_tracking_uri()}")
    print(
        "look at it with:  mlflow ui --backend-store-uri "
        f"{os.environ.get('MLFLOW_TRACKING_URI') or 'sqlite:///mlflow.db'}   (then open the run's Model metrics tab)"
    )
    return callback


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--learning-rate", type=float, default=5e-6)
    parser.add_argument("--output-dir", default=None, help="Trainer output folder (default: a temporary one)")
    options = parser.parse_args()
    main(options.max_steps, options.learning_rate, options.output_dir)
