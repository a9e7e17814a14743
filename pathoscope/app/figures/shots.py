"""Metrics against K: the figure `pathoscope table` draws beside table.md.

One panel per metric of the paper's Table 1 (Image AUROC, Pixel AUROC, PRO, Dice), x = the number
of shots K, y = percent. Each config of the runs folder is one solid line of its mean over the
seeds with error bars of the sample std (none for one seed). The paper's rows that name one of
our configs (PathoSCOPE, GLASS-h, GLASS-m, the L_GC ablation) are dashed lines in that config's
colour, labelled "paper"; a dataset without paper rows (the demo) shows ours only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

SHOTS_FILE = "metrics_vs_k.png"


def _plot_ours(
    ax: Any,
    metric: str,
    by_config: dict[str, dict[int, dict[str, Any]]],
    configs: Sequence[str],
    colour: dict[str, str],
) -> None:
    """One solid line per config: its mean over the seeds against K, with the sample std."""
    for config in configs:
        points = []
        for k, s in sorted(by_config[config].items()):
            stat = s["metrics"].get(metric) or {}
            if stat.get("mean") is not None:
                points.append((k, 100 * stat["mean"], 100 * (stat.get("std") or 0.0)))
        if points:
            ks, means, stds = zip(*points, strict=True)
            ax.errorbar(
                ks, means, yerr=stds, marker="o", capsize=3, color=colour[config], label=config
            )


def _plot_paper(ax: Any, metric: str, refs: Sequence[Any], colour: dict[str, str]) -> None:
    """One dashed line per paper row, in its config's colour."""
    for ref in refs:
        values = [(k, v) for k, v in sorted(ref.metrics.get(metric, {}).items()) if v is not None]
        if values:
            ks, vs = zip(*values, strict=True)
            ax.plot(
                ks,
                vs,
                linestyle="--",
                marker="x",
                color=colour[str(ref.config)],
                alpha=0.8,
                label=f"paper {ref.source}: {ref.label}",
            )


def _legend(fig: Any, axes: Sequence[Any]) -> int:
    """One legend for all panels (ours first, each label once); returns its number of labels."""
    seen: dict[str, Any] = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, h)
    labels = sorted(seen, key=lambda label: label.startswith("paper"))  # ours first
    handles = [seen[label] for label in labels]
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
    return len(labels)


def plot_metrics_vs_k(
    summaries: Sequence[dict[str, Any]],
    metrics: dict[str, str],
    paper: Sequence[Any],
    out_path: Path,
    order: Sequence[str] | None = None,
) -> Path:
    """Write the figure of the module docstring; `metrics` maps keys to titles, `paper` holds
    `pathoscope.app.paper_tables.PaperRow`s, `order` the configs' order (default sorted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_config: dict[str, dict[int, dict[str, Any]]] = {}
    for s in summaries:
        by_config.setdefault(str(s["config"]), {})[int(s["shots"])] = s
    configs = list(order) if order is not None else sorted(by_config)
    refs = [r for r in paper if r.config is not None]
    names = list(dict.fromkeys([*configs, *(r.config for r in refs if r.config)]))
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {name: cycle[i % len(cycle)] for i, name in enumerate(names)}
    datasets = sorted({str(s.get("dataset")) for s in summaries})

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 4.0), squeeze=False)
    for ax, (metric, title) in zip(axes[0], metrics.items(), strict=True):
        _plot_ours(ax, metric, by_config, configs, colour)
        _plot_paper(ax, metric, refs, colour)
        ax.set_title(f"{title} (%)", fontsize=10)
        ax.set_xlabel("K (shots)")
        ax.grid(True, alpha=0.3)
        all_ks = sorted(
            {int(s["shots"]) for s in summaries}
            | {k for r in refs for k in r.metrics.get(metric, {})}
        )
        ax.set_xticks(all_ks)
    n_labels = _legend(fig, axes[0])
    note = "mean ± std over seeds, last checkpoint"
    if not refs:
        note += f"; the paper has no rows for {', '.join(datasets)}"
    fig.suptitle(f"{', '.join(datasets)}: metrics against K ({note})", fontsize=10)
    rows = (n_labels + 3) // 4
    fig.tight_layout(rect=(0, 0.05 + 0.04 * rows, 1, 0.95))
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return out_path
