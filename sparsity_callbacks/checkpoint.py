"""Safetensors checkpoints: find the files of a file, model folder or Hub id, read their headers into an
index of where each tensor's bytes are (`Checkpoint`, `TensorInfo`), and read those bytes (`_Reader`).

Nothing here compares anything: `diff` does, chunk by chunk, with the rules of `_rules`.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import threading
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Checkpoint", "CheckpointError", "TensorInfo", "open_checkpoint"]

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_FLOAT_CODES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
_MAX_HEADER = 100 << 20


class CheckpointError(ValueError):
    """A checkpoint cannot be found or read (missing, not safetensors, truncated)."""


@dataclass(frozen=True)
class TensorInfo:
    """One stored tensor: ``dtype`` is the safetensors code (``"F32"``, ``"BF16"``, ...); ``offset``
    the absolute byte offset of its data in ``path``; ``nbytes`` its size in bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: str
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return _DTYPES.get(self.dtype)

    @property
    def is_float(self) -> bool:
        return self.dtype in _FLOAT_CODES


@dataclass(frozen=True)
class Checkpoint:
    """The stored tensors of a safetensors file, a (sharded) model folder or a Hub snapshot.
    ``source`` is what the user gave, ``root`` the local path it resolved to."""

    source: str
    root: str
    tensors: dict[str, TensorInfo]

    @property
    def files(self) -> list[str]:
        return sorted({t.path for t in self.tensors.values()})

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data."""
        return sum(t.nbytes for t in self.tensors.values())


def open_checkpoint(source: str | os.PathLike) -> Checkpoint:
    """Index the tensors of ``source``: a ``.safetensors`` file, a Hugging Face model folder
    (``model.safetensors`` or shards listed in ``model.safetensors.index.json``), or a Hub id
    ``org/name[@revision]`` (downloaded with ``huggingface_hub.snapshot_download``, safetensors and
    JSON only). Reads only the headers. Raises `CheckpointError` / `FileNotFoundError`."""
    source = os.fspath(source)
    root = _resolve(source)
    files = _safetensors_files(root)
    tensors: dict[str, TensorInfo] = {}
    for path in files:
        for info in _read_header(path):
            tensors.setdefault(info.name, info)  # a name stored twice is compared once (its first copy)
    if not tensors:
        raise CheckpointError(f"{source!r} holds no tensors.")
    return Checkpoint(source=source, root=root, tensors=tensors)


def _resolve(source: str) -> str:
    if os.path.exists(source):
        return source
    if _HUB_ID.match(source) and not source.endswith((".safetensors", ".json")):
        repo_id, _, revision = source.partition("@")
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(repo_id, revision=revision or None, allow_patterns=["*.safetensors", "*.json"])
        except Exception as err:
            raise CheckpointError(
                f"{source!r} is not a local path, and downloading it from the Hugging Face Hub failed "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). HINT: check the "
                "path or the repository id, and HF_TOKEN for private repositories."
            ) from None
    raise FileNotFoundError(
        f"{source!r} does not exist. HINT: pass a .safetensors file, a model folder, "
        "or a Hugging Face Hub id like `org/name`."
    )


def _open_regular(path: str) -> int:
    """A read-only file descriptor of ``path``, which must be a regular file: a FIFO, device or socket named
    ``*.safetensors`` is refused instead of blocking forever (opened non-blocking, checked with ``fstat``)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "folder" if stat.S_ISDIR(mode) else "FIFO" if stat.S_ISFIFO(mode) else "special file"
            raise CheckpointError(f"{path!r} is a {kind}, not a regular file; only regular files are read.")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _shard_paths(root: str, index: str) -> list[str]:
    """The shard files named by ``model.safetensors.index.json``, confined to the model folder: each name is
    a relative path of ``*.safetensors`` inside ``root`` (no absolute path, drive or ``..``); anything else
    is refused without opening it."""
    try:
        with open(index, encoding="utf-8") as handle:
            index_data = json.load(handle)
        if not isinstance(index_data, dict) or "weight_map" not in index_data:
            raise KeyError("weight_map")
        weight_map = index_data["weight_map"]
    except KeyError:
        raise CheckpointError(f"{index!r} is not a JSON object with a `weight_map`. HINT: re-save the model.") from None
    except (OSError, ValueError, TypeError, RecursionError) as err:
        reason = f"{type(err).__name__} at {err.pos}" if isinstance(err, json.JSONDecodeError) else type(err).__name__
        raise CheckpointError(
            f"Cannot read {index!r} ({reason}). HINT: the index is corrupt; re-save the model with `save_pretrained`."
        ) from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index!r}: `weight_map` is not a map of tensor names to shard file names.")
    files = list(dict.fromkeys(weight_map.values()))
    for name in files:
        parts = re.split(r"[\\/]", name)
        if os.path.isabs(name) or os.path.splitdrive(name)[0] or ".." in parts or not name.endswith(".safetensors"):
            raise CheckpointError(
                f"{index!r} names a shard outside the model folder or not a .safetensors file ({name[:200]!r}); "
                "shards must be .safetensors files inside the folder. HINT: the index is corrupt or crafted."
            )
    return [os.path.join(root, f) for f in files]


def _safetensors_files(root: str) -> list[str]:
    if not os.path.isdir(root):
        return [root]  # `_read_header` opens it only if it is a regular file
    index = os.path.join(root, "model.safetensors.index.json")
    if os.path.isfile(index):
        paths = _shard_paths(root, index)
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise CheckpointError(
                f"{index!r} lists {len(missing)} shard(s) that are not there (e.g. "
                f"{os.path.basename(missing[0])!r}). HINT: the download is incomplete."
            )
        return paths
    single = os.path.join(root, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    found = sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith(".safetensors"))
    # (special files among them, e.g. a FIFO, are refused by `_open_regular` before anything is read)
    if not found:
        others = [f for f in os.listdir(root) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        hint = (
            f" It has {others[:3]}: convert them with `model.save_pretrained(dir, safe_serialization=True)`."
            if others
            else ""
        )
        raise CheckpointError(f"No .safetensors file in {root!r}.{hint}")
    return found


def _read_header(path: str) -> list[TensorInfo]:
    """The tensors of one safetensors file, checked as the format requires: an 8-byte little-endian header
    length, a JSON object header, and per tensor a ``dtype``, a ``shape`` of non-negative ints and
    ``data_offsets`` ``[begin, end]`` with ``0 <= begin <= end``, ``end - begin = numel * itemsize``; the
    ranges, sorted, tile the data section exactly (contiguous from 0, no overlap, no hole, ending at the end
    of the file). Errors never quote the file's bytes (it may be any file)."""
    hint = "HINT: the file is truncated, not safetensors, or crafted; re-download or re-save it."
    try:
        fd = _open_regular(path)
        with os.fdopen(fd, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path!r} is too short to be a safetensors file ({size} bytes). {hint}")
            header_len = int.from_bytes(prefix, "little")
            if header_len > min(_MAX_HEADER, size - 8):
                raise CheckpointError(
                    f"{path!r} is not a safetensors file (its first 8 bytes are not a header length that fits "
                    f"the file). {hint}"
                )
            header = json.loads(handle.read(header_len).decode("utf-8"))
    except OSError as err:
        raise CheckpointError(f"Cannot read {path!r}: {err.strerror or type(err).__name__}.") from None
    except (ValueError, RecursionError) as err:
        if isinstance(err, CheckpointError):
            raise
        where = f" at byte {err.pos}" if isinstance(err, json.JSONDecodeError) else ""
        raise CheckpointError(f"{path!r} has a corrupt safetensors header (not UTF-8 JSON{where}). {hint}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path!r} has a corrupt safetensors header (not a JSON object). {hint}")
    data_start = 8 + header_len
    infos = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        dtype_code = entry.get("dtype") if isinstance(entry, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(x) is int for x in offsets)
            or not isinstance(shape, list)
            or not all(type(d) is int and d >= 0 for d in shape)
            or not isinstance(dtype_code, str)
        ):
            raise CheckpointError(
                f"{path!r}: corrupt header entry for tensor {name[:200]!r} (needs `dtype`, a `shape` of non-negative "
                f"integers and two integer `data_offsets`). {hint}"
            )
        begin, end = offsets
        if not 0 <= begin <= end:
            raise CheckpointError(
                f"{path!r}: tensor {name[:200]!r} has data_offsets [{begin}, {end}]; they must satisfy "
                f"0 <= begin <= end. {hint}"
            )
        info = TensorInfo(name, dtype_code, tuple(shape), path, data_start + begin, end - begin)
        dtype = info.torch_dtype  # None: a dtype code this reader does not know (listed by `diff`, not compared)
        if dtype is not None and info.nbytes != info.numel * dtype.itemsize:
            raise CheckpointError(
                f"{path!r}: tensor {name[:200]!r} has {info.nbytes} bytes for shape "
                f"{list(info.shape)} of {info.dtype} ({info.numel * dtype.itemsize} expected). {hint}"
            )
        infos.append(info)
    expected = 0  # the ranges must tile [0, size - data_start) exactly
    for info in sorted(infos, key=lambda i: (i.offset, i.nbytes)):
        if info.offset - data_start != expected:
            problem = "overlaps the previous one" if info.offset - data_start < expected else "leaves a hole before it"
            raise CheckpointError(
                f"{path!r}: tensor {info.name[:200]!r} starts at data byte {info.offset - data_start}, which "
                f"{problem} (expected {expected}); safetensors data is contiguous. {hint}"
            )
        expected += info.nbytes
    if data_start + expected != size:
        raise CheckpointError(
            f"{path!r}: its tensors cover {expected} data bytes but the file holds {size - data_start} after the "
            f"header ({'truncated' if data_start + expected > size else 'trailing bytes'}). {hint}"
        )
    return infos


class _Reader:
    """Reads byte ranges of stored tensors with ``os.preadv`` (no memory map, so the page cache never counts
    against this process). One file descriptor per file, shared by the threads that call `read`."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            with self._lock:
                fd = self._fds.get(path)
                if fd is None:
                    fd = self._fds[path] = _open_regular(path)
        return fd

    def read(self, info: TensorInfo, lo: int, out: np.ndarray) -> None:
        """Fill ``out`` (a uint8 buffer) with the bytes of elements ``lo, lo + 1, ...`` of ``info``."""
        _pread_exact(self._fd(info.path), out, info.offset + lo * info.torch_dtype.itemsize, info.path)


def _pread_exact(fd: int, out: np.ndarray, offset: int, path: str) -> None:
    view = out.data.cast("B")
    done = 0
    while done < len(view):
        if hasattr(os, "preadv"):
            got = os.preadv(fd, [view[done:]], offset + done)
        else:  # Windows
            data = os.pread(fd, len(view) - done, offset + done) if hasattr(os, "pread") else b""
            view[done : done + len(data)] = data
            got = len(data)
        if got <= 0:
            raise CheckpointError(f"{path!r} ended early (truncated while reading?). HINT: re-download or re-save it.")
        done += got
