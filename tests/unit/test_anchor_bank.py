"""pathoscope.anchor_bank: nearest-anchor search vs brute force, gradients, greedy k-centre coreset
vs a plain reference, sizes, distance_scale, checkpoints and pickling."""

from __future__ import annotations

import copy
import io
import math
import pickle
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from pathoscope.anchor_bank import AnchorBank, _k_centre, greedy_coreset

# "faiss" answers these tests' small query sets by its matrix product (MATMUL_MAX_QUERIES);
# "faiss-index" is the FAISS backend made to use its index for every query.
BACKENDS = ["faiss", "faiss-index", "torch"]


def make_bank(features: Tensor, backend: str, **kwargs: object) -> AnchorBank:
    bank = AnchorBank.from_features(
        features, backend="faiss" if backend == "faiss-index" else backend, **kwargs
    )
    if backend == "faiss-index":
        bank.matmul_max_queries = 0
    return bank


def brute_nearest(x: Tensor, anchors: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest anchor by torch.cdist in float64: (dist (M,), idx (M,))."""
    d = torch.cdist(x.double(), anchors.double())
    return d.min(1)


def ref_k_centre(feats: Tensor, n: int, start: int) -> list[int]:
    """Plain greedy k-centre: after each pick, update every point's distance to its closest centre
    and pick the farthest point (first index on ties)."""
    selected = [start]
    min_d = ((feats - feats[start]) ** 2).sum(1)
    for _ in range(1, n):
        nxt = int(torch.argmax(min_d))
        selected.append(nxt)
        min_d = torch.minimum(min_d, ((feats - feats[nxt]) ** 2).sum(1))
    return selected


@pytest.fixture(scope="module")
def data() -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "features": torch.randn(300, 16, generator=g) * 3.0,
        "queries": torch.randn(60, 16, generator=g) * 3.0,
    }


# ---------------------------------------------------------------- search


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ratio", [1.0, 0.3])
def test_nearest_matches_brute_force(data: dict[str, Tensor], backend: str, ratio: float) -> None:
    bank = make_bank(
        data["features"], backend, coreset_ratio=ratio, generator=torch.Generator().manual_seed(0)
    )
    dist, idx = bank.nearest(data["queries"])
    assert (bank._index is not None) == (backend == "faiss-index")  # which path answered
    ref_d, ref_i = brute_nearest(data["queries"], bank.anchors)
    assert torch.equal(idx, ref_i)
    torch.testing.assert_close(dist.double(), ref_d, rtol=1e-5, atol=1e-5)
    assert dist.shape == idx.shape == (60,)


def test_backends_agree_on_k_nearest(data: dict[str, Tensor]) -> None:
    faiss_bank = make_bank(data["features"], "faiss-index")
    torch_bank = AnchorBank.from_features(data["features"], backend="torch")
    sq_f, idx_f = faiss_bank.search(data["queries"], k=5)
    sq_t, idx_t = torch_bank.search(data["queries"], k=5, chunk=7)  # several chunks
    assert torch.equal(idx_f, idx_t)
    torch.testing.assert_close(sq_f, sq_t, rtol=1e-4, atol=1e-3)
    ref = torch.cdist(data["queries"].double(), data["features"].double()) ** 2
    ref_sq, ref_idx = ref.topk(5, dim=1, largest=False)
    assert torch.equal(idx_t, ref_idx)
    torch.testing.assert_close(sq_t.double(), ref_sq, rtol=1e-4, atol=1e-3)


def test_faiss_bank_uses_its_index_above_matmul_max_queries(data: dict[str, Tensor]) -> None:
    bank = make_bank(data["features"], "faiss")
    bank.matmul_max_queries = 10
    ref = torch.cdist(data["queries"].double(), bank.anchors.double()).square()
    ref_sq, ref_idx = ref.topk(4, dim=1, largest=False)
    sq_small, idx_small = bank.search(data["queries"][:10], k=4)
    assert bank._index is None  # answered by the matrix product
    sq, idx = bank.search(data["queries"][:11], k=4)
    assert bank._index is not None and bank._index.ntotal == len(bank)
    assert torch.equal(idx_small, ref_idx[:10]) and torch.equal(idx, ref_idx[:11])
    torch.testing.assert_close(sq_small.double(), ref_sq[:10], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sq_small, sq[:10], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_matrix_product_search_is_exact_far_from_the_origin(
    data: dict[str, Tensor], backend: str
) -> None:
    """Features whose norms dwarf their spacing (|x|^2 ~ 1.4e6, the anchors' spread ~3): the
    product is taken about the anchors' mean, so it ranks as float64 does. Without the centring,
    float32 rounds squared distances by ~0.1-0.5 at that norm and near neighbours swap."""
    offset = 300.0 * torch.ones(16)
    bank = make_bank(data["features"] + offset, backend)
    x = data["queries"] + offset
    ref = torch.cdist(x.double(), bank.anchors.double()).square()
    ref_sq, ref_idx = ref.topk(8, dim=1, largest=False)
    sq, idx = bank.search(x, k=8)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(sq.double(), ref_sq, rtol=0, atol=1e-3)


def test_matrix_product_search_follows_anchors_changed_in_place(data: dict[str, Tensor]) -> None:
    bank = make_bank(data["features"], "torch")
    bank.nearest(data["queries"])  # caches the centred anchors
    with torch.no_grad():
        bank.anchors[: len(bank) // 2] += 5.0
    _, idx = bank.nearest(data["queries"])
    assert torch.equal(idx, brute_nearest(data["queries"], bank.anchors)[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_is_the_unit_vector_from_the_anchor(data: dict[str, Tensor], backend: str) -> None:
    bank = make_bank(data["features"], backend)
    x = data["queries"].clone().requires_grad_(True)
    dist, idx = bank.nearest(x)
    dist.sum().backward()
    a = bank.anchors[idx]
    expected = (x.detach() - a) / torch.linalg.vector_norm(x.detach() - a, dim=1, keepdim=True)
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_query_on_an_anchor_has_zero_distance_and_zero_gradient(
    data: dict[str, Tensor], backend: str
) -> None:
    bank = make_bank(data["features"], backend)
    x = torch.cat([bank.anchors[[3, 17]], data["queries"][:2]]).requires_grad_(True)
    dist, idx = bank.nearest(x)
    assert idx[:2].tolist() == [3, 17]
    assert dist[:2].tolist() == [0.0, 0.0]
    dist.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.equal(x.grad[:2], torch.zeros(2, 16))
    assert (x.grad[2:].norm(dim=1) - 1.0).abs().max() < 1e-5  # the others: unit vectors


def test_empty_bank_refuses_to_search() -> None:
    with pytest.raises(RuntimeError, match="empty"):
        AnchorBank(4).nearest(torch.zeros(2, 4))


def test_bad_arguments_raise(data: dict[str, Tensor]) -> None:
    with pytest.raises(ValueError, match="backend"):
        AnchorBank(16, backend="annoy")
    bank = AnchorBank(16)
    with pytest.raises(ValueError, match=r"\(N, 16\)"):
        bank.build(torch.zeros(10, 8))
    for ratio in (0.0, 1.5):
        with pytest.raises(ValueError, match="coreset_ratio"):
            bank.build(data["features"], coreset_ratio=ratio)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_backend_on_gpu_matches_cpu(data: dict[str, Tensor]) -> None:
    cpu = AnchorBank.from_features(data["features"], backend="torch")
    gpu = copy.deepcopy(cpu).cuda()
    x = data["queries"].cuda().requires_grad_(True)
    dist, idx = gpu.nearest(x)
    dist.sum().backward()
    ref_d, ref_i = cpu.nearest(data["queries"])
    assert dist.is_cuda and torch.equal(idx.cpu(), ref_i)
    torch.testing.assert_close(dist.cpu(), ref_d, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(x.grad).all()


# ---------------------------------------------------------------- coreset


def test_k_centre_on_a_line_by_hand() -> None:
    pts = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0], [20.0]])
    # From 0: the farthest is 20; then 10 (min distance 10); then 2 (2 beats 1 and 11's 1).
    assert _k_centre(pts, 4, start=0).tolist() == [0, 5, 3, 2]
    # From 10: 0 and 20 are both 10 away; the tie goes to the first index. Then 20 (10 away).
    assert _k_centre(pts, 3, start=3).tolist() == [3, 0, 5]


@pytest.mark.parametrize("dim", [2, 256])  # 256 > 128: the selection runs on a projection
def test_coreset_picks_one_point_per_cluster(dim: int) -> None:
    g = torch.Generator().manual_seed(dim)
    centres = torch.randn(5, dim, generator=g)
    centres = 100.0 * centres / centres.norm(dim=1, keepdim=True)  # far apart
    labels = torch.arange(5).repeat_interleave(40)
    pts = centres[labels] + 0.1 * torch.randn(200, dim, generator=g)
    for seed in range(3):
        idx = greedy_coreset(pts, 5, generator=torch.Generator().manual_seed(seed))
        assert sorted(labels[idx].tolist()) == [0, 1, 2, 3, 4]
    bank = AnchorBank.from_features(pts, coreset_ratio=5 / 200, backend="torch")
    _, which = brute_nearest(bank.anchors, pts)
    assert sorted(labels[which].tolist()) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_k_centre_matches_plain_greedy(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    # Clustered data, so that the triangle-inequality pruning actually skips groups.
    centres = torch.randn(12, 8, generator=g) * 5.0
    feats = centres[torch.randint(12, (600,), generator=g)] + torch.randn(600, 8, generator=g)
    start = int(torch.randint(600, (1,), generator=g))
    assert _k_centre(feats, 80, start).tolist() == ref_k_centre(feats, 80, start)


def test_greedy_coreset_is_k_centre_on_the_projection() -> None:
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(400, 200, generator=g)
    idx = greedy_coreset(feats, 30, projection_dim=16, generator=torch.Generator().manual_seed(9))
    # The same generator draws the projection, then the start: replay it.
    replay = torch.Generator().manual_seed(9)
    proj = torch.randn(200, 16, generator=replay) / math.sqrt(16)
    start = int(torch.randint(400, (1,), generator=replay))
    assert idx.tolist() == ref_k_centre(feats @ proj, 30, start)
    assert len(set(idx.tolist())) == 30
    # Without a projection (or with a wide one) the selection runs on the features themselves.
    idx_full = greedy_coreset(
        feats, 30, projection_dim=None, generator=torch.Generator().manual_seed(9)
    )
    replay = torch.Generator().manual_seed(9)
    start = int(torch.randint(400, (1,), generator=replay))
    assert idx_full.tolist() == ref_k_centre(feats, 30, start)


@pytest.mark.parametrize(
    ("ratio", "max_anchors", "expected"),
    [(1.0, 4096, 100), (0.1, 4096, 10), (0.25, 4096, 25), (0.333, 4096, 34), (0.5, 7, 7)],
)
def test_bank_size(ratio: float, max_anchors: int, expected: int) -> None:
    feats = torch.randn(100, 6, generator=torch.Generator().manual_seed(0))
    bank = AnchorBank.from_features(feats, coreset_ratio=ratio, max_anchors=max_anchors)
    assert len(bank) == bank.anchors.shape[0] == expected
    assert bank.built
    # Anchors are rows of the features, all different.
    _, which = brute_nearest(bank.anchors, feats)
    assert torch.equal(feats[which], bank.anchors)
    assert len(set(which.tolist())) == expected
    if expected == 100:
        assert torch.equal(bank.anchors, feats)  # ratio 1: every point, in order


# ---------------------------------------------------------------- distance_scale


def test_distance_scale_is_median_nearest_distance_of_heldout() -> None:
    feats = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    heldout = torch.tensor([[1.0, 0.0], [0.0, 2.0], [10.0, 3.0], [6.0, 0.0], [-10.0, 0.0]])
    # nearest distances: 1, 2, 3, 4, 10 -> median 3 (the mean would be 4)
    bank = AnchorBank.from_features(feats, heldout=heldout)
    assert bank.distance_scale.item() == pytest.approx(3.0)
    assert AnchorBank.from_features(feats).distance_scale.item() == 1.0  # no held-out features
    # Rebuilding without held-out features resets the scale.
    assert bank.build(feats).distance_scale.item() == 1.0


# ---------------------------------------------------------------- checkpoints and pickling


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_checkpoint_round_trip(data: dict[str, Tensor], backend: str) -> None:
    parent = nn.Module()
    parent.bank = AnchorBank.from_features(
        data["features"], coreset_ratio=0.5, backend=backend, heldout=data["queries"][:20]
    )
    before = parent.bank.nearest(data["queries"])
    buffer = io.BytesIO()
    torch.save(parent.state_dict(), buffer)
    buffer.seek(0)

    fresh = nn.Module()
    fresh.bank = AnchorBank(16, backend=backend)  # size 0: the buffer must be resized
    assert not fresh.bank.built
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(fresh.bank.anchors, parent.bank.anchors)
    assert fresh.bank.distance_scale == parent.bank.distance_scale != 1.0
    after = fresh.bank.nearest(data["queries"])
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_loading_a_smaller_bank_replaces_the_index(data: dict[str, Tensor], backend: str) -> None:
    big = make_bank(data["features"], backend)
    big.nearest(data["queries"])  # index (or the matrix product's centred copy) of 300 anchors
    small = make_bank(data["features"], backend, coreset_ratio=0.1)
    big.load_state_dict(small.state_dict())
    assert len(big) == 30
    _, idx = big.nearest(data["queries"])
    assert torch.equal(idx, brute_nearest(data["queries"], small.anchors)[1])


@pytest.mark.parametrize(
    "clone", [lambda b: pickle.loads(pickle.dumps(b)), copy.deepcopy], ids=["pickle", "deepcopy"]
)
def test_pickle_and_deepcopy_rebuild_the_index(
    data: dict[str, Tensor], clone: Callable[[AnchorBank], AnchorBank]
) -> None:
    bank = make_bank(data["features"], "faiss-index", coreset_ratio=0.5)
    before = bank.nearest(data["queries"])
    assert bank._index is not None  # the faiss index exists and is not picklable itself
    other = clone(bank)
    assert other._index is None
    after = other.nearest(data["queries"])
    assert other._index is not None and other._index.ntotal == len(bank)
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    assert bank._index is not None  # the original keeps its index
