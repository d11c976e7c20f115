"""GRPO-style policy gradient on a tiny causal LM in Lightning, with the sparsity of the update live in MLflow.

The policy is a small Llama built from a config (no download, no tokenizer). Each step samples a group of
completions per random prompt, rewards each completion by the fraction of even token ids in it (a toy
verifiable reward), turns rewards into group-normalised advantages (GRPO) and takes one AdamW step on
``-advantage * log p(completion)``. `SparsityCallback(compare_dtype="bfloat16")` measures which weights
differ from the start as a bf16 checkpoint would store them, and logs into the MLFlowLogger's run.

Run (about a minute on a laptop CPU: 100 steps of 32 sampled completions)::

    python examples/lightning_rl.py                    # writes ./mlflow.db
    mlflow ui --backend-store-uri sqlite:///mlflow.db   # then open http://127.0.0.1:5000
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader

try:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import MLFlowLogger
except ImportError:  # the standalone package
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import MLFlowLogger
from transformers import LlamaConfig, LlamaForCausalLM

from sparsity_callbacks.integrations.lightning import SparsityCallback


def even_token_reward(completions: torch.Tensor) -> torch.Tensor:
    """Fraction in [0, 1] of even token ids in each completion, shape ``(batch,)``."""
    return (completions % 2 == 0).float().mean(dim=1)


class GRPOPolicy(pl.LightningModule):
    """One optimizer step per batch of ``prompts_per_step`` prompts x ``group_size`` sampled completions."""

    def __init__(
        self,
        vocab_size: int = 64,
        prompt_len: int = 4,
        completion_len: int = 8,
        group_size: int = 8,
        prompts_per_step: int = 4,
        lr: float = 5e-5,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        self.policy = LlamaForCausalLM(config)

    @torch.no_grad()
    def _sample(self, prompts: torch.Tensor) -> torch.Tensor:
        """Sample ``completion_len`` tokens after each prompt (temperature 1); returns the completions."""
        self.policy.eval()
        ids = prompts
        for _ in range(self.hparams.completion_len):  # sequences are short: no KV cache needed
            logits = self.policy(input_ids=ids, use_cache=False).logits[:, -1].float()
            ids = torch.cat([ids, torch.multinomial(torch.softmax(logits, dim=-1), 1)], dim=1)
        self.policy.train()
        return ids[:, prompts.shape[1] :]

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        generator = torch.Generator().manual_seed(int(batch[0]))
        prompts = torch.randint(0, hp.vocab_size, (hp.prompts_per_step, hp.prompt_len), generator=generator)
        prompts = prompts.repeat_interleave(hp.group_size, dim=0).to(self.device)
        completions = self._sample(prompts)
        rewards = even_token_reward(completions)
        grouped = rewards.view(hp.prompts_per_step, hp.group_size)
        advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)

        ids = torch.cat([prompts, completions], dim=1)
        logits = self.policy(input_ids=ids[:, :-1], use_cache=False).logits[:, hp.prompt_len - 1 :]
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, completions.unsqueeze(-1)).squeeze(-1)
        loss = -(advantages.detach() * logp.sum(dim=1)).mean() / hp.completion_len
        self.log("reward", rewards.mean(), prog_bar=True, on_step=True)
        self.log("loss", loss, on_step=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.policy.parameters(), lr=self.hparams.lr, weight_decay=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--experiment", default="lightning-rl-sparsity")
    args = parser.parse_args()

    torch.set_num_threads(min(4, torch.get_num_threads()))
    pl.seed_everything(0, verbose=False)
    logger = MLFlowLogger(experiment_name=args.experiment, tracking_uri=args.tracking_uri)
    sparsity = SparsityCallback(compare_dtype="bfloat16", every_n_steps=5)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=args.steps,
        logger=logger,
        callbacks=[sparsity],
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    model = GRPOPolicy(lr=args.lr)
    prompts = DataLoader(list(range(args.steps)), batch_size=1)  # one prompt seed per step
    start = time.perf_counter()
    trainer.fit(model, prompts)

    m = sparsity.last_measurement
    history = sparsity.tracker.history
    rewards = [v.value for v in logger.experiment.get_metric_history(logger.run_id, "reward")]
    first, last = sum(rewards[:5]) / max(1, len(rewards[:5])), sum(rewards[-5:]) / max(1, len(rewards[-5:]))
    print(f"\n{args.steps} GRPO steps in {time.perf_counter() - start:.0f} s; reward {first:.3f} -> {last:.3f}")
    print(f"changed fraction (bf16):      {m.changed_fraction:.4f}  (update sparsity {m.update_sparsity:.4f})")
    print(f"ever-changed fraction (bf16): {m.ever_changed_fraction:.4f}")
    print(
        "curve (step: changed / ever-changed):",
        ", ".join(f"{int(p['step'])}: {p['changed_fraction']:.3f}/{p['ever_changed_fraction']:.3f}" for p in history),
    )
    print(
        f"MLflow run {logger.run_id} in experiment {args.experiment!r}. Look at it with:\n"
        f"  mlflow ui --backend-store-uri {args.tracking_uri}"
    )


if __name__ == "__main__":
    main()
