"""Shared by the tests: tiny real models and tokenizers built in code (no hub), loopback ports, and new
processes that start without paying for their imports."""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import os
import socket
import threading

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


#: What every new process of `new_process` and `spawn_ranks` finds already imported. They are forked from a
#: forkserver that imports these once per test process (~9 s on 2 cores); a new Python process would spend
#: 5-10 s importing them every time, and the suite starts fifteen such processes. One that is not installed (an
#: extra left out) is skipped by the forkserver and imported, or not, by the process that needs it.
_PRELOADED = (
    "torch",
    "torch.distributed",
    "torch._dynamo",  # before DeepSpeed, which a rank may import (see sparsity_callbacks/params.py)
    "transformers",
    "transformers.generation.utils",
    "transformers.models.llama.modeling_llama",
    "mlflow",
    "lightning.pytorch",
    "sparsity_callbacks",
    "sparsity_callbacks.integrations.transformers",
    "sparsity_callbacks.integrations.lightning",
)


def _forkserver() -> multiprocessing.context.ForkServerContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(_PRELOADED))  # read when the forkserver starts (at its first use)
    return context


def _as_new_process(env: dict[str, str], cwd: str, log: str | None, target, *args) -> None:
    """Run ``target(*args)`` with what a new process would have: environment, working directory, output;
    end like the interpreter does (join the non-daemon threads, run the atexit handlers), which
    multiprocessing's child skips (it leaves with ``os._exit``)."""
    os.environ.clear()
    os.environ.update(env)  # the forkserver's environment is the one from when it started
    os.chdir(cwd)
    if log is not None:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    try:
        target(*args)
    finally:
        for thread in threading.enumerate():
            if thread is not threading.current_thread() and not thread.daemon:
                thread.join()
        atexit._run_exitfuncs()


def new_process(target, *args, env: dict[str, str] | None = None, cwd=None, log=None) -> multiprocessing.Process:
    """A started process running ``target(*args)`` (a module-level function) as a new Python process would:
    environment ``env`` (default: this process's), working directory ``cwd`` (default: this one's), stdout and
    stderr into the file ``log`` if given. Forked from the forkserver (`_PRELOADED` imported). Its ``exitcode``
    is 0 on success, 1 on an exception, ``-9`` after a SIGKILL."""
    environment = dict(os.environ if env is None else env)
    where = str(cwd or os.getcwd())
    process = _forkserver().Process(
        target=_as_new_process, args=(environment, where, None if log is None else str(log), target, *args)
    )
    process.start()
    return process


def run_in_new_process(target, *args, timeout: float, **options) -> int:
    """`new_process` (``options``: its ``env``, ``cwd``, ``log``) waited for: its exit code. Raises
    `TimeoutError` (after killing it) when it still runs after ``timeout`` seconds."""
    process = new_process(target, *args, **options)
    process.join(timeout)
    if process.exitcode is None:
        process.kill()
        process.join()
        raise TimeoutError(f"{target.__name__} still ran after {timeout} s; killed")
    return process.exitcode


def spawn_ranks(worker, args: tuple, nprocs: int, attempts: int = 3) -> None:
    """``worker(rank, port, *args)`` in ``nprocs`` new processes (`torch.multiprocessing.start_processes`, forked
    from the forkserver of `new_process`), with a free loopback ``port`` for the process group; started again
    on a fresh port when rank 0 could not listen on it (EADDRINUSE: another process took the port between
    `free_port` and rank 0's ``listen``; the other ranks are stopped at the first failure)."""
    import torch.multiprocessing

    _forkserver()  # its preload list, set before start_processes starts the forkserver
    ranked = functools.partial(_as_new_process, dict(os.environ), os.getcwd(), None, worker)
    for attempt in range(attempts):
        try:
            torch.multiprocessing.start_processes(
                ranked, args=(free_port(), *args), nprocs=nprocs, start_method="forkserver"
            )
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
