"""Tiny real models and tokenizers built in code (no hub), shared by the tests."""

from __future__ import annotations

import socket

import torch


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports free now (held together while they are picked). Another process can
    still take one before it is used: callers that bind later must tolerate EADDRINUSE."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    """One loopback port free now (`free_ports`)."""
    return free_ports(1)[0]


def spawn_ranks(worker, args: tuple, nprocs: int, attempts: int = 3) -> None:
    """``torch.multiprocessing.spawn(worker, (port, *args), nprocs)`` with a free loopback `port` for the process
    group, started again on a fresh port when rank 0 could not listen on it (EADDRINUSE: another process took
    the port between `free_port` and rank 0's `listen`; spawn stops the other ranks at the first failure)."""
    import torch.multiprocessing

    for attempt in range(attempts):
        try:
            torch.multiprocessing.spawn(worker, args=(free_port(), *args), nprocs=nprocs)
            return
        except torch.multiprocessing.ProcessRaisedException as err:
            if "EADDRINUSE" not in str(err) or attempt == attempts - 1:
                raise


def tiny_llama(seed: int = 0, tie_word_embeddings: bool = False, **overrides):
    """A 2-layer Llama-style causal LM (~30k parameters), float32, built from config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    options = dict(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=tie_word_embeddings,
    )
    return LlamaForCausalLM(LlamaConfig(**{**options, **overrides}))


def tiny_gpt2(seed: int = 0, **overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    options = dict(vocab_size=64, n_positions=64, n_embd=16, n_layer=2, n_head=2, bos_token_id=2, eos_token_id=1)
    return GPT2LMHeadModel(GPT2Config(**{**options, **overrides}))


def tiny_qwen2(seed: int = 0, **overrides):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    options = dict(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return Qwen2ForCausalLM(Qwen2Config(**{**options, **overrides}))


def tiny_tokenizer():
    """A word-level `PreTrainedTokenizerFast` over a 64-token vocabulary, built in code."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(56)] + [str(d) for d in range(4)]
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    vocab.update({w: i + 4 for i, w in enumerate(words)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
