"""Reproduce the papers' findings on a pretrained LM (SmolLM2-135M-Instruct), on a CPU, and show what bf16 hides.

    python examples/reproduce_paper.py                    # every part, the documented step counts
    python examples/reproduce_paper.py --parts a --steps 4 --out results.json
    python examples/reproduce_paper.py --tiny --steps 1 --recovery-steps 2   # the tiny built-in model (tests)

Papers: update sparsity of RL fine-tuning, 68-96 % of bf16 weights unchanged (arXiv 2505.11711); the
subnetworks of different seeds and algorithms overlap far above chance and training only the subnetwork
recovers the full model (arXiv 2507.17107); fp32 updates below half a bf16 ulp vanish in bf16 checkpoints,
the "precision gate" (arXiv 2511.08567).

Parts (each runnable alone with ``--parts``; a part trains what it needs, runs shared within one process are
trained once):

a. update sparsity compared in bf16 after ``--steps`` (default 3) steps of GRPO at lr 1e-6 and 1e-5, DPO
   and SFT, from the dequantized fp32 base (only ~21 % of its weights are bf16 values) and from the base
   rounded to bf16; also the fraction changed in fp32 and the share of changed elements that moved >= 255
   ulps (bf16 and fp32 compare: the regime of the fingerprint estimator).
b. overlap of the bf16 masks of two GRPO seeds and of GRPO vs DPO, against the uniform and the
   magnitude-matched chance (strata: tensor x bf16 exponent of the base weight).
c. subnetwork recovery: GRPO from the bf16 base for ``--recovery-steps`` (default 8) at ``--recovery-lr``
   (default 5e-5, where the short-answer reward rises within 8 steps), then the same run (same init, seed,
   data) trained only on its ever-changed bf16 mask, and on a random mask of the same density: fraction of
   elements identical to the full run's final weights exactly and within 1e-5 / 1e-4 (and of the untrained
   base, the floor), and the reward curves per step.
d. rank of the updates (final - base) of the 2-D weights, as rank / min(shape).

The GRPO task (all parts): small sums, rewarded 1 for the right number plus a short-answer term (1 − chars/48
when the answer holds a number, else 0). SmolLM2 learns the short answers within about 10 steps at lr 5e-5
(0.40 -> 0.96 in a 12-step trial); the right-sum rate (0-25 % per step) does not move on a CPU budget.
``--tiny``: the tiny model built in code, on word tasks its tokenizer can spell.

Every training run is an MLflow run (``MLFLOW_TRACKING_URI`` or ``mlflow.db`` here) with the sparsity
metrics; the results go to ``--out`` as JSON and are printed as tables.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _models import TINY_WORDS, load_model, tiny_model, tiny_tokenizer  # noqa: E402
from trl_grpo import (  # noqa: E402
    _last_integer,
    _text,
    arithmetic_prompts,
    correct_sum_reward,
    round_to_bf16_,
    target_word_reward,
)

from sparsity_callbacks import Mask, SparsityCallback  # noqa: E402

#: the documented default step counts (README, "Reproducing the papers")
STEPS = 3
RECOVERY_STEPS = 8

PAPERS = {
    "update sparsity (bf16), RL": "68.5-96 % of weights unchanged in published RL checkpoints (2505.11711)",
    "update sparsity, SFT": "much lower than RL: SFT updates are dense (2505.11711)",
    "overlap of seeds / algorithms": "far above the uniform chance (2505.11711, 2507.17107)",
    "subnetwork recovery": "94.0 % (DPO) / 90.5 % (PRIME) identical within 1e-5, 100 % within 1e-4 (2505.11711)",
    "rank of updates": "> 99 % of full rank (2505.11711)",
    "precision gate": "fp32 updates under half a bf16 ulp vanish in bf16 checkpoints (2511.08567)",
}


#: characters of answer over which the short-answer reward falls from 1 to 0
SHORT_ANSWER_SCALE_CHARS = 48


@dataclass
class Options:
    # Defaults: see the README ("Reproducing the papers") for what they take on 2 cores.
    steps: int = STEPS  # optimizer steps per run (parts a, b, d)
    recovery_steps: int = RECOVERY_STEPS  # per run of part c
    recovery_lr: float = 5e-5  # part c: the short-answer format is learned within RECOVERY_STEPS at this lr
    num_generations: int = 4
    max_completion_length: int = 16
    sft_lr: float = 1e-5
    dpo_lr: float = 1e-6
    rank_layers: tuple[int, ...] | None = None  # part d; None: the first, middle and last layer
    tiny: bool = False  # the tiny model built in code, on word tasks (tests)
    out: str = "reproduce_paper.json"
    output_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="reproduce_paper_"))


def short_answer_reward(completions: list, **kwargs) -> list[float]:
    """``1 − characters / SHORT_ANSWER_SCALE_CHARS`` (floored at 0) for an answer that holds a number, else 0:
    the format SmolLM2 learns within a CPU budget ("42" scores 0.96, "17 + 25 = 42" 0.75, a ramble 0)."""
    rewards = []
    for completion in completions:
        text = _text(completion).strip()
        has_number = _last_integer(text) is not None
        rewards.append(max(0.0, 1.0 - len(text) / SHORT_ANSWER_SCALE_CHARS) if has_number else 0.0)
    return rewards


@dataclass
class Task:
    """What the runs train on: GRPO prompts and rewards, DPO preference pairs, SFT demonstrations."""

    name: str
    grpo_prompts: Callable[[int], Any]
    grpo_rewards: list[Callable]
    preference_pairs: Callable[[int], Any]
    demonstrations: Callable[[int], Any]


def _small_sums_task() -> Task:
    return Task(
        name="small sums (right number + short answer)",
        grpo_prompts=lambda seed: arithmetic_prompts(seed=seed),
        grpo_rewards=[correct_sum_reward, short_answer_reward],
        preference_pairs=lambda seed: _preference_pairs(seed),
        demonstrations=lambda seed: _demonstrations(seed),
    )


def _tiny_words_task() -> Task:
    """The tiny model's tasks, in words its tokenizer spells: emit ``w7`` (GRPO), count up (DPO, SFT)."""
    from datasets import Dataset

    def prompts(seed: int):
        rng = random.Random(seed)
        return Dataset.from_dict(
            {"prompt": [" ".join(f"w{rng.randrange(TINY_WORDS)}" for _ in range(6)) for _ in range(64)]}
        )

    def counting(seed: int, n: int = 64):
        rng = random.Random(seed)
        starts = [rng.randrange(TINY_WORDS - 6) for _ in range(n)]
        return starts, rng

    def pairs(seed: int):
        starts, rng = counting(seed)
        return Dataset.from_dict(
            {
                "prompt": [" ".join(f"w{s + i}" for i in range(3)) for s in starts],
                "chosen": [" " + " ".join(f"w{s + 3 + i}" for i in range(3)) for s in starts],
                "rejected": [" " + " ".join(f"w{rng.randrange(TINY_WORDS)}" for _ in range(3)) for _ in starts],
            }
        )

    def demonstrations(seed: int):
        starts, _ = counting(seed)
        return Dataset.from_dict(
            {
                "prompt": [" ".join(f"w{s + i}" for i in range(3)) for s in starts],
                "completion": [" " + " ".join(f"w{s + 3 + i}" for i in range(3)) for s in starts],
            }
        )

    return Task("tiny words (w7; counting up)", prompts, [target_word_reward], pairs, demonstrations)


@dataclass
class Run:
    """One finished training run: what the parts need of it."""

    label: str
    seconds: float
    mask: Mask  # ever-changed, compared in bf16
    metrics: dict[str, float]
    representable: float | None
    rewards: list[float]  # mean total reward per step (GRPO; empty otherwise)
    reward_terms: dict[str, list[float]] = field(default_factory=dict)  # per reward function, per step
    final: dict[str, torch.Tensor] | None = None  # final weights (kept only when a part needs them)
    run_id: str | None = None
    ulps: dict[str, float] = field(default_factory=dict)


class Lab:
    """The base model (loaded once), its bf16-rounded copy, and a cache of finished runs."""

    def __init__(self, options: Options, model: str | None = None) -> None:
        self.options = options
        started = time.perf_counter()
        if options.tiny:
            self.tokenizer = tiny_tokenizer()
            self.model = tiny_model(self.tokenizer)
            self.task = _tiny_words_task()
        else:
            self.model, self.tokenizer = load_model(model)
            self.task = _small_sums_task()
        layers = self.model.config.num_hidden_layers
        self.rank_layers = options.rank_layers or tuple(sorted({0, layers // 2, layers - 1}))
        self.load_seconds = time.perf_counter() - started
        self.bases = {"dequantized": self.model.state_dict()}
        rounded = copy.deepcopy(self.model)
        round_to_bf16_(rounded)
        self.bases["bf16"] = rounded.state_dict()
        self.runs: dict[str, Run] = {}

    def base_weights(self, base: str) -> dict[str, torch.Tensor]:
        """The tracked parameters of a base (tied weights once), by name."""
        names = {n for n, _ in self.model.named_parameters()}
        return {n: t for n, t in self.bases[base].items() if n in names}

    def run(self, kind: str, base: str, lr: float, seed: int = 0, steps: int | None = None, **kw) -> Run:
        key = f"{kind} lr={lr:g} base={base} seed={seed} steps={steps or self.options.steps}"
        key += "".join(f" {k}={os.path.basename(v)}" for k, v in sorted(kw.items()) if v is not None)
        if key not in self.runs:
            self.runs[key] = self._train(key, kind, base, lr, seed, steps or self.options.steps, **kw)
        return self.runs[key]

    def _train(
        self,
        label: str,
        kind: str,
        base: str,
        lr: float,
        seed: int,
        steps: int,
        freeze_mask: str | None = None,
    ) -> Run:
        """Train a copy of ``base``; keeps the final weights of runs from the bf16 base (parts c, d need them)."""
        import mlflow

        model = copy.deepcopy(self.model)
        model.load_state_dict(self.bases[base])
        # exact bf16 reference, eager kernels (no compile warm-up per run), no churn, no artifacts: the figures
        # here are the final counts; the per-step curves are in each MLflow run
        callback = SparsityCallback(
            compare_dtype="bfloat16",
            mode="exact",
            compile=False,
            track_churn=False,
            log_artifacts=False,
            freeze_mask=freeze_mask,
        )
        started = time.perf_counter()
        trainer = _trainer(kind, model, self.tokenizer, self.task, lr, seed, steps, self.options, callback, label)
        trainer.train()
        seconds = time.perf_counter() - started
        if mlflow.active_run() is not None:
            mlflow.end_run()
        base_weights = self.base_weights(base)
        final = {n: p.detach().clone() for n, p in model.named_parameters() if n in base_weights}
        m = callback.last_measurement
        metrics = {
            "changed_fraction_bf16": m.changed_fraction,
            "ever_changed_fraction_bf16": m.ever_changed_fraction,
            "changed_fraction_fp32": _fraction_changed(base_weights, final, None),
        }
        run = Run(
            label=label,
            seconds=seconds,
            mask=callback.tracker.ever_changed_mask(),
            metrics=metrics,
            representable=callback.tracker.reference_representable_fraction,
            rewards=[e["reward"] for e in trainer.state.log_history if "reward" in e],
            reward_terms={
                f.__name__: [e[f"rewards/{f.__name__}/mean"] for e in trainer.state.log_history if "reward" in e]
                for f in (self.task.grpo_rewards if kind == "grpo" else [])
            },
            final=final if base == "bf16" else None,
            run_id=callback.run_id,
            ulps=_ulp_shares(base_weights, final),
        )
        print(f"  {label}: {seconds:.0f} s, bf16 changed {metrics['changed_fraction_bf16']:.4%}", flush=True)
        return run


def _trainer(kind, model, tokenizer, task: Task, lr, seed, steps, options: Options, callback, label):
    """A TRL trainer for ``kind`` in ("grpo", "dpo", "sft") on ``task``."""
    common = dict(
        output_dir=os.path.join(options.output_dir, label.replace(" ", "_").replace("=", "")),
        max_steps=steps,
        learning_rate=lr,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="mlflow",
        run_name=f"reproduce_paper: {label}",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        seed=seed,
        data_seed=seed,
    )
    if kind == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        args = GRPOConfig(
            **common,
            per_device_train_batch_size=options.num_generations,
            num_generations=options.num_generations,
            max_completion_length=options.max_completion_length,
            beta=0.0,
        )
        return GRPOTrainer(
            model=model,
            reward_funcs=task.grpo_rewards,
            args=args,
            train_dataset=task.grpo_prompts(seed),
            processing_class=tokenizer,
            callbacks=[callback],
        )
    if kind == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(**common, per_device_train_batch_size=4, beta=0.1, max_length=64)
        return DPOTrainer(
            model=model,
            ref_model=copy.deepcopy(model),  # the frozen reference policy: the base (TRL would reload it by name)
            args=args,
            train_dataset=task.preference_pairs(seed),
            processing_class=tokenizer,
            callbacks=[callback],
        )
    if kind == "sft":
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(**common, per_device_train_batch_size=4, max_length=64)
        data = task.demonstrations(seed)
        return SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[callback])
    raise ValueError(f"kind must be 'grpo', 'dpo' or 'sft', got {kind!r}")


def _sums(n: int, seed: int):
    rng = random.Random(seed)
    for _ in range(n):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        yield a, b, [{"role": "user", "content": f"What is {a}+{b}? Answer with the number only."}]


def _preference_pairs(seed: int, n: int = 256):
    """DPO pairs: the right sum is chosen, a near miss rejected."""
    from datasets import Dataset

    rng = random.Random(seed + 1)
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for a, b, prompt in _sums(n, seed):
        wrong = a + b + rng.choice([-10, -2, -1, 1, 2, 10])
        rows["prompt"].append(prompt)
        rows["chosen"].append([{"role": "assistant", "content": str(a + b)}])
        rows["rejected"].append([{"role": "assistant", "content": str(wrong)}])
    return Dataset.from_dict(rows)


def _demonstrations(seed: int, n: int = 256):
    """SFT prompt/completion pairs: the right sum."""
    from datasets import Dataset

    rows = {"prompt": [], "completion": []}
    for a, b, prompt in _sums(n, seed):
        rows["prompt"].append(prompt)
        rows["completion"].append([{"role": "assistant", "content": str(a + b)}])
    return Dataset.from_dict(rows)


# --- counting -----------------------------------------------------------------------------------------------


def _ordered(bits: torch.Tensor, width: int) -> torch.Tensor:
    """Float bit patterns (as int64) mapped to integers in the floats' order, so a difference is in ulps."""
    sign = 1 << (width - 1)
    return torch.where(bits & sign != 0, -(bits & (sign - 1)), bits)


def _ulp_distance(base: torch.Tensor, final: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    view, width = (torch.int16, 16) if dtype == torch.bfloat16 else (torch.int32, 32)
    a = base.to(dtype).view(view).to(torch.int64) & ((1 << width) - 1)
    b = final.to(dtype).view(view).to(torch.int64) & ((1 << width) - 1)
    return (_ordered(b, width) - _ordered(a, width)).abs()


def _ulp_shares(base: dict[str, torch.Tensor], final: dict[str, torch.Tensor]) -> dict[str, float]:
    """Among elements changed in bf16 (in fp32), the share that moved >= 255 ulps of that dtype."""
    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        changed = far = 0
        for n, b in base.items():
            d = _ulp_distance(b.reshape(-1), final[n].reshape(-1), dtype)
            changed += int((d > 0).sum())
            far += int((d >= 255).sum())
        out[f"share_ge_255_ulps_{name}"] = far / changed if changed else math.nan
        out[f"changed_{name}"] = changed
    return out


def _fraction_changed(base, final, dtype: torch.dtype | None, atol: float = 0.0) -> float:
    changed = numel = 0
    for n, b in base.items():
        f = final[n]
        if dtype is not None:
            b, f = b.to(dtype), f.to(dtype)
        if atol:
            changed += int(((f.double() - b.double()).abs() > atol).sum())
        else:
            changed += int((f != b).sum())
        numel += b.numel()
    return changed / numel


# --- parts --------------------------------------------------------------------------------------------------


def part_a(lab: Lab) -> dict:
    """Update sparsity in bf16 per algorithm and base."""
    o = lab.options
    rows = {}
    for base in ("dequantized", "bf16"):
        for kind, lr in (("grpo", 1e-6), ("grpo", 1e-5), ("dpo", o.dpo_lr), ("sft", o.sft_lr)):
            run = lab.run(kind, base, lr)
            rows[f"{kind} lr={lr:g} from {base} base"] = {
                "steps": o.steps,
                "seconds": round(run.seconds, 1),
                "reference_representable_fraction_bf16": run.representable,
                "update_sparsity_bf16": 1 - run.metrics["changed_fraction_bf16"],
                "changed_fraction_bf16": run.metrics["changed_fraction_bf16"],
                "changed_fraction_fp32": run.metrics["changed_fraction_fp32"],
                **run.ulps,
                "mlflow_run_id": run.run_id,
            }
    return rows


def part_b(lab: Lab) -> dict:
    """Overlap of two GRPO seeds and of GRPO vs DPO (bf16 masks from the bf16 base)."""
    o = lab.options
    reference = lab.base_weights("bf16")
    grpo0 = lab.run("grpo", "bf16", 1e-5, seed=0)
    grpo1 = lab.run("grpo", "bf16", 1e-5, seed=1)
    dpo = lab.run("dpo", "bf16", o.dpo_lr)
    rows = {}
    for label, (a, b) in {"GRPO seed 0 vs seed 1": (grpo0, grpo1), "GRPO vs DPO": (grpo0, dpo)}.items():
        ov = a.mask.overlap(b.mask, reference=reference)
        rows[label] = {
            "density_a": a.mask.density,
            "density_b": b.mask.density,
            "overlap_ab": ov.overlap_ab,
            "chance_uniform": ov.chance_ab,
            "chance_magnitude_matched": ov.chance_magnitude_matched,
            "jaccard": ov.jaccard,
            "chance_jaccard_uniform": ov.chance_jaccard,
            "chance_jaccard_magnitude_matched": ov.chance_magnitude_matched_jaccard,
        }
    return rows


def part_c(lab: Lab) -> dict:
    """Subnetwork recovery: the full GRPO run vs the same run on its bf16 mask and on a random mask."""
    o = lab.options
    steps, lr = o.recovery_steps, o.recovery_lr
    full = lab.run("grpo", "bf16", lr, steps=steps)
    folder = tempfile.mkdtemp(prefix="reproduce_masks_")
    discovered = os.path.join(folder, "discovered.safetensors")
    full.mask.save(discovered)
    gen = torch.Generator().manual_seed(0)
    density = full.mask.density
    random_mask = Mask(
        {n: torch.rand(full.mask.shapes[n], generator=gen) < density for n in full.mask.names},
        signatures=full.mask.signatures,
    )
    random_path = os.path.join(folder, "random.safetensors")
    random_mask.save(random_path)
    base = lab.base_weights("bf16")
    runs = {
        "full": (full, None),
        "discovered mask": (lab.run("grpo", "bf16", lr, steps=steps, freeze_mask=discovered), full.mask),
        "random mask, same density": (lab.run("grpo", "bf16", lr, steps=steps, freeze_mask=random_path), random_mask),
    }
    out = {}
    for label, (run, mask) in runs.items():
        row = _identical(full.final, run.final)
        row = {
            "steps": steps,
            "learning_rate": lr,
            "trained_fraction": 1.0 if mask is None else mask.density,
            **row,
            # the freeze is bit-exact: outside the trained mask nothing may differ from the base
            "changed_outside_trained_mask": None if mask is None else _changed_outside(base, run.final, mask),
            "reward_curve": run.rewards,
            "reward_terms": run.reward_terms,
            "reward_first_quarter": _quarter(run.rewards, first=True),
            "reward_last_quarter": _quarter(run.rewards, first=False),
            "seconds": round(run.seconds, 1),
            "mlflow_run_id": run.run_id,
        }
        out[label] = row
        if run.run_id is not None and mask is not None:
            _log_recovery(run.run_id, row)
    # the floor: how much of the full run's final weights the untrained base already matches
    out["base, untrained"] = {"steps": 0, "trained_fraction": 0.0, **_identical(full.final, base)}
    return out


def _identical(full: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> dict[str, float]:
    """Fraction of elements of ``other`` identical to ``full``: bit for bit, and within 1e-5 / 1e-4."""
    return {
        "identical_exact": 1 - _fraction_changed(full, other, None),
        "identical_within_1e-5": 1 - _fraction_changed(full, other, None, atol=1e-5),
        "identical_within_1e-4": 1 - _fraction_changed(full, other, None, atol=1e-4),
    }


def _changed_outside(base: dict[str, torch.Tensor], final: dict[str, torch.Tensor], mask: Mask) -> int:
    """Elements outside ``mask`` whose bits differ from the base (0 when the freeze held)."""
    total = 0
    for name, b in base.items():
        outside = ~mask[name].reshape(b.shape)
        total += int((final[name].view(torch.int32) != b.view(torch.int32))[outside].sum())
    return total


def _log_recovery(run_id: str, row: dict) -> None:
    """The recovery figures as metrics of the masked run (``recovery/...``), beside its reward curve."""
    from mlflow import MlflowClient

    client = MlflowClient()
    for key in ("trained_fraction", "identical_exact", "identical_within_1e-5", "identical_within_1e-4"):
        client.log_metric(run_id, f"recovery/{key}", float(row[key]))


def _quarter(values: list[float], first: bool) -> float:
    k = max(1, len(values) // 4)
    return _mean(values[:k] if first else values[-k:])


def part_d(lab: Lab) -> dict:
    """Rank / min(shape) of the update of the 2-D weights of some layers (GRPO lr 1e-5 and SFT, bf16 base)."""
    o = lab.options
    base = lab.base_weights("bf16")
    out = {}
    for kind, lr in (("grpo", 1e-5), ("sft", o.sft_lr)):
        run = lab.run(kind, "bf16", lr)
        ranks = {}
        for name, b in base.items():
            layer = _layer(name)
            if b.dim() != 2 or layer is None or layer not in lab.rank_layers:
                continue
            delta = (run.final[name] - b).double()
            ranks[name] = int(torch.linalg.matrix_rank(delta)) / min(delta.shape)
        out[f"{kind} lr={lr:g}"] = {
            "tensors": len(ranks),
            "mean_relative_rank": _mean(list(ranks.values())),
            "min_relative_rank": min(ranks.values()) if ranks else math.nan,
            "per_tensor": ranks,
        }
    return out


def _layer(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


PARTS = {"a": part_a, "b": part_b, "c": part_c, "d": part_d}


def main(parts: str = "abcd", options: Options | None = None, model: str | None = None) -> dict:
    if not parts or set(parts) - set(PARTS):
        raise ValueError(f"parts takes letters from 'abcd' (e.g. 'a' or 'bc'), got {parts!r}")
    options = options or Options()
    started = time.perf_counter()
    lab = Lab(options, model)
    results: dict = {
        "model": lab.model.config.name_or_path,
        "load_seconds": round(lab.load_seconds, 1),
        "task": lab.task.name,
        "options": {k: v for k, v in vars(options).items() if k != "output_dir"},
        "rank_layers": list(lab.rank_layers),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_start": _load_average(),
        "papers": PAPERS,
    }
    for part in parts:
        part_started = time.perf_counter()
        print(f"part {part}: {PARTS[part].__doc__.splitlines()[0]}", flush=True)
        results[part] = PARTS[part](lab)
        results[f"{part}_seconds"] = round(time.perf_counter() - part_started, 1)
        with open(options.out, "w") as handle:  # after every part: a crash keeps what is done
            json.dump(results, handle, indent=1, default=str)
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    results["load_average_end"] = _load_average()
    with open(options.out, "w") as handle:
        json.dump(results, handle, indent=1, default=str)
    _print(results)
    return results


def _load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _print(results: dict) -> None:
    def pct(x):
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2%}"

    if "a" in results:
        print("\n(a) update sparsity after", results["options"]["steps"], "steps")
        for label, r in results["a"].items():
            print(
                f"  {label:<34} bf16 changed {pct(r['changed_fraction_bf16']):>8}  fp32 changed "
                f"{pct(r['changed_fraction_fp32']):>8}  >=255 ulps: bf16 {pct(r['share_ge_255_ulps_bf16'])} "
                f"fp32 {pct(r['share_ge_255_ulps_fp32'])}  ({r['seconds']} s)"
            )
    if "b" in results:
        print("\n(b) overlap of bf16 masks")
        for label, r in results["b"].items():
            print(
                f"  {label:<24} o(A,B) {r['overlap_ab']:.3f}  uniform chance {r['chance_uniform']:.3f}  "
                f"magnitude-matched chance {r['chance_magnitude_matched']:.3f}"
            )
    if "c" in results:
        print("\n(c) subnetwork recovery")
        for label, r in results["c"].items():
            reward = (
                f"  reward {r['reward_first_quarter']:.3f} -> {r['reward_last_quarter']:.3f}"
                if "reward_curve" in r
                else ""
            )
            print(
                f"  {label:<26} trained {pct(r['trained_fraction'])}  identical to full: exact "
                f"{pct(r['identical_exact'])}, 1e-5 {pct(r['identical_within_1e-5'])}, 1e-4 "
                f"{pct(r['identical_within_1e-4'])}{reward}"
            )
    if "d" in results:
        print("\n(d) rank of updates")
        for label, r in results["d"].items():
            print(f"  {label:<14} mean rank/min(shape) {pct(r['mean_relative_rank'])} over {r['tensors']} tensors")
    print(f"\ntotal {results.get('total_seconds')} s; JSON: {results['options']['out']}")


def markdown_tables(results: dict) -> str:
    """The results as the README's Markdown tables (one per part present), with run times and load."""

    def pct(x, digits: int = 2) -> str:
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * 100:.{digits}f} %"

    lines: list[str] = []
    if "a" in results:
        lines += [
            f"**(a) Update sparsity after {results['options']['steps']} steps, compared in bf16**",
            "",
            "| run | base | unchanged in bf16 (update sparsity) | changed in bf16 | changed in fp32 "
            "| changed elements ≥ 255 ulps: bf16 / fp32 | run time |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, r in results["a"].items():
            run, base = label.split(" from ")
            representable = r["reference_representable_fraction_bf16"]
            lines.append(
                f"| {run} | {base.removesuffix(' base')} ({representable * 100:.1f} % bf16 values) "
                f"| {pct(r['update_sparsity_bf16'])} | {pct(r['changed_fraction_bf16'])} "
                f"| {pct(r['changed_fraction_fp32'])} | {pct(r['share_ge_255_ulps_bf16'], 3)} / "
                f"{pct(r['share_ge_255_ulps_fp32'], 1)} | {r['seconds']:.0f} s |"
            )
        lines.append("")
    if "b" in results:
        lines += [
            "**(b) Overlap of the bf16 ever-changed masks (bf16 base)**",
            "",
            "| masks | density A / B | o(A,B) | uniform chance | magnitude-matched chance | Jaccard "
            "| uniform / matched chance |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, r in results["b"].items():
            lines.append(
                f"| {label} | {pct(r['density_a'])} / {pct(r['density_b'])} | {r['overlap_ab']:.3f} "
                f"| {r['chance_uniform']:.3f} | {r['chance_magnitude_matched']:.3f} | {r['jaccard']:.3f} "
                f"| {r['chance_jaccard_uniform']:.3f} / {r['chance_jaccard_magnitude_matched']:.3f} |"
            )
        lines.append("")
    if "c" in results:
        full = results["c"]["full"]
        lines += [
            f"**(c) Subnetwork recovery, GRPO {full['steps']} steps at lr {full['learning_rate']:g} "
            "from the bf16 base**",
            "",
            "| run | trained fraction | identical to the full run: exactly | within 1e-5 | within 1e-4 "
            "| changed outside its mask | reward per step | reward terms, first → last quarter | run time |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for label, r in results["c"].items():
            identical = (
                f"{pct(r['identical_exact'])} | {pct(r['identical_within_1e-5'])} | {pct(r['identical_within_1e-4'])}"
            )
            if "reward_curve" not in r:  # the untrained base: the floor
                lines.append(f"| {label} | {pct(r['trained_fraction'])} | {identical} | — | — | — | — |")
                continue
            curve = " ".join(f"{v:.2f}" for v in r["reward_curve"])
            terms = ", ".join(
                f"{name.removesuffix('_reward')} {_quarter(v, first=True):.2f} → {_quarter(v, first=False):.2f}"
                for name, v in r["reward_terms"].items()
            )
            outside = "—" if r["changed_outside_trained_mask"] is None else str(r["changed_outside_trained_mask"])
            lines.append(
                f"| {label} | {pct(r['trained_fraction'])} | {identical} | {outside} | {curve} | {terms} "
                f"| {r['seconds']:.0f} s |"
            )
        lines.append("")
    if "d" in results:
        layers = ", ".join(str(layer) for layer in results.get("rank_layers", []))
        lines += [
            "**(d) Rank of the updates, rank / min(shape) of final − base**",
            "",
            f"| run | 2-D tensors (layers {layers}) | mean | min |",
            "|---|---|---|---|",
        ]
        for label, r in results["d"].items():
            lines.append(
                f"| {label} | {r['tensors']} | {pct(r['mean_relative_rank'])} | {pct(r['min_relative_rank'])} |"
            )
        lines.append("")
    times = ", ".join(f"part {p} {results[f'{p}_seconds'] / 60:.1f} min" for p in "abcd" if f"{p}_seconds" in results)
    lines.append(
        f"Run time: {(results.get('total_seconds') or 0) / 60:.1f} min in all ({times}; loading "
        f"{results.get('load_seconds')} s); load average (1, 5, 15 min) {results.get('load_average_start')} at the "
        f"start, {results.get('load_average_end')} at the end; {results.get('cpu_count')} CPUs."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="abcd", help="which parts, e.g. 'a' or 'bc' (default: all)")
    parser.add_argument("--model", default=None, help="model folder, .gguf file or hub id (default: SmolLM2-135M)")
    parser.add_argument("--steps", type=int, default=Options.steps, help="optimizer steps per run, parts a, b, d")
    parser.add_argument("--recovery-steps", type=int, default=Options.recovery_steps, help="steps per run, part c")
    parser.add_argument("--recovery-lr", type=float, default=Options.recovery_lr, help="learning rate, part c")
    parser.add_argument("--tiny", action="store_true", help="the tiny built-in model on word tasks (seconds; tests)")
    parser.add_argument("--out", default=Options.out, help="where to write the JSON results")
    parser.add_argument("--tables", metavar="JSON", help="only print the README tables of a results file")
    args = parser.parse_args()
    if args.tables:
        with open(args.tables) as handle:
            print(markdown_tables(json.load(handle)))
        sys.exit(0)
    options = Options(
        steps=args.steps,
        recovery_steps=args.recovery_steps,
        recovery_lr=args.recovery_lr,
        tiny=args.tiny,
        out=args.out,
    )
    main(args.parts, options, args.model)
