"""The shape of the training code: renamed config keys, each section's own validate, the methods
registry as the only reader of `mode`, configs saved by earlier versions, and a checkpoint written
by the code before the config rename resuming bit-exactly."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import REPO, tiny_overrides, write_tokenizer

from mmcl.data import DataConfig, load_digits_dataset
from mmcl.methods import METHODS, LossConfig, MoCoConfig, Objective, build_objective, objective_class
from mmcl.train import (
    BatchNormConfig, CheckpointConfig, EvalConfig, ModelConfig, OptimConfig, TrainConfig, fit, load_config,
    load_saved_config,
)
from mmcl.train.config import RENAMED
from mmcl.train.saved import flat_dict, upgrade_keys
from mmcl.train.evaluation import Evaluator

TOWERS = ["model.image_tower=timm:resnet18", "model.text_tower=x"]


# --------------------------------------------------------------------------- renamed keys


@pytest.mark.parametrize("old", sorted(RENAMED))
def test_renamed_key_raises_naming_its_new_key(old, tmp_path):
    new = RENAMED[old].split(" ")[0]
    with pytest.raises(ValueError, match=f"{re.escape(old)}' moved to {re.escape(new)}"):
        load_config(None, TOWERS + [f"{old}=1"])
    section, key = old.split(".")
    path = tmp_path / "old.yaml"
    path.write_text(f"{section}:\n  {key}: 1\n")
    with pytest.raises(ValueError, match=re.escape(new)):
        load_config(path, TOWERS)


def test_new_keys_land_in_their_sections():
    cfg = load_config(None, TOWERS + [
        "moco.queue_size=128", "moco.key_momentum=0.99", "moco.final_momentum=1.0", "moco.shuffle_bn=false",
        "data.image_size=24", "model.batchnorm.splits=2", "checkpoint.every=5", "checkpoint.keep=3",
        "checkpoint.resume=auto", "train.accumulate=4", "train.accumulate_mode=plain", "train.batch_size=8"])
    assert (cfg.moco.queue_size, cfg.moco.key_momentum, cfg.moco.final_momentum, cfg.moco.shuffle_bn) == \
        (128, 0.99, 1.0, False)
    assert cfg.data.image_size == 24 and cfg.model.batchnorm == BatchNormConfig(splits=2, sync=False)
    assert cfg.checkpoint == CheckpointConfig(every=5, keep=3, resume="auto")
    assert (cfg.train.accumulate, cfg.train.accumulate_mode) == (4, "plain")


# --------------------------------------------------------------------------- each section validates itself


@pytest.mark.parametrize("section,field,value,match", [
    (ModelConfig(image_tower="x"), "projection", "conv", "model.projection must be one of linear, mlp"),
    (ModelConfig(image_tower="x"), "projection_dim", 0, "model.projection_dim"),
    (ModelConfig(image_tower="x"), "image_tower", None, "model.image_tower"),
    (BatchNormConfig(), "splits", 0, "model.batchnorm.splits"),
    (BatchNormConfig(), "sync", "yes", "model.batchnorm.sync"),
    (DataConfig(), "augment", "strong", "DataConfig.augment"),
    (DataConfig(), "augment_on_device", "", "DataConfig.augment_on_device"),
    (LossConfig(), "impl", "cuda", "loss.impl must be one of auto, naive, chunked, triton"),
    (LossConfig(), "temperature", 0.0, "loss.temperature"),
    (LossConfig(), "simclr_weight", -1.0, "loss.simclr_weight"),
    (MoCoConfig(), "queue_size", 0, "moco.queue_size"),
    (MoCoConfig(), "key_momentum", 1.0, "moco.key_momentum"),
    (MoCoConfig(), "final_momentum", 1.5, "moco.final_momentum"),
    (OptimConfig(), "name", "adam", "optim.name must be one of adamw, lars, sgd"),
    (OptimConfig(), "schedule", "step", "optim.schedule"),
    (OptimConfig(), "min_lr_ratio", 2.0, "optim.min_lr_ratio"),
    (TrainConfig(), "accumulate", 0, "train.accumulate"),
    (TrainConfig(), "accumulate_mode", "gradcache", "train.accumulate_mode must be one of cached, plain"),
    (TrainConfig(), "mixed_precision", "fp8", "train.mixed_precision"),
    (TrainConfig(), "trackers", ["mlflow"], "unknown tracker 'mlflow'"),
    (CheckpointConfig(), "every", -1, "checkpoint.every"),
    (CheckpointConfig(), "keep", 0, "checkpoint.keep"),
    (CheckpointConfig(), "resume", 3, "checkpoint.resume"),
    (EvalConfig(), "knn_k", 0, "eval.knn_k"),
    (EvalConfig(), "knn_train_samples", 0, "eval.knn_train_samples"),
])
def test_each_section_validates_itself(section, field, value, match):
    section.validate()  # the defaults (plus a tower) are valid
    setattr(section, field, value)
    with pytest.raises(ValueError, match=re.escape(match)):
        section.validate()


def test_rules_across_sections_name_both_keys():
    with pytest.raises(ValueError, match=r"train.batch_size \(6\) must be divisible by model.batchnorm.splits \(4\)"):
        load_config(None, TOWERS + ["mode=moco", "data.augment=mocov2", "train.batch_size=6",
                                    "model.batchnorm.splits=4"])
    with pytest.raises(ValueError, match="image-only mode"):
        load_config(None, TOWERS + ["data.augment=none", "data.augment_on_device=mocov2"])
    with pytest.raises(ValueError, match="mode must be one of clip, simclr, moco, clip\\+simclr, siglip, pcl, byol"):
        load_config(None, TOWERS + ["mode=swav"])


# --------------------------------------------------------------------------- methods


def test_registry_classes_describe_themselves():
    assert set(METHODS) == {"clip", "simclr", "moco", "clip+simclr", "siglip", "pcl", "byol"}
    for mode, cls in METHODS.items():
        assert issubclass(cls, Objective) and cls.name == mode and objective_class(mode) is cls
        assert cls.batch_keys and cls.eval_kind in ("zeroshot", "knn")
        assert cls.needs_text == ("input_ids" in cls.batch_keys) and cls.needs_views == ("view1" in cls.batch_keys)
        assert cls.learns_scale == cls.needs_text  # only the image-text methods learn the temperature


def test_build_objective_is_the_only_reader_of_mode():
    """Outside mmcl/methods/__init__.py no library code reads a `.mode` attribute or compares a
    `mode` string: everything asks the objective (or its class)."""
    pattern = re.compile(r"\.mode\b|\bmode\s*(==|!=|\bin\b|\bnot in\b)")
    not_the_training_mode = {("mmcl/data/shard_writer.py", "info.mode")}  # a tar member's permission bits
    found = []
    for path in sorted(Path(REPO, "mmcl").rglob("*.py")):
        if path == Path(REPO, "mmcl", "methods", "__init__.py"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            rel = str(path.relative_to(REPO))
            if any(rel == f and text in code for f, text in not_the_training_mode):
                continue
            if pattern.search(code) and '"""' not in code and not code.strip().startswith(("`", "mode:")):
                found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not found, "mode read outside mmcl.methods:\n" + "\n".join(found)
    # ... and the registry does read it.
    assert "config_or_mode.mode" in Path(REPO, "mmcl", "methods", "__init__.py").read_text()


@pytest.mark.parametrize("mode", sorted(METHODS))
def test_objective_state_modules_and_device(mode, tmp_path):
    cfg = load_config(None, tiny_overrides(mode, tmp_path / "r", write_tokenizer(tmp_path / "tok")))
    from mmcl.train.builders import build_model

    objective = build_objective(cfg, build_model(cfg))
    assert type(objective) is METHODS[mode]
    modules = objective.state_modules()
    expected = {"moco": {"key_encoder", "queue"}, "pcl": {"key_encoder", "queue", "prototypes"},
                "byol": {"target_encoder", "predictor"}}
    assert set(modules) == expected.get(mode, set())
    objective.to(torch.float64)  # nn.Module.to semantics: every state module follows
    for module in modules.values():
        assert all(t.dtype == torch.float64 for t in module.state_dict().values() if t.is_floating_point())
    if mode == "moco":
        assert modules["queue"].size == 24 and modules["key_encoder"].momentum == cfg.moco.key_momentum


def test_zero_shot_class_names_come_from_the_class_label():
    cfg = load_config(None, TOWERS)
    evaluator = Evaluator(cfg)
    assert evaluator.kind == "zeroshot" and Evaluator(cfg, "knn").kind == "knn"
    ds = load_digits_dataset("test", seed=0)
    assert evaluator.class_names(ds) == ds.features["label"].names
    cfg.eval.class_names = ["a", "b"]
    assert evaluator.class_names(ds) == ["a", "b"]


# --------------------------------------------------------------------------- configs of earlier versions


def test_upgrade_maps_every_renamed_key_and_both_accumulation_knobs():
    old = {f"{k}": 7 for k in RENAMED if k not in ("train.grad_accum_steps", "model.image_size")}
    up = upgrade_keys({**old, "train.grad_accum_steps": 3, "model.image_size": 32})
    assert up["moco.key_momentum"] == 7 and up["checkpoint.every"] == 7 and up["model.batchnorm.sync"] == 7
    assert (up["train.accumulate"], up["train.accumulate_mode"], up["data.image_size"]) == (3, "plain", 32)
    assert not set(up) & set(RENAMED)
    assert "train.accumulate_mode" not in upgrade_keys({"train.accumulate": 4, "train.grad_accum_steps": 1})
    with pytest.raises(ValueError, match="data.image_size"):
        upgrade_keys({"model.image_size": 32, "data.image_size": 16})


def test_saved_flat_config_round_trips(tmp_path):
    cfg = load_config(None, tiny_overrides("moco", tmp_path / "r", "tok") + ["train.trackers=[jsonl]",
                                                                           "optim.betas=[0.8, 0.9]"])
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "config.json").write_text(json.dumps(flat_dict(cfg)))
    assert load_saved_config(tmp_path) == cfg
    with pytest.raises(ValueError, match="no saved config.json"):
        load_saved_config(tmp_path / "missing")


LEGACY_COMMIT = "c7e8fd9"  # the last commit whose config used the old key names

LEGACY_RUN = """
import sys
from mmcl.train import fit, load_config
fit(load_config(None, sys.argv[1:]))
"""


def _legacy_tree(tmp_path) -> Path | None:
    """mmcl as of LEGACY_COMMIT, extracted from the repository's history."""
    if subprocess.run(["git", "-C", REPO, "cat-file", "-e", f"{LEGACY_COMMIT}^{{commit}}"],
                      capture_output=True).returncode != 0:
        return None
    root = tmp_path / "legacy"
    root.mkdir()
    archive = subprocess.run(["git", "-C", REPO, "archive", LEGACY_COMMIT, "mmcl", "kernels"], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    (root / "mmcl" / "kernels").symlink_to(root / "kernels")  # installed as mmcl.kernels
    return root


@pytest.mark.slow
def test_checkpoint_of_the_legacy_code_resumes_bit_exactly(tmp_path):
    """The code before the rename trains MoCo (old keys: loss.queue_size, loss.momentum,
    train.grad_accum_steps, train.save_every, ...) for 6 steps with checkpoints. Today's code reads
    that run's saved config, resumes from its step-4 checkpoint (model, optimizer, schedule, data
    position, RNG, key encoder and queue) and must end with the legacy run's exact weights."""
    legacy = _legacy_tree(tmp_path)
    if legacy is None:
        pytest.skip(f"the repository history (commit {LEGACY_COMMIT}) is not available")
    tok = write_tokenizer(tmp_path / "tok")
    old_run = tmp_path / "old"
    overrides = [o.replace("data.image_size", "model.image_size").replace("moco.queue_size", "loss.queue_size")
                 for o in tiny_overrides("moco", old_run, tok, steps=6, batch=6, samples=40)]
    overrides += ["loss.momentum=0.9", "train.grad_accum_steps=2", "train.save_every=2", "train.keep_checkpoints=3",
                  "eval.enabled=false", "train.trackers=[jsonl]"]
    env = dict(os.environ, PYTHONPATH=str(legacy), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    r = subprocess.run([sys.executable, "-c", LEGACY_RUN, *overrides], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    cfg = load_saved_config(old_run)
    assert (cfg.moco.queue_size, cfg.moco.key_momentum, cfg.data.image_size) == (24, 0.9, 16)
    assert (cfg.train.accumulate, cfg.train.accumulate_mode, cfg.checkpoint.every) == (2, "plain", 2)
    cfg.output_dir = str(tmp_path / "new")
    cfg.checkpoint.resume = str(old_run / "checkpoints" / "step_00000004")
    results = fit(cfg)
    assert results["step"] == 6
    want = load_file(str(old_run / "final" / "model.safetensors"))
    got = load_file(str(Path(results["final_dir"]) / "model.safetensors"))
    assert want.keys() == got.keys()
    differ = [k for k in want if not torch.equal(want[k], got[k])]
    assert not differ, f"weights differ from the legacy run after resuming: {differ[:5]}"
    old_extra = load_file(str(old_run / "checkpoints" / "step_00000006" / "extra.safetensors"))
    new_extra = load_file(str(tmp_path / "new" / "checkpoints" / "step_00000006" / "extra.safetensors"))
    assert old_extra.keys() == new_extra.keys() and all(torch.equal(old_extra[k], new_extra[k]) for k in old_extra)
