"""Where PiEG's embeddings lie, next to real normal and pathological ones (the paper's Fig. 2 and
4; the verb is `pathoscope embeddings`, pathoscope/app/embeddings.py).

For a trained model and its data, four sets of adapted features v (the space D scores):

* normal: feature cells of the normal test images, inside the foreground;
* pathological: feature cells of the pathological test images inside gt_mask (a cell counts
  when half its pixels do, as lesion cells in training);
* PiEG: v_s of `--batches` training batches (augmented shots, Eq. 3, exactly as a training step
  makes them: `PathoScopeModel.synthesize`), on the foreground cells;
* Gaussian: the same v_n plus Gaussian noise of PiEG's start (`pieg.noise_mean`,
  `pieg.noise_std`), GLASS's synthetic embeddings.

Each set is subsampled to `--points` cells (seeded; the PiEG and Gaussian sets keep the same
cells, so that they have the same size and the same origins). The number: for each pathological
cell, the distance to the nearest PiEG embedding, averaged, divided by the same average to the
nearest Gaussian embedding, in the full feature space (not in 2-D). Below 1, PiEG's embeddings lie
closer to real pathology than Gaussian noise does. The four sets are drawn in 2-D by t-SNE
(scikit-learn, on a 50-dimensional PCA of the features, 500 iterations: seconds for 2,000 points). Writes `embeddings.png` and `embeddings.json` (the number, its two terms, the
distance to the normal set for scale, the set sizes) into `--out`, and prints the number.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pathoscope.batches import EvalBatch
from pathoscope.losses import mask_to_grid
from pathoscope.torch_model import PathoScopeModel

GROUPS = ("normal", "pathological", "pieg", "gaussian")
LABELS = {
    "normal": "normal (test)",
    "pathological": "pathological (test, inside gt_mask)",
    "pieg": "PiEG v_s",
    "gaussian": "Gaussian v_n + N(mu, sigma)",
}
# Drawn in this order (PiEG last: on top of the Gaussian set it starts from).
STYLE: dict[str, dict[str, Any]] = {
    "normal": {"c": "tab:blue", "marker": "o", "s": 6},
    "pathological": {"c": "tab:red", "marker": "o", "s": 6},
    "gaussian": {"c": "tab:orange", "marker": "x", "s": 12},
    "pieg": {"c": "tab:green", "marker": "+", "s": 20},
}
PCA_DIMS, TSNE_ITERATIONS = 50, 500  # t-SNE on a PCA of the features: seconds, not a minute


@torch.no_grad()
def real_embeddings(
    model: PathoScopeModel, dataset: Any, batch_size: int = 16
) -> dict[str, Tensor]:
    """{"normal": (n, C), "pathological": (m, C)} adapted features of the test set's cells."""
    out: dict[str, list[Tensor]] = {"normal": [], "pathological": []}
    fraction = model.hp.losses.lesion_min_fraction
    device = model.tau.device
    for start in range(0, len(dataset), batch_size):
        batch = EvalBatch.collate(
            [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        )
        v = model.embed(batch.image.to(device))  # (b, h, w, C)
        grid = tuple(v.shape[1:3])
        fg = mask_to_grid(batch.foreground, grid, 0.5)
        gt = mask_to_grid(batch.gt_mask, grid, fraction)
        for j in range(batch.size):
            if int(batch.label[j]) == 0:
                out["normal"].append(v[j][fg[j]].cpu())
            elif bool(batch.has_mask[j]):
                out["pathological"].append(v[j][gt[j]].cpu())
    return {k: torch.cat(parts) if parts else torch.zeros(0, 0) for k, parts in out.items()}


def synthetic_embeddings(
    model: PathoScopeModel, loader: Any, batches: int, seed: int
) -> dict[str, Tensor]:
    """{"pieg": (n, C), "gaussian": (n, C)} on the foreground cells of `batches` training batches;
    row i of both comes from the same v_n cell."""
    pg = model.hp.pieg
    unit = model.pieg_unit()
    gen = torch.Generator().manual_seed(seed)
    device = model.tau.device
    pieg, gauss = [], []
    for step, batch in enumerate(loader):
        if step >= batches:
            break
        x_n, x_p = batch.image.to(device), batch.lesion_image.to(device)
        b = x_n.shape[0]
        with torch.no_grad():
            v = model.embed(torch.cat([x_n, x_p]))
        v_n, v_p = v[:b], v[b:]
        fg = mask_to_grid(batch.foreground.to(device), tuple(v.shape[1:3]), 0.5)
        use_fg = fg if model.hp.losses.global_in_foreground else None
        with torch.enable_grad():
            syn = model.synthesize(v_n, v_p, use_fg, step)
        # The Gaussian start alone, at the cells PiEG perturbed (`base`: v_n, its foreground
        # cells with losses.synthetic_in_foreground, a random subset of them with pieg.max_cells),
        # so that row i of both sets comes from the same v_n cell.
        base, v_s = syn.base.detach(), syn.v_s.detach()
        noise = (
            torch.randn(base.shape, generator=gen) * (pg.noise_std * unit) + pg.noise_mean * unit
        )
        gaussian = base + noise.to(device)
        if v_s.shape == v_n.shape:  # every cell perturbed: keep the foreground ones
            v_s, gaussian = v_s[fg], gaussian[fg]
        pieg.append(v_s.reshape(-1, v_s.shape[-1]).cpu())
        gauss.append(gaussian.reshape(-1, gaussian.shape[-1]).cpu())
    if not pieg:
        raise ValueError("embeddings: the training loader yielded no batch")
    return {"pieg": torch.cat(pieg), "gaussian": torch.cat(gauss)}


def mean_nn_distance(queries: Tensor, points: Tensor, chunk: int = 1024) -> float:
    """Mean over `queries` (n, C) of the Euclidean distance to the nearest row of `points` (m, C)."""
    best = [
        torch.cdist(q.double(), points.double()).min(dim=1).values for q in queries.split(chunk)
    ]
    return float(torch.cat(best).mean())


def subsample(sets: dict[str, Tensor], points: int, seed: int) -> dict[str, Tensor]:
    """Each set cut to at most `points` rows (seeded); "pieg" and "gaussian" keep the same rows."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in ("normal", "pathological", "pieg"):
        n = sets[name].shape[0]
        rows = np.sort(rng.choice(n, size=min(points, n), replace=False))
        out[name] = sets[name][torch.from_numpy(rows)]
        if name == "pieg":
            out["gaussian"] = sets["gaussian"][torch.from_numpy(rows)]
    return out


def closeness(sets: dict[str, Tensor]) -> dict[str, float]:
    """The number of the module docstring and its terms (feature units)."""
    path = sets["pathological"]
    to_pieg = mean_nn_distance(path, sets["pieg"])
    to_gauss = mean_nn_distance(path, sets["gaussian"])
    to_normal = mean_nn_distance(path, sets["normal"])
    return {
        "nn_ratio_pieg_over_gaussian": to_pieg / to_gauss,
        # the same ratio for the normal cells themselves: what a v_s that never left v_n scores
        "nn_ratio_normal_over_gaussian": to_normal / to_gauss,
        "nn_pathological_to_pieg": to_pieg,
        "nn_pathological_to_gaussian": to_gauss,
        "nn_pathological_to_normal": to_normal,
    }


@torch.no_grad()
def discriminator_means(model: PathoScopeModel, sets: dict[str, Tensor]) -> dict[str, float]:
    """{"d_<set>": mean sigmoid(D(v))} of each set (evaluation-mode D): a synthetic set that D
    already scores near 1 teaches it little about where the normal boundary is."""
    was_training = model.discriminator.training
    model.discriminator.eval()
    device = model.tau.device
    out = {
        f"d_{name}": float(torch.sigmoid(model.discriminator(v.to(device))).mean())
        for name, v in sets.items()
    }
    model.discriminator.train(was_training)
    return out


def plot_embeddings(
    sets: dict[str, Tensor], numbers: dict[str, float], out_path: Path, title: str, seed: int
) -> Path:
    """t-SNE of the four sets, one colour each, the number in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    names = [g for g in STYLE if sets[g].shape[0]]
    stacked = torch.cat([sets[g] for g in names]).double().numpy()
    reduced = PCA(min(PCA_DIMS, *stacked.shape), random_state=seed).fit_transform(stacked)
    perplexity = float(min(30.0, max(2.0, (stacked.shape[0] - 1) / 3.0)))
    tsne = TSNE(2, perplexity=perplexity, init="pca", random_state=seed, max_iter=TSNE_ITERATIONS)
    xy = tsne.fit_transform(reduced)
    fig, ax = plt.subplots(figsize=(7.5, 7))
    start = 0
    for g in names:
        n = sets[g].shape[0]
        label = f"{LABELS[g]} ({n})"
        ax.scatter(*xy[start : start + n].T, alpha=0.6, linewidths=0.8, label=label, **STYLE[g])
        start += n
    ax.legend(fontsize=8, markerscale=2, loc="best")
    ax.set_xticks([])
    ax.set_yticks([])
    r = numbers["nn_ratio_pieg_over_gaussian"]
    ax.set_title(
        f"{title}\nt-SNE of adapted features v. Nearest-neighbour distance from pathological "
        f"cells\nto PiEG / to Gaussian = {numbers['nn_pathological_to_pieg']:.3g} / "
        f"{numbers['nn_pathological_to_gaussian']:.3g} = {r:.3f} (feature space; < 1: PiEG closer)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return out_path
