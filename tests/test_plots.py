"""`sparsity_callbacks.plots`: PNGs that open, and the terminal heatmap."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from sparsity_callbacks.plots import heatmap_text, save_curves, save_heatmap

MODULES = ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj")


def _cells(n_layers: int, modules=MODULES) -> dict:
    cells = {
        (layer, m): (layer + j) / (n_layers + len(modules)) for layer in range(n_layers) for j, m in enumerate(modules)
    }
    cells[(None, "embed_tokens")] = 0.05
    return cells


def _read_png(path) -> np.ndarray:
    import matplotlib.image

    image = matplotlib.image.imread(str(path))
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    return image


def _is_not_blank(image: np.ndarray) -> bool:
    return float(image[..., :3].std()) > 0.01


def test_heatmap_png_opens_and_has_content(tmp_path):
    path = tmp_path / "heatmap.png"
    save_heatmap(_cells(4), str(path), title="step 10")
    image = _read_png(path)
    assert image.shape[0] >= 300 and image.shape[1] >= 500
    assert _is_not_blank(image)


def test_heatmap_grows_to_stay_readable_for_80_layers_and_20_module_types(tmp_path):
    modules = [f"block.module_{i:02d}" for i in range(20)]
    small, large = tmp_path / "small.png", tmp_path / "large.png"
    save_heatmap(_cells(2, modules[:3]), str(small))
    save_heatmap(_cells(80, modules), str(large))
    small_image, large_image = _read_png(small), _read_png(large)
    # about 0.18 inch (18 px) per layer row and 0.45 inch per module column at 100 dpi
    assert large_image.shape[0] >= 80 * 15 and large_image.shape[1] >= 20 * 40
    assert large_image.shape[0] > small_image.shape[0] and large_image.shape[1] > small_image.shape[1]
    assert _is_not_blank(large_image)


def test_heatmap_of_nothing_still_writes_a_png(tmp_path):
    save_heatmap({}, str(tmp_path / "empty.png"))
    _read_png(tmp_path / "empty.png")


def test_curves_png_with_and_without_churn(tmp_path):
    history = [
        {"step": 0, "changed_fraction": 0.0, "ever_changed_fraction": 0.0},
        {"step": 10, "changed_fraction": 0.1, "ever_changed_fraction": 0.12, "churn_fraction": 0.05},
        {"step": 20, "changed_fraction": 0.15, "ever_changed_fraction": 0.2, "churn_fraction": 0.04},
    ]
    path = tmp_path / "curves.png"
    save_curves(history, str(path), title="sparsity")
    image = _read_png(path)
    assert image.shape[:2] == (450, 800)
    assert _is_not_blank(image)
    prefixed = [{f"sparsity/{k}" if k != "step" else k: v for k, v in e.items()} for e in history]
    save_curves(prefixed, str(tmp_path / "prefixed.png"))
    save_curves([], str(tmp_path / "empty.png"))
    _read_png(tmp_path / "prefixed.png")
    _read_png(tmp_path / "empty.png")


def test_heatmap_text_lists_module_names_and_percentages():
    text = heatmap_text({(0, "self_attn.q_proj"): 0.123, (1, "mlp.down_proj"): 0.5, (None, "embed_tokens"): 0.0})
    lines = text.splitlines()
    assert lines[0].split() == ["layer", "embed_tokens", "mlp.down_proj", "self_attn.q_proj"]
    assert lines[1].split() == ["0", "-", "-", "12.3%"]
    assert lines[2].split() == ["1", "-", "50.0%", "-"]
    assert lines[3].split() == ["other", "0.0%", "-", "-"]
    assert heatmap_text({}) == "(no tracked tensors)"


def test_importing_does_not_import_matplotlib():
    # one fresh process: the package first, then its plots module on top of it, each checked after its import
    code = (
        "import sys, importlib\n"
        "for module in ('sparsity_callbacks', 'sparsity_callbacks.plots'):\n"
        "    importlib.import_module(module)\n"
        "    assert 'matplotlib' not in sys.modules, f'importing {module} imported matplotlib'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plotting_leaves_the_pyplot_backend_alone(tmp_path):
    code = (
        "import sys, matplotlib; matplotlib.use('svg'); from sparsity_callbacks.plots import save_heatmap; "
        f"save_heatmap({{(0, 'a'): 0.5}}, {str(tmp_path / 'h.png')!r}); "
        "assert matplotlib.get_backend().lower() == 'svg', matplotlib.get_backend(); "
        "assert 'matplotlib.pyplot' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_heatmap_text_fits_100_columns_for_a_deep_model():
    """24 layers x 9 module types of a Llama-style model: transposed and wrapped, every value kept."""
    modules = [f"self_attn.{p}_proj" for p in "qkvo"] + [f"mlp.{p}_proj" for p in ("gate", "up", "down")]
    modules += ["input_layernorm", "post_attention_layernorm"]
    cells = {(layer, m): (layer * 9 + i) / 1000 for layer in range(24) for i, m in enumerate(modules)}
    cells[(None, "embed_tokens")] = 1.0
    text = heatmap_text(cells)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 100
    blocks = text.split("\n\n")
    assert len(blocks) >= 2 and all(block.splitlines()[0].startswith("module \\ layer") for block in blocks)
    columns = [c for block in blocks for c in block.splitlines()[0].split()[3:]]
    assert columns == [str(i) for i in range(24)] + ["other"]  # every layer once, in order
    q_row = [line.split()[1:] for line in lines if line.startswith("self_attn.q_proj")]
    assert [v for row in q_row for v in row] == [f"{100 * (layer * 9) / 1000:.1f}%" for layer in range(24)] + ["-"]
    assert heatmap_text(cells, width=60).count("\n\n") > text.count("\n\n")
