"""Contrastive losses: CLIP's symmetric InfoNCE, SigLIP's pairwise sigmoid loss, InfoNCE with a
MoCo queue, SimCLR's NT-Xent and supervised contrastive (SupCon).

Every loss takes features as given (normalise them first for cosine similarities; the towers'
`encode_*` do by default) and returns a scalar tensor. Each has one plain-torch reference that
materialises the logits (`impl="naive"`); the large-negative paths (`"chunked"` in torch,
`"triton"` on GPUs) compute only row/column logsumexps of `scale * Q @ K.T` and the positive
logits, so nothing of size B×N is stored. `impl="auto"` follows `resolve_impl`.

With `gather=True` (clip_loss, siglip_loss, nt_xent, supcon_loss) a loss is that of the global batch, but each
rank computes only its own rows against all ranks' columns: B_local × B_global logits per rank
(4 passes over them, with or without local_loss). Besides the gathered column features, only
O(B_global) column statistics and those features' gradients (reduce-scattered to their owners)
cross ranks.

info_nce, nt_xent and clip_loss also take `hard_negative_beta` / `debias_tau_plus` (HCL's
reweighted, DCL's debiased negatives) and `mix_partner` / `mix_lambda` (i-Mix's soft targets);
their per-row terms live in `mmcl.losses.options`, on every path and under gather.

The modules: `_common` (validators, `resolve_impl`, dispatch), `clip`, `siglip`, `ssl` (info_nce,
nt_xent), `supcon`, `scale` (LogitScale) and `options` (the options' per-row terms).
"""
from mmcl.losses._common import AUTO_CHUNKED_MIN_LOGITS, AUTO_NAIVE_MAX_LOGIT_BYTES, IMPLS, resolve_impl  # noqa: F401
from mmcl.losses.clip import clip_loss
from mmcl.losses.scale import LogitScale
from mmcl.losses.siglip import siglip_loss
from mmcl.losses.ssl import info_nce, nt_xent
from mmcl.losses.supcon import supcon_loss

__all__ = ["clip_loss", "siglip_loss", "info_nce", "nt_xent", "supcon_loss", "LogitScale", "resolve_impl", "IMPLS"]
