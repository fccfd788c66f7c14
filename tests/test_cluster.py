"""mmcl.cluster.kmeans against scikit-learn's KMeans (Lloyd, same initial centroids)."""
import pytest
import torch
from sklearn.cluster import KMeans

from mmcl.cluster import kmeans


def _blobs(n: int, d: int, centres: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    means = 4 * torch.randn(centres, d, generator=g, dtype=torch.float64)
    labels = torch.randint(centres, (n,), generator=g)
    return means[labels] + torch.randn(n, d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("n,d,k", [(97, 5, 7), (300, 17, 13), (53, 3, 1), (40, 8, 40)])
def test_kmeans_inertia_matches_sklearn_from_the_same_init(n, d, k):
    x = _blobs(n, d, max(k // 2, 1), seed=n)
    init = x[torch.randperm(n, generator=torch.Generator().manual_seed(1))[:k]]
    ours = kmeans(x, k, iters=100, init=init, backend="torch")
    ref = KMeans(n_clusters=k, init=init.numpy(), n_init=1, max_iter=100, tol=0.0, algorithm="lloyd").fit(x.numpy())
    assert abs(ours.inertia - ref.inertia_) <= 0.01 * ref.inertia_ + 1e-9, (ours.inertia, ref.inertia_)
    # The reported inertia is the sum of the rows' squared distances to their own centroids.
    direct = ((x - ours.centroids[ours.assignments]) ** 2).sum()
    assert torch.allclose(direct, torch.tensor(ours.inertia, dtype=torch.float64), rtol=1e-9)
    assert ours.centroids.shape == (k, d) and ours.assignments.shape == (n,)
    assert torch.bincount(ours.assignments, minlength=k).min() >= 1  # no empty cluster


def test_kmeans_is_seeded_and_every_cluster_keeps_a_row():
    x = torch.randn(64, 4)
    x[32:] = x[0]  # half the rows identical: drawn duplicate centroids leave clusters empty
    a, b = kmeans(x, 20, seed=3, backend="torch"), kmeans(x, 20, seed=3, backend="torch")
    assert torch.equal(a.assignments, b.assignments) and torch.equal(a.centroids, b.centroids)
    assert torch.bincount(a.assignments, minlength=20).min() >= 1
    c = kmeans(x, 20, seed=4, backend="torch")
    assert not torch.equal(a.centroids, c.centroids)


def test_kmeans_float32_close_to_float64():
    x = _blobs(200, 6, 5, seed=2)
    init = x[:5]
    r64 = kmeans(x, 5, init=init, backend="torch")
    r32 = kmeans(x.float(), 5, init=init.float(), backend="torch")
    assert torch.equal(r64.assignments, r32.assignments)
    assert abs(r64.inertia - r32.inertia) <= 1e-4 * r64.inertia


def test_kmeans_bad_input():
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match="num_clusters"):
        kmeans(x, 11)
    with pytest.raises(ValueError, match="num_clusters"):
        kmeans(x, 0)
    with pytest.raises(TypeError, match="features"):
        kmeans(torch.arange(10), 2)
    with pytest.raises(ValueError, match="init"):
        kmeans(x, 2, init=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="backend"):
        kmeans(x, 2, backend="sklearn")
    with pytest.raises(ValueError, match="NaN"):
        kmeans(torch.full((4, 2), float("nan")), 2)
