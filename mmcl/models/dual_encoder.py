"""DualEncoder: an image tower and an optional text tower, each with a projection head into a
shared embedding space, one learnable logit scale (CLIP's 1 / temperature) and, for models
trained with the pairwise sigmoid loss (SigLIP), a learnable logit bias."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

import mmcl
from mmcl.losses import LogitScale
from mmcl.models import hf_interop
from mmcl.models.processor import DualProcessor, TransformImageProcessor
from mmcl.models.towers import Tower, build_pair, from_saved

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PROJECTIONS = ("linear", "mlp", "mlp_bn", "none")


@dataclass
class DualEncoderOutput:
    """image_embeds (B, P) or None, text_embeds (B, P) or None, logit_scale: 0-dim multiplier,
    logit_bias: 0-dim bias of a sigmoid (SigLIP) model, None for softmax (CLIP) models."""

    image_embeds: torch.Tensor | None
    text_embeds: torch.Tensor | None
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor | None = None


def make_projection(kind: str, in_dim: int, out_dim: int, hidden: int | None = None) -> nn.Module:
    """Head from tower features (B, in_dim) to embeddings (B, out_dim); `hidden` (default in_dim)
    is the MLPs' hidden width.

    "linear": bias-free, as in CLIP (so transformers' CLIP/VisionTextDualEncoder heads map onto
    it one to one). "mlp": Linear-GELU-Linear. "mlp_bn": Linear-BatchNorm1d-ReLU-Linear, the
    projector of BYOL and SimCLR v2 (batch statistics in train mode, running ones in eval mode).
    "none": the identity.
    """
    if hidden is not None and (not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 1):
        raise ValueError(f"projection_hidden must be a positive int or None, got {hidden!r}")
    width = in_dim if hidden is None else hidden
    if kind == "linear":
        return nn.Linear(in_dim, out_dim, bias=False)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, width), nn.GELU(), nn.Linear(width, out_dim, bias=False))
    if kind == "mlp_bn":
        # No bias before BatchNorm: its shift would be subtracted again.
        return nn.Sequential(nn.Linear(in_dim, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
                             nn.Linear(width, out_dim))
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"projection must be one of {PROJECTIONS}, got {kind!r}")


class DualEncoder(nn.Module):
    """Two towers + projection heads + LogitScale (+ a logit bias for sigmoid models). Build with
    `from_towers` or `from_pretrained`.

    encode_image (B, 3, H, W) -> (B, P); encode_text (B, L) ids -> (B, P); forward -> both.
    max_scale=None leaves the logit scale unclamped (SigLIP). init_logit_bias=None (CLIP) gives
    no bias parameter at all, so a CLIP model's state dict and config do not change; a float
    makes the model a sigmoid model (`logit_bias`, zero-shot gives sigmoid probabilities).
    """

    def __init__(self, image_tower: Tower, text_tower: Tower | None, processor: DualProcessor, *,
                 projection_dim: int = 512, projection: str = "linear", init_temperature: float = 0.07,
                 max_scale: float | None = 100.0, init_logit_bias: float | None = None,
                 projection_hidden: int | None = None):
        super().__init__()
        if max_scale is not None and not (isinstance(max_scale, (int, float)) and max_scale > 0):
            raise ValueError(f"max_scale must be a number > 0 or None (no clamp), got {max_scale!r}")
        if projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
        if projection == "none":
            projection_dim = image_tower.output_dim
            if text_tower is not None and text_tower.output_dim != projection_dim:
                raise ValueError(
                    f'projection="none" needs towers of equal width, got image {image_tower.output_dim} '
                    f"and text {text_tower.output_dim}"
                )
        if not isinstance(projection_dim, int) or isinstance(projection_dim, bool) or projection_dim < 1:
            raise ValueError(f"projection_dim must be a positive int, got {projection_dim!r}")
        self.image_tower = image_tower
        if projection_hidden is not None and projection not in ("mlp", "mlp_bn"):
            raise ValueError(f'projection_hidden sets the hidden width of an "mlp" or "mlp_bn" head; '
                             f"projection={projection!r} has none")
        head = {"hidden": projection_hidden}
        self.image_projection = make_projection(projection, image_tower.output_dim, projection_dim, **head)
        self.text_tower = text_tower
        self.text_projection = (
            make_projection(projection, text_tower.output_dim, projection_dim, **head) if text_tower is not None
            else None
        )
        self.logit_scale = LogitScale(init_temperature, max_scale=math.inf if max_scale is None else max_scale)
        self.register_parameter("logit_bias", None)
        self.init_logit_bias = None
        if init_logit_bias is not None:
            self.add_logit_bias(init_logit_bias)
        self.processor = processor
        self.projection, self.projection_dim = projection, projection_dim
        self.projection_hidden = projection_hidden
        self.init_temperature = float(init_temperature)
        self.max_scale = None if max_scale is None else float(max_scale)
        self._fully_locked: set[str] = set()

    # ------------------------------------------------------------------ construction
    def add_logit_bias(self, init: float) -> None:
        """Give the model a learnable logit bias starting at `init` (SigLIP: -10), making it a
        sigmoid model; used when training a softmax (CLIP) checkpoint with the sigmoid loss."""
        if self.logit_bias is not None:
            raise ValueError("this DualEncoder already has a logit bias")
        if isinstance(init, bool) or not isinstance(init, (int, float)) or not math.isfinite(init):
            raise ValueError(f"init_logit_bias must be a finite number, got {init!r}")
        self.logit_bias = nn.Parameter(torch.tensor(float(init), device=self.logit_scale.log_scale.device))
        self.init_logit_bias = float(init)

    @classmethod
    def from_towers(cls, image_tower, text_tower=None, *, projection_dim: int = 512, projection: str = "linear",
                    projection_hidden: int | None = None, init_temperature: float = 0.07,
                    max_scale: float | None = 100.0, init_logit_bias: float | None = None,
                    image_pooling: str = "auto", text_pooling: str = "auto", tokenizer=None, image_processor=None,
                    image_size=None, image_mean=None, image_std=None):
        """A new model from tower specs (heads, logit scale and bias freshly initialised).

        A tower is a transformers directory or hub id, a transformers PretrainedConfig (random
        init), "open_clip:NAME[:CHECKPOINT]", "timm:NAME[:WEIGHTS]" or "torchvision:NAME[:WEIGHTS]"
        (weights: safetensors or a torch state dict). text_tower=None gives an image-only model.
        Two equal open_clip specs share one open_clip model. Pooling "auto" picks per model type
        (see mmcl.models.towers). tokenizer / image_processor (a directory or an object) replace
        the ones found with the towers; image_size / image_mean / image_std switch to a
        torchvision-transforms processor with those values.
        """
        image, text = build_pair(image_tower, text_tower, image_pooling, text_pooling)
        image_proc = _resolve_image_processor(image, image_processor, image_size, image_mean, image_std)
        tok = _resolve_tokenizer(text, tokenizer)
        processor = DualProcessor(image_proc, tok, getattr(text, "max_length", None) if text is not None else None,
                                  pad_to_max_length=getattr(text, "pad_to_max_length", False))
        model = cls(image, text, processor, projection_dim=projection_dim, projection=projection,
                    projection_hidden=projection_hidden, init_temperature=init_temperature, max_scale=max_scale,
                    init_logit_bias=init_logit_bias)
        return model.eval()  # as transformers' from_pretrained: call .train() to train

    @classmethod
    def from_pretrained(cls, path_or_spec: str) -> "DualEncoder":
        """Load an mmcl directory (save_pretrained), a transformers CLIPModel, SiglipModel or
        VisionTextDualEncoderModel directory (or cached hub id), or an open_clip model:
        "open_clip:NAME[:CHECKPOINT]" or a directory with open_clip_config.json (then the heads
        are identities and the logit scale, and a SigLIP-style model's logit bias, are open_clip's)."""
        if isinstance(path_or_spec, os.PathLike):
            path_or_spec = os.fspath(path_or_spec)
        if not isinstance(path_or_spec, str):
            raise TypeError(f"path_or_spec must be a str, got {type(path_or_spec).__name__}")
        if path_or_spec.startswith("open_clip:"):
            return cls._from_parts(hf_interop.from_open_clip(path_or_spec))
        directory = hf_interop.resolve_directory(path_or_spec)
        if hf_interop.is_open_clip_dir(directory):
            return cls._from_parts(hf_interop.from_open_clip(directory))
        config = hf_interop.read_config(directory)
        if "mmcl_model_type" in config:
            return cls._from_mmcl_dir(directory, config)
        return cls._from_parts(hf_interop.from_transformers_dir(directory, config))

    @classmethod
    def _from_parts(cls, parts: hf_interop.DualEncoderParts) -> "DualEncoder":
        sigmoid = parts.logit_bias is not None
        model = cls(parts.image_tower, parts.text_tower, parts.processor, projection_dim=parts.projection_dim,
                    projection=parts.projection, init_temperature=1.0 / parts.scale,
                    max_scale=None if sigmoid else max(100.0, parts.scale),
                    init_logit_bias=float(parts.logit_bias) if sigmoid else None)
        with torch.no_grad():
            if parts.image_head is not None:
                model.image_projection.weight.copy_(parts.image_head)
            if parts.text_head is not None:
                model.text_projection.weight.copy_(parts.text_head)
            model.logit_scale.log_scale.copy_(parts.log_scale)
            if sigmoid:
                model.logit_bias.copy_(parts.logit_bias)
        return model.eval()

    @classmethod
    def _from_mmcl_dir(cls, directory: str, config: dict) -> "DualEncoder":
        if config["mmcl_model_type"] != "dual_encoder":
            raise ValueError(f"{directory!r} holds an mmcl {config['mmcl_model_type']!r}, not a dual_encoder")
        image = from_saved(config["image_tower"], "image")
        text = from_saved(config["text_tower"], "text") if config.get("text_tower") else None
        model = cls(image, text, DualProcessor.from_pretrained(directory), projection_dim=config["projection_dim"],
                    projection=config["projection"], projection_hidden=config.get("projection_hidden"),
                    init_temperature=config["init_temperature"], max_scale=config.get("max_scale", 100.0),
                    init_logit_bias=config.get("init_logit_bias"))
        weights = os.path.join(directory, WEIGHTS_FILE)
        if not os.path.isfile(weights):
            raise ValueError(f"{directory!r} has no {WEIGHTS_FILE}")
        try:
            load_model(model, weights, strict=True)
        except SafetensorError as err:  # a truncated or overwritten file: say which, not the parser's words
            raise ValueError(f"{weights} is damaged (not a complete safetensors file): {err}") from err
        return model.eval()

    def save_pretrained(self, directory: str) -> None:
        """Write config.json, model.safetensors and the processor files into `directory`."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_FILE), "w") as f:
            json.dump(self.config(), f, indent=2)
        save_model(self, os.path.join(directory, WEIGHTS_FILE))
        self.processor.save_pretrained(directory)

    def config(self) -> dict:
        """JSON-serialisable description that rebuilds this architecture."""
        config = {
            "mmcl_model_type": "dual_encoder", "mmcl_version": mmcl.__version__,
            "image_tower": self.image_tower.spec(),
            "text_tower": self.text_tower.spec() if self.text_tower is not None else None,
            "projection": self.projection, "projection_dim": self.projection_dim,
            "init_temperature": self.init_temperature, "max_scale": self.max_scale,
        }
        if self.projection_hidden is not None:  # only MLP heads of a set width carry the key
            config["projection_hidden"] = self.projection_hidden
        if self.logit_bias is not None:  # only sigmoid models carry the key
            config["init_logit_bias"] = self.init_logit_bias
        return config

    def export_to_transformers(self, directory: str) -> None:
        """Write a transformers model directory (VisionTextDualEncoderModel, CLIPModel when both
        towers are CLIP's, SiglipModel for a sigmoid model whose towers are both SigLIP's) with
        its processor files; transformers' zero-shot pipeline loads it. Raises ValueError for what
        transformers cannot express (non-transformers towers, "mlp" heads, towers not pooled by
        pooler_output, image-only models, a sigmoid model without SigLIP towers)."""
        hf_interop.export_to_transformers(self, directory)

    # ------------------------------------------------------------------ encoding
    @property
    def has_text_tower(self) -> bool:
        return self.text_tower is not None

    def _check_pixels(self, pixel_values) -> torch.Tensor:
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        if not pixel_values.is_floating_point():
            raise TypeError(f"pixel_values must be a float tensor, got dtype {pixel_values.dtype}")
        if pixel_values.dim() != 4 or pixel_values.shape[0] == 0:
            raise ValueError(f"pixel_values must be (B, C, H, W) with B >= 1, got shape {tuple(pixel_values.shape)}")
        channels = self.image_tower.num_channels
        if pixel_values.shape[1] != channels:
            raise ValueError(f"pixel_values must have {channels} channels, got shape {tuple(pixel_values.shape)}")
        need = self.image_tower.required_size
        if need is not None and tuple(pixel_values.shape[-2:]) != tuple(need):
            raise ValueError(
                f"the image tower takes {need[0]}x{need[1]} images, got pixel_values of shape "
                f"{tuple(pixel_values.shape)} (model.processor.preprocess_images resizes)"
            )
        return pixel_values.to(self.image_projection_dtype)

    @property
    def image_projection_dtype(self) -> torch.dtype:
        return next(self.image_tower.parameters()).dtype

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """pixel_values (B, 3, H, W) float → embeddings (B, P), L2-normalised unless normalize=False."""
        x = self.image_projection(self.image_features(pixel_values))
        return F.normalize(x, dim=-1) if normalize else x

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, 3, H, W) float → the image tower's features (B, F) before the projection
        head (the representation SimCLR, MoCo and BYOL evaluate; F = image_tower.output_dim)."""
        return self.image_tower(pixel_values=self._check_pixels(pixel_values))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    normalize: bool = True) -> torch.Tensor:
        """input_ids (B, L) integer, attention_mask (B, L) or None → embeddings (B, P)."""
        if self.text_tower is None:
            raise ValueError("this DualEncoder is image-only (built with text_tower=None): it cannot encode text")
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
        if input_ids.dim() != 2 or input_ids.shape[0] == 0:
            raise ValueError(f"input_ids must be (B, L) with B >= 1, got shape {tuple(input_ids.shape)}")
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        vocab = self.text_tower.vocab_size
        if vocab is not None and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
            raise ValueError(f"input_ids must lie in [0, {vocab}) (the text tower's vocabulary), got values "
                             f"in [{int(input_ids.min())}, {int(input_ids.max())}]")
        x = self.text_projection(self.text_tower(input_ids=input_ids.long(), attention_mask=attention_mask))
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, pixel_values=None, input_ids=None, attention_mask=None) -> DualEncoderOutput:
        """Embeddings of whichever inputs are given, the logit scale (multiplier) and bias."""
        if pixel_values is None and input_ids is None:
            raise ValueError("pass pixel_values, input_ids or both")
        image = self.encode_image(pixel_values) if pixel_values is not None else None
        text = self.encode_text(input_ids, attention_mask) if input_ids is not None else None
        # The bias leaves through an op, not as the bare leaf: DDP's unused-parameter search
        # follows the outputs' grad_fn and would otherwise count it unused (then ready twice).
        bias = self.logit_bias.clone() if self.logit_bias is not None else None
        return DualEncoderOutput(image, text, self.logit_scale(), bias)

    # ------------------------------------------------------------------ training switches
    def lock_image(self, unlocked_layers: int = 0, lock_projection: bool = False) -> None:
        """Freeze the image tower (LiT) except its last `unlocked_layers` blocks (and what comes
        after them, e.g. the final norm). A fully locked tower also stays in eval mode, so batch
        norm statistics and dropout stay fixed. The projection head stays trainable unless
        lock_projection=True."""
        self._lock("image", self.image_tower, self.image_projection, unlocked_layers, lock_projection)

    def lock_text(self, unlocked_layers: int = 0, lock_projection: bool = False) -> None:
        """As lock_image, for the text tower."""
        if self.text_tower is None:
            raise ValueError("this DualEncoder has no text tower to lock")
        self._lock("text", self.text_tower, self.text_projection, unlocked_layers, lock_projection)

    def _lock(self, modality, tower, head, unlocked_layers, lock_projection):
        if not isinstance(unlocked_layers, int) or isinstance(unlocked_layers, bool) or unlocked_layers < 0:
            raise ValueError(f"unlocked_layers must be an int >= 0, got {unlocked_layers!r}")
        tower.lock(unlocked_layers)
        for p in head.parameters():
            p.requires_grad_(not lock_projection)
        if unlocked_layers == 0:
            self._fully_locked.add(modality)
            tower.eval()
        else:
            self._fully_locked.discard(modality)

    def train(self, mode: bool = True):
        super().train(mode)
        for modality in self._fully_locked:
            (self.image_tower if modality == "image" else self.text_tower).eval()
        return self

    def gradient_checkpointing_enable(self) -> None:
        """Turn on the towers' own activation checkpointing (transformers, timm, open_clip)."""
        for tower in (self.image_tower, self.text_tower):
            if tower is not None:
                tower.gradient_checkpointing_enable()


def _resolve_image_processor(tower, image_processor, image_size, image_mean, image_std):
    if image_processor is not None:
        if isinstance(image_processor, (str, os.PathLike)):
            from transformers import AutoImageProcessor

            try:
                return AutoImageProcessor.from_pretrained(os.fspath(image_processor))
            except Exception as exc:
                raise ValueError(f"cannot load an image processor from {image_processor!r}: {exc}") from exc
        return image_processor
    overrides = image_size is not None or image_mean is not None or image_std is not None
    if not overrides and (saved := tower.default_image_processor()) is not None:
        return saved
    cfg = tower.image_processing()
    return TransformImageProcessor(
        image_size if image_size is not None else cfg["size"], image_mean if image_mean is not None else cfg["mean"],
        image_std if image_std is not None else cfg["std"], cfg.get("crop_pct", 1.0),
        cfg.get("interpolation", "bicubic"),
    )


def _resolve_tokenizer(text, tokenizer):
    if text is None:
        return None
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer))
        except Exception as exc:
            raise ValueError(f"cannot load a tokenizer from {tokenizer!r}: {exc}") from exc
    elif tokenizer is None:
        tokenizer = text.default_tokenizer()
    vocab = getattr(text, "vocab_size", None)
    if tokenizer is not None and vocab is not None and hasattr(tokenizer, "__len__") and len(tokenizer) > vocab:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the text tower's vocab_size is {vocab}")
    return tokenizer
