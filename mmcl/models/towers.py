"""Towers: one image or text encoder that maps inputs to a pooled feature vector (B, H).

Every tower kind (transformers, timm, torchvision; open_clip in `open_clip_towers.py`) is an
nn.Module with the same small surface, so DualEncoder never asks where a tower came from:

    forward(pixel_values) or forward(input_ids, attention_mask) -> (B, output_dim)
    modality ("image" | "text"), output_dim, spec() (JSON: rebuilds the architecture without
    weights), image_processing() (size/mean/std for a transforms processor), required_size
    ((H, W) the tower insists on, or None), blocks() (the layer list used by lock_*),
    gradient_checkpointing_enable().
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn as nn

from mmcl.models.weights import load_weights_into, read_state_dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POOLINGS = ("auto", "pooler", "cls", "mean")
# Model types whose pooler_output is the representation the model was trained to produce
# (CLIP's post-layernorm CLS / EOS token, DINOv2's normed CLS, CNNs' global average pool).
_POOLER_TYPES = {
    "clip_vision_model", "clip_text_model", "siglip_vision_model", "siglip_text_model", "dinov2",
    "convnext", "convnextv2", "resnet", "regnet", "efficientnet", "swin", "swinv2", "mobilenet_v2",
}


def largest_block_list(module: nn.Module) -> list[nn.Module]:
    """The ModuleList/Sequential holding most of the parameters: a network's stack of layers."""
    best, best_params = [], -1
    for sub in module.modules():
        if isinstance(sub, (nn.ModuleList, nn.Sequential)) and len(sub) >= 2:
            n = sum(p.numel() for p in sub.parameters())
            if n > best_params:
                best, best_params = list(sub), n
    return best


class HFTower(nn.Module):
    """A transformers model (vision or text) pooled by `pooling`: "pooler" (the model's
    pooler_output), "cls" (first token of the last hidden state) or "mean" (mean over tokens,
    masked by the attention mask for text)."""

    kind = "transformers"

    def __init__(self, model, modality: str, pooling: str):
        super().__init__()
        if pooling not in POOLINGS[1:]:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.model = model
        self.modality = modality
        self.pooling = pooling
        cfg = model.config
        self.output_dim = int(getattr(cfg, "hidden_size", None) or cfg.hidden_sizes[-1])
        self.num_channels = int(getattr(cfg, "num_channels", 3))
        self.vocab_size = getattr(cfg, "vocab_size", None)
        self.max_length = getattr(cfg, "max_position_embeddings", None)

    @property
    def required_size(self):
        # Patch-embedding transformers with learnt absolute positions need the trained size;
        # CNNs and DINOv2 (which interpolates its positions) take any size.
        if self.modality != "image" or self.model.config.model_type not in (
            "vit", "deit", "clip_vision_model", "siglip_vision_model", "beit"
        ):
            return None
        size = self.model.config.image_size
        return (size, size) if isinstance(size, int) else tuple(size)

    def forward(self, pixel_values=None, input_ids=None, attention_mask=None) -> torch.Tensor:
        if self.modality == "image":
            out = self.model(pixel_values=pixel_values, return_dict=True)
        else:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        if self.pooling == "pooler":
            return out.pooler_output.flatten(1)
        hidden = out.last_hidden_state
        if hidden.dim() != 3:
            raise ValueError(f"pooling {self.pooling!r} needs a token sequence, but {self.model.config.model_type} "
                             f"returns feature maps {tuple(hidden.shape)}: use pooling 'pooler'")
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.modality == "text" and attention_mask is not None:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return hidden.mean(1)

    def spec(self) -> dict:
        return {"kind": self.kind, "config": self.model.config.to_dict(), "pooling": self.pooling}

    def image_processing(self) -> dict:
        size = getattr(self.model.config, "image_size", 224)
        size = (size, size) if isinstance(size, int) else tuple(size)
        return {"size": size, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "crop_pct": 1.0}

    def blocks(self):
        return largest_block_list(self.model)

    def gradient_checkpointing_enable(self):
        if not getattr(self.model, "supports_gradient_checkpointing", False):
            raise ValueError(f"{type(self.model).__name__} does not support gradient checkpointing")
        # transformers 5 renamed the switch (the old name warns); older releases have only that.
        enable = getattr(self.model, "activation_checkpointing_enable", None) or self.model.gradient_checkpointing_enable
        enable()


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                    "sentencepiece.bpe.model")


def has_tokenizer_files(path: str) -> bool:
    """transformers v5 builds an *empty* tokenizer from a directory without tokenizer files, so
    look before loading."""
    return any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES)


def has_image_processor_files(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("preprocessor_config.json", "processor_config.json"))


def _hf_modality(model) -> str:
    return "image" if model.main_input_name == "pixel_values" else "text"


def _sentence_transformers_pooling(path: str):
    cfg = os.path.join(path, "1_Pooling", "config.json")
    if not os.path.isfile(cfg):
        return None
    with open(cfg) as f:
        pooling = json.load(f)
    if pooling.get("pooling_mode_mean_tokens"):
        return "mean"
    if pooling.get("pooling_mode_cls_token"):
        return "cls"
    raise ValueError(f"{cfg}: only mean or CLS sentence-transformers pooling is supported, got {pooling}")


def default_pooling(model, missing_keys=()) -> str:
    """Pooling for a transformers tower whose pooling was not given (see HFTower)."""
    if model.config.model_type in _POOLER_TYPES:
        return "pooler"
    has_pooler = getattr(model, "pooler", None) is not None
    # A pooler whose weights were not in the checkpoint is a random dense+tanh: skip it.
    if has_pooler and not any(k.startswith("pooler.") for k in missing_keys):
        return "pooler"
    return "cls" if _hf_modality(model) == "image" else "mean"


def _hf_class_for(config, modality: str):
    """CLIP/SigLIP checkpoints hold both towers; every other model type goes through AutoModel."""
    import transformers

    pairs = {"clip": ("CLIPVisionModel", "CLIPTextModel"), "siglip": ("SiglipVisionModel", "SiglipTextModel")}
    if config.model_type in pairs:
        return getattr(transformers, pairs[config.model_type][modality == "text"])
    return transformers.AutoModel


def hf_tower_from_pretrained(path: str, modality: str, pooling: str = "auto") -> HFTower:
    """A tower from a local transformers directory or a (cached) hub id."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise ValueError(
            f"tower {path!r} is neither a transformers model directory nor a cached hub id "
            f"(or another tower spec: 'open_clip:NAME', 'timm:NAME', 'torchvision:NAME'): {exc}"
        ) from exc
    cls = _hf_class_for(config, modality)
    from transformers.utils import logging as hf_logging

    # Taking one tower of a two-tower checkpoint leaves the other's weights "unexpected": that
    # report is noise here. Missing weights are not, and are checked below.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = cls.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    if _hf_modality(model) != modality:
        raise ValueError(f"{path!r} is a {_hf_modality(model)} model, but was given as the {modality} tower")
    missing = [k for k in info.get("missing_keys", ()) if not k.startswith("pooler.")]
    if missing:
        raise ValueError(f"{path!r} lacks weights of its {type(model).__name__}: {sorted(missing)[:5]}")
    if pooling == "auto":
        pooling = (os.path.isdir(path) and _sentence_transformers_pooling(path)) or default_pooling(
            model, info.get("missing_keys", ())
        )
    return HFTower(model, modality, pooling)


def hf_tower_from_config(config, modality: str, pooling: str = "auto") -> HFTower:
    """A randomly initialised tower from a transformers PretrainedConfig (e.g. ViTConfig(...))."""
    cls = _hf_class_for(config, modality)
    if config.model_type in ("clip", "siglip"):
        config = config.text_config if modality == "text" else config.vision_config
    model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    model = model.float()
    if _hf_modality(model) != modality:
        raise ValueError(f"a {type(config).__name__} builds a {_hf_modality(model)} model, not a {modality} tower")
    return HFTower(model, modality, default_pooling(model) if pooling == "auto" else pooling)


def hf_tower_from_spec(spec: dict, modality: str) -> HFTower:
    from transformers import CONFIG_MAPPING

    cfg = spec["config"]
    config = CONFIG_MAPPING[cfg["model_type"]].from_dict(cfg)
    return hf_tower_from_config(config, modality, spec["pooling"])


class TimmTower(nn.Module):
    """A timm image backbone with its classifier removed: forward gives the pooled features."""

    kind = "timm"
    modality = "image"

    def __init__(self, name: str, weights: str | None = None):
        super().__init__()
        import timm

        try:
            model = timm.create_model(name, pretrained=False)
        except Exception as exc:
            raise ValueError(f"timm has no model {name!r} ({exc})") from exc
        if weights:
            load_weights_into(model, read_state_dict(weights), weights)
        model.reset_classifier(0)
        self.model, self.name = model, name
        self.output_dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
        self.num_channels = int(getattr(model, "in_chans", 3))

    @property
    def required_size(self):
        patch = getattr(self.model, "patch_embed", None)
        if patch is not None and getattr(patch, "strict_img_size", False):
            return tuple(patch.img_size)
        return None

    def forward(self, pixel_values=None, input_ids=None, attention_mask=None):
        return self.model(pixel_values)

    def spec(self):
        return {"kind": self.kind, "name": self.name}

    def image_processing(self):
        import timm.data

        cfg = timm.data.resolve_data_config({}, model=self.model)
        return {"size": tuple(cfg["input_size"][1:]), "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]),
                "crop_pct": float(cfg.get("crop_pct", 1.0)), "interpolation": cfg.get("interpolation", "bicubic")}

    def blocks(self):
        return largest_block_list(self.model)

    def gradient_checkpointing_enable(self):
        self.model.set_grad_checkpointing(True)


def _replace_last_linear(model: nn.Module) -> int:
    """Swap the classifier (the last nn.Linear) for an Identity; returns its input size."""
    last = None
    for name, sub in model.named_modules():
        if isinstance(sub, nn.Linear):
            last = name
    if last is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier to remove")
    parent_name, _, child = last.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    in_features = getattr(parent, child).in_features
    setattr(parent, child, nn.Identity())
    return in_features


class TorchvisionTower(nn.Module):
    """A torchvision classification model with its classifier replaced by an Identity."""

    kind = "torchvision"
    modality = "image"

    def __init__(self, name: str, weights: str | None = None):
        super().__init__()
        import torchvision

        try:
            model = torchvision.models.get_model(name, weights=None)
        except Exception as exc:
            raise ValueError(f"torchvision has no model {name!r} ({exc})") from exc
        if weights:
            load_weights_into(model, read_state_dict(weights), weights)
        self.output_dim = _replace_last_linear(model)
        self.model, self.name, self.num_channels = model, name, 3

    @property
    def required_size(self):
        size = getattr(self.model, "image_size", None)  # torchvision's ViTs
        return (size, size) if isinstance(size, int) else None

    def forward(self, pixel_values=None, input_ids=None, attention_mask=None):
        return self.model(pixel_values)

    def spec(self):
        return {"kind": self.kind, "name": self.name}

    def image_processing(self):
        size = self.required_size or (224, 224)
        return {"size": size, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "crop_pct": 0.875,
                "interpolation": "bilinear"}

    def blocks(self):
        return largest_block_list(self.model)

    def gradient_checkpointing_enable(self):
        raise ValueError(f"torchvision tower {self.name!r} has no gradient checkpointing switch")


def _split_spec(spec: str) -> tuple[str, str, str | None]:
    kind, _, rest = spec.partition(":")
    name, _, weights = rest.partition(":")
    if not name:
        raise ValueError(f"tower spec {spec!r} names no model (expected '{kind}:NAME[:WEIGHTS_FILE]')")
    return kind, name, weights or None


def build_tower(spec, modality: str, pooling: str = "auto") -> nn.Module:
    """A tower from a user spec: a transformers dir / hub id / PretrainedConfig, or a
    "timm:NAME[:WEIGHTS]" / "torchvision:NAME[:WEIGHTS]" string ("open_clip:" is handled by
    the caller, which may share one open_clip model between both towers)."""
    from transformers import PretrainedConfig

    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if isinstance(spec, PretrainedConfig):
        return hf_tower_from_config(spec, modality, pooling)
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str):
        raise TypeError(f"{modality}_tower must be a str, a path or a transformers PretrainedConfig, "
                        f"got {type(spec).__name__}")
    if spec.startswith(("timm:", "torchvision:")):
        kind, name, weights = _split_spec(spec)
        if modality != "image":
            raise ValueError(f"{kind} towers are image towers, got {spec!r} as the {modality} tower")
        return (TimmTower if kind == "timm" else TorchvisionTower)(name, weights)
    if spec.startswith("mmcl:"):  # mmcl's own image towers (the CIFAR-stem ResNets)
        from mmcl.models.cifar_resnet import CifarResNetTower

        _, name, weights = _split_spec(spec)
        if modality != "image":
            raise ValueError(f"mmcl towers are image towers, got {spec!r} as the {modality} tower")
        return CifarResNetTower(name, weights)
    prefix = spec.partition(":")[0]
    if ":" in spec and not os.path.exists(spec) and prefix.replace("_", "").isalnum():
        raise ValueError(f"unknown tower spec {spec!r}: the prefixes are 'open_clip:', 'timm:', 'torchvision:' and 'mmcl:'; "
                         "anything else is a transformers directory or hub id")
    if os.path.exists(spec) and not os.path.isdir(spec):
        raise ValueError(f"{modality}_tower {spec!r} is a file; a transformers tower is a directory")
    if not os.path.isdir(spec) and (spec.startswith((".", "/", "~")) or spec.count("/") > 1):
        raise ValueError(f"{modality}_tower directory {spec!r} does not exist")
    return hf_tower_from_pretrained(spec, modality, pooling)


def tower_from_spec(spec: dict, modality: str) -> nn.Module:
    """Rebuild a tower's architecture (random weights) from its saved spec()."""
    kind = spec.get("kind")
    if kind == "transformers":
        return hf_tower_from_spec(spec, modality)
    if kind == "timm":
        return TimmTower(spec["name"])
    if kind == "torchvision":
        return TorchvisionTower(spec["name"])
    if kind == "mmcl":
        from mmcl.models.cifar_resnet import CifarResNetTower

        return CifarResNetTower(spec["name"])
    if kind == "open_clip":
        from mmcl.models.open_clip_towers import open_clip_towers_from_cfg

        image, text, _ = open_clip_towers_from_cfg(spec["name"], spec["model_cfg"], None)
        return image if modality == "image" else text
    raise ValueError(f"unknown tower kind {kind!r} in saved config")
