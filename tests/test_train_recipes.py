"""Few-step runs of every recipe on CPU: SimCLR, MoCo and SLIP-style in-process through the recipe
scripts, CLIP through `accelerate launch --multi_gpu --num_processes 2` (gloo) checked against a
one-process run of the same global batches."""
import json
import os

import pytest
import torch
import train_clip
import train_moco
import train_simclr
from helpers.launch import accelerate_launch
from safetensors.torch import load_file
from train_helpers import REPO, recipe_overrides, write_tokenizer

from mmcl.train import fit, load_config
from mmcl.train.recipe import recipe_main

RECIPES = os.path.join(REPO, "recipes")


def test_recipes_name_their_default_configs():
    for recipe, name in ((train_clip, "clip_digits.yaml"), (train_simclr, "simclr_digits.yaml"),
                         (train_moco, "moco_digits.yaml")):
        assert recipe.DEFAULT_CONFIG == os.path.join(RECIPES, "configs", name)
        assert load_config(recipe.DEFAULT_CONFIG).mode == name.split("_")[0]


def test_recipe_main_reports_config_errors(tmp_path, capsys):
    with pytest.raises(SystemExit, match="error: .*no_such_key"):
        recipe_main(train_clip.DEFAULT_CONFIG, ["train.no_such_key=1"])
    with pytest.raises(SystemExit, match="does not exist"):
        recipe_main(train_clip.DEFAULT_CONFIG, ["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(TypeError, match="default_config"):
        recipe_main(None, [])


@pytest.mark.parametrize("recipe,mode", [(train_simclr, "simclr"), (train_moco, "moco")])
def test_image_only_recipe_trains_and_evaluates(recipe, mode, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the suite runs on one thread (conftest); the YAML's num_threads=1 must not leak
    try:
        res = recipe_main(recipe.DEFAULT_CONFIG, recipe_overrides(mode, tmp_path / "run", None, steps=3)
                          + ["train.eval_every=2"])
        assert torch.get_num_threads() == 2  # the YAML's train.num_threads=1 held only during fit
    finally:
        torch.set_num_threads(threads)
    assert res["step"] == 3 and torch.isfinite(torch.tensor(res["loss"]))
    assert 0.0 <= res["knn_top1"] <= 1.0 and res["skipped_images"] == 0
    final = tmp_path / "run" / "final"
    from mmcl.models import DualEncoder

    model = DualEncoder.from_pretrained(str(final))
    assert not model.has_text_tower
    # TensorBoard event file and the jsonl tracker both got the metrics.
    assert any((tmp_path / "run" / "logs").rglob("events.out.tfevents*"))
    lines = (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()
    assert sum('"loss"' in line for line in lines) == 3
    evals = [json.loads(line) for line in lines if "eval/knn_top1" in line]
    assert [row["step"] for row in evals] == [2, 3]  # periodic (eval_every=2) and final


def test_slip_recipe_config(tmp_path):
    tok = write_tokenizer(tmp_path / "tok")
    res = recipe_main(train_clip.DEFAULT_CONFIG, ["--config", os.path.join(RECIPES, "configs", "clip_simclr_digits.yaml"),
                                                  *recipe_overrides("clip+simclr", tmp_path / "run", tok, steps=2)])
    assert res["step"] == 2 and 0.0 <= res["zeroshot_top1"] <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("accumulate", [1, 2], ids=["ddp", "gradcache"])
def test_accelerate_launch_two_processes_matches_one_process(accumulate, tmp_path):
    """2 gloo processes x batch 4 (DDP), or x micro-batch 2 x GradCache accumulate 2, train on the
    same 8-image global batches as one process with batch 8: the features are gathered across
    ranks with gradients and the towers' gradients averaged (by DDP, or by hand after GradCache),
    so the final weights must agree; both ranks must end with identical weights."""
    tok = write_tokenizer(tmp_path / "tok")
    common = ["eval.enabled=false", "optim.name=sgd", "optim.lr=0.2", "train.max_steps=2"]
    two = recipe_overrides("clip", tmp_path / "two", tok, batch=8 // (2 * accumulate)) + common + [
        f"train.accumulate={accumulate}"]
    r = accelerate_launch(os.path.join(RECIPES, "train_clip.py"), *two, timeout=300)
    assert "weights identical on all 2 processes" in r.stdout

    fit(load_config(train_clip.DEFAULT_CONFIG,
                    recipe_overrides("clip", tmp_path / "one", tok, batch=8) + common))
    a = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    for k in b:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), f"{k}: max diff {(a[k] - b[k]).abs().max():.3e}"
    # ... and training moved the weights: the temperature left its initial 0.07.
    assert abs(float(a["logit_scale.log_scale"].exp()) - 1 / 0.07) > 1e-4


@pytest.mark.slow
def test_fsdp_launch_on_cpu_says_it_runs_data_parallel(tmp_path):
    """`accelerate launch` with FSDP asked for (as recipes/accelerate/fsdp.yaml does) on CPU
    processes: Accelerate runs plain data parallelism, and the run says so once, naming both."""
    tok = write_tokenizer(tmp_path / "tok")
    common = ["train.max_steps=2", "eval.enabled=false"]
    proc = accelerate_launch(os.path.join(REPO, "tests", "scripts", "train_fit.py"), "simclr", str(tmp_path / "run"), tok, "0",
                             *common, env={"ACCELERATE_USE_FSDP": "true"})
    out = proc.stdout + proc.stderr
    assert out.count("mmcl: warning: the launch asked for FSDP") == 1, out[-3000:]
    assert "runs MULTI_CPU here" in out
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()  # it trained to the end
    plain = accelerate_launch(os.path.join(REPO, "tests", "scripts", "train_fit.py"), "simclr", str(tmp_path / "plain"), tok,
                              "0", *common)
    assert "the launch asked for" not in plain.stdout + plain.stderr
