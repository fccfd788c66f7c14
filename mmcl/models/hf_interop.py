"""Reading transformers' CLIPModel / VisionTextDualEncoderModel / SiglipModel and open_clip
models as the parts of a DualEncoder, and exporting a DualEncoder back to transformers.

The mapping is one to one: both softmax models pool each tower by its pooler_output, project
with bias-free linears (`visual_projection`, `text_projection`) and store the log of the logit
multiplier (`logit_scale`); mmcl's "pooler" pooling, "linear" heads and LogitScale are the same
three things. SiglipModel has no projections: its towers' pooler_output are the embeddings (the
vision tower's attention-pooling head, the text tower's last position through its linear
`head`), so it maps onto "none" heads, with its `logit_bias` as the DualEncoder's.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch

from mmcl.models.processor import DualProcessor, TransformImageProcessor
from mmcl.models.towers import HFTower, Tower, has_image_processor_files, has_tokenizer_files, parse
from mmcl.models.towers.open_clip import open_clip_tokenizer_for, open_clip_towers_from_cfg, \
    open_clip_towers_from_dir


@dataclass
class DualEncoderParts:
    """What a foreign model is made of, in DualEncoder's terms: towers, processor, heads and
    logit scale. `image_head` / `text_head` are (P, H) weights of "linear" heads (None: fresh);
    `log_scale` is the log of the logit multiplier `scale`; `logit_bias` (0-dim) only for
    sigmoid (SigLIP) models."""

    image_tower: Tower
    text_tower: Tower
    processor: DualProcessor
    projection: str
    projection_dim: int
    scale: float
    log_scale: torch.Tensor
    image_head: torch.Tensor | None = None
    text_head: torch.Tensor | None = None
    logit_bias: torch.Tensor | None = None


def resolve_directory(path: str) -> str:
    """`path` if it is a directory; otherwise a hub id found in the local Hugging Face cache."""
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ValueError(f"{path!r} is a file; from_pretrained takes a model directory")
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise ValueError(f"model directory {path!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path)
    except Exception as exc:
        raise ValueError(f"{path!r} is not a directory, and no hub model of that id could be found "
                         f"(offline runs need it in the local cache): {exc}") from exc


def read_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{directory!r} has no config.json: it is not a model directory")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"config file {path!r} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"config file {path!r} must hold a JSON object")
    return config


def _hf_processor(directory: str, vision_config, text_tower) -> DualProcessor:
    """The image processor and tokenizer saved with a transformers model, if any."""
    from transformers import AutoImageProcessor, AutoTokenizer

    if has_image_processor_files(directory):
        image_processor = AutoImageProcessor.from_pretrained(directory)
    else:  # plain resize / normalise at the model's size
        size = getattr(vision_config, "image_size", 224)
        image_processor = TransformImageProcessor(size, (0.5,) * 3, (0.5,) * 3)
    tokenizer = AutoTokenizer.from_pretrained(directory) if has_tokenizer_files(directory) else None
    return DualProcessor(image_processor, tokenizer, text_tower.max_length,
                         pad_to_max_length=text_tower.pad_to_max_length)


def from_transformers_dir(directory: str, config: dict) -> DualEncoderParts:
    """The parts of a transformers CLIPModel, VisionTextDualEncoderModel or SiglipModel directory."""
    import transformers

    model_type = config.get("model_type")
    if model_type == "siglip":
        return _siglip_parts(directory)
    if model_type == "clip":
        # transformers 5's CLIPModel holds a CLIPVisionModel and a CLIPTextModel: take them.
        hf = transformers.CLIPModel.from_pretrained(directory, dtype=torch.float32)
    elif model_type == "vision-text-dual-encoder":
        hf = transformers.VisionTextDualEncoderModel.from_pretrained(directory, dtype=torch.float32)
    else:
        raise ValueError(
            f"{directory!r} holds a transformers {model_type!r} model; DualEncoder.from_pretrained loads mmcl, "
            "CLIPModel, SiglipModel and VisionTextDualEncoderModel directories (use DualEncoder.from_towers for "
            "single towers)"
        )
    vision, text = hf.vision_model, hf.text_model
    image_tower, text_tower = HFTower(vision, "image", "pooler"), HFTower(text, "text", "pooler")
    return DualEncoderParts(
        image_tower, text_tower, _hf_processor(directory, vision.config, text_tower), projection="linear",
        projection_dim=hf.visual_projection.out_features, scale=float(hf.logit_scale.detach().exp()),
        log_scale=hf.logit_scale.detach().reshape(()), image_head=hf.visual_projection.weight.detach(),
        text_head=hf.text_projection.weight.detach())


def _siglip_parts(directory: str) -> DualEncoderParts:
    """A SiglipModel: its SiglipVisionModel and SiglipTextModel pooled by pooler_output (the
    embeddings themselves), identity heads, exp(logit_scale) and logit_bias."""
    import transformers

    hf = transformers.SiglipModel.from_pretrained(directory, dtype=torch.float32)
    vision, text = hf.vision_model, hf.text_model
    if not getattr(vision.config, "vision_use_head", True):
        raise ValueError(f"{directory!r}: a SiglipModel whose vision tower has no pooling head "
                         "(vision_use_head=false) gives no image embedding")
    image_tower, text_tower = HFTower(vision, "image", "pooler"), HFTower(text, "text", "pooler")
    if image_tower.output_dim != text_tower.output_dim:
        raise ValueError(f"{directory!r}: SigLIP image embeddings ({image_tower.output_dim}) and text embeddings "
                         f"({text_tower.output_dim}) differ in width")
    return DualEncoderParts(
        image_tower, text_tower, _hf_processor(directory, vision.config, text_tower), projection="none",
        projection_dim=image_tower.output_dim, scale=float(hf.logit_scale.detach().exp().reshape(())),
        log_scale=hf.logit_scale.detach().reshape(()), logit_bias=hf.logit_bias.detach().reshape(()))


def is_open_clip_dir(directory: str) -> bool:
    """A directory in open_clip's published layout (open_clip_config.json, no config.json)."""
    return os.path.isfile(os.path.join(directory, "open_clip_config.json")) and not os.path.isfile(
        os.path.join(directory, "config.json"))


def from_open_clip(spec: str) -> DualEncoderParts:
    """Both towers of one open_clip model ("open_clip:NAME[:CKPT]" or an open_clip model
    directory), with open_clip's own heads inside them (mmcl heads are identities), its logit
    scale and, for a SigLIP-style model (built with init_logit_bias), its logit bias."""
    if os.path.isdir(spec):
        image, text, scale, bias = open_clip_towers_from_dir(spec)
    else:
        _, name, ckpt = parse(spec, "image")
        image, text, scale, bias = open_clip_towers_from_cfg(name, None, ckpt)
    cfg = image.image_processing()
    processor = DualProcessor(TransformImageProcessor(cfg["size"], cfg["mean"], cfg["std"], 1.0, cfg["interpolation"]),
                              open_clip_tokenizer_for(image.model_cfg), text.max_length)
    return DualEncoderParts(image, text, processor, projection="none", projection_dim=image.output_dim,
                            scale=scale, log_scale=torch.tensor(math.log(scale)), logit_bias=bias)


def _export_problems(model) -> list[str]:
    problems = []
    if model.text_tower is None:
        problems.append("the model is image-only (transformers' dual encoders need a text tower)")
    for name, tower in (("image", model.image_tower), ("text", model.text_tower)):
        if tower is None:
            continue
        if tower.kind != "transformers":
            problems.append(f"the {name} tower is a {tower.kind} model, which transformers cannot hold")
        elif tower.pooling != "pooler":
            problems.append(
                f"the {name} tower is pooled by {tower.pooling!r}, but transformers' dual encoders use the "
                "tower's pooler_output, so the export would predict differently"
            )
    if model.logit_bias is not None:
        problems.extend(_siglip_export_problems(model))
    elif model.projection != "linear":
        problems.append(f'projection heads are {model.projection!r}; transformers holds only bias-free "linear" heads')
    if model.processor.tokenizer is not None and not hasattr(model.processor.tokenizer, "save_pretrained"):
        problems.append("the tokenizer is not a transformers tokenizer")
    if model.processor.tokenizer is None and model.text_tower is not None:
        problems.append("the model has no tokenizer (pass tokenizer= to from_towers)")
    return problems


_SIGLIP_TYPES = ("siglip_vision_model", "siglip_text_model")


def _tower_types(model) -> tuple:
    return tuple(getattr(getattr(getattr(t, "model", None), "config", None), "model_type", None)
                 for t in (model.image_tower, model.text_tower))


def _siglip_export_problems(model) -> list[str]:
    """A sigmoid model (with a logit bias) exports only as a SiglipModel."""
    if _tower_types(model) != _SIGLIP_TYPES:
        return ["the model is a sigmoid model (trained with the SigLIP loss; it has a logit bias): transformers "
                "holds one only as a SiglipModel, whose towers must be a SiglipVisionModel and a "
                f"SiglipTextModel, got {_tower_types(model)}; a CLIPModel or VisionTextDualEncoderModel would "
                "drop the bias and its zero-shot pipeline would give softmax probabilities over the labels "
                "instead of this model's independent sigmoid ones"]
    if model.projection != "none":
        return [f'projection heads are {model.projection!r}; SiglipModel has no projection heads (its towers\' '
                'pooler_output are the embeddings), so a sigmoid model exports with projection "none"']
    return []


def _build_siglip(model):
    import transformers

    vision, text = model.image_tower.model, model.text_tower.model
    config = transformers.SiglipConfig(text_config=text.config.to_dict(), vision_config=vision.config.to_dict())
    hf = transformers.SiglipModel(config)
    hf.vision_model.load_state_dict(vision.state_dict())
    hf.text_model.load_state_dict(text.state_dict())
    with torch.no_grad():
        hf.logit_scale.copy_(model.logit_scale().detach().log().reshape(hf.logit_scale.shape))
        hf.logit_bias.copy_(model.logit_bias.detach().reshape(hf.logit_bias.shape))
    return hf.eval()


def build_transformers_model(model):
    """The transformers model (CLIPModel, VisionTextDualEncoderModel or, for a sigmoid model,
    SiglipModel) equal to `model`."""
    import transformers

    if model.logit_bias is not None:
        return _build_siglip(model)
    vision, text = model.image_tower.model, model.text_tower.model
    both_clip = (vision.config.model_type, text.config.model_type) == ("clip_vision_model", "clip_text_model")
    if both_clip:
        config = transformers.CLIPConfig(text_config=text.config.to_dict(), vision_config=vision.config.to_dict(),
                                         projection_dim=model.projection_dim)
        hf = transformers.CLIPModel(config)
    else:
        config = transformers.VisionTextDualEncoderConfig.from_vision_text_configs(
            vision.config, text.config, projection_dim=model.projection_dim)
        hf = transformers.VisionTextDualEncoderModel(config)
    hf.vision_model.load_state_dict(vision.state_dict())
    hf.text_model.load_state_dict(text.state_dict())
    with torch.no_grad():
        hf.visual_projection.weight.copy_(model.image_projection.weight)
        hf.text_projection.weight.copy_(model.text_projection.weight)
        # transformers does not clamp: store the (clamped) multiplier mmcl actually uses.
        hf.logit_scale.copy_(model.logit_scale().detach().log().reshape(hf.logit_scale.shape))
    return hf.eval()


def export_to_transformers(model, directory: str) -> None:
    problems = _export_problems(model)
    if problems:
        raise ValueError("cannot export to transformers: " + "; ".join(problems))
    hf = build_transformers_model(model)
    _check_same_outputs(model, hf)
    os.makedirs(directory, exist_ok=True)
    hf.save_pretrained(directory)
    image_processor = model.processor.image_processor
    if isinstance(image_processor, TransformImageProcessor):
        image_processor = image_processor.to_transformers()
    image_processor.save_pretrained(directory)
    model.processor.tokenizer.save_pretrained(directory)


@torch.no_grad()
def _check_same_outputs(model, hf) -> None:
    """Guard against silently different predictions: one random batch through both models."""
    h, w = model.processor.image_size
    device = next(model.parameters()).device
    hf.to(device)
    pixels = torch.randn(2, model.image_tower.num_channels, h, w, device=device)
    ids = model.processor.tokenize(["a photo", "two words here"])
    ids = {k: v.to(device) for k, v in ids.items()}
    was_training = model.training
    model.eval()
    try:
        ours = model(pixel_values=pixels, **ids)
    finally:
        model.train(was_training)
    theirs = hf(pixel_values=pixels, **ids)
    ref = ours.logit_scale * ours.image_embeds @ ours.text_embeds.T
    if ours.logit_bias is not None:
        ref = ref + ours.logit_bias
    err = float((ref - theirs.logits_per_image).abs().max())
    if not err <= 1e-3 * max(1.0, float(ref.abs().max())):
        raise RuntimeError(f"exported transformers model differs from the mmcl model (max logit error {err:.3g})")
