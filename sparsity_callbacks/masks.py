"""`Mask`: one bit per tracked element, saved as bit-packed safetensors with JSON metadata."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from sparsity_callbacks._bits import _pack_bits, _packed_numel, _popcount, _unpack_bits
from sparsity_callbacks.params import _architecture_signature

_FORMAT = "sparsity_callbacks.mask"
_VERSION = "1"
_URI_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/", "s3://", "gs://", "wasbs://", "dbfs:/", "hdfs://")


@dataclass(frozen=True)
class Overlap:
    """How two masks A and B of the same model overlap (arXiv 2505.11711).

    ``overlap_ab`` = |A ∩ B| / |A|; ``overlap_ba`` = |A ∩ B| / |B|; ``jaccard`` = |A ∩ B| / |A ∪ B|.
    The ``chance_*`` fields are the same figures expected for independent random masks of the same
    densities: E[o(A, B)] = |B| / N, E[o(B, A)] = |A| / N, Jaccard as the ratio of the expectations.

    ``chance_magnitude_matched*`` (only when the base weights were given, see `Mask.overlap`): the same
    figures for masks that are independent *given each element's magnitude*: the elements are split into
    strata, one per tensor and bf16 exponent of the base weight (weights within a factor of 2 of each
    other, which share one bf16 ulp), and A and B are drawn independently inside each stratum with the
    observed counts, so E|A ∩ B| = Σ_s |A_s| |B_s| / N_s (``expected_intersection_magnitude_matched``).
    An update of a given size flips a weight's bf16 value far more often when the weight is small (its
    ulp is small), so masks compared in bf16 share elements through magnitude alone; an observed overlap
    near this baseline says the "shared subnetwork" is mostly magnitude, one well above it says more.
    Fractions are in [0, 1]; NaN where the denominator is 0.
    """

    numel: int
    size_a: int
    size_b: int
    intersection: int
    per_tensor: dict[str, Overlap] = field(default_factory=dict, repr=False)
    expected_intersection_magnitude_matched: float | None = None

    @property
    def union(self) -> int:
        return self.size_a + self.size_b - self.intersection

    @property
    def overlap_ab(self) -> float:
        return self.intersection / self.size_a if self.size_a else math.nan

    @property
    def overlap_ba(self) -> float:
        return self.intersection / self.size_b if self.size_b else math.nan

    @property
    def jaccard(self) -> float:
        return self.intersection / self.union if self.union else math.nan

    @property
    def chance_ab(self) -> float:
        return self.size_b / self.numel if self.numel else math.nan

    @property
    def chance_ba(self) -> float:
        return self.size_a / self.numel if self.numel else math.nan

    @property
    def chance_jaccard(self) -> float:
        expected_intersection = self.size_a * self.size_b / self.numel if self.numel else 0.0
        expected_union = self.size_a + self.size_b - expected_intersection
        return expected_intersection / expected_union if expected_union else math.nan

    @property
    def chance_magnitude_matched(self) -> float | None:
        """E[o(A, B)] for masks independent given the base weights' magnitude; None without base weights."""
        e = self.expected_intersection_magnitude_matched
        return None if e is None else (e / self.size_a if self.size_a else math.nan)

    @property
    def chance_magnitude_matched_ba(self) -> float | None:
        """E[o(B, A)] for masks independent given the base weights' magnitude; None without base weights."""
        e = self.expected_intersection_magnitude_matched
        return None if e is None else (e / self.size_b if self.size_b else math.nan)

    @property
    def chance_magnitude_matched_jaccard(self) -> float | None:
        """Jaccard from the magnitude-matched expected intersection; None without base weights."""
        e = self.expected_intersection_magnitude_matched
        if e is None:
            return None
        union = self.size_a + self.size_b - e
        return e / union if union else math.nan

    def to_dict(self) -> dict[str, Any]:
        keys = (
            "numel",
            "size_a",
            "size_b",
            "intersection",
            "overlap_ab",
            "overlap_ba",
            "jaccard",
            "chance_ab",
            "chance_ba",
            "chance_jaccard",
        )
        data = {k: getattr(self, k) for k in keys}
        if self.expected_intersection_magnitude_matched is not None:
            for k in (
                "expected_intersection_magnitude_matched",
                "chance_magnitude_matched",
                "chance_magnitude_matched_ba",
                "chance_magnitude_matched_jaccard",
            ):
                data[k] = getattr(self, k)
        return data


def _magnitude_strata(values: torch.Tensor) -> torch.Tensor:
    """Stratum per element (int64 in [0, 255], same shape): the 8-bit exponent field of the value rounded
    to bf16 (= the fp32 exponent: 0 for zeros and subnormals, 255 for inf/NaN). Elements in one stratum
    differ in magnitude by less than a factor of 2 and have the same bf16 ulp."""
    bits = values.detach().to(torch.bfloat16).view(torch.int16).to(torch.int64)
    return (bits >> 7) & 0xFF


class Mask:
    """A set of elements of a model: one bit per element of each named tensor (1 = in the set).

    Held bit-packed on the CPU (1 bit per element). ``mask[name]`` gives a bool tensor of the
    parameter's shape. ``signatures`` (content hashes of the reference weights, see
    ``check_matches``) identify the base model the mask was made for.
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        *,
        signatures: Mapping[str, str] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(tensors, Mapping):
            raise TypeError(f"`tensors` must map names to torch.bool tensors, got {type(tensors).__name__}.")
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._packed: dict[str, torch.Tensor] = {}
        for name, value in tensors.items():
            if not torch.is_tensor(value):
                raise TypeError(f"Mask tensor {name!r} must be a torch.bool tensor, got {type(value).__name__}.")
            if value.dtype != torch.bool:
                raise TypeError(f"Mask tensor {name!r} must be torch.bool, got {value.dtype}.")
            self._shapes[name] = tuple(value.shape)
            self._packed[name] = _pack_bits(value.detach().cpu())
        self.signatures: dict[str, str] = dict(signatures or {})
        self.metadata: dict[str, Any] = dict(metadata or {})

    @classmethod
    def _from_packed(
        cls,
        packed: dict[str, torch.Tensor],
        shapes: dict[str, tuple[int, ...]],
        signatures: Mapping[str, str] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Mask:
        mask = cls({}, signatures=signatures, metadata=metadata)
        mask._packed = {n: p.cpu() for n, p in packed.items()}
        mask._shapes = dict(shapes)
        return mask

    # --- container -----------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._shapes)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __contains__(self, name: object) -> bool:
        return name in self._shapes

    def __getitem__(self, name: str) -> torch.Tensor:
        """Bool tensor of the tensor's shape (CPU)."""
        shape = self._shapes[name]
        return _unpack_bits(self._packed[name], math.prod(shape)).view(shape)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._shapes:
            yield name, self[name]

    def count(self, name: str | None = None) -> int:
        """Elements in the set (of one tensor, or all)."""
        names = [name] if name is not None else self._shapes
        return int(sum(int(_popcount(self._packed[n])) for n in names))

    def numel(self, name: str | None = None) -> int:
        names = [name] if name is not None else self._shapes
        return sum(math.prod(self._shapes[n]) for n in names)

    @property
    def density(self) -> float:
        """Fraction in [0, 1] of elements in the set."""
        total = self.numel()
        return self.count() / total if total else math.nan

    def __repr__(self) -> str:
        return f"Mask({len(self)} tensors, {self.numel():,} elements, density={self.density:.4f})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mask):
            return NotImplemented
        return self._shapes == other._shapes and all(
            torch.equal(self._packed[n], other._packed[n]) for n in self._shapes
        )

    # --- comparison ----------------------------------------------------------------------------
    def overlap(self, other: Mask, reference: Mapping[str, torch.Tensor] | None = None) -> Overlap:
        """`Overlap` of this mask (A) with ``other`` (B), global and per tensor. Both must cover the
        same tensor names and shapes.

        ``reference``: the base weights by tensor name (e.g. the base model's ``state_dict()``; the
        values the masks were measured against). With it, the overlap also carries the magnitude-matched
        chance baseline (`Overlap.chance_magnitude_matched`; strata: tensor × bf16 exponent of the base
        weight).
        """
        if not isinstance(other, Mask):
            raise TypeError(
                f"`other` must be a Mask, got {type(other).__name__}. HINT: read a file with Mask.load(path)."
            )
        self._check_same_layout(other, "other mask")
        if reference is not None:
            missing = [n for n in self._shapes if n not in reference]
            wrong = [n for n in self._shapes if n in reference and tuple(reference[n].shape) != tuple(self._shapes[n])]
            if missing or wrong:
                detail = f"missing {missing[:3]}" if missing else f"shape differs for {wrong[:3]}"
                raise ValueError(
                    f"`reference` does not match the masks: {detail}. HINT: pass the base model's weights by "
                    "the masks' tensor names (e.g. `base_model.state_dict()`)."
                )
        per_tensor = {}
        for name in self._shapes:
            a, b = self._packed[name], other._packed[name]
            expected = None
            if reference is not None:
                numel = math.prod(self._shapes[name])
                strata = _magnitude_strata(reference[name].reshape(-1))
                n_s = torch.bincount(strata, minlength=256).double()
                a_s = torch.bincount(strata[_unpack_bits(a, numel)], minlength=256).double()
                b_s = torch.bincount(strata[_unpack_bits(b, numel)], minlength=256).double()
                expected = float((a_s * b_s / n_s.clamp(min=1)).sum())
            per_tensor[name] = Overlap(
                numel=math.prod(self._shapes[name]),
                size_a=int(_popcount(a)),
                size_b=int(_popcount(b)),
                intersection=int(_popcount(a & b)),
                expected_intersection_magnitude_matched=expected,
            )
        return Overlap(
            numel=sum(o.numel for o in per_tensor.values()),
            size_a=sum(o.size_a for o in per_tensor.values()),
            size_b=sum(o.size_b for o in per_tensor.values()),
            intersection=sum(o.intersection for o in per_tensor.values()),
            per_tensor=per_tensor,
            expected_intersection_magnitude_matched=(
                None
                if reference is None
                else sum(o.expected_intersection_magnitude_matched or 0.0 for o in per_tensor.values())
            ),
        )

    def _check_same_layout(self, other: Mask, what: str) -> None:
        check_matches(self._shapes, other._shapes, None, None, what=what, mask_label="this mask")

    def check_matches(self, shapes: Mapping[str, tuple[int, ...]], signatures: Mapping[str, str] | None = None) -> None:
        """Raise `ValueError` naming the first tensor whose name, shape or content signature differs
        between this mask and a model (``shapes``/``signatures`` of its reference weights)."""
        check_matches(self._shapes, shapes, self.signatures, signatures, what="model", mask_label="mask")

    # --- files ---------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file: one uint8 tensor of packed bits per name, JSON metadata."""
        from safetensors.torch import save_file

        if os.path.isdir(path):
            raise ValueError(f"Cannot save the mask to {os.fspath(path)!r}: it is a folder. HINT: give a file name.")

        metadata = {
            "format": _FORMAT,
            "version": _VERSION,
            "shapes": json.dumps({n: list(s) for n, s in self._shapes.items()}),
            "signatures": json.dumps(self.signatures),
            "architecture": _architecture_signature(self._shapes),
            "density": repr(self.density),
            "extra": json.dumps(self.metadata, default=str),
        }
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        save_file({n: p.contiguous() for n, p in self._packed.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)

    @classmethod
    def load(cls, source: str | os.PathLike) -> Mask:
        """Load a mask from a file path or an MLflow artifact URI (``runs:/<id>/sparsity/mask.safetensors``).

        Raises `ValueError` for a file that is not a valid mask (truncated, corrupt, another format).
        Only safetensors and JSON are parsed: loading cannot execute code.
        """
        if not isinstance(source, (str, os.PathLike)):
            raise TypeError(f"`source` must be a path or an MLflow URI, got {type(source).__name__}.")
        source = os.fspath(source)
        if source.startswith(_URI_SCHEMES):
            return cls._load_uri(source)
        if not os.path.exists(source):
            raise FileNotFoundError(f"Mask file {source!r} does not exist.")
        if not os.path.isfile(source):
            kind = "folder" if os.path.isdir(source) else "special file (not a regular file)"
            raise ValueError(f"{source!r} is a {kind}, not a mask file.")
        return cls._load_file(source)

    @classmethod
    def _load_uri(cls, uri: str) -> Mask:
        try:
            import mlflow
        except ImportError:
            raise ImportError(f"Loading {uri!r} needs MLflow: pip install 'sparsity-callbacks[mlflow]'.") from None
        from sparsity_callbacks.sinks.mlflow import _require_reachable

        _require_reachable()  # fail fast, naming the server, instead of minutes of MLflow's retries
        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
            except Exception as err:
                raise ValueError(
                    f"Could not download the mask {uri!r} from MLflow ({type(err).__name__}: {err}). "
                    "HINT: check the run id and MLFLOW_TRACKING_URI, or pass a local file."
                ) from err
            if os.path.isdir(local):
                local = os.path.join(local, "mask.safetensors")
            return cls._load_file(local)

    @classmethod
    def _load_file(cls, path: str) -> Mask:
        from safetensors import safe_open

        hint = "HINT: the file is truncated or not a mask; re-create it with `tracker.ever_changed_mask().save(...)`."
        try:
            with safe_open(path, framework="pt") as handle:
                metadata = handle.metadata() or {}
                if metadata.get("format") != _FORMAT:
                    raise ValueError(
                        f"{path!r} is a safetensors file but not a sparsity_callbacks mask "
                        f"(format={metadata.get('format')!r})."
                    )
                if metadata.get("version") != _VERSION:
                    raise ValueError(
                        f"{path!r} is mask format version {metadata.get('version')!r}; this "
                        f"sparsity_callbacks reads version {_VERSION}. Upgrade the package."
                    )
                shapes = _checked_shapes(json.loads(metadata["shapes"]), path, hint)
                signatures = json.loads(metadata.get("signatures", "{}"))
                extra = json.loads(metadata.get("extra", "{}"))
                if not isinstance(signatures, dict) or not all(isinstance(v, str) for v in signatures.values()):
                    raise ValueError(f"Mask file {path!r} is corrupt: `signatures` is not a name -> text map. {hint}")
                if not isinstance(extra, dict):
                    raise ValueError(f"Mask file {path!r} is corrupt: `extra` metadata is not a JSON object. {hint}")
                packed = {n: handle.get_tensor(n) for n in handle.keys()}
        except json.JSONDecodeError as err:
            raise ValueError(f"Mask file {path!r} has metadata that is not valid JSON ({err}). {hint}") from None
        except ValueError:
            raise
        except Exception as err:  # safetensors raises its own error types for corrupt headers/data
            raise ValueError(f"Cannot read mask file {path!r}: {type(err).__name__}: {err}. {hint}") from None
        if set(packed) != set(shapes):
            raise ValueError(
                f"Mask file {path!r} is inconsistent: tensors {sorted(set(packed) ^ set(shapes))[:5]} "
                f"are missing from its data or its metadata. {hint}"
            )
        for name, shape in shapes.items():
            if packed[name].dtype != torch.uint8 or packed[name].numel() != _packed_numel(math.prod(shape)):
                raise ValueError(
                    f"Mask file {path!r} is corrupt: tensor {name!r} of shape {list(shape)} needs "
                    f"{_packed_numel(math.prod(shape))} packed bytes, found {packed[name].numel()} "
                    f"({packed[name].dtype}). {hint}"
                )
        return cls._from_packed(packed, shapes, signatures, extra)


def _checked_shapes(shapes: Any, path: str, hint: str) -> dict[str, tuple[int, ...]]:
    """The ``shapes`` metadata of a mask file: names -> lists of non-negative ints, else `ValueError`."""
    if not isinstance(shapes, dict):
        raise ValueError(f"Mask file {path!r} is corrupt: its `shapes` metadata is not a JSON object. {hint}")
    for name, shape in shapes.items():
        if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 2**62 for d in shape):
            raise ValueError(
                f"Mask file {path!r} is corrupt: tensor {name!r} has shape {shape!r}; a shape is a list of "
                f"non-negative integers. {hint}"
            )
    return {n: tuple(s) for n, s in shapes.items()}


def check_matches(
    mask_shapes: Mapping[str, tuple[int, ...]],
    model_shapes: Mapping[str, tuple[int, ...]],
    mask_signatures: Mapping[str, str] | None,
    model_signatures: Mapping[str, str] | None,
    *,
    what: str = "model",
    mask_label: str = "mask",
) -> None:
    """Raise `ValueError` naming the tensors that differ between a mask and a model (names, shapes,
    content signatures of the reference weights)."""
    missing = [n for n in model_shapes if n not in mask_shapes]
    extra = [n for n in mask_shapes if n not in model_shapes]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} {what} tensor(s) not in the {mask_label} (e.g. {missing[:3]})")
        if extra:
            parts.append(f"{len(extra)} {mask_label} tensor(s) not in the {what} (e.g. {extra[:3]})")
        raise ValueError(
            f"The {mask_label} was made for another model: {'; '.join(parts)}. HINT: use a mask "
            "recorded on this model with the same `include`/`exclude` options."
        )
    for name, shape in model_shapes.items():
        if tuple(mask_shapes[name]) != tuple(shape):
            raise ValueError(
                f"The {mask_label} was made for another model: tensor {name!r} has shape "
                f"{list(mask_shapes[name])} in the {mask_label} but {list(shape)} in the {what}."
            )
    if mask_signatures and model_signatures:
        for name in model_shapes:
            a, b = mask_signatures.get(name), model_signatures.get(name)
            if a is not None and b is not None and a != b:
                raise ValueError(
                    f"The {mask_label} was made for another base model: the reference weights of tensor "
                    f"{name!r} differ (signature {a} in the {mask_label}, {b} in the {what}). HINT: load the "
                    "base model the mask was recorded on, or re-discover the mask on this one."
                )
