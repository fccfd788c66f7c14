"""Weighted k-nearest-neighbour classification on frozen features.

This is the monitor of InstDisc (Wu et al., 2018) that MoCo and many self-supervised codebases
print during training: cosine similarities to a labelled bank of training features, the k most
similar vote for their class with weight exp(sim / T), and the class with the largest summed
weight wins. It needs no training, so it is cheap enough to run every epoch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmcl.eval._checks import as_features, as_labels, positive_float, positive_int, same_dim

__all__ = ["knn_predict", "knn_accuracy"]


def knn_predict(
    train_features,
    train_labels,
    test_features,
    k: int = 200,
    temperature: float = 0.1,
    *,
    normalize: bool = True,
    batch_size: int = 1024,
) -> torch.Tensor:
    """Predict a label for each test row by temperature-weighted votes of its k nearest train rows.

    Args:
        train_features: (N, D) tensor or array, the labelled bank.
        train_labels: (N,) integer labels (any integers; they need not be 0..C-1).
        test_features: (M, D) tensor or array.
        k: neighbours per query; capped at N when the bank is smaller.
        temperature: T in the vote weight exp(cos / T).
        normalize: L2-normalise both sides first, so the similarity is the cosine.
        batch_size: test rows per similarity block; bounds memory at batch_size x N.

    Returns:
        (M,) long tensor of predicted labels, taken from `train_labels`' values. Ties in the summed
        vote go to the smaller label.
    """
    train = as_features("train_features", train_features)
    test = as_features("test_features", test_features)
    same_dim("train_features", train, "test_features", test)
    labels = as_labels("train_labels", train_labels, train.shape[0]).to(train.device)
    k = positive_int("k", k)
    temperature = positive_float("temperature", temperature)
    batch_size = positive_int("batch_size", batch_size)
    test = test.to(device=train.device, dtype=train.dtype)
    if normalize:
        train, test = F.normalize(train, dim=1), F.normalize(test, dim=1)

    # Votes are summed per class index; unique() is sorted, so argmax ties favour the smaller label.
    classes, class_index = torch.unique(labels, return_inverse=True)
    k = min(k, train.shape[0])
    predictions = []
    for block in test.split(batch_size):
        top_sim, top_idx = (block @ train.T).topk(k, dim=1)
        # Shifting by each row's best similarity leaves the argmax unchanged and keeps exp() finite
        # for any T and any feature scale (the unshifted exp(1/0.01) would already overflow fp16).
        weights = ((top_sim - top_sim[:, :1]) / temperature).exp()
        votes = torch.zeros(block.shape[0], classes.numel(), dtype=weights.dtype, device=weights.device)
        votes.scatter_add_(1, class_index[top_idx], weights)
        predictions.append(classes[votes.argmax(dim=1)])
    return torch.cat(predictions)


def knn_accuracy(
    train_features,
    train_labels,
    test_features,
    test_labels,
    k: int = 200,
    temperature: float = 0.1,
    *,
    normalize: bool = True,
    batch_size: int = 1024,
) -> float:
    """Top-1 accuracy in [0, 1] of `knn_predict` on (M, D) test features with (M,) labels.

    Shapes: train_features (N, D), train_labels (N,), test_features (M, D), test_labels (M,).
    """
    test = as_features("test_features", test_features)
    truth = as_labels("test_labels", test_labels, test.shape[0])
    predicted = knn_predict(
        train_features, train_labels, test, k, temperature, normalize=normalize, batch_size=batch_size
    )
    return (predicted.cpu() == truth.cpu()).double().mean().item()
