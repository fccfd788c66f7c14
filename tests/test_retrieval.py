"""Retrieval recall@k: constructed similarity matrices whose ranks are known by construction."""
import itertools
import math
import random

import pytest
import torch

from mmcl.retrieval import flatten_captions, recall_at_k, retrieval_ranks


def _owners(captions_per_image):
    return [i for i, n in enumerate(captions_per_image) for _ in range(n)]


def _rows_with_ranks(owner, ranks, rng):
    """(I, T) similarity where image i's best caption has exactly ranks[i] wrong captions above it."""
    n_img, n_txt = len(ranks), len(owner)
    sim = torch.empty(n_img, n_txt, dtype=torch.float64)
    for i, r in enumerate(ranks):
        right = [j for j in range(n_txt) if owner[j] == i]
        wrong = [j for j in range(n_txt) if owner[j] != i]
        rng.shuffle(right)
        rng.shuffle(wrong)
        rest = right[1:] + wrong[r:]
        rng.shuffle(rest)
        order = wrong[:r] + right[:1] + rest  # best first
        sim[i, order] = torch.linspace(1.0, -1.0, n_txt, dtype=torch.float64)
    return sim


def _columns_with_ranks(owner, n_img, ranks, rng):
    """(I, T) similarity where text j's image has exactly ranks[j] other images above it."""
    sim = torch.empty(n_img, len(owner), dtype=torch.float32)
    for j, r in enumerate(ranks):
        others = [i for i in range(n_img) if i != owner[j]]
        rng.shuffle(others)
        order = others[:r] + [owner[j]] + others[r:]
        sim[order, j] = torch.linspace(0.9, -0.3, n_img)
    return sim


@pytest.mark.parametrize("captions_per_image", [[1] * 13, [5, 1, 3, 2, 5, 4, 1, 5, 2, 3, 1, 5, 2, 4, 3, 1, 2]])
def test_image_to_text_recall_matches_construction(captions_per_image):
    rng = random.Random(len(captions_per_image))
    owner = _owners(captions_per_image)
    n_wrong = [len(owner) - n for n in captions_per_image]
    # Ranks straddling every k boundary: 0, k-1, k, and far down the list.
    pool = [0, 1, 4, 5, 9, 10, 11]
    ranks = [min(rng.choice(pool), w) for w in n_wrong]
    sim = _rows_with_ranks(owner, ranks, rng)
    image_ranks, _ = retrieval_ranks(sim, owner, block=4)  # several blocks, the last one partial
    assert image_ranks.above.tolist() == ranks
    assert image_ranks.tied_wrong.sum() == 0 and (image_ranks.tied_right == 1).all()
    out = recall_at_k(sim, owner, ks=(1, 5, 10))
    for k in (1, 5, 10):
        expected = sum(r < k for r in ranks) / len(ranks)
        assert out[f"image_to_text_R@{k}"] == pytest.approx(expected, abs=1e-12), k


def test_text_to_image_recall_matches_construction():
    rng = random.Random(3)
    captions_per_image = [2, 5, 1, 3, 4, 1, 2, 5, 3, 1, 2, 2, 4]
    owner = _owners(captions_per_image)
    n_img = len(captions_per_image)
    ranks = [rng.choice([0, 0, 1, 4, 5, 9, 10, n_img - 1]) for _ in owner]
    sim = _columns_with_ranks(owner, n_img, ranks, rng)
    _, text_ranks = retrieval_ranks(sim, torch.tensor(owner), block=7)
    assert text_ranks.above.tolist() == ranks
    out = recall_at_k(sim, owner, ks=(1, 3, 5, 10))
    for k in (1, 3, 5, 10):
        assert out[f"text_to_image_R@{k}"] == pytest.approx(sum(r < k for r in ranks) / len(ranks), abs=1e-12)
    assert out["mean_recall"] == pytest.approx(sum(v for key, v in out.items() if "@" in key) / 8)


def _recall_over_all_tie_orders(sim, owner, k):
    """Exact expected recall@k when equal scores are ordered uniformly at random, by enumerating
    every tie-breaking permutation (sort by score, then by the permutation)."""
    n_img, n_txt = len(sim), len(sim[0])
    i2t = []
    for i in range(n_img):
        hits = [any(owner[j] == i for j in sorted(range(n_txt), key=lambda j: (-sim[i][j], perm[j]))[:k])
                for perm in itertools.permutations(range(n_txt))]
        i2t.append(sum(hits) / len(hits))
    t2i = []
    for j in range(n_txt):
        hits = [owner[j] in sorted(range(n_img), key=lambda i: (-sim[i][j], perm[i]))[:k]
                for perm in itertools.permutations(range(n_img))]
        t2i.append(sum(hits) / len(hits))
    return sum(i2t) / n_img, sum(t2i) / n_txt


@pytest.mark.parametrize("seed", [0, 1])
def test_ties_count_as_a_random_order(seed):
    # Scores from a 3-value set: many ties, between right and wrong items alike (duplicate captions).
    gen = torch.Generator().manual_seed(seed)
    owner = [0, 0, 1, 2, 2, 3, 1]
    sim = torch.randint(0, 3, (4, 7), generator=gen).double() / 2
    got = recall_at_k(sim, owner, ks=(1, 2, 3, 5))
    for k in (1, 2, 3, 5):
        i2t, t2i = _recall_over_all_tie_orders(sim.tolist(), owner, k)
        assert got[f"image_to_text_R@{k}"] == pytest.approx(i2t, abs=1e-9), k
        assert got[f"text_to_image_R@{k}"] == pytest.approx(t2i, abs=1e-9), k


def test_collapsed_model_scores_chance_not_perfect():
    captions_per_image = [1, 2, 3, 1, 1, 2]
    owner = _owners(captions_per_image)
    sim = torch.zeros(len(captions_per_image), len(owner))
    n_txt, n_img = len(owner), len(captions_per_image)
    random_ties = recall_at_k(sim, owner, ks=(1, 5))
    pessimistic = recall_at_k(sim, owner, ks=(1, 5), ties="pessimistic")
    optimistic = recall_at_k(sim, owner, ks=(1, 5), ties="optimistic")
    for k in (1, 5):
        # Chance: a text's own image is among k random picks of n_img with probability k / n_img.
        assert random_ties[f"text_to_image_R@{k}"] == pytest.approx(min(k, n_img) / n_img)
        # An image misses only if its k random picks from the captions are all someone else's.
        miss = [math.comb(n_txt - n, k) / math.comb(n_txt, k) for n in captions_per_image]
        assert random_ties[f"image_to_text_R@{k}"] == pytest.approx(1 - sum(miss) / n_img)
        assert pessimistic[f"image_to_text_R@{k}"] == pytest.approx(
            sum((n_txt - n) < k for n in captions_per_image) / n_img)
        assert pessimistic[f"text_to_image_R@{k}"] == float(n_img - 1 < k)
        assert optimistic[f"image_to_text_R@{k}"] == optimistic[f"text_to_image_R@{k}"] == 1.0


def test_flatten_captions_mixes_strings_and_lists():
    texts, owner = flatten_captions(["one", ["two a", "two b"], ("three",)])
    assert texts == ["one", "two a", "two b", "three"]
    assert owner == [0, 1, 1, 2]


@pytest.mark.parametrize(
    "sim, owner, match",
    [
        (torch.zeros(3, 4), [0, 1, 2], "4 text columns"),
        (torch.zeros(3, 3), [0, 1, 3], r"image indices in \[0, 3\)"),
        (torch.zeros(3, 3), [0, 1, 1], "at least one caption"),
        (torch.full((2, 2), float("nan")), [0, 1], "NaN"),
        (torch.zeros(2, 2, dtype=torch.long), [0, 1], "floating-point"),
    ],
)
def test_bad_input_is_named(sim, owner, match):
    with pytest.raises((ValueError, TypeError), match=match):
        recall_at_k(sim, owner)


def test_bad_captions_are_named():
    with pytest.raises(ValueError, match="row 1 of caption column 'captions'"):
        flatten_captions(["ok", []])
    with pytest.raises(ValueError, match="k must be a positive integer"):
        recall_at_k(torch.eye(3), [0, 1, 2], ks=(0,))
    with pytest.raises(ValueError, match="ties must be"):
        recall_at_k(torch.eye(3), [0, 1, 2], ties="first")


def test_evaluate_with_a_model_and_duplicate_captions(tmp_path):
    import datasets
    from tiny_dual_encoder import build_tiny_vtde, real_images, reference_features

    from mmcl.models import DualEncoder
    from mmcl.retrieval import evaluate

    hf_model, hf_processor = build_tiny_vtde(str(tmp_path / "model"))
    model = DualEncoder.from_pretrained(str(tmp_path / "model"))
    images = real_images(6)
    # Images 0, 1 and 4 share a caption: identical texts must tie exactly, whatever the batching.
    captions = [["a photo of the cat"], ["a photo of the cat", "art of the dog"], ["itap of a car"],
                ["a photo of the dog", "art of the bird", "a bad photo of a ship"], ["a photo of the cat"], ["truck"]]
    ds = datasets.Dataset.from_dict({"image": images, "captions": captions})
    got = evaluate(model, ds, batch_size=4, progress=False, ks=(1, 2, 5))
    texts, owner = flatten_captions(captions)
    # The reference embeds all texts in one batch, where equal texts get equal embeddings.
    sim = reference_features(hf_model, hf_processor, images=images) @ \
        reference_features(hf_model, hf_processor, texts=texts).T
    expected = recall_at_k(sim, owner, ks=(1, 2, 5))
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    assert (got["num_images"], got["num_texts"]) == (6, len(texts))


def test_old_module_names_are_the_eval_modules():
    """mmcl.retrieval and mmcl.zeroshot stay importable: the same objects as mmcl.eval's modules."""
    import mmcl.eval.retrieval
    import mmcl.eval.zeroshot
    import mmcl.retrieval
    import mmcl.zeroshot

    for old, new in ((mmcl.retrieval, mmcl.eval.retrieval), (mmcl.zeroshot, mmcl.eval.zeroshot)):
        assert old.__all__ == new.__all__
        for name in new.__all__:
            assert getattr(old, name) is getattr(new, name), name
    assert mmcl.zeroshot.TEMPLATE_SETS is mmcl.eval.zeroshot.TEMPLATE_SETS
    assert mmcl.ZeroShotClassifier is mmcl.eval.zeroshot.ZeroShotClassifier
