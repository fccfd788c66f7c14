"""Does each method learn? kNN top-1 of MoCo, MoCo+HCL, MoCo+PCL, SimCLR, SimCLR+i-Mix and BYOL,
zero-shot top-1 of CLIP and CLIP+i-Mix, against the random-init encoder, in one table
(bench/RESULTS.md).

CPU (default): the digits protocol of recipes/README.md. The MoCo-family rows and BYOL use
recipes/configs/moco_digits.yaml (ResNet tower, 16x16 views made on the device, 1,000 steps, seed
0), the SimCLR rows recipes/configs/simclr_digits.yaml (same tower, 32x32, 300 steps, seed 0), the
CLIP rows recipes/configs/clip_digits.yaml (same tower, locked MiniLM text tower, 200 steps, seed
0); each group has its own random-init row (same config, no training: the same evaluation of the
freshly built model). kNN top-1 (k=20) of the 297 held-out digits against the 1,500 training
digits; CLIP: zero-shot top-1 of the held-out digits.

    python bench/bench_methods.py                       # the whole table, ~15 min on 2 free cores
    python bench/bench_methods.py --steps-fraction 0.5  # every row at half its steps (said in the table)
    python bench/bench_methods.py --rows moco byol      # a subset; --no-write prints only
    python bench/bench_methods.py --rows random byol --seed 1   # another seed (data split, init, order)
    python bench/bench_methods.py --gpu                 # CIFAR-10, CIFAR ResNet-18, a few GPU minutes

GPU: the CIFAR-10 recipes (moco_v2_cifar10.yaml, simclr_cifar10.yaml, byol_cifar10.yaml) for
`--gpu-epochs` epochs each (default 2; the schedules shortened to match), kNN top-1 (k=200) of the
10,000 test images against all 50,000 training images. It exits with status 2 without CUDA.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
CONFIGS = ROOT / "recipes" / "configs"

# row name -> (base config, overrides, trained). The HCL row uses the HCL paper's debiased + hard
# setting (β = 1, τ⁺ = 0.1); i-Mix mixes half the samples of each batch (CutMix, data.cutmix=0.5).
# BYOL: its own projector (mlp_bn: Linear-BN-ReLU-Linear, as in the paper), target momentum 0.996
# (the paper's, ramped to 1) and half MoCo's lr (0.001); same tower, views, steps and seed as MoCo.
# Its untrained row is the same model (that head, random weights).
BYOL_MODEL = ["model.projection=mlp_bn", "model.projection_hidden=512"]
CPU_ROWS = {
    "random init (MoCo/BYOL protocol)": ("moco_digits.yaml", [], False),
    "MoCo v2": ("moco_digits.yaml", [], True),
    "MoCo v2 + HCL": ("moco_digits.yaml", ["loss.hard_negative_beta=1.0", "loss.debias_tau_plus=0.1"], True),
    "MoCo v2 + PCL": ("moco_digits.yaml", ["mode=pcl", "pcl.num_clusters=[10,20,40]", "pcl.warmup_steps=100"], True),
    "random init (BYOL model)": ("moco_digits.yaml", ["mode=byol", *BYOL_MODEL], False),
    "BYOL": ("moco_digits.yaml", ["mode=byol", *BYOL_MODEL, "byol.momentum=0.996", "byol.predictor_hidden=512",
                                  "optim.lr=0.001"], True),
    "random init (SimCLR protocol)": ("simclr_digits.yaml", [], False),
    "SimCLR": ("simclr_digits.yaml", [], True),
    "SimCLR + i-Mix": ("simclr_digits.yaml", ["data.cutmix=0.5"], True),
    "random init (CLIP protocol)": ("clip_digits.yaml", [], False),
    "CLIP": ("clip_digits.yaml", [], True),
    "CLIP + i-Mix": ("clip_digits.yaml", ["data.cutmix=0.5"], True),
}
GPU_ROWS = {
    "random init": ("moco_v2_cifar10.yaml", [], False),
    "MoCo v2": ("moco_v2_cifar10.yaml", [], True),
    "MoCo v2 + HCL": ("moco_v2_cifar10.yaml", ["loss.hard_negative_beta=1.0", "loss.debias_tau_plus=0.1"], True),
    "MoCo v2 + PCL": ("moco_v2_cifar10.yaml", ["mode=pcl", "pcl.num_clusters=[250,500,1000]"], True),
    "BYOL": ("byol_cifar10.yaml", [], True),
    "SimCLR": ("simclr_cifar10.yaml", [], True),
    "SimCLR + i-Mix": ("simclr_cifar10.yaml", ["data.cutmix=0.5"], True),
}
ALIASES = {"moco": "MoCo v2", "hcl": "MoCo v2 + HCL", "pcl": "MoCo v2 + PCL", "byol": "BYOL", "simclr": "SimCLR",
           "imix": "SimCLR + i-Mix", "clip": "CLIP", "clip-imix": "CLIP + i-Mix", "random": "random init"}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="the CIFAR-10 protocol on a CUDA GPU")
    p.add_argument("--rows", nargs="+", default=None, help=f"a subset: {', '.join(ALIASES)}")
    p.add_argument("--seed", type=int, default=None, help="every row at this seed (default: the configs' own, 0)")
    p.add_argument("--steps-fraction", type=float, default=1.0,
                   help="CPU: train every row for this fraction of its protocol's steps")
    p.add_argument("--gpu-epochs", type=float, default=2.0, help="GPU: epochs per row")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10"), help="GPU: CIFAR-10 parquet dir")
    p.add_argument("--output", default=None, help="run directories (default: a temporary one)")
    p.add_argument("--no-write", action="store_true", help="print the table, append nothing to RESULTS.md")
    args = p.parse_args(argv)
    if not 0 < args.steps_fraction <= 1:
        p.error(f"--steps-fraction must be in (0, 1], got {args.steps_fraction}")
    return args


def _selected(table: dict, rows) -> dict:
    if not rows:
        return table
    wanted = [ALIASES.get(r, r) for r in rows]
    picked = {k: v for k, v in table.items() if any(k == w or k.startswith(w) for w in wanted)}
    if not picked:
        sys.exit(f"error: no row matches {rows}; rows: {', '.join(ALIASES)}")
    return picked


def _gpu_overrides(config: str, args) -> list:
    from mmcl.train import load_config

    data = Path(args.data)
    base = load_config(CONFIGS / config, [f"data.source={data / 'train.parquet'}",
                                           f"data.eval_source={data / 'test.parquet'}"])
    steps_per_epoch = 50000 // base.train.batch_size
    steps = max(1, int(args.gpu_epochs * steps_per_epoch))
    return [f"data.source={data / 'train.parquet'}", f"data.eval_source={data / 'test.parquet'}",
            f"train.max_steps={steps}", f"optim.warmup_steps={min(base.optim.warmup_steps, steps // 10)}",
            "train.eval_every=0", "checkpoint.every=0", "checkpoint.resume=null", "train.progress=false",
            "train.trackers=[jsonl]"]


def run_row(name: str, config: str, overrides: list, trained: bool, args, out: Path) -> dict:
    """Train one row (or only build and evaluate it: trained False) and return its figures: top-1
    on the method's own evaluation (kNN of the embeddings, or zero-shot) and, for kNN methods, kNN
    of the tower's features before the projection head (eval.knn_features=tower)."""
    import torch
    from accelerate.utils import set_seed

    from mmcl.methods import objective_class
    from mmcl.models import DualEncoder
    from mmcl.train import fit, load_config
    from mmcl.train.builders import build_model
    from mmcl.train.evaluation import Evaluator

    run_dir = out / name.replace(" ", "_").replace("/", "-").replace("+", "plus").replace("(", "").replace(")", "")
    common = [f"output_dir={run_dir}", "train.progress=false", "train.trackers=[jsonl]", "checkpoint.every=0"]
    common += [] if args.seed is None else [f"seed={args.seed}"]
    extra = _gpu_overrides(config, args) if args.gpu else []
    cfg = load_config(CONFIGS / config, common + extra + list(overrides))
    steps = cfg.train.max_steps if args.gpu else max(1, round(cfg.train.max_steps * args.steps_fraction))
    kind = objective_class(cfg).eval_kind  # image-only methods: kNN; CLIP: zero-shot
    key, metric = ("knn_top1", "kNN") if kind == "knn" else ("zeroshot_top1", "zero-shot")
    start = time.perf_counter()
    if not trained:  # the random-init encoder, built exactly as fit builds it (same seed)
        set_seed(cfg.seed)
        model = build_model(cfg)
        model = model.cuda() if args.gpu else model
        r = {"top1": Evaluator(cfg, kind)(model)[key], "steps": 0, "mode": "-"}
    else:
        cfg = load_config(CONFIGS / config, common + extra + list(overrides) + [f"train.max_steps={steps}"])
        threads = torch.get_num_threads()
        result = fit(cfg)
        torch.set_num_threads(threads)
        r = {"top1": result[key], "steps": result["step"], "mode": cfg.mode, "loss": result["loss"]}
        model = DualEncoder.from_pretrained(result["final_dir"])
        model = model.cuda() if args.gpu else model
    r["tower_knn"] = None
    if kind == "knn":
        tower_cfg = load_config(CONFIGS / config, common + extra + list(overrides) + ["eval.knn_features=tower"])
        r["tower_knn"] = Evaluator(tower_cfg, "knn")(model)["knn_top1"]
    return {**r, "metric": metric, "seconds": time.perf_counter() - start}


def main(argv=None) -> int:
    args = parse(argv)
    import torch

    if args.gpu and not torch.cuda.is_available():
        print("error: --gpu runs the CIFAR-10 protocol on a CUDA GPU, and torch sees none here; "
              "run without --gpu for the CPU digits table", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = _selected(GPU_ROWS if args.gpu else CPU_ROWS, args.rows)
    out = Path(args.output) if args.output else Path(tempfile.mkdtemp(prefix="bench_methods_"))
    results = []
    for name, (config, overrides, trained) in rows.items():
        print(f"== {name} ({config} {' '.join(overrides)}{'' if trained else ' (no training)'})", flush=True)
        r = run_row(name, config, overrides, trained, args, out)
        tower = "" if r["tower_knn"] is None else f", tower features kNN {r['tower_knn']:.4f}"
        print(f"   {r['metric']} top-1 {r['top1']:.4f}{tower} after {r['steps']} steps, {r['seconds']:.0f} s",
              flush=True)
        results.append((name, config, overrides, trained, r))
    _report(results, args)
    return 0


def _report(results, args) -> None:
    from _results import append_section, markdown_table

    headers = ["method", "config + overrides", "steps", "top-1", "kNN top-1, tower features", "wall s"]

    def shown(config, overrides, trained):
        return " ".join([f"`{config}`", *(f"`{o}`" for o in overrides), *([] if trained else ["(untrained)"])])

    table = [[name, shown(config, overrides, trained), r["steps"], f"{r['top1']:.4f} ({r['metric']})",
              "-" if r["tower_knn"] is None else f"{r['tower_knn']:.4f}", f"{r['seconds']:.0f}"]
             for name, config, overrides, trained, r in results]
    text = markdown_table(headers, table)
    if args.gpu:
        note = (f"CIFAR-10, CIFAR ResNet-18, {args.gpu_epochs:g} epochs per row (the recipes' schedules "
                "shortened to that length); kNN k=200, T=0.1, all 50,000 training images as the memory bank, "
                "10,000 test images; `tower features`: the same kNN before the projection head.")
        title = "Methods on CIFAR-10 (bench/bench_methods.py --gpu)"
    else:
        frac = "" if args.steps_fraction == 1 else (f" Every row trained for {args.steps_fraction:g} of its "
                                                    "protocol's steps (time was short).")
        note = ("scikit-learn digits: 1,500 training / 297 held-out images; kNN k=20, T=0.1 of the held-out "
                "embeddings against the training embeddings (mmcl's evaluator, un-augmented images); `tower "
                "features`: the same kNN on the image tower's output before the projection head "
                "(eval.knn_features=tower), the representation these methods' papers evaluate; CLIP rows: "
                "zero-shot top-1 of the 297 held-out digits over the ten classes (mmcl's digit prompt templates); "
                f"one seed ({0 if args.seed is None else args.seed})." + frac + " One run per row: differences "
                "of about 0.01 are within what another seed could give.")
        title = "Methods on the digits (bench/bench_methods.py)"
    print("\n" + text + "\n\n" + note)
    if not args.no_write:
        append_section(title, text + "\n\n" + note)


if __name__ == "__main__":
    sys.exit(main())
