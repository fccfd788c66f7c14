"""Linear probe: a logistic-regression classifier trained on frozen features.

The standard second opinion on a representation after kNN (CLIP, SimCLR and MoCo all report it):
the encoder stays fixed and only a linear map from features to classes is fitted, here with
scikit-learn's L-BFGS `LogisticRegression`.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from mmcl.eval._checks import as_features, as_labels, positive_float, positive_int, same_dim

__all__ = ["fit_linear_probe", "linear_probe_predict", "linear_probe"]


def _numpy_features(name: str, x, normalize: bool) -> np.ndarray:
    t = as_features(name, x).detach().cpu()
    if normalize:
        t = F.normalize(t, dim=1)
    return t.numpy()


def fit_linear_probe(train_features, train_labels, *, C: float = 1.0, max_iter: int = 1000, normalize: bool = True):
    """Fit and return a scikit-learn `LogisticRegression` on (N, D) features and (N,) integer labels.

    `C` is the inverse L2 penalty (scikit-learn's meaning); `normalize` L2-normalises rows first,
    which puts every model's features on one scale so a single `C` is a sensible default.
    """
    x = _numpy_features("train_features", train_features, normalize)
    y = as_labels("train_labels", train_labels, x.shape[0]).cpu().numpy()
    if np.unique(y).size < 2:
        raise ValueError("train_labels must contain at least two classes to fit a linear probe")
    clf = LogisticRegression(
        C=positive_float("C", C), max_iter=positive_int("max_iter", max_iter), random_state=0
    )
    return clf.fit(x, y)


def linear_probe_predict(
    train_features, train_labels, test_features, *, C: float = 1.0, max_iter: int = 1000, normalize: bool = True
) -> torch.Tensor:
    """Fit on (N, D) train features / (N,) labels and return (M,) predicted labels for (M, D) test features."""
    test = as_features("test_features", test_features)
    train = as_features("train_features", train_features)
    same_dim("train_features", train, "test_features", test)
    clf = fit_linear_probe(train, train_labels, C=C, max_iter=max_iter, normalize=normalize)
    return torch.from_numpy(clf.predict(_numpy_features("test_features", test, normalize))).long()


def linear_probe(
    train_features,
    train_labels,
    test_features,
    test_labels,
    *,
    C: float = 1.0,
    max_iter: int = 1000,
    normalize: bool = True,
) -> float:
    """Top-1 accuracy in [0, 1] of a logistic-regression probe.

    Shapes: train_features (N, D), train_labels (N,), test_features (M, D), test_labels (M,).
    """
    test = as_features("test_features", test_features)
    truth = as_labels("test_labels", test_labels, test.shape[0]).cpu()
    predicted = linear_probe_predict(
        train_features, train_labels, test, C=C, max_iter=max_iter, normalize=normalize
    )
    return (predicted == truth).double().mean().item()
