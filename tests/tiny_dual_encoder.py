"""A tiny transformers VisionTextDualEncoderModel (ViT + BERT) with its processor, saved to a
directory, and a handful of real images: the shared fixture material of the evaluation tests."""
import math
import os

import numpy as np
import torch

WORDS = ("a photo of the an image digit zero one two three four five six seven eight nine cat dog car bird "
         "ship truck . bad origami large small video game art in itap handwritten picture").split()
CLASS_NAMES = ["cat", "dog", "car", "bird", "ship", "truck", "handwritten digit"]


def build_tiny_vtde(directory: str, logit_scale: float = 100.0):
    """Write a random-init VisionTextDualEncoderModel + VisionTextDualEncoderProcessor to `directory`.

    Returns (model, processor), transformers' own objects, as the reference.
    """
    from transformers import (BertConfig, BertTokenizerFast, VisionTextDualEncoderConfig,
                              VisionTextDualEncoderModel, VisionTextDualEncoderProcessor, ViTConfig,
                              ViTImageProcessor)

    os.makedirs(directory, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(WORDS)), *letters, *("##" + c for c in letters)]
    # transformers v5 builds the WordPiece tokenizer from a {token: id} dict.
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)})
    image_processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = VisionTextDualEncoderProcessor(image_processor=image_processor, tokenizer=tokenizer)
    config = VisionTextDualEncoderConfig.from_vision_text_configs(
        ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, initializer_range=0.3),
        BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64, max_position_embeddings=64, initializer_range=0.3),
        projection_dim=24,
    )
    torch.manual_seed(0)
    model = VisionTextDualEncoderModel(config).eval()
    with torch.no_grad():
        # A large multiplier spreads the random model's probabilities, so comparisons are not all ~1/C.
        model.logit_scale.fill_(math.log(logit_scale))
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return model, processor


def real_images(n: int = 9):
    """n real images of mixed sizes and modes: crops of scikit-learn's two sample photos (RGB),
    handwritten digits (grey, "L") and one RGBA."""
    from PIL import Image
    from sklearn.datasets import load_digits, load_sample_images

    photos = load_sample_images().images
    digits = load_digits()
    out = []
    for i in range(n):
        if i % 3 == 0:
            y, x = 40 * i, 25 * i
            out.append(Image.fromarray(photos[(i // 3) % 2][y : y + 150 + 10 * i, x : x + 200]))
        elif i % 3 == 1:
            pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)
            out.append(Image.fromarray(pixels, mode="L").resize((24, 24)))
        else:
            rgba = np.concatenate([photos[1][:64, 8 * i : 8 * i + 48], np.full((64, 48, 1), 200, np.uint8)], axis=2)
            out.append(Image.fromarray(rgba, mode="RGBA"))
    return out


def reference_features(hf_model, hf_processor, images=None, texts=None):
    """transformers' own projected features, float64 and L2-normalised: (N, P) images, (T, P) texts."""
    out = []
    with torch.no_grad():
        if images is not None:
            pix = hf_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
            feats = hf_model.get_image_features(pixel_values=pix)
            out.append(torch.nn.functional.normalize(_pooled(feats).double(), dim=-1))
        if texts is not None:
            tok = hf_processor.tokenizer(texts, padding=True, return_tensors="pt")
            feats = hf_model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
            out.append(torch.nn.functional.normalize(_pooled(feats).double(), dim=-1))
    return out[0] if len(out) == 1 else tuple(out)


def _pooled(x):
    # transformers v5 returns a model output whose pooler_output holds the projected features.
    return x if isinstance(x, torch.Tensor) else x.pooler_output
