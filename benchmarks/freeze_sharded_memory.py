"""Per-rank extra memory of `MaskFreezer` on a sharded model (FSDP2 / FSDP1, 2 gloo ranks on CPU) vs one process.

A stack of Linear layers (``--width``, ``--layers``; 8.4M parameters by default) frozen to a random mask of
``--density`` trainable elements. For each setting it reports ``freezer.extra_bytes`` (the stored frozen
values and trainable masks, exact) and the process RSS growth while building the freezer (median of
``--repeats``), per rank, and their ratio to the single-process figures: they must scale with the shard
(~1/world), not with the model.

    python benchmarks/freeze_sharded_memory.py [--width 1024 --layers 8 --density 0.3 --repeats 3]
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import statistics
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


def _measure(model: torch.nn.Module, mask: Mask, repeats: int) -> tuple[int, float]:
    """(extra_bytes, median RSS growth in bytes) of building a freezer on ``model``."""
    process = psutil.Process()
    growth, extra = [], 0
    for _ in range(repeats):
        gc.collect()
        before = process.memory_info().rss
        freezer = MaskFreezer(model, mask)
        growth.append(process.memory_info().rss - before)
        extra = freezer.extra_bytes
        freezer.detach()
        del freezer
        gc.collect()
    return extra, statistics.median(growth)


def _rank(rank: int, port: int, args: argparse.Namespace, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(args.world))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=args.world)
    results = {}
    for kind in ("fsdp2", "fsdp1"):
        model = _model(args.width, args.layers)
        mask = _mask(model, args.density)
        if kind == "fsdp2":
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
        results[kind] = _measure(wrapped, mask, args.repeats)
        del wrapped, model
        torch.distributed.barrier()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--density", type=float, default=0.3, help="trainable fraction of the mask")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.set_num_threads(1)
    model = _model(args.width, args.layers)
    mask = _mask(model, args.density)
    numel = sum(p.numel() for p in model.parameters())
    single_extra, single_rss = _measure(model, mask, args.repeats)
    del model

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        torch.multiprocessing.spawn(_rank, args=(port, args, out_dir), nprocs=args.world)
        ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(args.world)]

    print(
        f"model: {args.layers} x Linear({args.width}, {args.width}), {numel:,} fp32 parameters; mask density "
        f"{args.density}; {args.world} gloo ranks; torch {torch.__version__}, {os.cpu_count()} CPUs"
    )
    print(f"{'setting':<22}{'extra_bytes':>14}{'bytes/param':>13}{'vs 1 proc':>11}{'RSS growth':>14}{'vs 1 proc':>11}")
    one = f"{1:>11.3f}"
    print(f"{'single process':<22}{single_extra:>14,}{single_extra / numel:>13.3f}{one}{single_rss:>14,.0f}{one}")
    for kind in ("fsdp2", "fsdp1"):
        for rank, result in enumerate(ranks):
            extra, rss = result[kind]
            print(
                f"{kind + ' rank ' + str(rank):<22}{extra:>14,}{extra / numel:>13.3f}{extra / single_extra:>11.3f}"
                f"{rss:>14,.0f}{rss / single_rss:>11.3f}"
            )


if __name__ == "__main__":
    main()
