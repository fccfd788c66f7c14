"""Models saved by mmcl 0.1.0 still load, with the same outputs.

tests/fixtures/saved_models/<kind>/ holds, for each saveable tower kind, what save_pretrained
wrote (config.json, mmcl_processor.json), the header of its model.safetensors (weights.json:
tensor names, dtypes and shapes) and expected.safetensors (a fixed input and the embeddings the
saved model gave for it). The weights are a fixed formula of each tensor's name, position and
shape (`formula_tensor`), so the large files need not be committed: the test rebuilds them from
the header; the tiny models' weight files are committed as written.

The fixtures were written by running this file with the 0.1.0 code:
    cd <0.1.0 checkout> && python <this checkout>/tests/test_models_saved.py OUT_DIR
"""
import json
import math
import os
import shutil
import struct
import sys
from pathlib import Path

import torch

FIXTURES = Path(__file__).parent / "fixtures" / "saved_models"
KINDS = ("transformers", "open_clip", "timm", "torchvision", "mmcl")
# A committed weight file must stay small; larger ones are rebuilt from weights.json.
MAX_COMMITTED_WEIGHTS = 64_000
_DTYPES = {"F32": torch.float32, "I64": torch.int64}


def _uniform(n: int, index: int) -> torch.Tensor:
    """n values in [-1, 1) from an integer hash of (position, index): the same on any machine."""
    mask = 2**31 - 1  # 31-bit arithmetic: no product overflows int64
    x = (torch.arange(n, dtype=torch.int64) * 0x1E3779B1 + index * 0x05EBCA77 + 0x165667B1) & mask
    for mult in (0x05EBCA6B, 0x42B2AE35):
        x = ((x ^ (x >> 15)) * mult) & mask
    x = x ^ (x >> 13)
    return x.double() / 2**30 - 1.0


def formula_tensor(name: str, index: int, shape: list[int], dtype: str) -> torch.Tensor:
    """Deterministic weights with sane magnitudes: matrices ~ U(+-sqrt(3 / fan_in)), norm scales
    near 1, biases and running means small, running variances near 1, counters 0."""
    if dtype == "I64":
        return torch.zeros(shape, dtype=torch.int64)
    n = math.prod(shape)
    u = _uniform(n, index)
    if name.endswith("running_var"):
        values = 1.0 + 0.25 * u
    elif name.endswith("running_mean") or len(shape) <= 1 and not name.endswith("weight"):
        values = 0.05 * u
    elif len(shape) <= 1:  # norm scales
        values = 1.0 + 0.1 * u
    else:
        values = u * math.sqrt(3.0 / (n // shape[0]))
    return values.reshape(shape).to(_DTYPES[dtype])


def read_header(path) -> dict:
    """The JSON header of a safetensors file: {name: {"dtype", "shape", "data_offsets"}}."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


def formula_state(header: dict) -> dict[str, torch.Tensor]:
    return {name: formula_tensor(name, i, info["shape"], info["dtype"])
            for i, (name, info) in enumerate(sorted(header.items()))}


# ---------------------------------------------------------------------------------------- the test
def _model_dir(kind: str, tmp_path) -> Path:
    """The fixture as save_pretrained left it: committed files plus the rebuilt weights."""
    from safetensors.torch import load_file, save_file

    src, dst = FIXTURES / kind, tmp_path / kind
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("weights.json", "expected.safetensors"))
    header = json.loads((src / "weights.json").read_text())
    state = formula_state(header)
    if (dst / "model.safetensors").is_file():
        committed = load_file(dst / "model.safetensors")
        assert committed.keys() == state.keys()
        for name in state:  # the formula is what was saved
            assert torch.equal(committed[name], state[name]), name
    else:
        save_file(state, dst / "model.safetensors")
    return dst


def _check_kind(kind: str, tmp_path) -> None:
    from safetensors.torch import load_file

    from mmcl.models import DualEncoder

    expected = load_file(FIXTURES / kind / "expected.safetensors")
    model = DualEncoder.from_pretrained(_model_dir(kind, tmp_path))
    config = json.loads((FIXTURES / kind / "config.json").read_text())
    rebuilt = json.loads(json.dumps(model.config()))  # as written to config.json
    assert rebuilt["image_tower"] == config["image_tower"] and rebuilt["text_tower"] == config["text_tower"]
    with torch.no_grad():
        image = model.encode_image(expected["pixel_values"])
        torch.testing.assert_close(image, expected["image_embeds"], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(model.logit_scale(), expected["logit_scale"], atol=0, rtol=1e-6)
        if "input_ids" in expected:
            text = model.encode_text(expected["input_ids"], expected["attention_mask"])
            torch.testing.assert_close(text, expected["text_embeds"], atol=2e-5, rtol=1e-4)
        else:
            assert config["text_tower"] is None and not model.has_text_tower
    # Saving again writes the same description, and the same tensor names.
    model.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert {k: v for k, v in again.items() if k != "mmcl_version"} == \
        {k: v for k, v in config.items() if k != "mmcl_version"}
    assert read_header(tmp_path / "again" / "model.safetensors").keys() == \
        json.loads((FIXTURES / kind / "weights.json").read_text()).keys()


def test_saved_transformers_model_loads(tmp_path):
    _check_kind("transformers", tmp_path)


def test_saved_open_clip_model_loads_without_its_name_registered(tmp_path):
    _check_kind("open_clip", tmp_path)


def test_saved_timm_model_loads(tmp_path):
    _check_kind("timm", tmp_path)


def test_saved_torchvision_model_loads(tmp_path):
    _check_kind("torchvision", tmp_path)


def test_saved_cifar_resnet_model_loads(tmp_path):
    _check_kind("mmcl", tmp_path)


def test_fixtures_stay_small():
    total = sum(f.stat().st_size for f in FIXTURES.rglob("*") if f.is_file())
    assert total < 300_000, total
    assert sorted(p.name for p in FIXTURES.iterdir()) == sorted(KINDS)


# ------------------------------------------------------------------------- writing the fixtures
_OPEN_CLIP_CFG = {
    "embed_dim": 8,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 16, "head_width": 8, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}


def _fixture_models(tmp: Path) -> dict:
    """kind -> (model, whether it has text), built with the running mmcl."""
    import open_clip
    from transformers import BertConfig, ViTConfig

    from mmcl.models import DualEncoder

    tiny = dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=12)
    (tmp / "mmcl-fixture-clip.json").write_text(json.dumps(_OPEN_CLIP_CFG))
    open_clip.add_model_config(tmp / "mmcl-fixture-clip.json")
    return {
        "transformers": DualEncoder.from_towers(
            ViTConfig(image_size=16, patch_size=8, **tiny), BertConfig(vocab_size=40, max_position_embeddings=16, **tiny),
            projection_dim=6, text_pooling="mean"),
        "open_clip": DualEncoder.from_towers("open_clip:mmcl-fixture-clip", "open_clip:mmcl-fixture-clip",
                                             projection_dim=6),
        "timm": DualEncoder.from_towers("timm:test_efficientnet", projection="mlp", projection_dim=6),
        "torchvision": DualEncoder.from_towers("torchvision:shufflenet_v2_x0_5", projection_dim=6),
        "mmcl": DualEncoder.from_towers("mmcl:cifar_resnet18", projection="mlp", projection_dim=6),
    }


def write_fixtures(out: Path) -> None:
    from safetensors.torch import save_file

    from mmcl.models import DualEncoder

    out.mkdir(parents=True, exist_ok=True)
    models = _fixture_models(out)
    os.remove(out / "mmcl-fixture-clip.json")
    gen = torch.Generator().manual_seed(0)
    for kind, model in models.items():
        directory = out / kind
        model.save_pretrained(directory)
        header = read_header(directory / "model.safetensors")
        lines = [f"{json.dumps(name)}: {json.dumps({'dtype': info['dtype'], 'shape': info['shape']})}"
                 for name, info in sorted(header.items())]
        (directory / "weights.json").write_text("{\n" + ",\n".join(lines) + "\n}\n")
        save_file(formula_state(header), directory / "model.safetensors")
        model = DualEncoder.from_pretrained(directory)  # the saved files, read back by the same code
        expected = {"pixel_values": torch.randn(2, 3, 16, 16, generator=gen)}
        if model.has_text_tower:
            vocab = model.text_tower.vocab_size or 40
            expected["input_ids"] = torch.randint(0, vocab, (2, 8), generator=gen)
            expected["attention_mask"] = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
        with torch.no_grad():
            expected["image_embeds"] = model.encode_image(expected["pixel_values"])
            expected["logit_scale"] = model.logit_scale().detach()
            if model.has_text_tower:
                expected["text_embeds"] = model.encode_text(expected["input_ids"], expected["attention_mask"])
        save_file({k: v.contiguous() for k, v in expected.items()}, directory / "expected.safetensors")
        if (directory / "model.safetensors").stat().st_size > MAX_COMMITTED_WEIGHTS:
            os.remove(directory / "model.safetensors")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    write_fixtures(Path(sys.argv[1]))
