"""Image <-> text retrieval: recall@k in both directions, several captions per image.

Image -> text: an image is a hit at k when at least one of its captions is among the k
captions most similar to it. Text -> image: a caption is a hit at k when its image is among the
k most similar images. Equal scores count as in a random order (the exact expectation, not a
sample): a collapsed model whose embeddings are all equal scores chance, not a perfect 1.0, and a
caption duplicated under another image (template-made captions often are) competes as a coin
toss rather than as a certain loss or win.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import datasets
import numpy as np
import torch

from mmcl.eval._checks import positive_int
from mmcl.eval.embed import embed_images, embed_texts

__all__ = ["recall_at_k", "retrieval_ranks", "hit_probability", "Ranks", "flatten_captions", "evaluate"]


def _check_similarity(similarity, text_to_image):
    if isinstance(similarity, np.ndarray):
        similarity = torch.from_numpy(similarity)
    if not isinstance(similarity, torch.Tensor) or not similarity.is_floating_point():
        raise TypeError("similarity must be a floating-point tensor (num_images, num_texts)")
    if similarity.dim() != 2 or 0 in similarity.shape:
        raise ValueError(
            f"similarity must be a non-empty (num_images, num_texts) matrix, got {tuple(similarity.shape)}"
        )
    if torch.isnan(similarity).any():
        raise ValueError("similarity contains NaN")
    t2i = torch.as_tensor(np.asarray(text_to_image) if not isinstance(text_to_image, torch.Tensor) else text_to_image)
    if t2i.is_floating_point() or t2i.dim() != 1:
        raise ValueError("text_to_image must be a 1-D integer sequence: the image index of each text")
    n_img, n_txt = similarity.shape
    if t2i.numel() != n_txt:
        raise ValueError(f"text_to_image has {t2i.numel()} entries but similarity has {n_txt} text columns")
    t2i = t2i.long().to(similarity.device)
    if t2i.min() < 0 or t2i.max() >= n_img:
        raise ValueError(f"text_to_image values must be image indices in [0, {n_img})")
    captioned = torch.zeros(n_img, dtype=torch.bool, device=similarity.device)
    captioned[t2i] = True
    if not captioned.all():
        missing = (~captioned).nonzero().flatten()[:5].tolist()
        raise ValueError(f"every image needs at least one caption; images without one include {missing}")
    return similarity, t2i


class Ranks(NamedTuple):
    """Where the first correct item lands for each query, as counts of competing items.

    above: wrong items scoring strictly higher than the best correct one; tied_wrong: wrong items
    scoring exactly the same; tied_right: correct items at that same best score (>= 1).
    """

    above: torch.Tensor
    tied_wrong: torch.Tensor
    tied_right: torch.Tensor


def retrieval_ranks(similarity, text_to_image, *, block: int = 1024) -> tuple[Ranks, Ranks]:
    """Rank counts for image->text (I queries) and text->image (T queries).

    Args:
        similarity: (I, T) scores, row i = image i, column j = text j.
        text_to_image: (T,) the image index each text describes.
        block: rows/columns processed at a time (bounds extra memory at block x T or I x block).

    Returns:
        (image_ranks, text_ranks): `Ranks` of (I,) and (T,) long tensors on CPU.
    """
    sim, t2i = _check_similarity(similarity, text_to_image)
    n_img, n_txt = sim.shape
    block = positive_int("block", block)
    img = ([], [], [])
    for start in range(0, n_img, block):
        rows = sim[start : start + block]
        right = t2i[None, :] == torch.arange(start, start + rows.shape[0], device=sim.device)[:, None]
        best = rows.masked_fill(~right, float("-inf")).max(dim=1, keepdim=True).values
        for out, mask in zip(img, ((rows > best) & ~right, (rows == best) & ~right, (rows == best) & right)):
            out.append(mask.sum(dim=1))
    txt = ([], [], [])
    for start in range(0, n_txt, block):
        cols = torch.arange(start, min(start + block, n_txt), device=sim.device)
        scores = sim[:, cols]  # (I, b)
        right = torch.arange(n_img, device=sim.device)[:, None] == t2i[cols][None, :]
        own = scores[t2i[cols], torch.arange(cols.numel(), device=sim.device)][None, :]
        for out, mask in zip(txt, ((scores > own) & ~right, (scores == own) & ~right, right)):
            out.append(mask.sum(dim=0))
    return (Ranks(*(torch.cat(x).cpu() for x in img)), Ranks(*(torch.cat(x).cpu() for x in txt)))


def hit_probability(ranks: Ranks, k: int, ties: str = "random") -> torch.Tensor:
    """(N,) float64 probability that some correct item is in the top k of each query.

    ties="random": averaged over a uniformly random order of equal scores (exact, not sampled);
    "pessimistic": every tied wrong item ranks first; "optimistic": the correct item ranks first.
    """
    above, tied_wrong, tied_right = (x.double() for x in ranks)
    if ties == "optimistic":
        return (above < k).double()
    if ties == "pessimistic":
        return (above + tied_wrong < k).double()
    if ties != "random":
        raise ValueError(f"ties must be 'random', 'pessimistic' or 'optimistic', got {ties!r}")
    # m = tied slots left inside the top k. The first correct item among the tied ones falls outside
    # them only if all m go to wrong items: probability C(w, m) / C(w + r, m), hypergeometric.
    m = (k - above).clamp(min=0)
    lg = torch.lgamma
    m_ok = torch.minimum(m, tied_wrong)  # keeps lgamma's arguments valid where the miss chance is 0
    log_all_wrong = (lg(tied_wrong + 1) - lg(tied_wrong - m_ok + 1)
                     - lg(tied_wrong + tied_right + 1) + lg(tied_wrong + tied_right - m_ok + 1))
    miss = torch.where(m > tied_wrong, torch.zeros_like(m), log_all_wrong.exp())
    return torch.where(m <= 0, torch.zeros_like(m), 1.0 - miss)


def recall_at_k(similarity, text_to_image, ks: Sequence[int] = (1, 5, 10), *, ties: str = "random") -> dict:
    """Recall@k for image->text and text->image from an (I, T) similarity matrix.

    `text_to_image` (T,) gives the image index of each caption (an image may have several).
    Equal scores are resolved by `ties` (see `hit_probability`); the default, the expectation over
    a random order, neither rewards a collapsed model nor punishes duplicate captions.
    Returns {"image_to_text_R@k": ..., "text_to_image_R@k": ... for k in ks, "mean_recall": ...},
    each in [0, 1]; "mean_recall" is the mean of all the others.
    """
    ks = [positive_int("k", k) for k in ks]
    if not ks:
        raise ValueError("ks is empty")
    if ties not in ("random", "pessimistic", "optimistic"):
        raise ValueError(f"ties must be 'random', 'pessimistic' or 'optimistic', got {ties!r}")
    image_ranks, text_ranks = retrieval_ranks(similarity, text_to_image)
    out = {}
    for name, ranks in (("image_to_text", image_ranks), ("text_to_image", text_ranks)):
        for k in ks:
            out[f"{name}_R@{k}"] = hit_probability(ranks, k, ties).mean().item()
    out["mean_recall"] = float(np.mean(list(out.values())))
    return out


def flatten_captions(captions, column: str = "captions") -> tuple[list[str], list[int]]:
    """Per-image captions (a string or a list of strings each) -> (flat texts, image index per text)."""
    texts, owner = [], []
    for i, entry in enumerate(captions):
        items = [entry] if isinstance(entry, str) else entry
        if not isinstance(items, (list, tuple)) or not items or not all(isinstance(t, str) for t in items):
            raise ValueError(
                f"row {i} of caption column {column!r} must be a non-empty string or list of strings, got {entry!r}"
            )
        texts.extend(items)
        owner.extend([i] * len(items))
    return texts, owner


def evaluate(
    model,
    dataset,
    image_column: str = "image",
    caption_column: str = "captions",
    *,
    ks: Sequence[int] = (1, 5, 10),
    ties: str = "random",
    batch_size: int = 64,
    progress: bool = True,
    return_similarity: bool = False,
) -> dict:
    """Image<->text recall@k of `model` on a `datasets.Dataset` with one image and one or more captions per row.

    Returns the dict of `recall_at_k` plus "num_images" and "num_texts"; with `return_similarity`,
    also "similarity" (I, T) float32 and "text_to_image" (T,) for plotting.
    """
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"dataset must be a datasets.Dataset, got {type(dataset).__name__}")
    for arg, col in (("image_column", image_column), ("caption_column", caption_column)):
        if col not in dataset.column_names:
            raise ValueError(f"{arg} {col!r} is not in the dataset; columns: {dataset.column_names}")
    if len(dataset) == 0:
        raise ValueError("dataset is empty")
    texts, owner = flatten_captions(dataset[caption_column], caption_column)
    image_embeds = embed_images(model, dataset, image_column=image_column, batch_size=batch_size, progress=progress)
    # Each distinct caption is embedded once: template-made captions repeat a lot, and identical
    # texts then get identical embeddings, i.e. exact ties rather than padding-dependent noise.
    unique = list(dict.fromkeys(texts))
    position = {t: i for i, t in enumerate(unique)}
    unique_embeds = embed_texts(model, unique, batch_size=4 * batch_size, progress=progress)
    text_embeds = unique_embeds[torch.tensor([position[t] for t in texts])]
    similarity = image_embeds @ text_embeds.T
    result = recall_at_k(similarity, owner, ks, ties=ties)
    result.update(num_images=len(dataset), num_texts=len(texts))
    if return_similarity:
        result.update(similarity=similarity, text_to_image=torch.tensor(owner))
    return result
