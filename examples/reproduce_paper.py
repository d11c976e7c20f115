"""Reproduce the papers' findings on a pretrained LM (SmolLM2-135M-Instruct), on a CPU, and show what bf16 hides.

    python examples/reproduce_paper.py                    # every part, the documented step counts
    python examples/reproduce_paper.py --parts a --steps 4 --out results.json

Papers: update sparsity of RL fine-tuning, 68-96 % of bf16 weights unchanged (arXiv 2505.11711); the
subnetworks of different seeds and algorithms overlap far above chance and training only the subnetwork
recovers the full model (arXiv 2507.17107); fp32 updates below half a bf16 ulp vanish in bf16 checkpoints,
the "precision gate" (arXiv 2511.08567).

Parts (each runnable alone with ``--parts``; a part trains what it needs, runs shared within one process are
trained once):

a. update sparsity compared in bf16 after N steps of GRPO at lr 1e-6 and 1e-5, DPO and SFT, from the
   dequantized fp32 base (only ~21 % of its weights are bf16 values) and from the base rounded to bf16; also
   the fraction changed in fp32 and the share of changed elements that moved >= 255 ulps (bf16 and fp32
   compare: the regime of the fingerprint estimator).
b. overlap of the bf16 masks of two GRPO seeds and of GRPO vs DPO, against the uniform and the
   magnitude-matched chance (strata: tensor x bf16 exponent of the base weight).
c. subnetwork recovery: GRPO from the bf16 base, then the same run (same init, seed, data) trained only on
   its ever-changed bf16 mask, and on a random mask of the same density: fraction of elements identical to
   the full run's final weights exactly and within 1e-5 / 1e-4, and the reward curves.
d. rank of the updates (final - base) of the 2-D weights, as rank / min(shape).

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
from dataclasses import dataclass, field

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _models import load_model  # noqa: E402
from trl_grpo import arithmetic_prompts, brevity_reward, correct_sum_reward, round_to_bf16_  # noqa: E402

from sparsity_callbacks import Mask, SparsityCallback  # noqa: E402

PAPERS = {
    "update sparsity (bf16), RL": "68.5-96 % of weights unchanged in published RL checkpoints (2505.11711)",
    "update sparsity, SFT": "much lower than RL: SFT updates are dense (2505.11711)",
    "overlap of seeds / algorithms": "far above the uniform chance (2505.11711, 2507.17107)",
    "subnetwork recovery": "94.0 % (DPO) / 90.5 % (PRIME) identical within 1e-5, 100 % within 1e-4 (2505.11711)",
    "rank of updates": "> 99 % of full rank (2505.11711)",
    "precision gate": "fp32 updates under half a bf16 ulp vanish in bf16 checkpoints (2511.08567)",
}


@dataclass
class Options:
    # Defaults sized for ~30 min on a quiet 2-core machine (GRPO step ~3.2 s, SFT ~1.8 s there, 11 runs);
    # the README's table was taken with --steps 3 --recovery-steps 3 on a machine shared by ~10 processes.
    steps: int = 10  # optimizer steps per run (parts a, b, d)
    recovery_steps: int = 10  # per run of part c (equal to `steps`: its full run is part a's GRPO lr 1e-5 run)
    num_generations: int = 4
    max_completion_length: int = 16
    sft_lr: float = 1e-5
    dpo_lr: float = 1e-6
    rank_layers: tuple[int, ...] = (0, 15, 29)
    out: str = "reproduce_paper.json"
    output_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="reproduce_paper_"))


@dataclass
class Run:
    """One finished training run: what the parts need of it."""

    label: str
    seconds: float
    mask: Mask  # ever-changed, compared in bf16
    metrics: dict[str, float]
    representable: float | None
    rewards: list[float]
    final: dict[str, torch.Tensor] | None = None  # final weights (kept only when a part needs them)
    run_id: str | None = None
    ulps: dict[str, float] = field(default_factory=dict)


class Lab:
    """The base model (loaded once), its bf16-rounded copy, and a cache of finished runs."""

    def __init__(self, options: Options, model: str | None = None) -> None:
        self.options = options
        started = time.perf_counter()
        self.model, self.tokenizer = load_model(model)
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
        trainer = _trainer(kind, model, self.tokenizer, lr, seed, steps, self.options, callback, label)
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
            final=final if base == "bf16" else None,
            run_id=callback.run_id,
            ulps=_ulp_shares(base_weights, final),
        )
        print(f"  {label}: {seconds:.0f} s, bf16 changed {metrics['changed_fraction_bf16']:.4%}", flush=True)
        return run


def _trainer(kind, model, tokenizer, lr, seed, steps, options: Options, callback, label):
    """A TRL trainer for ``kind`` in ("grpo", "dpo", "sft") on the small-sums task."""
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
            reward_funcs=[correct_sum_reward, brevity_reward],
            args=args,
            train_dataset=arithmetic_prompts(seed=seed),
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
            train_dataset=_preference_pairs(seed),
            processing_class=tokenizer,
            callbacks=[callback],
        )
    if kind == "sft":
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(**common, per_device_train_batch_size=4, max_length=64)
        data = _demonstrations(seed)
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
    full = lab.run("grpo", "bf16", 1e-5, steps=o.recovery_steps)
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
    rows = {"full": full}
    rows["discovered mask"] = lab.run("grpo", "bf16", 1e-5, steps=o.recovery_steps, freeze_mask=discovered)
    rows["random mask, same density"] = lab.run("grpo", "bf16", 1e-5, steps=o.recovery_steps, freeze_mask=random_path)
    out = {}
    for label, run in rows.items():
        out[label] = {
            "trained_fraction": 1.0 if label == "full" else (density if "discovered" in label else random_mask.density),
            "identical_exact": 1 - _fraction_changed(full.final, run.final, None),
            "identical_within_1e-5": 1 - _fraction_changed(full.final, run.final, None, atol=1e-5),
            "identical_within_1e-4": 1 - _fraction_changed(full.final, run.final, None, atol=1e-4),
            "reward_curve": run.rewards,
            "reward_first_quarter": _mean(run.rewards[: max(1, len(run.rewards) // 4)]),
            "reward_last_quarter": _mean(run.rewards[-max(1, len(run.rewards) // 4) :]),
            "seconds": round(run.seconds, 1),
        }
    return out


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
            if b.dim() != 2 or layer is None or layer not in o.rank_layers:
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
    options = options or Options()
    started = time.perf_counter()
    lab = Lab(options, model)
    results: dict = {
        "model": lab.model.config.name_or_path,
        "load_seconds": round(lab.load_seconds, 1),
        "options": {k: v for k, v in vars(options).items() if k != "output_dir"},
        "torch_threads": torch.get_num_threads(),
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
    with open(options.out, "w") as handle:
        json.dump(results, handle, indent=1, default=str)
    _print(results)
    return results


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
            print(
                f"  {label:<26} trained {pct(r['trained_fraction'])}  identical to full: exact "
                f"{pct(r['identical_exact'])}, 1e-5 {pct(r['identical_within_1e-5'])}, 1e-4 "
                f"{pct(r['identical_within_1e-4'])}  reward {r['reward_first_quarter']:.3f} -> "
                f"{r['reward_last_quarter']:.3f}"
            )
    if "d" in results:
        print("\n(d) rank of updates")
        for label, r in results["d"].items():
            print(f"  {label:<14} mean rank/min(shape) {pct(r['mean_relative_rank'])} over {r['tensors']} tensors")
    print(f"\ntotal {results.get('total_seconds')} s; JSON: {results['options']['out']}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="abcd", help="which parts, e.g. 'a' or 'bc' (default: all)")
    parser.add_argument("--model", default=None, help="model folder, .gguf file or hub id (default: SmolLM2-135M)")
    parser.add_argument("--steps", type=int, default=Options.steps, help="optimizer steps per run, parts a, b, d")
    parser.add_argument("--recovery-steps", type=int, default=Options.recovery_steps, help="steps per run, part c")
    parser.add_argument("--out", default=Options.out, help="where to write the JSON results")
    args = parser.parse_args()
    main(args.parts, Options(steps=args.steps, recovery_steps=args.recovery_steps, out=args.out), args.model)
