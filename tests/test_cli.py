"""`sparsity-callbacks diff | overlap | report` on real files, checked against known edits (the compare
rules themselves are checked tracker-vs-diff in test_rules_parity.py)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np
import pytest
import torch
from helpers import tiny_gpt2, tiny_llama
from safetensors.torch import load_file, save_file

from sparsity_callbacks import Mask
from sparsity_callbacks._rules import _tensor_signature
from sparsity_callbacks.cli import main
from sparsity_callbacks.diff import DiffResult, diff_checkpoints
from sparsity_callbacks.params import _module_type

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
Q = "model.layers.0.self_attn.q_proj.weight"  # 10 elements set to new values
DOWN = "model.layers.1.mlp.down_proj.weight"  # 5 elements moved by 3e-6 (< atol 1e-5)
K = "model.layers.1.self_attn.k_proj.weight"  # 6 elements moved by one fp32 ulp (< one bf16 ulp)


def _state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _sub_bf16_ulp_positions(w: torch.Tensor, count: int) -> list[int]:
    """Elements whose low 16 bits are far from the bf16 rounding boundary: +1 fp32 ulp keeps their bf16 value."""
    low = (w.reshape(-1).view(torch.int32) & 0xFFFF).tolist()
    return [i for i, v in enumerate(low) if 0x100 < v < 0x7000][:count]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """BASE: a tiny Llama in one file; TUNED: the same with known edits, saved in shards."""
    root = tmp_path_factory.mktemp("models")
    model = tiny_llama(seed=0)
    model.save_pretrained(root / "base")
    edits = {}
    with torch.no_grad():
        params = dict(model.named_parameters())
        q = params[Q].view(-1)
        edits[Q] = [3, 17, 40, 41, 42, 100, 150, 200, 230, 255]
        q[edits[Q]] = torch.linspace(-2.0, 2.0, 10) + 0.123
        down = params[DOWN].view(-1)
        edits[DOWN] = [0, 7, 99, 300, 511]
        down[edits[DOWN]] += 3e-6
        k = params[K].view(-1)
        edits[K] = _sub_bf16_ulp_positions(params[K].detach(), 6)
        k.view(torch.int32)[edits[K]] += 1
    model.save_pretrained(root / "tuned", max_shard_size="20KB")
    assert os.path.exists(root / "tuned" / "model.safetensors.index.json")
    return {"base": str(root / "base"), "tuned": str(root / "tuned"), "edits": edits, "root": root}


def _run(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- entry points ------------------------------------------------------------------------------
@pytest.mark.slow
def test_module_entry_point_prints_help_with_examples():
    proc = subprocess.run(
        [sys.executable, "-m", "sparsity_callbacks", "--help"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "diff" in proc.stdout and "overlap" in proc.stdout and "report" in proc.stdout
    assert "examples:" in proc.stdout


def test_version_and_usage_errors(capsys):
    code, out, _ = _run(["--version"], capsys)
    assert code == 0 and out.startswith("sparsity-callbacks ")
    code, _, err = _run(["diff", "a", "b", "--atol", "-1"], capsys)
    assert code == 2 and "must be a finite number >= 0" in err
    code, _, err = _run(["bogus"], capsys)
    assert code == 2 and "invalid choice" in err


# --- diff --------------------------------------------------------------------------------------
def test_diff_counts_the_known_edits_and_json_round_trips(models, tmp_path, capsys):
    out_json = tmp_path / "diff.json"
    code, out, err = _run(
        ["diff", models["base"], models["tuned"], "--atol", "1e-5", "--atol", "0.1", "--json", out_json, "-q"], capsys
    )
    assert code == 0, err
    data = json.loads(out_json.read_text())
    base = load_file(os.path.join(models["base"], "model.safetensors"))
    assert set(data["tensors"]) == set(base)
    for name, row in data["tensors"].items():
        assert row["numel"] == base[name].numel()
        if name not in models["edits"]:  # untouched tensors: nothing changed at any tolerance
            assert (row["changed"], row["within"]) == (0, {"1e-05": 0, "0.1": 0}), name
    # the 10 new Q values are far from the old ones; at 0.1 the one nearest 0 may be within tolerance
    assert data["tensors"][Q]["within"]["1e-05"] == 10 and 9 <= data["tensors"][Q]["within"]["0.1"] <= 10
    assert data["tensors"][Q]["changed"] == 10
    assert data["tensors"][DOWN] == {**data["tensors"][DOWN], "changed": 5, "within": {"1e-05": 0, "0.1": 0}}
    assert data["tensors"][K]["changed"] == 6 and data["tensors"][K]["within"]["1e-05"] == 0
    assert data["changed"] == 21
    # counts are integers in the JSON text, not 21.0
    assert '"changed": 21,' in out_json.read_text() and isinstance(data["within_atol"]["1e-05"]["changed"], int)
    assert data["changed_fraction"] == pytest.approx(21 / data["numel"])
    assert data["within_atol"]["1e-05"]["changed"] == 10
    assert data["module_types"]["self_attn.q_proj"]["changed"] == 10
    assert data["layers"]["1"]["changed"] == 11
    # round trip: the JSON rebuilds the same result
    again = DiffResult.from_dict(data).to_dict()
    for key in ("tensors", "module_types", "layers", "within_atol", "changed", "numel", "atols"):
        assert again[key] == data[key], key
    # the table: global, module types, layers, both atol columns
    assert "self_attn.q_proj" in out and "|Δ|>1e-05" in out and "|Δ|>0.1" in out and "Per layer" in out


def test_diff_json_to_stdout_is_pure_json(models, capsys):
    code, out, _ = _run(["diff", models["base"], models["tuned"], "--json", "-", "-q"], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["kind"] == "sparsity_callbacks.diff" and data["changed"] == 21


def test_compare_dtype_bfloat16_ignores_sub_ulp_drift(models, capsys):
    code, out, err = _run(
        ["diff", models["base"], models["tuned"], "--compare-dtype", "bfloat16", "--json", "-", "-q"], capsys
    )
    assert code == 0, err
    data = json.loads(out)
    a, b = load_file(os.path.join(models["base"], "model.safetensors")), {}
    for f in os.listdir(models["tuned"]):
        if f.endswith(".safetensors"):
            b.update(load_file(os.path.join(models["tuned"], f)))
    for name, row in data["tensors"].items():
        x, y = a[name].to(torch.bfloat16).view(torch.int16), b[name].to(torch.bfloat16).view(torch.int16)
        assert row["changed"] == int((x != y).sum()), name
        assert row["dtype"] == "bfloat16"
    assert data["tensors"][K]["changed"] == 0  # +1 fp32 ulp, far from the rounding boundary
    assert data["tensors"][Q]["changed"] == 10


def test_mask_has_the_edited_positions_and_base_signatures(models, tmp_path, capsys):
    path = tmp_path / "mask.safetensors"
    code, _, err = _run(["diff", models["base"], models["tuned"], "--mask", path, "-q"], capsys)
    assert code == 0, err
    mask = Mask.load(path)
    base = load_file(os.path.join(models["base"], "model.safetensors"))
    assert set(mask.names) == set(base)
    assert mask.count() == 21
    for name, positions in models["edits"].items():
        assert sorted(torch.nonzero(mask[name].reshape(-1)).flatten().tolist()) == sorted(positions), name
        assert mask.shapes[name] == tuple(base[name].shape)
    assert mask.metadata["base"] == models["base"] and mask.metadata["tuned"] == models["tuned"]
    for name, tensor in base.items():
        assert mask.signatures[name] == _tensor_signature(tensor), name


def test_mask_bits_and_signatures_across_chunks_and_nan_rules(tmp_path):
    """A tensor larger than 4096 elements (strided signature samples) split into many chunks, with NaN:
    NaN in both (same bits) is unchanged, number -> NaN is changed."""
    gen = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(300, 70, generator=gen), "b": torch.randn(13, generator=gen)}
    tuned = {k: v.clone() for k, v in base.items()}
    flips = torch.rand(base["w"].shape, generator=gen) < 0.05
    tuned["w"][flips] += 1.0
    base["w"][0, :3] = float("nan")
    tuned["w"][0, :3] = float("nan")  # same bits: unchanged
    tuned["b"][5] = float("nan")  # changed
    save_file(base, tmp_path / "a.safetensors")
    save_file(tuned, tmp_path / "b.safetensors")
    result = diff_checkpoints(
        tmp_path / "a.safetensors", tmp_path / "b.safetensors", mask=True, chunk_numel=1000, workers=3
    )
    expected_w = flips.clone()
    expected_w[0, :3] = False
    assert result.tensors["w"].changed == int(expected_w.sum())
    assert torch.equal(result.mask["w"], expected_w)
    assert result.tensors["b"].changed == 1 and result.tensors["b"].within == [1]
    assert result.tensors["b"].nonfinite == 1
    assert result.mask.signatures["w"] == _tensor_signature(base["w"])
    one_chunk = diff_checkpoints(tmp_path / "a.safetensors", tmp_path / "b.safetensors", mask=True, workers=1)
    assert one_chunk.mask == result.mask


def test_rank_of_updates(tmp_path, capsys):
    gen = torch.Generator().manual_seed(2)
    base = {"low": torch.randn(40, 30, generator=gen), "full": torch.randn(40, 30, generator=gen)}
    tuned = {
        "low": base["low"] + torch.randn(40, 2, generator=gen) @ torch.randn(2, 30, generator=gen),
        "full": base["full"] + torch.randn(40, 30, generator=gen),
    }
    save_file(base, tmp_path / "a.safetensors")
    save_file(tuned, tmp_path / "b.safetensors")
    code, out, err = _run(
        ["diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--rank", "--json", "-", "-q"], capsys
    )
    assert code == 0, err
    rows = json.loads(out)["tensors"]
    assert (rows["low"]["rank"], rows["low"]["max_rank"]) == (2, 30)
    assert (rows["full"]["rank"], rows["full"]["max_rank"]) == (30, 30)


def test_different_architectures_exit_2_with_a_clear_message(models, tmp_path, capsys):
    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    capsys.readouterr()  # transformers' "Writing model shards" bar
    code, out, err = _run(["diff", models["base"], tmp_path / "gpt2", "-q"], capsys)
    assert code == 2 and out == ""
    assert "Nothing to compare" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    state = load_file(os.path.join(models["base"], "model.safetensors"))
    state["model.embed_tokens.weight"] = torch.zeros(65, 16)
    save_file(state, tmp_path / "wider.safetensors")
    code, out, err = _run(["diff", models["base"], tmp_path / "wider.safetensors", "-q"], capsys)
    assert code == 2 and out == ""
    assert "different architectures" in err and "model.embed_tokens.weight: [64, 16] vs [65, 16]" in err


def test_tensors_in_one_model_only_or_other_dtype_are_listed(models, tmp_path, capsys):
    state = load_file(os.path.join(models["base"], "model.safetensors"))
    del state["lm_head.weight"]
    state["extra.weight"] = torch.ones(3)
    state["model.norm.weight"] = state["model.norm.weight"].to(torch.bfloat16)
    save_file(state, tmp_path / "other.safetensors")
    code, out, err = _run(["diff", models["base"], tmp_path / "other.safetensors"], capsys)
    assert code == 0, err
    assert "only in BASE: 1 tensor(s)" in out and "lm_head.weight" in out
    assert "only in TUNED: 1 tensor(s)" in out and "extra.weight" in out
    assert "model.norm.weight (F32 vs BF16)" in out
    assert "3 tensor(s) not compared" in err
    # all dtypes differ: nothing comparable unless --compare-dtype says how
    bf16 = {k: v.to(torch.bfloat16) for k, v in load_file(os.path.join(models["base"], "model.safetensors")).items()}
    save_file(bf16, tmp_path / "bf16.safetensors")
    code, _, err = _run(["diff", models["base"], tmp_path / "bf16.safetensors", "-q"], capsys)
    assert code == 2 and "--compare-dtype bfloat16" in err
    code, out, err = _run(
        ["diff", models["base"], tmp_path / "bf16.safetensors", "--compare-dtype", "bfloat16", "--json", "-", "-q"],
        capsys,
    )
    assert code == 0 and json.loads(out)["changed"] == 0  # a bf16 save of BASE is BASE in bf16


def test_missing_and_corrupt_inputs(models, tmp_path, capsys):
    code, _, err = _run(["diff", models["base"], tmp_path / "nope.safetensors"], capsys)
    assert code == 2 and "does not exist" in err and "Traceback" not in err
    data = tmp_path / "x.safetensors"
    original = open(os.path.join(models["base"], "model.safetensors"), "rb").read()
    data.write_bytes(original[: len(original) // 2])
    code, _, err = _run(["diff", models["base"], data, "-q"], capsys)
    assert code == 1 and "truncated" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_peak_memory_is_far_below_one_model(tmp_path):
    """Two ~200 MB files: the diff's peak RSS stays below 0.6 x one file + the interpreter's own baseline."""
    gen = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(6400, 2048, generator=gen) for i in range(4)}
    size = sum(t.numel() * 4 for t in base.values())
    changed = 0
    tuned = {}
    for name, w in base.items():
        hit = torch.rand(w.shape, generator=gen) < 0.1
        changed += int(hit.sum())
        tuned[name] = torch.where(hit, w + 0.5, w)
    save_file(base, tmp_path / "a.safetensors")
    save_file(tuned, tmp_path / "b.safetensors")
    del base, tuned

    script = textwrap.dedent("""
        import json, resource, sys
        from sparsity_callbacks.cli import main
        code = main(sys.argv[1:])
        print(json.dumps({"code": code, "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}),
              file=sys.stderr)
    """)

    def peak(*argv) -> int:
        proc = subprocess.run(
            [sys.executable, "-c", script, *map(str, argv)], capture_output=True, text=True, cwd=REPO, timeout=300
        )
        report = json.loads(proc.stderr.strip().splitlines()[-1])
        assert report["code"] == 0, proc.stderr
        return report["peak_kb"] * 1024

    try:
        baseline = peak("--version")
        out = tmp_path / "d.json"
        used = peak("diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "-q", "--json", out)
        assert json.loads(out.read_text())["changed"] == changed
        assert used < baseline + 0.6 * size, (used / 2**20, baseline / 2**20, size / 2**20)
    finally:
        for f in ("a.safetensors", "b.safetensors"):
            (tmp_path / f).unlink(missing_ok=True)


# --- overlap -----------------------------------------------------------------------------------
def _masks(tmp_path) -> list[str]:
    """Three masks over two tensors, small enough to count by hand."""
    rows = {
        "A": ([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]),
        "B": ([1, 1, 0, 0, 1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]),
        "C": ([0, 0, 0, 0, 0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 1]),
    }
    paths = []
    for label, (attn, mlp) in rows.items():
        path = tmp_path / f"{label}.safetensors"
        Mask(
            {
                "model.layers.0.self_attn.q_proj.weight": torch.tensor(attn, dtype=torch.bool).view(2, 5),
                "model.layers.0.mlp.up_proj.weight": torch.tensor(mlp, dtype=torch.bool),
            }
        ).save(path)
        paths.append(str(path))
    return paths


def test_overlap_of_two_masks_equals_hand_count(tmp_path, capsys):
    a, b, _ = _masks(tmp_path)
    code, out, err = _run(["overlap", a, b, "--per-tensor", "--json", "-"], capsys)
    assert code == 0, err
    data = json.loads(out)
    g = data["global"]
    # |A| = 5, |B| = 6, |A n B| = 3 (two in q_proj, one in up_proj), N = 16
    assert (g["size_a"], g["size_b"], g["intersection"], g["numel"]) == (5, 6, 3, 16)
    assert g["overlap_ab"] == pytest.approx(3 / 5) and g["overlap_ba"] == pytest.approx(3 / 6)
    assert g["jaccard"] == pytest.approx(3 / 8)
    assert g["chance_ab"] == pytest.approx(6 / 16) and g["chance_ba"] == pytest.approx(5 / 16)
    e = 5 * 6 / 16
    assert g["chance_jaccard"] == pytest.approx(e / (11 - e))
    q = data["module_types"]["self_attn.q_proj"]
    assert (q["overlap_ab"], q["overlap_ba"], q["chance_ab"]) == (
        pytest.approx(2 / 4),
        pytest.approx(2 / 4),
        pytest.approx(4 / 10),
    )
    up = data["tensors"]["model.layers.0.mlp.up_proj.weight"]
    assert (up["intersection"], up["jaccard"]) == (1, pytest.approx(1 / 2))
    code, out, _ = _run(["overlap", a, b], capsys)
    assert code == 0 and "o(A,B)" in out and "0.6000" in out and "0.3750" in out


def test_overlap_of_three_masks_gives_matrices(tmp_path, capsys):
    paths = _masks(tmp_path)
    code, out, err = _run(["overlap", *paths, "--json", "-"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["labels"] == ["A", "B", "C"] and data["sizes"] == [5, 6, 2]
    assert data["overlap"][0] == [pytest.approx(1.0), pytest.approx(3 / 5), pytest.approx(0.0)]
    assert data["overlap"][1][0] == pytest.approx(3 / 6)
    assert data["jaccard"][0][1] == pytest.approx(3 / 8) and data["jaccard"][1][2] == pytest.approx(0.0)
    assert data["chance_overlap"][0][1] == pytest.approx(6 / 16) and data["chance_overlap"][1][2] == pytest.approx(
        2 / 16
    )
    code, out, _ = _run(["overlap", *paths], capsys)
    assert code == 0 and "chance o(row, col)" in out and "Jaccard" in out


@pytest.mark.slow
def test_overlap_chance_baseline_agrees_with_random_masks(tmp_path, capsys):
    """E[o(A, B)] = |B| / N for independent uniformly random masks of fixed sizes. |A n B| is hypergeometric,
    so the simulated mean of o(A, B) over S pairs has standard error sqrt(Var I) / |A| / sqrt(S); we allow 5 of
    them (a false failure has probability < 1e-6). Jaccard: the chance value is a ratio of expectations, whose
    bias (second order in the relative sd of I, here < 2e-4 relative) is far below the 5-standard-error band."""
    n, size_a, size_b, sims = 20_000, 2_000, 5_000, 300
    gen = torch.Generator().manual_seed(0)

    def random_mask(k: int) -> torch.Tensor:
        flags = torch.zeros(n, dtype=torch.bool)
        flags[torch.randperm(n, generator=gen)[:k]] = True
        return flags

    a, b = random_mask(size_a), random_mask(size_b)
    Mask({"model.layers.0.mlp.up_proj.weight": a}).save(tmp_path / "a.safetensors")
    Mask({"model.layers.0.mlp.up_proj.weight": b}).save(tmp_path / "b.safetensors")
    code, out, _ = _run(["overlap", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--json", "-"], capsys)
    assert code == 0
    g = json.loads(out)["global"]
    o_ab, o_ba, jac = [], [], []
    for _ in range(sims):
        x, y = random_mask(size_a), random_mask(size_b)
        inter = int((x & y).sum())
        o_ab.append(inter / size_a)
        o_ba.append(inter / size_b)
        jac.append(inter / (size_a + size_b - inter))
    p = size_b / n
    var_i = size_a * p * (1 - p) * (n - size_a) / (n - 1)
    se_ab = math.sqrt(var_i) / size_a / math.sqrt(sims)
    se_ba = math.sqrt(var_i) / size_b / math.sqrt(sims)
    assert abs(np.mean(o_ab) - g["chance_ab"]) < 5 * se_ab
    assert abs(np.mean(o_ba) - g["chance_ba"]) < 5 * se_ba
    assert abs(np.mean(jac) - g["chance_jaccard"]) < 5 * np.std(jac) / math.sqrt(sims)


def test_overlap_rejects_one_mask_and_masks_of_other_models(tmp_path, capsys):
    a, _, _ = _masks(tmp_path)
    code, _, err = _run(["overlap", a], capsys)
    assert code == 2 and "at least two masks" in err
    Mask({"other.weight": torch.ones(4, dtype=torch.bool)}).save(tmp_path / "other.safetensors")
    code, _, err = _run(["overlap", a, tmp_path / "other.safetensors"], capsys)
    assert code == 2 and "different tensors" in err and "Traceback" not in err


# --- report ------------------------------------------------------------------------------------
def test_report_of_a_mask_prints_the_heatmap_and_writes_the_png(models, tmp_path, capsys):
    from PIL import Image

    from sparsity_callbacks.plots import heatmap_text, save_heatmap

    mask_path = tmp_path / "mask.safetensors"
    assert main(["diff", models["base"], models["tuned"], "--mask", str(mask_path), "-q"]) == 0
    capsys.readouterr()
    png = tmp_path / "report.png"
    code, out, err = _run(["report", mask_path, "--png", png], capsys)
    assert code == 0, err
    mask = Mask.load(mask_path)
    cells = {}
    for name in mask.names:
        from sparsity_callbacks.params import _layer_index

        key = (_layer_index(name), _module_type(name))
        prev = cells.get(key, (0, 0))
        cells[key] = (prev[0] + mask.count(name), prev[1] + mask.numel(name))
    fractions = {k: c / n for k, (c, n) in cells.items()}
    assert heatmap_text(fractions) in out
    assert "self_attn.q_proj" in out and "21" in out
    reference = tmp_path / "reference.png"
    save_heatmap(fractions, str(reference), title="x")
    with Image.open(png) as image, Image.open(reference) as expected:
        image.verify()
        assert image.format == "PNG" and image.size == expected.size and image.size[0] >= 600
    # the diff JSON works as well
    json_path = tmp_path / "d.json"
    assert main(["diff", models["base"], models["tuned"], "--json", str(json_path), "-q"]) == 0
    capsys.readouterr()
    code, out, _ = _run(["report", json_path, "--png", tmp_path / "r2.png"], capsys)
    assert code == 0 and "diff report" in out and (tmp_path / "r2.png").exists()


def test_report_of_a_missing_source_exits_2(tmp_path, capsys):
    code, _, err = _run(["report", tmp_path / "nothing.safetensors"], capsys)
    assert code == 2 and "neither a file nor an MLflow run" in err


@pytest.mark.slow
def test_report_and_overlap_of_a_run_create_no_store_where_none_is_configured(tmp_path):
    """Without MLFLOW_TRACKING_URI, MLflow's default is ./mlflow.db; reading a run must not create it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    run_id = "0123456789abcdef0123456789abcdef"
    commands = [["report", run_id], ["report", f"runs:/{run_id}"], ["overlap", f"runs:/{run_id}/m", "runs:/x/m"]]
    for argv, (code, err, files) in zip(commands, _main_in_a_fresh_process(commands, cwd=tmp_path, env=env)):
        assert code == 2, err
        assert "no MLflow store at sqlite:///" in err and "--tracking-uri" in err
        assert files == [], argv


_FRESH_PROCESS_MAIN = """
import contextlib, io, json, os, sys
from sparsity_callbacks.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    results.append([code, err.getvalue(), sorted(os.listdir("."))])
print(json.dumps(results))
"""


def _main_in_a_fresh_process(commands: list[list[str]], cwd, env=None) -> list[tuple[int, str, list[str]]]:
    """``(exit code, stderr, files in cwd after it)`` of each CLI command, run one after the other by `main` in
    one fresh Python process (MLflow's process-wide defaults untouched by this test session; a hang is killed
    by the timeout): one start-up instead of one per command."""
    proc = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS_MAIN, json.dumps(commands)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [tuple(r) for r in json.loads(proc.stdout.strip().splitlines()[-1])]


# --- MLflow ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_diff_to_mlflow_then_report_and_overlap_from_the_run(models, tmp_path, capsys, mlflow_local):
    from mlflow import MlflowClient

    code, out, err = _run(
        [
            "diff",
            models["base"],
            models["tuned"],
            "--mlflow",
            "--tracking-uri",
            mlflow_local,
            "--experiment",
            "cli-diff",
            "--json",
            "-",
            "-q",
        ],
        capsys,
    )
    assert code == 0, err
    data = json.loads(out)
    run_id = data["mlflow_run_id"]
    client = MlflowClient(mlflow_local)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "cli-diff"
    assert run.data.params["base"] == models["base"] and run.data.params["tuned"] == models["tuned"]
    assert run.data.params["atol"] == "1e-05" and run.data.params["compare_dtype"] == "as stored"
    assert run.data.metrics["sparsity/changed_fraction"] == pytest.approx(data["changed_fraction"])
    assert run.data.metrics["sparsity/changed_fraction_by_module/self_attn.q_proj"] == pytest.approx(10 / 512)
    assert run.data.metrics["sparsity/atol_1e-05/changed_fraction"] == pytest.approx(10 / data["numel"])
    artifacts = {os.path.basename(a.path) for a in client.list_artifacts(run_id, "sparsity")}
    assert {"report.json", "heatmap.png", "mask.safetensors"} <= artifacts

    code, out, err = _run(["report", run_id, "--tracking-uri", mlflow_local, "--png", tmp_path / "run.png"], capsys)
    assert code == 0, err
    assert "diff report" in out and (tmp_path / "run.png").exists()
    uri = f"runs:/{run_id}/sparsity/mask.safetensors"
    code, out, err = _run(["overlap", uri, uri, "--tracking-uri", mlflow_local, "--json", "-"], capsys)
    assert code == 0, err
    assert json.loads(out)["global"]["jaccard"] == pytest.approx(1.0)


def test_report_against_a_dead_tracking_server_fails_at_once_naming_the_server(tmp_path, capsys, monkeypatch):
    """A server that drops every connection unanswered: one probe (one connection) and a clear error, where
    MLflow's own HTTP client would retry the request for minutes."""
    import socket
    import threading

    connections = []
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        dead = f"http://127.0.0.1:{server.getsockname()[1]}"

        def drop_every_connection():
            while True:
                try:
                    connection, _ = server.accept()
                except OSError:  # the listening socket was closed: the test is over
                    return
                connections.append(connection)
                connection.close()

        threading.Thread(target=drop_every_connection, daemon=True).start()
        monkeypatch.chdir(tmp_path)
        code = main(["report", f"runs:/{'a' * 32}", "--tracking-uri", dead, "--png", str(tmp_path / "h.png")])
    err = capsys.readouterr().err
    assert code == 1
    assert f"MLflow tracking server at {dead} is unreachable" in err and "report.json" not in err
    assert len(connections) == 1
    assert not (tmp_path / "h.png").exists()


# --- untrusted checkpoint folders stay contained (issue 14, item 4) --------------------------------
def _raw_safetensors(path, entries: dict, data: bytes) -> None:
    """A safetensors file written by hand: ``entries`` is the header (any offsets), then ``data``."""
    header = json.dumps(entries).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)


@pytest.mark.parametrize(
    "entries, data, message",
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, b"\0" * 8, r"0 <= begin <= end"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, r"0 <= begin <= end"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            },
            b"\0" * 8,
            r"overlaps the previous one",
        ),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, r"leaves a hole before it"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8, r"trailing bytes"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, r"8 bytes for shape \[3\]"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, r"non-negative"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8]}}, b"\0" * 8, r"two integer `data_offsets`"),
    ],
    ids=["negative", "reversed", "overlapping", "hole", "trailing", "wrong_size", "negative_shape", "float_offset"],
)
def test_diff_refuses_offsets_the_safetensors_format_does_not_allow(tmp_path, capsys, entries, data, message):
    good = tmp_path / "good.safetensors"
    save_file({"a": torch.zeros(2), "b": torch.zeros(2)}, str(good))
    bad = tmp_path / "bad.safetensors"
    _raw_safetensors(bad, entries, data)
    assert main(["diff", str(good), str(bad)]) == 1
    err = capsys.readouterr().err
    assert "bad.safetensors" in err and re.search(message, err), err
    assert "changed" not in err


def test_diff_never_opens_shards_outside_the_model_folder(tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "x.safetensors"
    secret.write_bytes(b"SECRET-CONTENT-12345" * 10)
    base = tmp_path / "base"
    base.mkdir()
    save_file({"a": torch.zeros(2)}, str(base / "model.safetensors"))
    for shard in ("../outside/x.safetensors", str(secret), "/etc/passwd", "sub/../../outside/x.safetensors"):
        tuned = tmp_path / "tuned"
        shutil.rmtree(tuned, ignore_errors=True)
        tuned.mkdir()
        (tuned / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": shard}}))
        assert main(["diff", str(base), str(tuned)]) == 1
        err = capsys.readouterr().err
        assert "outside the model folder" in err, err
        assert "SECRET" not in err and "root:" not in err


def test_diff_error_on_a_non_safetensors_file_does_not_echo_its_bytes(tmp_path, capsys):
    base = tmp_path / "base.safetensors"
    save_file({"a": torch.zeros(2)}, str(base))
    other = tmp_path / "passwd.safetensors"
    other.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n" * 4)
    assert main(["diff", str(base), str(other)]) == 1
    err = capsys.readouterr().err
    assert "not a safetensors file" in err and "root" not in err.replace(str(tmp_path), "")


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_named_safetensors_is_refused_instead_of_hanging(tmp_path):
    base = tmp_path / "base.safetensors"
    save_file({"a": torch.zeros(2)}, str(base))
    folder = tmp_path / "tuned"
    folder.mkdir()
    os.mkfifo(folder / "model.safetensors")
    targets = [folder, folder / "model.safetensors"]
    commands = [["diff", str(base), str(target)] for target in targets]
    env = {**os.environ, "PYTHONPATH": REPO}  # a hang would be killed by the timeout and fail the test
    for target, (code, err, _) in zip(targets, _main_in_a_fresh_process(commands, cwd=tmp_path, env=env)):
        assert code == 1, (target, err)
        assert "FIFO, not a regular file" in err, target
