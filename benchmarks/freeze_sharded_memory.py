"""Per-rank extra memory of `MaskFreezer` on a sharded model (FSDP2 / FSDP1, 2 gloo ranks on CPU) vs one process.

A stack of Linear layers (``--width``, ``--layers``; 33.6M parameters by default) frozen to a random mask of
``--density`` trainable elements. For each setting it reports ``freezer.extra_bytes`` (what the freezer holds:
frozen values, trainable masks or indices; exact) and the process RSS growth from building the freezer (held,
freezer alive, after ``malloc_trim``), per rank, and their ratio to the single-process dense freezer: they
must scale with the shard (~1/world), not with the model. Then the AdamW state after one step plus the freezer
(``optimizer_state_bytes + extra_bytes``) per rank, dense vs compact optimizer state (FSDP2: a 1-D ``Shard(0)``
DTensor of each rank's trainable elements; FSDP1 and ZeRO-3 keep the dense mechanism).

Each setting first builds and drops one throwaway freezer: the first freezer built in a process grows RSS by a
one-time ~48 MB that later ones do not (heap growth malloc_trim cannot hand back, whichever mechanism comes
first); after it, RSS growth equals ``extra_bytes`` within 1 %.

    python benchmarks/freeze_sharded_memory.py [--width 2048 --layers 8 --density 0.3]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import socket
import sys
import tempfile

import psutil
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sparsity_callbacks import Mask, MaskFreezer  # noqa: E402


def _model(width: int, layers: int) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])


def _mask(model: torch.nn.Module, density: float) -> Mask:
    generator = torch.Generator().manual_seed(1)
    return Mask({n: torch.rand(p.shape, generator=generator) < density for n, p in model.named_parameters()})


def _trim() -> None:
    """glibc ``malloc_trim(0)``: return freed heap memory to the OS, so RSS shows what is held."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def _measure(model: torch.nn.Module, mask: Mask, compact_state: bool = False) -> tuple[int, int]:
    """(extra_bytes, RSS growth in bytes with the freezer alive) of building a freezer on ``model``."""
    MaskFreezer(model, mask, compact_optimizer_state=compact_state).detach()  # the one-time growth (see above)
    process = psutil.Process()
    gc.collect()
    _trim()
    before = process.memory_info().rss
    freezer = MaskFreezer(model, mask, compact_optimizer_state=compact_state)
    _trim()  # hand freed temporaries (one tensor's unpacked mask at a time) back to the OS
    growth = process.memory_info().rss - before
    extra = freezer.extra_bytes
    freezer.detach()
    return extra, growth


def _state_after_step(model: torch.nn.Module, mask: Mask, width: int, compact_state: bool) -> int:
    """This rank's AdamW state bytes + freezer bytes after one frozen step."""
    freezer = MaskFreezer(model, mask, compact_optimizer_state=compact_state)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    freezer.attach(optimizer)
    model(torch.randn(4, width, generator=torch.Generator().manual_seed(2))).square().mean().backward()
    optimizer.step()
    total = freezer.optimizer_state_bytes + freezer.extra_bytes
    freezer.detach(expand_state=False)
    return total


def _rank(rank: int, port: int, args: argparse.Namespace, out_dir: str, kind: str) -> None:
    """One rank of a fresh process group for ``kind`` (fresh processes: the RSS growth is not hidden by memory
    an earlier setting freed)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(args.world))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=args.world)
    model = _model(args.width, args.layers)
    mask = _mask(model, args.density)
    if kind.startswith("fsdp2"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (args.world,))
        for layer in model:
            fully_shard(layer, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        wrapped = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
    gc.collect()
    compact = kind == "fsdp2compact"
    results = {kind: (*_measure(wrapped, mask, compact), _state_after_step(wrapped, mask, args.width, compact))}
    del wrapped, model
    torch.distributed.barrier()
    torch.save(results, os.path.join(out_dir, f"{kind}-rank{rank}.pt"))
    torch.distributed.destroy_process_group()


KINDS = ("fsdp2", "fsdp2compact", "fsdp1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--density", type=float, default=0.3, help="trainable fraction of the mask")
    parser.add_argument("--world", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(1)
    model = _model(args.width, args.layers)
    mask = _mask(model, args.density)
    numel = sum(p.numel() for p in model.parameters())
    single = {
        "1 process, dense": (*_measure(model, mask), _state_after_step(model, mask, args.width, False)),
        "1 process, compact": (*_measure(model, mask, True), _state_after_step(model, mask, args.width, True)),
    }
    single_extra, single_rss, single_state = single["1 process, dense"]
    del model

    ranks: list[dict] = [{} for _ in range(args.world)]
    with tempfile.TemporaryDirectory() as out_dir:
        for kind in KINDS:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            torch.multiprocessing.spawn(_rank, args=(port, args, out_dir, kind), nprocs=args.world)
            for r in range(args.world):
                ranks[r].update(torch.load(os.path.join(out_dir, f"{kind}-rank{r}.pt")))

    print(
        f"model: {args.layers} x Linear({args.width}, {args.width}), {numel:,} fp32 parameters; mask density "
        f"{args.density}; {args.world} gloo ranks; torch {torch.__version__}, {os.cpu_count()} CPUs"
    )
    print(
        f"{'setting':<22}{'extra_bytes':>14}{'bytes/param':>13}{'vs dense':>11}{'RSS growth':>14}{'vs dense':>11}"
        f"{'state+freezer':>16}{'vs dense':>11}"
    )
    rows = list(single.items())
    rows += [(f"{kind} rank {rank}", result[kind]) for kind in KINDS for rank, result in enumerate(ranks)]
    for name, (extra, rss, state) in rows:
        print(
            f"{name:<22}{extra:>14,}{extra / numel:>13.3f}{extra / single_extra:>11.3f}"
            f"{rss:>14,.0f}{rss / single_rss:>11.3f}{state:>16,}{state / single_state:>11.3f}"
        )


if __name__ == "__main__":
    main()
