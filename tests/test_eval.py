"""kNN and linear probes against scikit-learn on the same features; confusion-matrix plot."""
import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier

from mmcl.eval import confusion_matrix, knn_accuracy, knn_predict, linear_probe, plot_confusion_matrix


def _clustered(n, d, labels, rng, spread=1.5):
    """Features near one random centre per class, so neighbours carry signal but classes overlap."""
    centres = {c: rng.standard_normal(d) for c in sorted(set(labels))}
    return np.stack([centres[c] + spread * rng.standard_normal(d) for c in labels])


@pytest.mark.parametrize(
    "n_train, n_test, dim, k, temperature", [(97, 31, 48, 7, 0.1), (53, 11, 32, 53, 0.07), (200, 17, 5, 1, 0.5)]
)
def test_knn_matches_sklearn_weighted_vote(n_train, n_test, dim, k, temperature):
    rng = np.random.default_rng(n_train)
    classes = np.array([3, 7, 11, 20, 42])  # non-contiguous labels
    y_train = rng.choice(classes, n_train)
    y_test = rng.choice(classes, n_test)
    x_train = _clustered(n_train, dim, list(y_train) + list(y_test), rng)[:n_train]
    x_test = _clustered(n_test, dim, y_test, rng)
    # scikit-learn's cosine distance is 1 - cos, so this weight is exactly exp(cos / T).
    ref = KNeighborsClassifier(
        n_neighbors=k, metric="cosine", algorithm="brute", weights=lambda d: np.exp((1.0 - d) / temperature)
    ).fit(x_train, y_train)
    expected = ref.predict(x_test)
    got = knn_predict(torch.from_numpy(x_train), torch.from_numpy(y_train), torch.from_numpy(x_test),
                      k=k, temperature=temperature, batch_size=6)
    np.testing.assert_array_equal(got.numpy(), expected)
    acc = knn_accuracy(x_train, y_train, x_test, y_test, k=k, temperature=temperature)
    assert acc == pytest.approx(float(np.mean(expected == y_test)))


def test_knn_against_float64_formula_without_normalisation():
    rng = np.random.default_rng(1)
    x_train = rng.standard_normal((41, 9)) * rng.uniform(0.2, 3.0, (41, 1))
    y_train = rng.integers(0, 4, 41)
    x_test = rng.standard_normal((13, 9))
    k, temperature = 10, 0.3
    expected = []
    for q in x_test:  # the InstDisc vote written out: top-k by dot product, sum exp(sim/T) per class
        sim = x_train @ q
        top = np.argsort(-sim)[:k]
        votes = np.zeros(4)
        for j in top:
            votes[y_train[j]] += np.exp(sim[j] / temperature)
        expected.append(np.argmax(votes))
    got = knn_predict(torch.from_numpy(x_train).float(), y_train, torch.from_numpy(x_test).float(),
                      k=k, temperature=temperature, normalize=False)
    np.testing.assert_array_equal(got.numpy(), np.array(expected))


def test_knn_caps_k_at_the_bank_size():
    rng = np.random.default_rng(2)
    x_train, y_train, x_test = rng.standard_normal((23, 6)), rng.integers(0, 3, 23), rng.standard_normal((9, 6))
    capped = knn_predict(x_train, y_train, x_test, k=200)
    exact = knn_predict(x_train, y_train, x_test, k=23)
    assert torch.equal(capped, exact)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"test_features": np.zeros((3, 5))}, ValueError, "same feature dim"),
        ({"train_labels": np.zeros(9, dtype=int)}, ValueError, "has 9 labels but the features have 10"),
        ({"train_labels": np.zeros(10)}, TypeError, "integer labels"),
        ({"k": 0}, ValueError, "k must be a positive integer"),
        ({"temperature": 0.0}, ValueError, "temperature must be a positive number"),
        ({"train_features": np.full((10, 4), np.nan)}, ValueError, "NaN"),
        ({"train_features": [[1.0] * 4] * 10}, TypeError, "train_features must be a torch.Tensor"),
    ],
)
def test_knn_bad_input_is_named(kwargs, error, match):
    args = dict(train_features=np.ones((10, 4)), train_labels=np.arange(10), test_features=np.ones((3, 4)))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        knn_predict(**args)


def test_linear_probe_matches_sklearn_on_digits():
    # The 64 pixel values of scikit-learn's real digits stand in for frozen features.
    digits = load_digits()
    x, y = digits.data.astype(np.float32), digits.target
    perm = np.random.default_rng(0).permutation(len(y))
    train, test = perm[:1200], perm[1200:]
    got = linear_probe(x[train], y[train], x[test], y[test], C=2.0, max_iter=500)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    ref = LogisticRegression(C=2.0, max_iter=500, random_state=0).fit(xn[train], y[train])
    assert got == pytest.approx(ref.score(xn[test], y[test]), abs=1e-12)
    assert got > 0.9  # digits are linearly separable to well above chance (0.1)


def test_linear_probe_bad_input_is_named():
    x = np.random.default_rng(0).standard_normal((8, 3))
    with pytest.raises(ValueError, match="at least two classes"):
        linear_probe(x, np.zeros(8, dtype=int), x, np.zeros(8, dtype=int))
    with pytest.raises(ValueError, match="C must be a positive number"):
        linear_probe(x, np.arange(8) % 2, x, np.arange(8) % 2, C=-1.0)


def test_confusion_plot_counts_and_file(tmp_path):
    from sklearn.metrics import confusion_matrix as sk_confusion

    rng = np.random.default_rng(4)
    labels, preds = rng.integers(0, 7, 60), rng.integers(0, 7, 60)
    names = [f"class {i}" for i in range(7)]
    out = tmp_path / "cm.png"
    counts = plot_confusion_matrix(labels, preds, names, out, title="test")
    np.testing.assert_array_equal(counts, sk_confusion(labels, preds, labels=range(7)))
    np.testing.assert_array_equal(confusion_matrix(labels, preds, 7), counts)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="does not exist"):
        plot_confusion_matrix(labels, preds, names, tmp_path / "missing" / "cm.png")


def test_faiss_index_matches_brute_force(tmp_path):
    pytest.importorskip("faiss", reason="the optional embedding index needs faiss-cpu")
    from mmcl.search import EmbeddingIndex, build_index

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(503, 48, generator=gen) * torch.rand(503, 1, generator=gen)  # rows of unequal norm
    queries = torch.randn(9, 48, generator=gen)
    cos = torch.nn.functional.normalize(queries.double(), dim=1) @ torch.nn.functional.normalize(base.double(), dim=1).T
    expected = cos.topk(7, dim=1)
    ids = [f"row{i}" for i in range(503)]
    flat = build_index(base, ids)
    scores, found = flat.search(queries, k=7)
    assert found == [[ids[j] for j in row] for row in expected.indices.tolist()]
    torch.testing.assert_close(scores.double(), expected.values, atol=1e-5, rtol=0)
    # IVF scanning every list is exhaustive, so it must agree with the exact search too.
    ivf = build_index(base, ids, kind="ivf", nlist=11)
    assert ivf.search(queries, k=7, nprobe=11)[1] == found
    ivf.save(tmp_path / "ivf")
    loaded = EmbeddingIndex.load(tmp_path / "ivf")
    assert loaded.search(queries, k=7, nprobe=11)[1] == found and len(loaded) == 503
    assert len(flat.search(queries[:1], k=10_000)[1][0]) == 503  # k capped at the index size


def test_faiss_index_bad_input_is_named(tmp_path):
    pytest.importorskip("faiss", reason="the optional embedding index needs faiss-cpu")
    from mmcl.search import EmbeddingIndex, build_index

    x = torch.randn(50, 8)
    with pytest.raises(ValueError, match="ids has 3 entries but embeddings has 50 rows"):
        build_index(x, ["a", "b", "c"])
    with pytest.raises(ValueError, match="kind must be one of"):
        build_index(x, kind="hnsw")
    with pytest.raises(ValueError, match="queries have dim 4 but the index holds dim 8"):
        build_index(x).search(torch.randn(2, 4))
    with pytest.raises(ValueError, match="is not an mmcl embedding index"):
        EmbeddingIndex.load(tmp_path)
