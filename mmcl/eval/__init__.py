"""Evaluation of learned representations: zero-shot classification (`mmcl.eval.zeroshot`),
image<->text retrieval (`mmcl.eval.retrieval`), kNN and linear probes on frozen features,
embedding helpers, and plots. The training loop's periodic evaluation calls these.
"""
from mmcl.eval.embed import embed_images, embed_texts, load_image
from mmcl.eval.knn import knn_accuracy, knn_predict
from mmcl.eval.plots import confusion_matrix, plot_confusion_matrix, plot_similarity
from mmcl.eval.probe import fit_linear_probe, linear_probe, linear_probe_predict

__all__ = [
    "knn_accuracy",
    "knn_predict",
    "linear_probe",
    "linear_probe_predict",
    "fit_linear_probe",
    "embed_images",
    "embed_texts",
    "load_image",
    "confusion_matrix",
    "plot_confusion_matrix",
    "plot_similarity",
]
