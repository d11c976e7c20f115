"""Benchmark: `diff_checkpoints` throughput against plain reading of the same files.

Builds two fp32 "models" in a temporary folder (``--tensors`` tensors of ``--tensor-mb`` MB each per model;
default 8 x 64 MB = 512 MB per model, 1 GB in all), the tuned one with ~10 % of its elements changed, then
times, in the same run, the median of ``--repeats`` runs of:

* ``cat BASE TUNED > /dev/null`` (the page-cache read ceiling),
* ``safe_open`` + ``get_tensor`` + ``clone()`` of every tensor (safetensors >= 0.6 returns a lazy view of a
  memory map, so ``get_tensor`` alone reads nothing; the clone brings the bytes into process memory), and
  the same with every page touched but not copied (mapping page-cache pages only, for information),
* ``diff_checkpoints`` (no progress bar), with the default ``atol=1e-5``, and once more with ``mask=True``.

Every run reads from the page cache (the files were just written and the first, untimed, run warms it):
this measures the CPU cost of the diff, not the disk. Usage::

    python benchmarks/diff.py [--tensors 8] [--tensor-mb 64] [--repeats 3] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sparsity_callbacks.diff import diff_checkpoints  # noqa: E402


def _build(folder: str, tensors: int, tensor_mb: int, changed: float = 0.10) -> tuple[str, str, int]:
    numel = tensor_mb * (1 << 20) // 4
    base_path, tuned_path = os.path.join(folder, "base.safetensors"), os.path.join(folder, "tuned.safetensors")
    gen = torch.Generator().manual_seed(0)
    base, tuned = {}, {}
    expected = 0
    for i in range(tensors):
        w = torch.randn(numel // 1024, 1024, generator=gen)
        hit = torch.rand(w.shape, generator=gen) < changed
        base[f"model.layers.{i}.mlp.up_proj.weight"] = w
        tuned[f"model.layers.{i}.mlp.up_proj.weight"] = torch.where(hit, w + 1e-3, w)
        expected += int(hit.sum())
    save_file(base, base_path)
    del base
    save_file(tuned, tuned_path)
    return base_path, tuned_path, expected


def _median_time(fn, repeats: int) -> float:
    fn()  # warm the page cache and the allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _read_safetensors(paths: list[str], copy: bool) -> None:
    for path in paths:
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():
                t = handle.get_tensor(key)
                if copy:
                    t.clone()  # into process memory: what get_tensor itself did before safetensors 0.6
                else:
                    t.view(-1).view(torch.uint8)[::4096].sum()  # map every 4 KiB page of the lazy view, no copy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=8, help="tensors per model (default 8)")
    parser.add_argument("--tensor-mb", type=int, default=64, help="MB per tensor (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median; default 3)")
    parser.add_argument("--dir", default=None, help="where to write the temporary files (default: system temp)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="sparsity_diff_bench_") as folder:
        t0 = time.perf_counter()
        base, tuned, expected = _build(folder, args.tensors, args.tensor_mb)
        paths = [base, tuned]
        total = sum(os.path.getsize(p) for p in paths)
        print(
            f"built 2 x {args.tensors} x {args.tensor_mb} MB fp32 = {total / 1e9:.2f} GB in "
            f"{time.perf_counter() - t0:.1f} s; torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{os.cpu_count()} CPUs"
        )

        check = diff_checkpoints(base, tuned)
        assert int(check.measurement().changed) == expected, (check.measurement().changed, expected)

        rows = {
            "cat > /dev/null": _median_time(
                lambda: subprocess.run(["cat", *paths], stdout=subprocess.DEVNULL, check=True), args.repeats
            ),
            "safe_open + get_tensor + clone": _median_time(lambda: _read_safetensors(paths, True), args.repeats),
            "safe_open + get_tensor, pages touched (no copy)": _median_time(
                lambda: _read_safetensors(paths, False), args.repeats
            ),
            "diff_checkpoints (atol=1e-5)": _median_time(lambda: diff_checkpoints(base, tuned), args.repeats),
            "diff_checkpoints (atol=1e-5, 1e-3)": _median_time(
                lambda: diff_checkpoints(base, tuned, atol=(1e-5, 1e-3)), args.repeats
            ),
            "diff_checkpoints (mask=True)": _median_time(
                lambda: diff_checkpoints(base, tuned, mask=True), args.repeats
            ),
            "diff_checkpoints (compare_dtype=bfloat16)": _median_time(
                lambda: diff_checkpoints(base, tuned, compare_dtype="bfloat16"), args.repeats
            ),
        }
        read, cat = rows["safe_open + get_tensor + clone"], rows["cat > /dev/null"]
        print(f"\n{'what':50s} {'median s':>9s} {'GB/s':>7s} {'vs get_tensor+clone':>20s} {'vs cat':>7s}")
        for name, seconds in rows.items():
            print(f"{name:50s} {seconds:9.3f} {total / seconds / 1e9:7.2f} {read / seconds:20.0%} {cat / seconds:7.0%}")
        diff = rows["diff_checkpoints (atol=1e-5)"]
        print(
            f"\ndiff throughput = {read / diff:.0%} of safe_open + get_tensor + clone, {cat / diff:.0%} of "
            f"cat > /dev/null; target >= 50 % of read: {'met' if read / diff >= 0.5 else 'NOT met'}"
        )
        print("(the no-copy row only maps page-cache pages; no computation over every byte can match it)")


if __name__ == "__main__":
    main()
