"""open_clip models as towers: `visual` is the image tower, the text transformer the text tower.

Spec "open_clip:NAME[:CHECKPOINT]". Both towers of one open_clip model are built together (a
single `create_model` call) and split; one spec given for both towers shares that model. The
model is built with open_clip's "custom text" layout, where the text encoder is one module
(`model.text`); checkpoints in the standard layout are converted with open_clip's own
`convert_to_custom_text_state_dict`. Checkpoints are read without unpickling (safetensors, or
torch.load(weights_only=True)).
"""
from __future__ import annotations

import copy
import json
import os
import tempfile

import torch.nn as nn

from mmcl.models.towers.base import Tower, as_size
from mmcl.models.weights import read_state_dict

OPEN_CLIP_DIR_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class OpenCLIPTower(Tower):
    """One half of an open_clip model; forward gives open_clip's encode_image/encode_text
    features (B, embed_dim), unnormalised."""

    kind = prefix = "open_clip"
    modalities = ("image", "text")

    def __init__(self, module: nn.Module, modality: str, name: str, model_cfg: dict):
        super().__init__(module, modality, model_cfg["embed_dim"])
        self.name = name
        self.model_cfg = copy.deepcopy(model_cfg)
        self.vocab_size = getattr(module, "vocab_size", None)
        self.max_length = getattr(module, "context_length", None)

    @classmethod
    def from_spec(cls, name, weights, modality, pooling="auto"):
        image, text = cls.pair_from_spec(name, weights)
        return image if modality == "image" else text

    @classmethod
    def from_saved(cls, spec, modality):
        image, text, *_ = open_clip_towers_from_cfg(spec["name"], spec["model_cfg"], None)
        return image if modality == "image" else text

    @classmethod
    def pair_from_spec(cls, name, weights, image_pooling="auto", text_pooling="auto"):
        image, text, *_ = open_clip_towers_from_cfg(name, None, weights)
        return image, text

    @property
    def required_size(self):
        if self.modality != "image":
            return None
        return as_size(getattr(self.model, "image_size", None))

    def forward(self, pixel_values=None, input_ids=None, attention_mask=None):
        # open_clip's text encoders use a causal mask and pool at the EOS token, so padding is
        # already ignored and the attention mask is not needed.
        out = self.model(pixel_values if self.modality == "image" else input_ids)
        return out[0] if isinstance(out, tuple) else out

    def spec(self):
        return {"kind": self.kind, "name": self.name, "model_cfg": self.model_cfg}

    def image_processing(self):
        cfg = getattr(self.model, "preprocess_cfg", {}) or {}
        return {"size": as_size(cfg.get("size", 224)), "mean": tuple(cfg.get("mean", _CLIP_MEAN)),
                "std": tuple(cfg.get("std", _CLIP_STD)), "crop_pct": 1.0,
                "interpolation": cfg.get("interpolation", "bicubic")}

    def default_tokenizer(self):
        return open_clip_tokenizer_for(self.model_cfg)

    def lock(self, unlocked_layers: int):
        # open_clip's own LiT locking knows its groups. Its transformers count the projection
        # as a group of its own ([..., last block + final norm, proj]); mmcl counts layers, with
        # what follows the last unlocked layer always unlocked, hence the + 1.
        blocks = getattr(getattr(self.model, "transformer", None), "resblocks", None)
        if blocks is not None and unlocked_layers > len(blocks):
            raise ValueError(f"unlocked_layers={unlocked_layers} but the tower has only {len(blocks)} layers")
        groups = unlocked_layers + 1 if unlocked_layers and blocks is not None else unlocked_layers
        if self.modality == "image":
            self.model.lock(unlocked_groups=groups)
        else:
            self.model.lock(unlocked_layers=groups)

    def gradient_checkpointing_enable(self):
        self.model.set_grad_checkpointing(True)


def _create(name: str, model_cfg: dict | None):
    """Build an open_clip model (random init) by name, or from a saved config dict."""
    import open_clip

    kwargs = dict(pretrained=None, force_custom_text=True, load_weights=False, pretrained_text=False)
    if open_clip.get_model_config(name) is not None and (
        model_cfg is None or open_clip.get_model_config(name) == model_cfg
    ):
        return open_clip.create_model(name, **kwargs), open_clip.get_model_config(name)
    if model_cfg is None:
        raise ValueError(f"open_clip has no model config named {name!r} (open_clip.list_models() lists them)")
    # A config that open_clip does not know under this name (saved by mmcl): open_clip loads it
    # from a local directory holding open_clip_config.json.
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "open_clip_config.json"), "w") as f:
            json.dump({"model_cfg": model_cfg}, f)
        return open_clip.create_model(f"local-dir:{tmp}", **kwargs), model_cfg


def _load_checkpoint(model: nn.Module, path: str) -> None:
    from open_clip.model import convert_to_custom_text_state_dict

    state = convert_to_custom_text_state_dict(read_state_dict(path))
    # Buffers that open_clip recomputes (and older checkpoints lack) are not required.
    own = model.state_dict()
    result = model.load_state_dict(state, strict=False)
    bad = [k for k in result.missing_keys if k in own and not k.endswith("attn_mask")]
    if bad or result.unexpected_keys:
        raise ValueError(
            f"open_clip checkpoint {path!r} does not fit the model: missing {bad[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


def open_clip_towers_from_dir(directory: str):
    """(image tower, text tower, logit_scale multiplier, logit bias) of an open_clip model
    directory (open_clip_config.json + open_clip_model.safetensors, the layout open_clip publishes
    on the Hugging Face hub); see `open_clip_towers_from_cfg` for the bias."""
    import open_clip

    with open(os.path.join(directory, "open_clip_config.json")) as f:
        model_cfg = json.load(f).get("model_cfg")
    if not isinstance(model_cfg, dict):
        raise ValueError(f"{directory!r}: open_clip_config.json has no 'model_cfg'")
    weights = [os.path.join(directory, w) for w in OPEN_CLIP_DIR_WEIGHTS if os.path.isfile(os.path.join(directory, w))]
    if not weights:
        raise ValueError(f"{directory!r} has none of the open_clip weight files {OPEN_CLIP_DIR_WEIGHTS}")
    model = open_clip.create_model(f"local-dir:{directory}", force_custom_text=True, load_weights=False,
                                   pretrained_text=False)
    return _split(model, os.path.basename(os.path.normpath(directory)), model_cfg, weights[0])


def open_clip_towers_from_cfg(name: str, model_cfg: dict | None, checkpoint: str | None):
    """(image tower, text tower, logit_scale multiplier, logit bias) of one open_clip model: the
    model named `name` (or described by `model_cfg`), with the weights of `checkpoint` if given.
    The bias is a 0-dim tensor for a sigmoid (SigLIP) model, one whose config sets
    init_logit_bias, and None for a softmax (CLIP) model."""
    if checkpoint and not os.path.isfile(checkpoint):
        raise ValueError(f"open_clip checkpoint {checkpoint!r} (of model {name!r}) does not exist")
    model, cfg = _create(name, model_cfg)
    return _split(model, name, cfg, checkpoint)


def _split(model, name: str, cfg: dict, checkpoint: str | None):
    if checkpoint:
        _load_checkpoint(model, checkpoint)
    model = model.float()
    image = OpenCLIPTower(model.visual, "image", name, cfg)
    text = OpenCLIPTower(model.text, "text", name, cfg)
    bias = getattr(model, "logit_bias", None)  # a parameter of SigLIP-style models only
    bias = None if bias is None else bias.detach().reshape(-1)[0].clone()
    return image, text, float(model.logit_scale.detach().exp().reshape(-1)[0]), bias


class OpenCLIPTokenizer:
    """open_clip's BPE tokenizer (it ships with open_clip), producing fixed-length ids."""

    def __init__(self, context_length: int = 77):
        from open_clip.tokenizer import SimpleTokenizer

        self.context_length = int(context_length)
        self._tok = SimpleTokenizer(context_length=self.context_length)

    def __call__(self, texts: list[str], max_length: int | None = None) -> dict:
        """texts -> {"input_ids": (B, L) int64, "attention_mask": (B, L) int64}."""
        ids = self._tok(texts, context_length=max_length or self.context_length)
        return {"input_ids": ids.long(), "attention_mask": (ids != 0).long()}

    def to_json(self) -> dict:
        return {"kind": "open_clip", "context_length": self.context_length}


def open_clip_tokenizer_for(model_cfg: dict) -> OpenCLIPTokenizer:
    """The tokenizer of an open_clip model config (its BPE tokenizer at its context length)."""
    text_cfg = model_cfg.get("text_cfg", {})
    if text_cfg.get("hf_tokenizer_name") or text_cfg.get("hf_model_name"):
        raise ValueError(
            "this open_clip model uses a Hugging Face tokenizer; pass tokenizer=<local tokenizer dir> to from_towers"
        )
    return OpenCLIPTokenizer(text_cfg.get("context_length", 77))
