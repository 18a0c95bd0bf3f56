"""Pictures for the output folder (the optional `plot` extra, matplotlib): sparsity per layer x projection,
and held-out perplexity before and after. Without matplotlib nothing else changes; the report says why
the plots were skipped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..scoring.allocation import layer_key


def layer_projection_table(per_tensor: dict[str, dict[str, Any]]) -> tuple[list[str], list[str], dict]:
    """(layers in order, projection names in order, {(layer, projection): sparsity}) from report counts.

    A projection is the module's own name (`q_proj`, `mlp.up_proj` -> `up_proj`), a layer its index."""
    layers: list[str] = []
    projections: list[str] = []
    cells = {}
    for name, t in per_tensor.items():
        layer = layer_key(name).rsplit(".", 1)[-1]
        proj = name.removesuffix(".weight").rsplit(".", 1)[-1]
        if layer not in layers:
            layers.append(layer)
        if proj not in projections:
            projections.append(proj)
        cells[layer, proj] = t["zeros"] / t["numel"] if t["numel"] else 0.0
    return layers, projections, cells


def write_plots(report: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Write sparsity.png (and perplexity.png when measured) into `folder`; {"files": [...]} or {"skipped": why}."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {"skipped": "matplotlib is not installed (pip install 'llm-gradprune[plot]')"}
    files = []
    layers, projections, cells = layer_projection_table(report["per_tensor"])
    grid = [[cells.get((layer, p), float("nan")) for p in projections] for layer in layers]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(projections), 1.2 + 0.28 * len(layers)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(projections)), projections, rotation=30, ha="right")
    ax.set_yticks(range(len(layers)), layers)
    ax.set_xlabel("projection")
    ax.set_ylabel("decoder layer")
    ax.set_title(f"sparsity per layer x projection (overall {report['overall_sparsity']:.1%})")
    fig.colorbar(image, ax=ax, label="fraction of weights zero")
    fig.tight_layout()
    fig.savefig(folder / "sparsity.png", dpi=110)
    plt.close(fig)
    files.append("sparsity.png")
    ev = report.get("eval")
    if ev:
        fig, ax = plt.subplots(figsize=(4.2, 3.2))
        labels, values = ["dense", "pruned"], [ev["dense_ppl"], ev["pruned_ppl"]]
        if ev.get("recovered_ppl") is not None:
            labels.append("recovered")
            values.append(ev["recovered_ppl"])
        bars = ax.bar(labels, values, color=["#777777", "#c0504d", "#4f81bd"][: len(values)])
        ax.bar_label(bars, fmt="%.2f")
        ax.set_ylabel("held-out perplexity")
        ax.set_title(f"{ev['windows']} windows, {ev['tokens']:,} tokens")
        fig.tight_layout()
        fig.savefig(folder / "perplexity.png", dpi=110)
        plt.close(fig)
        files.append("perplexity.png")
    return {"files": files}
