"""The ``moe-report`` figures: a layers x experts heatmap and per-EP-rank load bars, drawn from the report dict
(``serve.launch.report.build_report``). matplotlib's object API: no pyplot, no global backend state."""

from __future__ import annotations

import numpy as np


def plot_heatmap(report: dict, path: str) -> None:
    """Layers x experts, colour = load / the layer's mean load (white = balanced, red = hot, blue = cold),
    the hottest expert of each layer boxed and labelled with its max/mean."""
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    counts = np.asarray(report["counts_LE"], dtype=np.float64)  # [L, E]
    L, E = counts.shape
    mean = counts.mean(axis=1, keepdims=True)
    rel = np.divide(counts, mean, out=np.ones_like(counts), where=mean > 0)
    fig = Figure(figsize=(min(4 + 0.45 * E, 24), min(2.2 + 0.4 * L, 30)), dpi=110, layout="constrained")
    ax = fig.subplots()
    top = min(max(2.0, float(rel.max())), 4.0)  # one outlier must not wash out the rest: clip the scale at 4x
    image = ax.imshow(rel, aspect="auto", cmap="RdBu_r", norm=TwoSlopeNorm(1.0, 0.0, top), interpolation="nearest")
    fig.colorbar(image, ax=ax, label="expert load / layer mean  (1 = balanced, 0 = dead)", shrink=min(1.0, 8 / L),
                 extend="max" if rel.max() > top else "neither")
    for layer in range(L):
        if mean[layer, 0] == 0:
            continue
        hot = int(np.argmax(counts[layer]))
        ax.add_patch(Rectangle((hot - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.5))
        if E <= 64 and L <= 64:
            color = "white" if rel[layer, hot] > 1 + 0.6 * (top - 1) else "black"
            ax.text(hot, layer, f"{rel[layer, hot]:.1f}x", ha="center", va="center", fontsize=8, weight="bold",
                    color=color)
    step_x, step_y = max(1, E // 32), max(1, L // 32)
    ax.set_xticks(range(0, E, step_x))
    ax.set_yticks(range(0, L, step_y), [short_name(n) for n in report["layer_names"][::step_y]])
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    tokens = f"{report['tokens']:,} tokens, " if report["tokens"] is not None else ""
    ax.set_title(f"Routing load per expert — {report['model'] or 'model'}\n{tokens}{report['routed']:,} routed "
                 f"({report['counts']}); boxed: hottest expert of each layer", fontsize=11)
    fig.savefig(path)


def plot_ranks(report: dict, path: str) -> None:
    """One panel per EP size: tokens per rank (all layers) for each placement, the mean dashed, the straggler
    outlined; the legend gives each placement's balancedness."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    sizes = sorted({row["ep_size"] for row in report["ep"]})
    fig = Figure(figsize=(min(4 + 4.5 * len(sizes), 20), 4.8), dpi=110, layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(sizes)))
    for ax, size in zip(axes, sizes, strict=True):
        rows = [row for row in report["ep"] if row["ep_size"] == size]
        width = 0.8 / len(rows)
        for i, row in enumerate(rows):
            x = np.arange(size) + (i - (len(rows) - 1) / 2) * width
            name = row["placement"] + (f" +{row['num_redundant']}" if row["num_redundant"] else "")
            ax.bar(x, row["loads"], width, color=f"C{i}", label=f"{name}: bal. {row['balancedness']:.2f}")
            s = row["straggler"]  # outlined by an unlabelled bar on top, so the legend keeps plain patches
            ax.bar(x[s], row["loads"][s], width, fill=False, edgecolor="black", linewidth=1.5)
        ax.axhline(np.mean(rows[0]["loads"]), color="gray", linestyle="--", linewidth=1, label="mean")
        ax.set_xticks(range(0, size, max(1, size // 16)))
        ax.yaxis.set_major_formatter(EngFormatter())
        ax.set_xlabel("EP rank")
        ax.set_ylabel("routed tokens (all layers)")
        ax.set_title(f"EP size {size} (outlined: straggler)", fontsize=10)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    fig.suptitle(f"Per-rank load — {report['model'] or 'model'}, {report['routed']:,} routed", fontsize=11)
    fig.savefig(path)


def short_name(name: str) -> str:
    """``model.layers.12.mlp`` -> ``12``; other names unchanged (last 16 characters)."""
    parts = [p for p in name.split(".") if p.isdigit()]
    return parts[-1] if parts else name[-16:]
