"""Image <-> text retrieval: recall@k in both directions, several captions per image.

Image -> text: an image is a hit at k when at least one of its captions is among the k
captions most similar to it. Text -> image: a caption is a hit at k when its image is among the
k most similar images. Ties are counted against the model (an equal-scoring wrong item ranks
ahead of the right one), so a collapsed model whose embeddings are all equal scores
recall@k = k / N rather than a perfect 1.0.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from mmcl.eval._checks import positive_int
from mmcl.eval.embed import embed_images, embed_texts

__all__ = ["recall_at_k", "retrieval_ranks", "flatten_captions", "evaluate"]


def _check_similarity(similarity, text_to_image):
    if isinstance(similarity, np.ndarray):
        similarity = torch.from_numpy(similarity)
    if not isinstance(similarity, torch.Tensor) or not similarity.is_floating_point():
        raise TypeError("similarity must be a floating-point tensor (num_images, num_texts)")
    if similarity.dim() != 2 or 0 in similarity.shape:
        raise ValueError(f"similarity must be a non-empty (num_images, num_texts) matrix, got {tuple(similarity.shape)}")
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


def retrieval_ranks(similarity, text_to_image, *, block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based ranks of the first correct item, counting ties pessimistically.

    Args:
        similarity: (I, T) scores, row i = image i, column j = text j.
        text_to_image: (T,) the image index each text describes.
        block: rows processed at a time (bounds extra memory at block x T).

    Returns:
        (image_ranks (I,), text_ranks (T,)): image_ranks[i] = number of wrong captions scoring >= the
        best correct caption of image i; text_ranks[j] = number of other images scoring >= image
        text_to_image[j] on text j.
    """
    sim, t2i = _check_similarity(similarity, text_to_image)
    n_img, n_txt = sim.shape
    block = positive_int("block", block)
    image_ranks = []
    for start in range(0, n_img, block):
        rows = sim[start : start + block]
        correct = t2i[None, :] == torch.arange(start, start + rows.shape[0], device=sim.device)[:, None]
        best = rows.masked_fill(~correct, float("-inf")).max(dim=1, keepdim=True).values
        image_ranks.append(((rows >= best) & ~correct).sum(dim=1))
    cols = torch.arange(n_txt, device=sim.device)
    text_ranks = []
    for start in range(0, n_txt, block):
        c = cols[start : start + block]
        scores = sim[:, c]  # (I, b)
        own = scores[t2i[c], torch.arange(c.numel(), device=sim.device)]
        # Every image scoring >= the right one, minus the right one itself.
        text_ranks.append((scores >= own[None, :]).sum(dim=0) - 1)
    return torch.cat(image_ranks).cpu(), torch.cat(text_ranks).cpu()


def recall_at_k(similarity, text_to_image, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Recall@k for image->text and text->image from an (I, T) similarity matrix.

    `text_to_image` (T,) gives the image index of each caption (an image may have several).
    Returns {"image_to_text_R@k": ..., "text_to_image_R@k": ... for k in ks, "mean_recall": ...},
    each in [0, 1]; "mean_recall" averages all of them (the "rsum" of the retrieval literature / 2|ks|).
    """
    ks = [positive_int("k", k) for k in ks]
    if not ks:
        raise ValueError("ks is empty")
    image_ranks, text_ranks = retrieval_ranks(similarity, text_to_image)
    out = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = (image_ranks < k).double().mean().item()
    for k in ks:
        out[f"text_to_image_R@{k}"] = (text_ranks < k).double().mean().item()
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
    batch_size: int = 64,
    progress: bool = True,
    return_similarity: bool = False,
) -> dict:
    """Image<->text recall@k of `model` on a `datasets.Dataset` with one image and one or more captions per row.

    Returns the dict of `recall_at_k` plus "num_images" and "num_texts"; with `return_similarity`,
    also "similarity" (I, T) float32 and "text_to_image" (T,) for plotting.
    """
    import datasets

    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"dataset must be a datasets.Dataset, got {type(dataset).__name__}")
    for arg, col in (("image_column", image_column), ("caption_column", caption_column)):
        if col not in dataset.column_names:
            raise ValueError(f"{arg} {col!r} is not in the dataset; columns: {dataset.column_names}")
    if len(dataset) == 0:
        raise ValueError("dataset is empty")
    texts, owner = flatten_captions(dataset[caption_column], caption_column)
    image_embeds = embed_images(model, dataset, image_column=image_column, batch_size=batch_size, progress=progress)
    text_embeds = embed_texts(model, texts, batch_size=4 * batch_size, progress=progress)
    similarity = image_embeds @ text_embeds.T
    result = recall_at_k(similarity, owner, ks)
    result.update(num_images=len(dataset), num_texts=len(texts))
    if return_similarity:
        result.update(similarity=similarity, text_to_image=torch.tensor(owner))
    return result
