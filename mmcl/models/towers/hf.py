"""transformers models (vision or text) as towers: kind "transformers".

Specs: a local model directory, a cached hub id, or a PretrainedConfig (random init).
"""
from __future__ import annotations

import json
import os

import torch

from mmcl.models.towers.base import IMAGENET_MEAN, IMAGENET_STD, POOLINGS, Tower, as_size

# Model types whose pooler_output is the representation the model was trained to produce
# (CLIP's post-layernorm CLS / EOS token, DINOv2's normed CLS, CNNs' global average pool).
_POOLER_TYPES = {
    "clip_vision_model", "clip_text_model", "siglip_vision_model", "siglip_text_model", "dinov2",
    "convnext", "convnextv2", "resnet", "regnet", "efficientnet", "swin", "swinv2", "mobilenet_v2",
}
# Patch-embedding transformers with learnt absolute positions need the trained size; CNNs and
# DINOv2 (which interpolates its positions) take any size.
_FIXED_SIZE_TYPES = ("vit", "deit", "clip_vision_model", "siglip_vision_model", "beit")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                    "sentencepiece.bpe.model")


def has_tokenizer_files(path: str) -> bool:
    """transformers v5 builds an *empty* tokenizer from a directory without tokenizer files, so
    look before loading."""
    return any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES)


def has_image_processor_files(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("preprocessor_config.json", "processor_config.json"))


class HFTower(Tower):
    """A transformers model (vision or text) pooled by `pooling`: "pooler" (the model's
    pooler_output), "cls" (first token of the last hidden state) or "mean" (mean over tokens,
    masked by the attention mask for text)."""

    kind = "transformers"
    modalities = ("image", "text")

    def __init__(self, model, modality: str, pooling: str, source_dir: str | None = None):
        if pooling not in POOLINGS[1:]:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        cfg = model.config
        # SigLIP's text model ends in its own linear head (hidden_size -> projection_size).
        width = getattr(cfg, "projection_size", None) if cfg.model_type == "siglip_text_model" else None
        super().__init__(model, modality, width or getattr(cfg, "hidden_size", None) or cfg.hidden_sizes[-1],
                         getattr(cfg, "num_channels", 3))
        self.pooling = pooling
        self.source_dir = source_dir  # where its tokenizer / image processor files may be
        self.vocab_size = getattr(cfg, "vocab_size", None)
        self.max_length = getattr(cfg, "max_position_embeddings", None)

    @classmethod
    def from_spec(cls, name, weights, modality, pooling="auto"):
        """`name`: a transformers directory, cached hub id or PretrainedConfig."""
        if isinstance(name, str):
            return _from_pretrained(name, modality, pooling)
        return _from_config(name, modality, pooling)

    @classmethod
    def from_saved(cls, spec, modality):
        from transformers import CONFIG_MAPPING

        cfg = spec["config"]
        return _from_config(CONFIG_MAPPING[cfg["model_type"]].from_dict(cfg), modality, spec["pooling"])

    @property
    def pad_to_max_length(self) -> bool:
        """SigLIP's text model pools its last position, so its texts are padded to full length."""
        return self.modality == "text" and self.model.config.model_type == "siglip_text_model"

    @property
    def required_size(self):
        if self.modality != "image" or self.model.config.model_type not in _FIXED_SIZE_TYPES:
            return None
        return as_size(self.model.config.image_size)

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
        size = as_size(getattr(self.model.config, "image_size", 224))
        return {"size": size, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "crop_pct": 1.0}

    def default_tokenizer(self):
        if self.source_dir is None or not has_tokenizer_files(self.source_dir):
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.source_dir)

    def default_image_processor(self):
        if self.source_dir is None or not has_image_processor_files(self.source_dir):
            return None
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(self.source_dir)

    def gradient_checkpointing_enable(self):
        if not getattr(self.model, "supports_gradient_checkpointing", False):
            raise ValueError(f"{type(self.model).__name__} does not support gradient checkpointing")
        # transformers 5 renamed the switch (the old name warns); older releases have only that.
        enable = getattr(self.model, "activation_checkpointing_enable", None) or self.model.gradient_checkpointing_enable
        enable()


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
    if config.model_type == "siglip_text_model":  # not in AutoModel's table
        return transformers.SiglipTextModel
    return transformers.AutoModel


def _from_pretrained(path: str, modality: str, pooling: str = "auto") -> HFTower:
    """A tower from a local transformers directory or a (cached) hub id."""
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise ValueError(
            f"tower {path!r} is neither a transformers model directory nor a cached hub id "
            f"(or another tower spec: 'open_clip:NAME', 'timm:NAME', 'torchvision:NAME'): {exc}"
        ) from exc
    cls = _hf_class_for(config, modality)
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
    return HFTower(model, modality, pooling, source_dir=path if os.path.isdir(path) else None)


def _from_config(config, modality: str, pooling: str = "auto") -> HFTower:
    """A randomly initialised tower from a transformers PretrainedConfig (e.g. ViTConfig(...))."""
    cls = _hf_class_for(config, modality)
    if config.model_type in ("clip", "siglip"):
        config = config.text_config if modality == "text" else config.vision_config
    model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    model = model.float()
    if _hf_modality(model) != modality:
        raise ValueError(f"a {type(config).__name__} builds a {_hf_modality(model)} model, not a {modality} tower")
    return HFTower(model, modality, default_pooling(model) if pooling == "auto" else pooling)
