"""`sparsity-callbacks diff | overlap | report`: analyse checkpoints and masks after training.

Results go to stdout (tables, or JSON with ``--json -``); progress, notes and errors to stderr.
Exit codes: 0 success, 2 usage error or incompatible inputs, 1 any other failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import tempfile
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

PROG = "sparsity-callbacks"
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class _UsageError(Exception):
    """Bad arguments or inputs that cannot be combined: exit code 2."""


# ------------------------------------------------------------------------------------------------
# Parser
# ------------------------------------------------------------------------------------------------
_MAIN_EPILOG = """\
examples:
  sparsity-callbacks diff Qwen/Qwen2.5-0.5B runs/grpo/checkpoint-500 --compare-dtype bfloat16
  sparsity-callbacks diff base/ tuned/ --atol 1e-5 --atol 1e-3 --mask grpo.safetensors --json diff.json
  sparsity-callbacks overlap grpo.safetensors dpo.safetensors
  sparsity-callbacks report runs:/0123456789abcdef0123456789abcdef --png heatmap.png
  sparsity-callbacks replay sparsity_mlflow_fallback_<run_id>.jsonl

run `sparsity-callbacks COMMAND --help` for the options of each command."""

_DIFF_EPILOG = """\
BASE and TUNED: a .safetensors file, a model folder (model.safetensors or shards with
model.safetensors.index.json), or a Hugging Face Hub id (org/name[@revision]).

An element is *changed* when its bits differ (a NaN whose payload changes counts; one that keeps
its bits does not); each --atol adds a column counting elements whose bits differ and whose
|tuned - base| (in float64) is not <= atol. The tracker applies the same rules. Tensors are
streamed in chunks: memory stays at a few tens of MB whatever the model size (--rank holds one
2-D update at a time).

examples:
  sparsity-callbacks diff base/ tuned/
  sparsity-callbacks diff base/model.safetensors tuned/model.safetensors --per-tensor --rank
  sparsity-callbacks diff Qwen/Qwen2.5-0.5B ./grpo-out --compare-dtype bfloat16 --json - | jq .changed_fraction
  sparsity-callbacks diff base/ tuned/ --mask grpo_mask.safetensors
  MLFLOW_TRACKING_URI=http://localhost:5000 sparsity-callbacks diff base/ tuned/ --mlflow --experiment rl-sparsity"""

_OVERLAP_EPILOG = """\
o(A, B) = |A n B| / |A| (arXiv 2505.11711), Jaccard = |A n B| / |A u B|; "chance" is the value
expected for independent random masks of the same densities (o(A, B) = |B| / N).
--base BASE_MODEL adds "chance|mag": the value expected for masks independent *given each weight's
magnitude* (strata: tensor x bf16 exponent of the base weight, i.e. weights within a factor of 2 that
share one bf16 ulp; E|A n B| = sum over strata of |A_s| |B_s| / N_s). An update flips a small weight's
bf16 value more easily than a large one's, so masks compared in bf16 overlap through magnitude alone:
compare the observed overlap with this baseline, not only with the uniform one.
MASK: a mask file, or an MLflow artifact URI (runs:/<run_id>/sparsity/mask.safetensors).
BASE_MODEL: a .safetensors file, a model folder or a Hub id (the weights the masks were measured from).

examples:
  sparsity-callbacks overlap seed0.safetensors seed1.safetensors --per-tensor
  sparsity-callbacks overlap seed0.safetensors seed1.safetensors --base base_model/
  sparsity-callbacks overlap grpo.safetensors dpo.safetensors ppo.safetensors --json overlap.json
  sparsity-callbacks overlap runs:/<id1>/sparsity/mask.safetensors runs:/<id2>/sparsity/mask.safetensors"""

_REPLAY_EPILOG = """\
FILE: the JSON-lines file MLflowSink wrote when the tracking server stayed unreachable until the end of
training (sparsity_mlflow_fallback_<run>.jsonl; artifacts in the _artifacts folder beside it). Metrics
keep their steps and timestamps. The target run: --run-id, else the file's run if it exists on the
server, else a new run in the file's experiment. Prints the run id.

examples:
  sparsity-callbacks replay sparsity_mlflow_fallback_0123456789abcdef.jsonl
  sparsity-callbacks replay fallback.jsonl --tracking-uri http://localhost:5000 --run-id 0123456789abcdef"""

_REPORT_EPILOG = """\
MASK_OR_RUN: a mask file, a report JSON (from `diff --json` or a run's sparsity/report.json), an
MLflow run id, or a runs:/<run_id>[/path] URI (reads the run's sparsity/report.json, else its
sparsity/mask.safetensors).

examples:
  sparsity-callbacks report grpo_mask.safetensors
  sparsity-callbacks report 0123456789abcdef0123456789abcdef --png run_heatmap.png
  sparsity-callbacks report diff.json"""


def _parser() -> argparse.ArgumentParser:
    from sparsity_callbacks import __version__

    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=fmt,
        epilog=_MAIN_EPILOG,
        description="Analyse which weights RL fine-tuning changed: diff checkpoints, compare masks, render reports.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    diff = sub.add_parser(
        "diff",
        help="which elements of TUNED differ from BASE",
        formatter_class=fmt,
        epilog=_DIFF_EPILOG,
        description="Count the elements of TUNED that differ from BASE, per tensor, layer, module type and overall.",
    )
    diff.add_argument("base", metavar="BASE", help="the model before fine-tuning")
    diff.add_argument("tuned", metavar="TUNED", help="the fine-tuned model")
    diff.add_argument(
        "--atol",
        type=_nonnegative_float,
        action="append",
        metavar="ATOL",
        help="also count changes with |tuned - base| > ATOL; repeatable, each gives a column (default: 1e-5)",
    )
    diff.add_argument(
        "--compare-dtype",
        choices=("float32", "bfloat16", "float16"),
        help="cast both to this dtype first (bfloat16: fp32 drift below one bf16 ulp is unchanged)",
    )
    diff.add_argument(
        "--rank",
        action="store_true",
        help="numerical rank of each 2-D update tuned - base, as rank / min(shape) (slow: one SVD each)",
    )
    diff.add_argument("--per-tensor", action="store_true", help="also print one row per tensor")
    diff.add_argument("--json", metavar="PATH", help="write the full result as JSON to PATH ('-': stdout, no table)")
    diff.add_argument("--mask", metavar="OUT", help="write the changed mask (bits differ) as a mask safetensors file")
    _mlflow_args(diff, log=True)
    diff.add_argument("-q", "--quiet", action="store_true", help="no progress bar or notes on stderr")
    diff.set_defaults(func=_cmd_diff)

    overlap = sub.add_parser(
        "overlap",
        help="how far masks overlap, against chance",
        formatter_class=fmt,
        epilog=_OVERLAP_EPILOG,
        description="Overlap and Jaccard of two or more masks, with the values expected by chance.",
    )
    overlap.add_argument("masks", metavar="MASK", nargs="+", help="two or more masks of the same model")
    overlap.add_argument("--per-tensor", action="store_true", help="also one row per tensor (two masks)")
    overlap.add_argument(
        "--base",
        metavar="BASE_MODEL",
        help="the base model's weights: adds the magnitude-matched chance baseline (two masks)",
    )
    overlap.add_argument("--json", metavar="PATH", help="write the result as JSON to PATH ('-': stdout, no table)")
    _mlflow_args(overlap, log=False)
    overlap.set_defaults(func=_cmd_overlap)

    report = sub.add_parser(
        "report",
        help="summary and heatmap of a mask or a run",
        formatter_class=fmt,
        epilog=_REPORT_EPILOG,
        description="Print the density per module type and the "
        "layer x module heatmap of a mask, a report JSON or an MLflow run; write the heatmap PNG.",
    )
    report.add_argument("source", metavar="MASK_OR_RUN", help="mask file, report JSON, MLflow run id or runs:/ URI")
    report.add_argument(
        "--png", default="sparsity_report.png", metavar="PATH", help="where to write the heatmap (default: %(default)s)"
    )
    report.add_argument("--title", help="heatmap title (default: the source)")
    _mlflow_args(report, log=False)
    report.set_defaults(func=_cmd_report)

    replay = sub.add_parser(
        "replay",
        help="send an MLflow fallback file to MLflow",
        formatter_class=fmt,
        epilog=_REPLAY_EPILOG,
        description="Deliver the metrics, params and artifacts that MLflowSink could not send during training.",
    )
    replay.add_argument("file", metavar="FILE", help="the sparsity_mlflow_fallback_*.jsonl file")
    replay.add_argument("--tracking-uri", help="MLflow tracking URI (default: the one in FILE)")
    replay.add_argument("--run-id", help="log into this run (default: FILE's run if it exists, else a new run)")
    replay.set_defaults(func=_cmd_replay)
    return parser


def _mlflow_args(parser: argparse.ArgumentParser, *, log: bool) -> None:
    if log:
        parser.add_argument(
            "--mlflow",
            action="store_true",
            help="log the diff as a new MLflow run (metrics, params, report.json, heatmap, mask)",
        )
        parser.add_argument(
            "--experiment", help="MLflow experiment for --mlflow (default: MLFLOW_EXPERIMENT_NAME or Default)"
        )
        parser.add_argument("--run-name", help="MLflow run name for --mlflow")
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else MLflow's default)"
    )


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return value


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 usage / incompatible inputs, 1 failure)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version, or a usage error argparse already printed
        return stop.code if isinstance(stop.code, int) else 2
    from sparsity_callbacks.diff import IncompatibleCheckpointsError

    try:
        _check_output_folders(args)
        return int(args.func(args) or 0)
    except (_UsageError, IncompatibleCheckpointsError, FileNotFoundError) as err:
        _error(args.command, err)
        return 2
    except KeyboardInterrupt:
        _error(args.command, "interrupted")
        return 130
    except Exception as err:  # one line, no traceback; SPARSITY_CALLBACKS_DEBUG=1 re-raises
        if os.environ.get("SPARSITY_CALLBACKS_DEBUG"):
            raise
        known = isinstance(err, (ValueError, OSError, ImportError))
        _error(
            args.command,
            err if known else f"{type(err).__name__}: {err} (set SPARSITY_CALLBACKS_DEBUG=1 for the traceback)",
        )
        return 1


def _error(command: str, message: Any) -> None:
    text = str(message).strip() or type(message).__name__
    print(f"{PROG} {command}: error: {' '.join(text.split())}", file=sys.stderr)


def _note(message: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"{PROG}: {message}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------
# diff
# ------------------------------------------------------------------------------------------------
def _cmd_diff(args: argparse.Namespace) -> int:
    from sparsity_callbacks.diff import diff_checkpoints

    atols = tuple(args.atol) if args.atol else (1e-5,)
    want_mask = bool(args.mask or args.mlflow)
    progress = not args.quiet and sys.stderr.isatty()
    result = diff_checkpoints(
        args.base,
        args.tuned,
        atol=atols,
        compare_dtype=args.compare_dtype,
        rank=args.rank,
        mask=want_mask,
        progress=progress,
    )
    data = result.to_dict()
    if args.mask:
        result.mask.save(args.mask)
        _note(
            f"wrote the changed mask ({result.mask.count():,} of {result.mask.numel():,} elements) to {args.mask}",
            args.quiet,
        )
    if args.mlflow:
        data["mlflow_run_id"] = _log_diff_to_mlflow(result, data, args)
        _note(f"logged to MLflow run {data['mlflow_run_id']}", args.quiet)
    if args.json:
        _write_json(data, args.json)
    if args.json != "-":
        _print_diff(result, args, data.get("mlflow_run_id"))
    skipped = result.skipped
    if skipped:
        _note(
            f"warning: {len(skipped)} tensor(s) not compared ({_skip_summary(result)}); they are listed in the output",
            args.quiet,
        )
    return 0


def _log_diff_to_mlflow(result, data: dict, args: argparse.Namespace) -> str | None:
    from sparsity_callbacks.plots import save_heatmap
    from sparsity_callbacks.sinks.mlflow import MLflowSink

    name = args.run_name or f"diff {_short(result.base)} -> {_short(result.tuned)}"
    sink = MLflowSink(tracking_uri=args.tracking_uri, experiment=args.experiment, run_name=name)
    try:
        sink.log_params(
            {
                "base": result.base,
                "tuned": result.tuned,
                "atol": ",".join(f"{a:g}" for a in result.atols),
                "compare_dtype": result.compare_dtype or "as stored",
            }
        )
        sink.log_metrics(result.to_metrics(per_tensor=args.per_tensor), step=0)
        run_id = sink.run_id
        with tempfile.TemporaryDirectory(prefix="sparsity_diff_") as tmp:
            report = os.path.join(tmp, "report.json")
            _write_json({**data, "mlflow_run_id": run_id}, report)
            sink.log_artifact(report, artifact_path="sparsity")
            heatmap = os.path.join(tmp, "heatmap.png")
            save_heatmap(_cells(result.measurement()), heatmap, title=f"changed: {name}")
            sink.log_artifact(heatmap, artifact_path="sparsity")
            mask = os.path.join(tmp, "mask.safetensors")
            result.mask.save(mask)
            sink.log_artifact(mask, artifact_path="sparsity")
            if not sink.flush(timeout=120):
                _note("warning: MLflow has not confirmed every item yet; see the MLflowSink warnings")
    finally:
        sink.close()
    return run_id


def _print_diff(result, args: argparse.Namespace, run_id: str | None) -> None:
    m = result.measurement()
    within = {a: result.measurement(a) for a in result.atols}
    out = _Output()
    size = sum(t.numel for t in result.tensors.values())
    out.line(f"BASE   {result.base}")
    out.line(f"TUNED  {result.tuned}")
    out.line(
        f"compared {len(result.tensors)} tensors, {size:,} elements, "
        f"as {result.compare_dtype or 'stored'}, in {result.seconds:.1f} s"
        + (f"; MLflow run {run_id}" if run_id else "")
    )
    atol_cols = [f"|Δ|>{a:g}" for a in result.atols]
    rank_col = ["rank/min"] if args.rank else []  # mean of rank(ΔW) / min(shape) over changed 2-D tensors

    def ranks_of(names: list[str]) -> list[str]:
        if not args.rank:
            return []
        rel = [
            result.tensors[n].relative_rank
            for n in names
            if result.tensors[n].relative_rank is not None and result.tensors[n].changed
        ]
        return [f"{sum(rel) / len(rel):.3f}" if rel else "-"]

    rows = [
        [
            "all",
            f"{m.numel:,}",
            f"{int(m.changed):,}",
            _pct(m.changed_fraction),
            *[_pct(w.changed_fraction) for w in within.values()],
            *ranks_of(list(result.tensors)),
        ]
    ]
    out.table(
        f"Changed elements (bits differ); update sparsity = {_pct(m.update_sparsity)}",
        ["", "elements", "changed", "changed %", *atol_cols, *rank_col],
        rows,
    )

    def group_rows(groups: Mapping[Any, Any], by_atol: Mapping[float, Mapping[Any, Any]], members) -> list[list[str]]:
        return [
            [
                str(key),
                f"{c.numel:,}",
                f"{c.changed:,}",
                _pct(_frac(c.changed, c.numel)),
                *[_pct(_frac(by_atol[a][key].changed, c.numel)) for a in result.atols],
                *ranks_of(members(key)),
            ]
            for key, c in groups.items()
        ]

    from sparsity_callbacks.params import _layer_index, _module_type

    types = dict(sorted(m.by_module_type().items()))
    out.table(
        "Per module type",
        ["module type", "elements", "changed", "changed %", *atol_cols, *rank_col],
        group_rows(
            types,
            {a: w.by_module_type() for a, w in within.items()},
            lambda k: [n for n in result.tensors if _module_type(n) == k],
        ),
    )
    layers = dict(sorted(m.by_layer().items()))
    if layers:
        out.table(
            "Per layer",
            ["layer", "elements", "changed", "changed %", *atol_cols, *rank_col],
            group_rows(
                layers,
                {a: w.by_layer() for a, w in within.items()},
                lambda k: [n for n in result.tensors if _layer_index(n) == k],
            ),
        )
    if args.per_tensor:
        rows = []
        for name, t in result.tensors.items():
            rank = [f"{t.rank}/{t.max_rank}" if t.rank is not None else "-"] if args.rank else []
            rows.append(
                [
                    name,
                    "x".join(map(str, t.shape)),
                    t.dtype,
                    f"{t.changed:,}",
                    _pct(_frac(t.changed, t.numel)),
                    *[_pct(_frac(c, t.numel)) for c in t.within],
                    *rank,
                ]
            )
        out.table("Per tensor", ["tensor", "shape", "dtype", "changed", "changed %", *atol_cols, *rank_col], rows)
    if m.nonfinite:
        out.line(f"note: TUNED holds {m.nonfinite:,} NaN/inf elements.")
    _print_skipped(out, result)


def _print_skipped(out: _Output, result) -> None:
    groups = [
        ("only in BASE", result.only_in_base, ""),
        ("only in TUNED", result.only_in_tuned, ""),
        (
            "different dtype (pass --compare-dtype to compare them)",
            [f"{n} ({a} vs {b})" for n, (a, b) in result.dtype_mismatch.items()],
            "",
        ),
        ("not floating point", [f"{n} ({d})" for n, d in result.not_float.items()], ""),
    ]
    limit = 25
    for title, names, _ in groups:
        if not names:
            continue
        out.line(f"not compared, {title}: {len(names)} tensor(s)")
        for name in names[:limit]:
            out.line(f"  {name}")
        if len(names) > limit:
            out.line(f"  ... and {len(names) - limit} more (all are in --json)")


def _skip_summary(result) -> str:
    parts = [
        (len(result.only_in_base), "only in BASE"),
        (len(result.only_in_tuned), "only in TUNED"),
        (len(result.dtype_mismatch), "different dtype"),
        (len(result.not_float), "not floating point"),
    ]
    return ", ".join(f"{n} {what}" for n, what in parts if n)


# ------------------------------------------------------------------------------------------------
# overlap
# ------------------------------------------------------------------------------------------------
def _cmd_overlap(args: argparse.Namespace) -> int:
    from sparsity_callbacks.masks import Mask, check_matches

    if len(args.masks) < 2:
        raise _UsageError(
            f"overlap needs at least two masks, got {len(args.masks)}. "
            "HINT: sparsity-callbacks overlap A.safetensors B.safetensors"
        )
    with _tracking_uri(args.tracking_uri):
        if any(not os.path.exists(src) for src in args.masks):
            _require_existing_store()
        masks = [Mask.load(src) for src in args.masks]
    for src, mask in zip(args.masks[1:], masks[1:]):
        try:
            check_matches(
                masks[0].shapes, mask.shapes, None, None, what=f"mask {src!r}", mask_label=f"mask {args.masks[0]!r}"
            )
        except ValueError as err:
            raise _UsageError(f"the masks cover different tensors: {err}") from None
    labels = _labels(args.masks)
    if args.base is not None and len(masks) != 2:
        raise _UsageError(f"--base works with two masks, got {len(masks)}. HINT: compare the masks pair by pair.")
    data = _overlap_pair(masks, labels, args) if len(masks) == 2 else _overlap_matrix(masks, labels)
    data["sources"] = list(args.masks)
    if args.json:
        _write_json(data, args.json)
    if args.json != "-":
        _print_overlap(data, masks)
    return 0


def _labels(sources: Sequence[str]) -> list[str]:
    names = [_short(s).removesuffix(".safetensors") for s in sources]
    if len(set(names)) == len(names):
        return names
    return [f"M{i + 1}" for i in range(len(sources))]


def _group_overlap(per_tensor: Mapping[str, Any], key) -> dict:
    from sparsity_callbacks.masks import Overlap

    sums: dict[Any, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    expected: dict[Any, float | None] = defaultdict(float)
    for name, o in per_tensor.items():
        k = key(name)
        s = sums[k]
        s[0] += o.numel
        s[1] += o.size_a
        s[2] += o.size_b
        s[3] += o.intersection
        e = o.expected_intersection_magnitude_matched
        expected[k] = None if e is None or expected[k] is None else expected[k] + e
    return {
        k: Overlap(v[0], v[1], v[2], v[3], expected_intersection_magnitude_matched=expected[k])
        for k, v in sorted(sums.items())
    }


def _base_weights(source: str, masks) -> dict:
    """The base model's tensors named in the masks (read one by one from ``source``)."""
    from safetensors import safe_open

    from sparsity_callbacks.diff import open_checkpoint

    try:
        checkpoint = open_checkpoint(source)
    except (OSError, ValueError) as err:
        raise _UsageError(f"--base {source!r}: {err}") from None
    missing = [n for n in masks[0].names if n not in checkpoint.tensors]
    if missing:
        raise _UsageError(
            f"--base {source!r} lacks {len(missing)} tensor(s) of the masks (e.g. {missing[:3]}). "
            "HINT: pass the base model the masks were measured from."
        )
    weights = {}
    for name in masks[0].names:
        with safe_open(checkpoint.tensors[name].path, framework="pt") as handle:
            weights[name] = handle.get_tensor(name)
    return weights


def _overlap_pair(masks, labels, args) -> dict:
    from sparsity_callbacks.params import _module_type

    base = None if args.base is None else _base_weights(args.base, masks)
    try:
        o = masks[0].overlap(masks[1], reference=base)
    except ValueError as err:
        raise _UsageError(f"--base {args.base!r}: {err}") from None
    data = {
        "kind": "sparsity_callbacks.overlap",
        "labels": labels,
        "density": [masks[0].density, masks[1].density],
        "global": o.to_dict(),
        "module_types": {k: v.to_dict() for k, v in _group_overlap(o.per_tensor, _module_type).items()},
    }
    if args.per_tensor:
        data["tensors"] = {k: v.to_dict() for k, v in o.per_tensor.items()}
    return data


def _overlap_matrix(masks, labels) -> dict:
    k = len(masks)
    counts = [m.count() for m in masks]
    numel = masks[0].numel()
    inter = [[0] * k for _ in range(k)]
    for i in range(k):
        inter[i][i] = counts[i]
        for j in range(i + 1, k):
            inter[i][j] = inter[j][i] = masks[i].overlap(masks[j]).intersection

    def ratio(x: float, y: float) -> float:
        return x / y if y else math.nan

    def chance_jaccard(a: int, b: int) -> float:
        e = a * b / numel if numel else 0.0
        return ratio(e, a + b - e)

    return {
        "kind": "sparsity_callbacks.overlap",
        "labels": labels,
        "numel": numel,
        "sizes": counts,
        "density": [ratio(c, numel) for c in counts],
        "overlap": [[ratio(inter[i][j], counts[i]) for j in range(k)] for i in range(k)],
        "jaccard": [[ratio(inter[i][j], counts[i] + counts[j] - inter[i][j]) for j in range(k)] for i in range(k)],
        "chance_overlap": [[1.0 if i == j else ratio(counts[j], numel) for j in range(k)] for i in range(k)],
        "chance_jaccard": [
            [1.0 if i == j else chance_jaccard(counts[i], counts[j]) for j in range(k)] for i in range(k)
        ],
        "intersection": inter,
    }


def _print_overlap(data: dict, masks) -> None:
    out = _Output()
    labels = data["labels"]
    for label, src, mask in zip(labels, data["sources"], masks):
        out.line(f"{label}: {src}  ({mask.count():,} of {mask.numel():,} elements, density {_pct(mask.density)})")
    if len(masks) == 2:
        a, b = labels
        matched = "chance_magnitude_matched" in data["global"]
        cols = ["", f"o({a},{b})", "chance", f"o({b},{a})", "chance", "Jaccard", "chance", f"|{a}|", f"|{b}|", "|A∩B|"]
        if matched:  # the magnitude-matched baseline right after each uniform one
            cols = [*cols[:3], "chance|mag", *cols[3:5], "chance|mag", *cols[5:7], "chance|mag", *cols[7:]]

        def row(key: str, o: Mapping[str, Any]) -> list[str]:
            cells = [
                key,
                _num(o["overlap_ab"]),
                _num(o["chance_ab"]),
                _num(o["overlap_ba"]),
                _num(o["chance_ba"]),
                _num(o["jaccard"]),
                _num(o["chance_jaccard"]),
                f"{o['size_a']:,}",
                f"{o['size_b']:,}",
                f"{o['intersection']:,}",
            ]
            if matched:
                mag = [
                    _num(o["chance_magnitude_matched"]),
                    _num(o["chance_magnitude_matched_ba"]),
                    _num(o["chance_magnitude_matched_jaccard"]),
                ]
                cells = [*cells[:3], mag[0], *cells[3:5], mag[1], *cells[5:7], mag[2], *cells[7:]]
            return cells

        out.table("Overlap, global", cols, [row("all", data["global"])])
        out.table("Per module type", ["module type", *cols[1:]], [row(k, v) for k, v in data["module_types"].items()])
        if "tensors" in data:
            out.table("Per tensor", ["tensor", *cols[1:]], [row(k, v) for k, v in data["tensors"].items()])
        return
    for key, title in (
        ("overlap", "o(row, col) = |row ∩ col| / |row|"),
        ("chance_overlap", "chance o(row, col) = |col| / N"),
        ("jaccard", "Jaccard"),
        ("chance_jaccard", "chance Jaccard"),
    ):
        out.table(title, ["", *labels], [[labels[i], *map(_num, r)] for i, r in enumerate(data[key])])


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def _cmd_report(args: argparse.Namespace) -> int:
    from sparsity_callbacks.plots import heatmap_text, save_heatmap

    with _tracking_uri(args.tracking_uri):
        kind, m, extra = _load_report_source(args.source)
    out = _Output()
    out.line(f"{args.source}: {kind}")
    out.line(
        f"{len(m.tensors)} tensors, {m.numel:,} elements; changed {int(m.changed):,} "
        f"({_pct(m.changed_fraction)}), update sparsity {_pct(m.update_sparsity)}"
        + (f", ever changed {_pct(m.ever_changed_fraction)}" if kind == "training report" else "")
    )
    for line in extra:
        out.line(line)
    rows = [
        [k, f"{c.numel:,}", f"{c.changed:,}", _pct(_frac(c.changed, c.numel))]
        for k, c in sorted(m.by_module_type().items())
    ]
    out.table("Per module type", ["module type", "elements", "changed", "changed %"], rows)
    cells = _cells(m)
    out.line("Changed % per layer (rows) and module type (columns):")
    out.line(heatmap_text(cells), markup=False)
    png = os.path.abspath(args.png)
    save_heatmap(cells, png, title=args.title or f"changed fraction: {_short(args.source)}")
    _note(f"wrote {png}")
    return 0


def _load_report_source(source: str):
    """``(kind, Measurement, extra lines)`` from a mask file, a report JSON, a run id or a runs:/ URI."""
    from sparsity_callbacks.masks import Mask

    if os.path.isdir(source):
        raise FileNotFoundError(f"{source!r} is a folder; `report` reads a mask file, a report JSON or an MLflow run.")
    if os.path.exists(source):
        if source.endswith(".json"):
            return _from_report_json(_read_json(source), source)
        return _from_mask(Mask.load(source))
    run_uri = None
    if _RUN_ID.match(source):
        run_uri = f"runs:/{source}"
    elif source.startswith("runs:/"):
        run_uri = source.rstrip("/")
    if run_uri is None:
        if source.startswith(("models:/", "mlflow-artifacts:/", "s3://", "gs://", "dbfs:/")):
            _require_existing_store()
            return _from_mask(Mask.load(source))
        raise FileNotFoundError(
            f"{source!r} is neither a file nor an MLflow run id / runs:/ URI. HINT: pass a "
            "mask file, a report JSON, a 32-character run id or runs:/<run_id>."
        )
    _require_existing_store()
    parts = run_uri[len("runs:/") :].split("/", 1)
    if len(parts) == 2 and parts[1]:
        if parts[1].endswith(".json"):
            return _from_report_json(_download_json(run_uri), run_uri)
        return _from_mask(Mask.load(run_uri))
    base = f"runs:/{parts[0]}/sparsity"
    try:
        return _from_report_json(_download_json(f"{base}/report.json"), f"{base}/report.json")
    except FileNotFoundError:
        pass
    try:
        return _from_mask(Mask.load(f"{base}/mask.safetensors"))
    except ValueError as err:
        raise FileNotFoundError(
            f"MLflow run {parts[0]} has neither sparsity/report.json nor a readable "
            f"sparsity/mask.safetensors ({err}). HINT: check the run id and --tracking-uri / "
            "MLFLOW_TRACKING_URI."
        ) from None


def _read_json(path: str) -> Any:
    """``json.load`` of ``path`` with the file named in every error (bad JSON, nesting too deep, not UTF-8)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err)
        raise ValueError(f"{path!r} is not a valid JSON report ({reason}).") from None


def _download_json(uri: str) -> dict:
    import mlflow

    from sparsity_callbacks.sinks.mlflow import _require_reachable

    _require_reachable()  # a dead server is named at once, not blamed on the run's files after minutes
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
        except Exception as err:
            raise FileNotFoundError(f"cannot download {uri} ({type(err).__name__}: {err})") from None
        return _read_json(local)


def _from_mask(mask):
    from sparsity_callbacks.measurement import Measurement, TensorCounts

    tensors = {n: TensorCounts(mask.numel(n), mask.count(n), mask.count(n), 0) for n in mask.names}
    extra = [f"mask metadata: {json.dumps(mask.metadata, default=str)}"] if mask.metadata else []
    return "mask (1 = changed / in the subnetwork)", Measurement(None, "mask", tensors, has_churn=False), extra


def _from_report_json(data: Any, source: str):
    from sparsity_callbacks.measurement import Measurement

    found = _find_tensors(data)
    if found is None:
        raise ValueError(
            f"{source} is not a sparsity report: it has no `tensors` table. HINT: pass a file "
            "written by `diff --json` or a run's sparsity/report.json."
        )
    tensors = {n: _tensor_counts(n, r, source) for n, r in found["tensors"].items()}
    probability = found.get("changed_miss_probability") or 0.0
    if isinstance(probability, bool) or not isinstance(probability, (int, float)) or not 0 <= probability <= 1:
        raise ValueError(f"{source}: `changed_miss_probability` must be a probability in [0, 1], got {probability!r}.")
    step = found.get("step")
    if step is not None and (type(step) is not int or step < 0):
        raise ValueError(f"{source}: `step` must be a non-negative integer or null, got {step!r:.40}.")
    kind = "diff report" if found.get("kind") == "sparsity_callbacks.diff" else "training report"
    m = Measurement(
        found.get("step"),
        str(found.get("mode", "exact")),
        tensors,
        has_churn=False,
        changed_miss_probability=float(probability),
        fingerprint_estimate="detected" if found.get("fingerprint_estimate") == "detected" else "corrected",
    )
    extra = []
    if kind == "diff report":
        extra.append(
            f"BASE {found.get('base')}  TUNED {found.get('tuned')}  compare dtype "
            f"{found.get('compare_dtype') or 'as stored'}"
        )
    elif found.get("step") is not None:
        extra.append(f"step {found['step']}, mode {found.get('mode')}")
    return kind, m, extra


def _tensor_counts(name: str, row: Any, source: str):
    """One row of a report's ``tensors`` table as `TensorCounts`; counts must be integers with
    0 <= count <= numel, else `ValueError` naming the tensor and the field."""
    from sparsity_callbacks.measurement import TensorCounts

    if not isinstance(row, dict) or "numel" not in row:
        raise ValueError(
            f"{source}: tensor {name!r} of the `tensors` table is not an object with a `numel`: {row!r:.80}."
        )
    counts: dict[str, int] = {}
    for key in ("numel", "changed", "ever_changed", "churn"):
        value = row.get(key, 0)
        limit = counts.get("numel", 2**62)
        if type(value) is not int or not 0 <= value <= limit:
            raise ValueError(
                f"{source}: tensor {name!r} has {key}={value!r:.40}; counts must be integers from 0 to "
                f"{'numel' if key != 'numel' else '2^62'} ({limit if key != 'numel' else 2**62}). HINT: pass a file "
                "written by `diff --json` or a run's sparsity/report.json, unedited."
            )
        counts[key] = value
    return TensorCounts(counts["numel"], counts["changed"], counts["ever_changed"], counts["churn"])


def _find_tensors(data: Any, depth: int = 0) -> dict | None:
    """The object holding the ``tensors`` table (the report itself, or nested up to 8 levels down)."""
    if isinstance(data, dict) and depth <= 8:
        if isinstance(data.get("tensors"), dict):
            return data
        for value in data.values():
            found = _find_tensors(value, depth + 1)
            if found is not None:
                return found
    return None


# ------------------------------------------------------------------------------------------------
# Shared helpers
# ------------------------------------------------------------------------------------------------
def _cells(m) -> dict:
    return {k: c.changed / c.numel for k, c in m.by_layer_and_module().items() if c.numel}


def _frac(x: float, n: int) -> float:
    return x / n if n else math.nan


def _pct(x: float) -> str:
    return "-" if x is None or math.isnan(x) else f"{100 * x:.3f} %"


def _num(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def _short(source: str) -> str:
    return os.path.basename(os.path.normpath(source)) or source


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _check_output_folders(args: argparse.Namespace) -> None:
    """Before any work: every output file (``--json``, ``--mask``, ``--png``) must go into a folder that
    exists (no folders are created: a typo must not leave a tree behind) and must not be a folder."""
    for option in ("json", "mask", "png"):
        path = getattr(args, option, None)
        if not isinstance(path, str) or path == "-":
            continue
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise _UsageError(f"--{option} {path!r}: the folder {folder!r} does not exist. HINT: create it first.")
        if os.path.isdir(path):
            raise _UsageError(f"--{option} {path!r} is a folder; give a file name.")


def _write_json(data: Mapping[str, Any], path: str) -> None:
    text = json.dumps(_json_safe(data), indent=2, allow_nan=False)
    if path == "-":
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
        return
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text + "\n")


def _require_existing_store() -> None:
    """Refuse to read from a local MLflow store that does not exist: MLflow would create an empty one
    (``mlflow.db`` in the current folder when nothing is configured) and then report a missing run."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :]
    elif uri.startswith("file:"):
        path = uri[len("file://") :] if uri.startswith("file://") else uri[len("file:") :]
    elif "://" not in uri:
        path = uri
    else:
        return  # a server or a remote database: nothing is created here
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no MLflow store at {uri} ({os.path.abspath(path)} does not exist), and reading from it would "
            "create an empty one. HINT: pass --tracking-uri (e.g. sqlite:///path/to/mlflow.db or "
            "http://host:5000), set MLFLOW_TRACKING_URI, or run from the folder that holds mlflow.db."
        )


class _tracking_uri:
    """Temporarily point MLflow at ``uri`` (restored afterwards: `main` may run inside a larger program)."""

    def __init__(self, uri: str | None) -> None:
        self.uri = uri
        self.previous: str | None = None

    def __enter__(self) -> None:
        if self.uri:
            import mlflow

            self.previous = mlflow.get_tracking_uri()
            mlflow.set_tracking_uri(self.uri)

    def __exit__(self, *exc) -> None:
        if self.uri:
            import mlflow

            mlflow.set_tracking_uri(self.previous)  # type: ignore[arg-type]  # None: MLflow's default


class _Output:
    """Tables and lines on stdout: rich when installed (plain text otherwise)."""

    def __init__(self) -> None:
        try:
            from rich.console import Console

            tty = sys.stdout.isatty()
            self.console: Any = Console(file=sys.stdout, highlight=False, width=None if tty else 200, soft_wrap=not tty)
        except ImportError:
            self.console = None

    def line(self, text: str, markup: bool = False) -> None:
        if self.console is not None:
            self.console.print(text, markup=markup)
        else:
            print(text)

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        if self.console is not None:
            from rich.table import Table
            from rich.text import Text

            table = Table(title=Text(title), title_justify="left", show_edge=False)
            for i, col in enumerate(columns):
                table.add_column(Text(col), justify="left" if i == 0 else "right", overflow="fold")
            for row in rows:
                table.add_row(*(Text(str(v)) for v in row))
            self.console.print(table)
            return
        widths = [
            max(len(str(c)), *(len(str(r[i])) for r in rows)) if rows else len(str(c)) for i, c in enumerate(columns)
        ]
        print(title)
        print("  ".join(str(c).ljust(w) for c, w in zip(columns, widths)))
        for row in rows:
            print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)))
        print()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


# ------------------------------------------------------------------------------------------------
# replay
# ------------------------------------------------------------------------------------------------
def _cmd_replay(args: argparse.Namespace) -> int:
    from sparsity_callbacks.sinks.mlflow import _replay_fallback

    if not os.path.isfile(args.file):
        raise FileNotFoundError(
            f"{args.file!r} does not exist. HINT: the MLflowSink warning at the end of training names the file."
        )
    with contextlib.redirect_stdout(sys.stderr):  # MLflow prints "View run ..." links: stdout is the run id alone
        run_id = _replay_fallback(args.file, args.tracking_uri, run_id=args.run_id)
    print(run_id)
    return 0
