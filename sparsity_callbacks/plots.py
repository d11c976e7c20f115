"""Plots of a `Measurement`: the layer x module-type heatmap and the curves over steps (PNG), plus a
terminal rendering of the heatmap.

matplotlib is imported inside the functions (``import sparsity_callbacks`` never imports it) and used
through ``matplotlib.figure.Figure`` with an Agg canvas: no pyplot, so the user's backend and global
figure state are left alone, and plotting from a worker thread is safe.

Heatmap cells come from ``Measurement.by_layer_and_module()`` turned into fractions, e.g.::

    cells = {key: c.changed / c.numel for key, c in m.by_layer_and_module().items() if c.numel}
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

#: row label of the tensors outside the numbered blocks (embeddings, final norm, lm_head).
OTHER_ROW = "other"
#: value labels are written into the heatmap cells when there are at most this many cells.
_MAX_LABELLED_CELLS = 400
#: curve keys in display order, with their legend labels.
_CURVES = {
    "changed_fraction": "changed (now)",
    "ever_changed_fraction": "ever changed (cumulative)",
    "churn_fraction": "churn (since previous measurement)",
    "changed_fraction_upper": "changed, 99.9 % upper bound",
}


def _grid(cells: Mapping[tuple[int | None, str], float]) -> tuple[list[int | None], list[str]]:
    """Rows: layer indices ascending, then None (the ``other`` row) last. Columns: module types sorted."""
    layers: list[int | None] = [*sorted({layer for layer, _ in cells if layer is not None})]
    if any(layer is None for layer, _ in cells):
        layers.append(None)
    modules = sorted({module for _, module in cells})
    return layers, modules


def _row_label(layer: int | None) -> str:
    return OTHER_ROW if layer is None else str(layer)


def _value(cells: Mapping[tuple[int | None, str], float], layer: int | None, module: str) -> float:
    value = cells.get((layer, module))
    return math.nan if value is None else float(value)


def _agg_figure(width_in: float, height_in: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_in, height_in), dpi=100)
    FigureCanvasAgg(figure)
    return figure


_warmed_up = False


def _warm_up() -> None:
    """Import matplotlib and render a tiny figure (fonts, colormap, PNG encoder), so that the first real
    plot costs only its own drawing: about 0.5 s of one-time work on a cold process, which the session
    runs on a background thread while training runs; once per process. Never raises (a plot that fails
    later says why)."""
    global _warmed_up
    if _warmed_up:
        return
    _warmed_up = True
    try:
        import io

        figure = _agg_figure(1.0, 1.0)
        axes = figure.add_subplot(1, 1, 1)
        axes.imshow([[0.0]], cmap="viridis", vmin=0.0, vmax=1.0)
        axes.set_title("warm-up")
        axes.text(0, 0, "0.0", fontsize=8)
        figure.savefig(io.BytesIO(), format="png")
    except Exception:
        pass


def save_heatmap(cells: Mapping[tuple[int | None, str], float], path: str, title: str = "") -> None:
    """Write a PNG heatmap of changed fractions to ``path``.

    Args:
        cells: ``{(layer index or None, module type): changed fraction in [0, 1]}``. Rows are the layer
            indices in ascending order with the tensors outside the blocks (layer None) as a last row
            labelled ``other``; columns are the module types in alphabetical order. Missing cells are
            left blank (grey). The colour scale is fixed to [0, 1] so that heatmaps of different steps
            and runs compare; each cell carries its value in percent when there are at most 400 cells.
            The figure grows with the grid (about 0.45 inch per column, 0.18 inch per row), so 20 module
            types x 80 layers stays readable.
        path: output file (PNG, or any format matplotlib infers from the suffix).
        title: figure title.
    """
    import numpy as np

    layers, modules = _grid(cells)
    n_rows, n_cols = max(len(layers), 1), max(len(modules), 1)
    data = np.full((n_rows, n_cols), np.nan)
    for i, layer in enumerate(layers):
        for j, module in enumerate(modules):
            data[i, j] = _value(cells, layer, module)

    longest = max((len(m) for m in modules), default=1)
    width = max(6.0, 2.0 + 0.45 * n_cols)
    height = max(3.5, 1.5 + 0.18 * n_rows + 0.07 * longest)
    figure = _agg_figure(width, height)
    axes = figure.add_subplot(1, 1, 1)

    import matplotlib

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")
    image = axes.imshow(
        np.ma.masked_invalid(data), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest"
    )
    colorbar = figure.colorbar(image, ax=axes, fraction=0.04, pad=0.02)
    colorbar.set_label("changed fraction")

    axes.set_xticks(range(len(modules)))
    axes.set_xticklabels(modules, rotation=60, ha="right", fontsize=8)
    row_step = max(1, math.ceil(n_rows / 60))  # at most ~60 row labels
    rows = [i for i in range(len(layers)) if i % row_step == 0 or layers[i] is None]
    axes.set_yticks(rows)
    axes.set_yticklabels([_row_label(layers[i]) for i in rows], fontsize=7 if n_rows > 30 else 8)
    axes.set_xlabel("module type")
    axes.set_ylabel("layer")
    if title:
        axes.set_title(title)
    if not cells:
        axes.text(0, 0, "no data", ha="center", va="center")

    if 0 < len(layers) * len(modules) <= _MAX_LABELLED_CELLS:
        fontsize = 7 if len(layers) * len(modules) > 100 else 8
        for i in range(len(layers)):
            for j in range(len(modules)):
                value = data[i, j]
                if not math.isnan(value):
                    axes.text(
                        j,
                        i,
                        f"{100 * value:.1f}",
                        ha="center",
                        va="center",
                        fontsize=fontsize,
                        color="white" if value < 0.6 else "black",
                    )
    # Margins in inches from the labels' lengths (tight_layout would measure them by drawing the figure
    # once more: ~1/3 of the plot's CPU time); x labels are rotated 60 degrees at ~0.065 inch per character.
    _set_margins(figure, left=0.9, right=1.1, top=0.45, bottom=0.55 + 0.057 * longest)
    figure.savefig(path)


def _set_margins(figure, *, left: float, right: float, top: float, bottom: float) -> None:
    """Place the axes ``left``/``right``/``top``/``bottom`` inches from the figure's edges."""
    width, height = figure.get_size_inches()
    figure.subplots_adjust(left=left / width, right=1 - right / width, top=1 - top / height, bottom=bottom / height)


def _short_key(key: str) -> str:
    return key.removeprefix("sparsity/")


def save_curves(history: Sequence[Mapping[str, float]], path: str, title: str = "") -> None:
    """Write a PNG line plot of the sparsity fractions against the optimizer step to ``path``.

    Args:
        history: one mapping per measurement with ``"step"`` and fractions in [0, 1]:
            ``changed_fraction``, ``ever_changed_fraction`` and optionally ``churn_fraction``,
            ``changed_fraction_upper`` or any other ``*_fraction`` key (keys may carry the
            ``sparsity/`` prefix of ``Measurement.to_metrics()``). A key missing from some entries
            leaves a gap there (churn is missing at the first measurement).
        path: output file (PNG).
        title: figure title.
    """
    entries = [{_short_key(k): v for k, v in entry.items()} for entry in history]
    entries = sorted((e for e in entries if e.get("step") is not None), key=lambda e: e["step"])
    keys = [k for k in _CURVES if any(k in e for e in entries)]
    keys += sorted({k for e in entries for k in e if k.endswith("_fraction") and k not in _CURVES})

    figure = _agg_figure(8.0, 4.5)
    axes = figure.add_subplot(1, 1, 1)
    steps = [e["step"] for e in entries]
    for key in keys:
        values = [float(e[key]) if e.get(key) is not None else math.nan for e in entries]
        axes.plot(
            steps,
            values,
            marker="o" if len(steps) <= 50 else None,
            markersize=3,
            linestyle="--" if key == "changed_fraction_upper" else "-",
            label=_CURVES.get(key, key),
        )
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("fraction of tracked elements")
    axes.set_ylim(bottom=0.0)
    axes.grid(True, alpha=0.3)
    if keys:
        axes.legend(loc="best", fontsize=8)
    else:
        axes.text(0.5, 0.5, "no measurements", ha="center", va="center", transform=axes.transAxes)
    if title:
        axes.set_title(title)
    _set_margins(figure, left=0.75, right=0.2, top=0.4, bottom=0.55)
    figure.savefig(path)


def heatmap_text(cells: Mapping[tuple[int | None, str], float], width: int = 100) -> str:
    """The heatmap as a plain-text table of percentages, at most ``width`` characters wide, for terminals.

    One row per layer (``other`` last) and one column per module type when that fits; otherwise
    transposed (one row per module type, one column per layer), with the columns wrapped into blocks of
    at most ``width`` characters, each repeating the row labels. ``-`` where a layer has no tensor of that
    module type.
    """
    if not cells:
        return "(no tracked tensors)"
    layers, modules = _grid(cells)

    def pct(layer: int | None, module: str) -> str:
        value = _value(cells, layer, module)
        return "-" if math.isnan(value) else f"{100 * value:.1f}%"

    by_layer = _text_table(
        ["layer", *modules], [[_row_label(layer)] + [pct(layer, m) for m in modules] for layer in layers]
    )
    if max(len(line) for line in by_layer) <= width:
        return "\n".join(by_layer)
    header = ["module \\ layer", *[_row_label(layer) for layer in layers]]
    rows = [[module] + [pct(layer, module) for layer in layers] for module in modules]
    label_width = max(len(r[0]) for r in [header, *rows])
    column_widths = [max(len(r[i]) for r in [header, *rows]) for i in range(1, len(header))]
    blocks, start = [], 0
    while start < len(column_widths):
        end, used = start + 1, label_width + 2 + column_widths[start]
        while end < len(column_widths) and used + 2 + column_widths[end] <= width:
            used += 2 + column_widths[end]
            end += 1
        keep = [0, *range(start + 1, end + 1)]
        blocks.append("\n".join(_text_table([header[i] for i in keep], [[r[i] for i in keep] for r in rows])))
        start = end
    return "\n\n".join(blocks)


def _text_table(header: list[str], body: list[list[str]]) -> list[str]:
    """Lines of a table: the first column left-aligned, the others right-aligned, two spaces apart."""
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in [header, *body]
    ]
