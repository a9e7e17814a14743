"""Reporting: summaries over seeds, the paper-shaped table of a runs folder, grid tables and plots.

summary.json / summary.md (docs/metrics.md lists their keys) are written per <config>/k<K>/;
summary.md also shows each seed's panel overview and training curves (relative links, only to
files that exist); `pathoscope table` gathers them into table.md / table.csv with the paper's
rows for reference and draws the metrics against K (pathoscope/app/figures/shots.py);
`pathoscope grid` writes grid.md / grid.csv and one plot per metric against the first parameter.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pathoscope.app.configs import DEFAULT_CONFIG
from pathoscope.app.figures.shots import SHOTS_FILE, plot_metrics_vs_k
from pathoscope.app.paper_tables import paper_rows
from pathoscope.files import atomic_path, write_text

# The four metrics of the paper's Table 1, in its order, with their column titles.
TABLE_METRICS: dict[str, str] = {
    "image_auroc": "Image AUROC",
    "pixel_auroc": "Pixel AUROC",
    "pro": "PRO",
    "dice_best": "Dice",
}
# Further metrics reported in summary.md (see callbacks/metrics.py and docs/metrics.md).
EXTRA_METRICS: dict[str, str] = {
    "pixel_auroc_fg": "Pixel AUROC (fg)",
    "pro_fg": "PRO (fg)",
    "sensitivity": "Sensitivity@tau",
    "specificity": "Specificity@tau",
    "dice_at_tau": "Dice@tau",
    "iou_at_tau": "IoU@tau",
}
# Sensitivity@tau by lesion area, a fraction of the slice's foreground (pathoscope.metrics.AREA_BINS).
AREA_METRICS: dict[str, str] = {
    "sensitivity_area_lt1": "< 1 %",
    "sensitivity_area_1to3": "1-3 %",
    "sensitivity_area_3to10": "3-10 %",
    "sensitivity_area_ge10": ">= 10 %",
}
SUMMARY_METRICS = (*TABLE_METRICS, *EXTRA_METRICS, *AREA_METRICS, "tau")
# metrics.json's record of the bad inputs a data module left out ({name: reason}), by dataset.
SKIPPED_KEYS = ("skipped_subjects", "skipped_images")
GridResult = tuple[tuple[tuple[str, str], ...], int, dict[str, Any]]  # (params, K, summary)


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample std (ddof 1; None for one value, where it is undefined) of the defined values."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return mean, None
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    return mean, math.sqrt(var)


def mean_std_cell(values: Sequence[float | None], scale: float = 1.0, digits: int = 3) -> str:
    """A table cell "mean ± std" of the defined values (times `scale`); "mean" for one, "-" for none."""
    mean, std = _mean_std(values)
    if mean is None:
        return "-"
    cell = f"{scale * mean:.{digits}f}"
    return cell if std is None else f"{cell} ± {scale * std:.{digits}f}"


def summarize(
    dataset: str, config: str, shots: int, per_seed: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """summary.json's content from the seeds' metrics.json (in seed order)."""
    metrics: dict[str, dict[str, Any]] = {}
    for key in SUMMARY_METRICS:
        values = [m.get(key) for m in per_seed]
        mean, std = _mean_std(values)
        metrics[key] = {"mean": mean, "std": std, "values": values}
    weights = sorted({str(m.get("weights")) for m in per_seed})
    return {
        "dataset": dataset,
        "config": config,
        "shots": shots,
        "repeats": len(per_seed),
        "metrics": metrics,
        "checkpoint": "last",
        "weights": weights[0] if len(weights) == 1 else weights,
        "eval_size": per_seed[0].get("eval_size") if per_seed else None,
        "lesion_area_counts": per_seed[0].get("lesion_area_counts") if per_seed else None,
        **skipped_inputs(per_seed),
    }


def skipped_inputs(per_seed: Sequence[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """{"skipped_subjects" (or "_images"): {name: reason}} over the seeds' metrics: the bad
    inputs of the data root that any seed's split left out (a subject that fails only when read
    in full is found by the seeds that select it)."""
    out: dict[str, dict[str, str]] = {}
    for metrics in per_seed:
        for key in SKIPPED_KEYS:
            if key in metrics:
                out.setdefault(key, {}).update(metrics[key])
    return {key: dict(sorted(names.items())) for key, names in out.items()}


def _skipped_lines(summary: dict[str, Any]) -> list[str]:
    """summary.md's line for each kind of input the seeds were made without (none if none)."""
    lines = []
    for key in SKIPPED_KEYS:
        if names := sorted(summary.get(key) or {}):
            kind = key.removeprefix("skipped_")
            lines.append(
                f"Made without {len(names)} of the data root's {kind}, which could not be used "
                f"(summary.json and each seed's metrics.json give the reasons): "
                f"{', '.join(names)}."
            )
    return lines


def _area_lines(summary: dict[str, Any]) -> list[str]:
    """Sensitivity@tau by lesion area (% of the slice's foreground), with each bin's test items."""
    counts = summary.get("lesion_area_counts") or {}
    if not any(counts.values()):
        return []
    names = [k.removeprefix("sensitivity_area_") for k in AREA_METRICS]
    return [
        "| Sensitivity@tau by lesion area (% of the slice's foreground) | "
        + " | ".join(
            f"{t} (n = {counts.get(n, 0)})"
            for t, n in zip(AREA_METRICS.values(), names, strict=True)
        )
        + " |",
        "|---|" + "---|" * len(AREA_METRICS),
        "| % | " + " | ".join(_pct(summary["metrics"].get(k)) for k in AREA_METRICS) + " |",
        "",
    ]


def _pct(stat: dict[str, Any] | None) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    std = stat.get("std")
    if std is None:  # one seed: no spread to report
        return f"{100 * stat['mean']:.2f}"
    return f"{100 * stat['mean']:.2f} ± {100 * std:.2f}"


def _weights_note(weights: Any) -> str:
    if weights == "random":
        return (
            "random (pretrained=False: no ImageNet weights were available; results are far "
            "below what pretrained weights give)"
        )
    return str(weights)


def summary_markdown(summary: dict[str, Any]) -> str:
    """summary.md: the paper's table layout in percent, mean ± std over the seeds."""
    n = summary["repeats"]
    m = summary["metrics"]
    lines = [
        f"## {summary['dataset']} / {summary['config']} / K={summary['shots']}",
        "",
        "| Method | K | " + " | ".join(f"{t} (%)" for t in TABLE_METRICS.values()) + " |",
        "|---|---|" + "---|" * len(TABLE_METRICS),
        f"| {summary['config']} | {summary['shots']} | "
        + " | ".join(_pct(m.get(k)) for k in TABLE_METRICS)
        + " |",
        "",
        "| " + " | ".join(f"{t} (%)" for t in EXTRA_METRICS.values()) + " |",
        "|" + "---|" * len(EXTRA_METRICS),
        "| " + " | ".join(_pct(m.get(k)) for k in EXTRA_METRICS) + " |",
        "",
        *_area_lines(summary),
        (
            f"Mean ± std (sample std, ddof 1) over {n} seeds (0..{n - 1}); the same test set for "
            "every seed, only the K training shots change."
            if n != 1
            else "One seed (0): no spread to report; use REPEATS=N for mean ± std over N seeds."
        ),
        *_skipped_lines(summary),
        f"Checkpoint reported: {summary['checkpoint']} (the final model; nothing is selected on "
        "test labels).",
        f"Backbone weights: {_weights_note(summary['weights'])}.",
        "Dice is the best Dice over thresholds on the pooled test set (an oracle, as in the "
        f"literature); @tau values use the threshold set on validation normals. Evaluation "
        f"size: {summary.get('eval_size')} px.",
        "",
    ]
    return "\n".join(lines)


# Each seed's figures that summary.md shows: (title, path inside seed<i>/).
SEED_FIGURES = (
    ("test panels", "panels/overview.png"),
    ("training curves", "training_curves.png"),
)


def figures_markdown(folder: Path, repeats: int) -> str:
    """summary.md's figure section: for each seed folder of `folder`, its SEED_FIGURES that
    exist, as images with relative links ("" when there are none)."""
    lines = []
    for seed in range(repeats):
        for title, rel in SEED_FIGURES:
            if (Path(folder) / f"seed{seed}" / rel).is_file():
                lines += [
                    f"### seed {seed}: {title}",
                    "",
                    f"![seed {seed} {title}](seed{seed}/{rel})",
                    "",
                ]
    if not lines:
        return ""
    intro = (
        "Test panels: the normal test items scored highest (false alarms), the pathological "
        "ones scored lowest (misses) and a random sample; tiles: image, gt_mask (red), "
        "anomaly_map, pred_mask at tau (green). docs/figures.md describes every figure."
    )
    return "\n".join(["## Figures", "", intro, "", *lines])


def write_summary(folder: Path, summary: dict[str, Any]) -> None:
    write_text(folder / "summary.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
    markdown = summary_markdown(summary)
    figures = figures_markdown(folder, int(summary["repeats"]))
    write_text(folder / "summary.md", markdown + ("\n" + figures if figures else ""))


def format_metrics(metrics: dict[str, Any]) -> str:
    """One line of the main metrics in percent."""
    parts = [
        f"{title} {100 * metrics[key]:.2f}" if metrics.get(key) is not None else f"{title} -"
        for key, title in TABLE_METRICS.items()
    ]
    return ", ".join(parts)


# ------------------------------------------------------------------------------- table
def load_summaries(runs_dir: Path) -> list[dict[str, Any]]:
    """Every summary.json under `runs_dir` (partial and old folders are hidden: never read)."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"{runs_dir}: runs folder not found")
    out = []
    for path in sorted(runs_dir.rglob("summary.json")):
        if any(part.startswith(".") for part in path.relative_to(runs_dir).parts):
            continue
        try:
            summary = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        if not {"config", "shots", "metrics"} <= summary.keys():
            raise ValueError(f"{path}: not a pathoscope summary (config, shots, metrics expected)")
        out.append(summary)
    return out


def config_order(name: str) -> tuple[int, str]:
    """Sort key of configs in tables and figures: the method, then ablations, then the rest."""
    if name == DEFAULT_CONFIG:
        return (0, name)
    return (1 if name.startswith("ablation/") else 2, name)


def _set_percent(row: dict[str, Any], m: str, k: int, stat: dict[str, Any] | None) -> None:
    """The CSV columns of metric `m` at K = `k`: mean and std in percent (None where undefined)."""
    mean = stat.get("mean") if stat else None
    std = stat.get("std") if stat else None
    row[f"{m}_k{k}_mean_pct"] = None if mean is None else 100 * mean
    row[f"{m}_k{k}_std_pct"] = None if std is None else 100 * std


def _paper_table_rows(
    datasets: Sequence[str], columns: Sequence[tuple[str, int]]
) -> tuple[list[str], list[dict[str, Any]], str]:
    """The paper's reference rows of `datasets`: (Markdown lines, CSV rows, the note below)."""
    refs = [r for d in datasets for r in paper_rows(d)]
    md: list[str] = []
    rows: list[dict[str, Any]] = []
    for ref in refs:
        cells = []
        row: dict[str, Any] = {"method": ref.label, "source": f"paper {ref.source}", "repeats": 10}
        for m, k in columns:
            value = ref.metrics.get(m, {}).get(k)
            cells.append("-" if value is None else f"{value:.2f}")
            row[f"{m}_k{k}_mean_pct"] = value
            row[f"{m}_k{k}_std_pct"] = None
        md.append(
            f"| {ref.label} | reference: paper {ref.source} | 10 | " + " | ".join(cells) + " |"
        )
        rows.append(row)
    if refs:
        note = (
            "Reference rows are the paper's own numbers (10 repeats, real data), not "
            "reproduced here."
        )
    else:
        note = (
            f"No paper reference rows for dataset(s) {', '.join(datasets)} (the paper reports "
            "BraTS2020 and ChestXray8 only)."
        )
    return md, rows, note


def build_table(
    summaries: Sequence[dict[str, Any]], paper: bool = True
) -> tuple[str, list[dict[str, Any]]]:
    """(Markdown, CSV rows) of the paper's Table 1 shape: rows configs, columns metric x K."""
    if not summaries:
        raise ValueError("no summary.json found: run `pathoscope train` first")
    datasets = sorted({str(s.get("dataset")) for s in summaries})
    ks = sorted({int(s["shots"]) for s in summaries})
    by_config: dict[str, dict[int, dict[str, Any]]] = {}
    for s in summaries:
        by_config.setdefault(str(s["config"]), {})[int(s["shots"])] = s
    columns = [(metric, k) for metric in TABLE_METRICS for k in ks]

    header = ["Method", "Source", "Repeats"] + [f"{TABLE_METRICS[m]} K={k}" for m, k in columns]
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows: list[dict[str, Any]] = []
    for config in sorted(by_config, key=config_order):
        per_k = by_config[config]
        repeats = sorted({int(s.get("repeats", 0)) for s in per_k.values()})
        cells = [_pct(per_k[k]["metrics"].get(m)) if k in per_k else "-" for m, k in columns]
        md.append(
            f"| {config} | ours | {'/'.join(map(str, repeats))} | " + " | ".join(cells) + " |"
        )
        row: dict[str, Any] = {"method": config, "source": "ours", "repeats": repeats[-1]}
        for m, k in columns:
            _set_percent(row, m, k, per_k[k]["metrics"].get(m) if k in per_k else None)
        rows.append(row)
    notes = [
        "",
        "Ours: mean ± std over the seeds, last checkpoint, in percent. Dice = best threshold "
        "on the pooled test set (oracle, as in the literature).",
    ]
    weights = sorted({str(s.get("weights")) for s in summaries})
    notes.append(f"Backbone weights: {', '.join(_weights_note(w) for w in weights)}.")
    if paper:
        paper_md, paper_csv, note = _paper_table_rows(datasets, columns)
        md += paper_md
        rows += paper_csv
        notes.append(note)
    title = f"## {', '.join(datasets)}: K = {', '.join(map(str, ks))}"
    return "\n".join([title, "", *md, *notes, ""]), rows


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in fields})
    write_text(path, buf.getvalue())


def write_table(runs_dir: Path, paper: bool = True) -> str:
    """Write table.md, table.csv and metrics_vs_k.png into `runs_dir`; returns the Markdown."""
    summaries = load_summaries(runs_dir)
    markdown, rows = build_table(summaries, paper=paper)
    write_text(Path(runs_dir) / "table.md", markdown)
    _write_csv(Path(runs_dir) / "table.csv", rows)
    datasets = sorted({str(s.get("dataset")) for s in summaries})
    refs = [r for d in datasets for r in paper_rows(d)] if paper else []
    configs = sorted({str(s["config"]) for s in summaries}, key=config_order)
    plot_metrics_vs_k(summaries, TABLE_METRICS, refs, Path(runs_dir) / SHOTS_FILE, configs)
    return markdown


# ------------------------------------------------------------------------------- grid
def _as_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def write_grid_outputs(
    out: Path,
    keys: Sequence[str],
    results: Sequence[GridResult],
) -> None:
    """grid.md, grid.csv and grid_<first parameter>.png of a grid's results into `out`."""
    ks = sorted({k for _, k, _ in results})
    combos = list(dict.fromkeys(combo for combo, _, _ in results))
    by = {(combo, k): s for combo, k, s in results}
    header = [*keys] + [f"{TABLE_METRICS[m]} K={k}" for m in TABLE_METRICS for k in ks]
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = []
    for combo in combos:
        cells = [v for _, v in combo]
        row: dict[str, Any] = dict(combo)
        for m in TABLE_METRICS:
            for k in ks:
                stat = by[(combo, k)]["metrics"].get(m) if (combo, k) in by else None
                cells.append(_pct(stat))
                _set_percent(row, m, k, stat)
        md.append("| " + " | ".join(cells) + " |")
        rows.append(row)
    out.mkdir(parents=True, exist_ok=True)
    write_text(
        out / "grid.md",
        "\n".join(md) + "\n\nMean ± std over the seeds in percent, last checkpoint.\n",
    )
    _write_csv(out / "grid.csv", rows)
    _plot_grid(out / f"grid_{keys[0].replace('/', '_')}.png", keys, combos, ks, by)


def _plot_grid(
    path: Path,
    keys: Sequence[str],
    combos: Sequence[tuple[tuple[str, str], ...]],
    ks: Sequence[int],
    by: dict[tuple[tuple[tuple[str, str], ...], int], dict[str, Any]],
) -> None:
    """One panel per metric against the first parameter; one line per K (and other params)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_values = list(dict.fromkeys(combo[0][1] for combo in combos))
    numeric = all(_as_number(v) is not None for v in x_values)
    xs = {v: (_as_number(v) if numeric else i) for i, v in enumerate(x_values)}
    fig, axes = plt.subplots(1, len(TABLE_METRICS), figsize=(4 * len(TABLE_METRICS), 3.5))
    for ax, (metric, title) in zip(axes, TABLE_METRICS.items(), strict=True):
        rest_combos = list(dict.fromkeys(combo[1:] for combo in combos))
        for rest in rest_combos:
            for k in ks:
                pts = []
                for v in x_values:
                    s = by.get((((keys[0], v), *rest), k))
                    stat = s["metrics"].get(metric) if s else None
                    if stat and stat.get("mean") is not None:
                        pts.append((xs[v], 100 * stat["mean"], 100 * (stat.get("std") or 0.0)))
                if not pts:
                    continue
                label = f"K={k}" + "".join(f", {kk}={vv}" for kk, vv in rest)
                px, py, pe = zip(*sorted(pts), strict=True)
                ax.errorbar(px, py, yerr=pe, marker="o", capsize=3, label=label)
        ax.set_title(f"{title} (%)")
        ax.set_xlabel(keys[0])
        if numeric and len(x_values) > 1 and min(xs.values()) > 0:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(list(xs.values()), x_values)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
