"""Zero-shot classification with mmcl's DualEncoder against transformers' VisionTextDualEncoderModel."""
import datasets
import numpy as np
import pytest
import torch
from tiny_dual_encoder import CLASS_NAMES, build_tiny_vtde, real_images, reference_features

from mmcl.eval import embed_images
from mmcl.models import DualEncoder
from mmcl.zeroshot import DEFAULT_TEMPLATES, IMAGENET_TEMPLATES, ZeroShotClassifier


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("vtde")
    hf_model, hf_processor = build_tiny_vtde(str(directory))
    return DualEncoder.from_pretrained(str(directory)), hf_model, hf_processor


def _open_clip_metadata():
    # Load open_clip's template module alone: importing the whole package costs seconds.
    import importlib.util
    import os

    package_dir = importlib.util.find_spec("open_clip").submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location("_oc_meta", os.path.join(package_dir, "zero_shot_metadata.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_templates_are_clips():
    ocm = _open_clip_metadata()

    assert [t.replace("{}", "fox") for t in IMAGENET_TEMPLATES] == [f("fox") for f in ocm.OPENAI_IMAGENET_TEMPLATES]
    assert [t.replace("{}", "fox") for t in DEFAULT_TEMPLATES] == [f("fox") for f in ocm.SIMPLE_IMAGENET_TEMPLATES]


def test_single_prompt_probabilities_equal_transformers(tiny):
    model, hf_model, hf_processor = tiny
    images = real_images(7)
    names = CLASS_NAMES[:5]
    inputs = hf_processor(text=names, images=[im.convert("RGB") for im in images], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = hf_model(**inputs).logits_per_image.softmax(dim=-1)
    # batch_size=3: two full batches and a partial one.
    clf = ZeroShotClassifier(model, names, templates="none", batch_size=3, progress=False)
    got = clf.predict(images)
    assert got.shape == (7, 5)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    assert (expected.max(dim=1).values > 0.3).all(), "reference too flat for the comparison to mean much"


def test_template_mean_matches_float64_reference(tiny, tmp_path):
    model, hf_model, hf_processor = tiny
    images = real_images(5)
    templates = ["a photo of the {}.", "itap of a {}", "{}", "a bad photo of a large {}."]
    names = CLASS_NAMES
    image_ref = reference_features(hf_model, hf_processor, images=images)
    class_ref = []
    for name in names:  # CLIP's procedure, written out in float64
        t = reference_features(hf_model, hf_processor, texts=[p.replace("{}", name) for p in templates])
        class_ref.append(torch.nn.functional.normalize(t.mean(dim=0), dim=0))
    scale = hf_model.logit_scale.detach().double().exp()
    expected = (scale * image_ref @ torch.stack(class_ref).T).softmax(dim=-1)

    clf = ZeroShotClassifier(model, names, templates=templates, batch_size=2, progress=False)
    torch.testing.assert_close(clf.class_embeddings.double(), torch.stack(class_ref), atol=1e-5, rtol=1e-4)
    from_pil = clf.predict(images)
    torch.testing.assert_close(from_pil.double(), expected, atol=2e-5, rtol=1e-4)

    # The same images as files on disk and as pixel tensors prepared by the processor.
    paths = []
    for i, im in enumerate(images):
        paths.append(tmp_path / f"img{i}.png")
        im.save(paths[-1])
    torch.testing.assert_close(clf.predict([str(p) for p in paths]), from_pil, atol=1e-6, rtol=1e-5)
    pixels = model.processor.preprocess_images(images)
    torch.testing.assert_close(clf.predict(pixels), from_pil, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(clf.predict(images[0]), from_pil[:1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("string_labels", [False, True])
def test_evaluate_top1_top5_on_a_dataset(tiny, string_labels):
    model, hf_model, hf_processor = tiny
    images = real_images(9)
    names = CLASS_NAMES  # 7 classes, so top-5 differs from top-1 and from 1.0
    inputs = hf_processor(text=names, images=[im.convert("RGB") for im in images], return_tensors="pt", padding=True)
    with torch.no_grad():
        ranking = hf_model(**inputs).logits_per_image.argsort(dim=1, descending=True)
    # Labels at known reference ranks: 0 (top-1 hit), 3 (top-5 hit), 6 (miss).
    wanted = [0, 3, 6, 0, 6, 3, 1, 5, 0]
    labels = [int(ranking[i, r]) for i, r in enumerate(wanted)]
    column = [names[y] for y in labels] if string_labels else labels
    features = datasets.Features({
        "image": datasets.Image(),
        "label": datasets.Value("string") if string_labels else datasets.ClassLabel(names=names),
    })
    ds = datasets.Dataset.from_dict({"image": images, "label": column}, features=features)
    clf = ZeroShotClassifier(model, names, templates="none", batch_size=4, progress=False)
    out = clf.evaluate(ds, return_predictions=True)
    assert out["top1"] == pytest.approx(np.mean([r == 0 for r in wanted]))
    assert out["top5"] == pytest.approx(np.mean([r < 5 for r in wanted]))
    assert out["num_samples"] == 9
    assert out["predictions"].tolist() == ranking[:, 0].tolist()


def test_embed_images_inputs_agree(tiny):
    model, hf_model, hf_processor = tiny
    images = real_images(5)
    ds = datasets.Dataset.from_dict({"picture": images}, features=datasets.Features({"picture": datasets.Image()}))
    from_ds = embed_images(model, ds, image_column="picture", batch_size=2)
    torch.testing.assert_close(from_ds.double(), reference_features(hf_model, hf_processor, images=images),
                               atol=1e-5, rtol=1e-4)
    raw = [torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous() for im in images]
    torch.testing.assert_close(embed_images(model, raw, batch_size=3), from_ds, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="image_column 'image' is not in the dataset"):
        embed_images(model, ds)


def test_bad_input_is_named(tiny, tmp_path):
    model = tiny[0]
    with pytest.raises(ValueError, match="class_names is empty"):
        ZeroShotClassifier(model, [])
    with pytest.raises(TypeError, match="class_names must be a list"):
        ZeroShotClassifier(model, "cat,dog")
    with pytest.raises(ValueError, match="duplicates"):
        ZeroShotClassifier(model, ["cat", "dog", "cat"])
    with pytest.raises(ValueError, match="containing '{}'"):
        ZeroShotClassifier(model, ["cat"], templates=["a photo"])
    clf = ZeroShotClassifier(model, ["cat", "dog"], progress=False)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(ValueError, match="cannot read image .*broken.jpg"):
        clf.predict([str(bad)])
    with pytest.raises(ValueError, match="image file not found: .*missing.png"):
        clf.predict([str(tmp_path / "missing.png")])
    ds = datasets.Dataset.from_dict({"image": real_images(2), "label": [0, 5]})
    with pytest.raises(ValueError, match=r"label 5 in column 'label' is not a class index in \[0, 2\)"):
        clf.evaluate(ds)
    with pytest.raises(ValueError, match="label_column 'y' is not in the dataset"):
        clf.evaluate(ds, label_column="y")
    # A corrupt image inside a dataset: the error names its row and file, not a PIL internals trace.
    real_images(1)[0].save(tmp_path / "img.png")
    good = {"bytes": (tmp_path / "img.png").read_bytes(), "path": "img.png"}
    broken = {"bytes": b"not an image", "path": "broken.jpg"}
    corrupt = datasets.Dataset.from_dict({"image": [good, good, broken], "label": [0, 1, 0]},
                                         features=datasets.Features({"image": datasets.Image(),
                                                                     "label": datasets.Value("int64")}))
    with pytest.raises(ValueError, match="image 2: cannot read image broken.jpg"):
        clf.evaluate(corrupt)
