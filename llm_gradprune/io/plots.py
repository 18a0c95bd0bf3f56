"""Pictures for the output folder (the optional `plot` extra, matplotlib): sparsity per layer x projection,
and held-out perplexity before and after. Without matplotlib nothing else changes; the report says why
the plots were skipped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..report import Report, TensorCount, as_report
from ..scoring.allocation import layer_key


def layer_projection_table(per_tensor: dict[str, TensorCount]) -> tuple[list[str], list[str], dict]:
    """(layers in order, projection names in order, {(layer, projection): sparsity}) from report counts.

    A layer is its index. A projection is the module's own name (`mlp.up_proj` -> `up_proj`), led by its
    parent's where another parent has a matrix of the same name (GPT-2's `attn.c_proj` and `mlp.c_proj`,
    Qwen2-MoE's `shared_expert.down_proj` beside `experts.down_proj`). The matrices of numbered experts
    are one projection per matrix name (`experts.5.gate_up_proj` -> `experts.gate_up_proj`), their zeros
    and weights summed, so 64 experts stay one column."""
    placed = {name: _place(name) for name in per_tensor}
    parents: dict[str, set[tuple[str, ...]]] = {}
    for _, parent, leaf, _ in placed.values():
        parents.setdefault(leaf, set()).add(parent)
    shared = {p for owners in parents.values() if len(owners) > 1 for p in owners}
    layers: list[str] = []
    projections: list[str] = []
    sums: dict[tuple[str, str], list[int]] = {}
    for name, t in per_tensor.items():
        layer, parent, leaf, expert = placed[name]
        proj = f"{parent[-1]}.{leaf}" if parent and (expert or parent in shared) else leaf
        if layer not in layers:
            layers.append(layer)
        if proj not in projections:
            projections.append(proj)
        cell = sums.setdefault((layer, proj), [0, 0])
        cell[0] += t.zeros
        cell[1] += t.numel
    cells = {key: zeros / numel if numel else 0.0 for key, (zeros, numel) in sums.items()}
    return layers, projections, cells


def _place(name: str) -> tuple[str, tuple[str, ...], str, bool]:
    """(layer index, parent path inside the layer, matrix name, whether it is one of numbered experts)."""
    prefix = layer_key(name)
    inside = name[len(prefix) + 1 :] if name != prefix else name
    parts = inside.removesuffix(".weight").split(".")
    index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
    if index is not None:  # `experts.5.gate_up_proj`, `experts.5.w1.weight`: the expert's number dropped
        return prefix.rsplit(".", 1)[-1], tuple(parts[:index]), ".".join(parts[index + 1 :]), True
    return prefix.rsplit(".", 1)[-1], tuple(parts[:-1]), parts[-1], False


def write_plots(report: Report | dict[str, Any], folder: Path) -> dict[str, Any]:
    """Write sparsity.png (and perplexity.png when measured) into `folder`; {"files": [...]} or {"skipped": why}."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {"skipped": "matplotlib is not installed (pip install 'llm-gradprune[plot]')"}
    r = as_report(report)
    files = [_shape_plot(plt, r, folder) if r.structured else _sparsity_plot(plt, r, folder)]
    files += _eval_and_recovery_plots(plt, r, folder)
    return {"files": files}


def _sparsity_plot(plt, r: Report, folder: Path) -> str:
    layers, projections, cells = layer_projection_table(r.sparsity.per_tensor)
    grid = [[cells.get((layer, p), float("nan")) for p in projections] for layer in layers]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(projections), 1.2 + 0.28 * len(layers)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(projections)), projections, rotation=30, ha="right")
    ax.set_yticks(range(len(layers)), layers)
    ax.set_xlabel("projection")
    ax.set_ylabel("decoder layer")
    ax.set_title(f"sparsity per layer x projection (overall {r.sparsity.overall_sparsity:.1%})")
    fig.colorbar(image, ax=ax, label="fraction of weights zero")
    fig.tight_layout()
    fig.savefig(folder / "sparsity.png", dpi=110)
    plt.close(fig)
    return "sparsity.png"


def _shape_plot(plt, r: Report, folder: Path) -> str:
    """Kept share of each kind of unit and of the parameters, after a structured run."""
    shrunk = r.shrinking
    old, new = shrunk.shape_before, shrunk.shape_after
    kinds = [(label.removesuffix(" per layer").removesuffix(" per MoE layer"), key) for key, label, _ in old.rows()
             if key != "head_dim"]  # fmt: skip
    names = [k for k, _ in kinds] + ["decoder params", "all params"]
    kept = [getattr(new, key) / getattr(old, key) for _, key in kinds] + [
        shrunk.decoder_kept, shrunk.params_after.total / shrunk.params_before.total]  # fmt: skip
    fig, ax = plt.subplots(figsize=(max(6.4, 0.85 * len(names)), 3.8))
    bars = ax.bar(names, kept, color=["#4f81bd"] * len(kinds) + ["#9bbb59", "#9bbb59"])
    ax.bar_label(bars, fmt="%.2f")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("kept / before")
    ax.set_title(f"structure {shrunk.structure}: kept share")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(folder / "shape.png", dpi=110)
    plt.close(fig)
    return "shape.png"


def _eval_and_recovery_plots(plt, r: Report, folder: Path) -> list[str]:
    files = []
    ev = r.eval
    if ev:
        fig, ax = plt.subplots(figsize=(4.2, 3.2))
        named = [("dense", ev.dense_ppl, "#777777"), ("pruned", ev.pruned_ppl, "#c0504d"),
                 ("recovered", ev.recovered_ppl, "#4f81bd")]  # fmt: skip
        named = [x for x in named if x[1] is not None]
        bars = ax.bar([x[0] for x in named], [x[1] for x in named], color=[x[2] for x in named])
        ax.bar_label(bars, fmt="%.2f")
        ax.set_ylabel("held-out perplexity")
        ax.set_title(f"{ev.windows} windows, {ev.tokens:,} tokens")
        fig.tight_layout()
        fig.savefig(folder / "perplexity.png", dpi=110)
        plt.close(fig)
        files.append("perplexity.png")
    log = r.recovery.log if r.recovery else []
    if any("loss" in e for e in log):
        fig, ax = plt.subplots(figsize=(6, 3.4))
        steps = [e["step"] for e in log if "loss" in e]
        ax.plot(steps, [e["loss"] for e in log if "loss" in e], label="training loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        evals = [(e["step"], e["ppl"]) for e in log if "ppl" in e]
        if evals:
            twin = ax.twinx()
            twin.plot(
                [s for s, _ in evals], [p for _, p in evals], "o--", color="#c0504d", label="held-out ppl"
            )
            twin.set_ylabel("held-out perplexity")
        ax.set_title("masked recovery training")
        fig.tight_layout()
        fig.savefig(folder / "recovery_loss.png", dpi=110)
        plt.close(fig)
        files.append("recovery_loss.png")
    return files
