"""Reproduction run: MoCo v2 / SimCLR on CIFAR-10 with the CIFAR-stem ResNet-18 (issue 7).

Trains through mmcl.train.fit from recipes/configs/{moco_v2,simclr}_cifar10.yaml, logs the kNN
monitor (k=200, T=0.1, all 50,000 training images as the memory bank, 10,000 test images) after
every epoch, fits a linear probe on frozen backbone features at the end, plots the kNN curves
beside the published ones (bench/moco_cifar10.png) and appends a dated table with the device to
bench/RESULTS.md.

    # on a GPU machine, CIFAR-10 parquet files in data/cifar10 (copied from ../shared/data/cifar10):
    python bench/moco_cifar10.py --data data/cifar10 --methods moco --epochs 200
    python bench/moco_cifar10.py --data data/cifar10 --methods moco simclr --epochs 20
    # CPU: prove the script end to end on a slice (writes nothing to bench/):
    python bench/moco_cifar10.py --smoke
    # a rehearsal at full size that records nothing (table printed, plot under --output):
    python bench/moco_cifar10.py --data data/cifar10 --minutes 0.3 --no-write

Extra arguments after `--` are dotted config overrides for every method (e.g. -- moco.queue_size=8192).
A shorter run is reported as what it is: the curve up to its last epoch, next to the published
points at 200/400/800 epochs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
CONFIGS = {"moco": ROOT / "recipes/configs/moco_v2_cifar10.yaml", "simclr": ROOT / "recipes/configs/simclr_cifar10.yaml"}
# Published kNN monitor numbers with the CIFAR ResNet-18 (sources in recipes/README.md).
SMOKE_SIZES = {"train": 256, "test": 128}
PUBLISHED_KNN = {"moco": {200: 82.6, 400: 86.3, 800: 88.7}}  # MoCo's CIFAR-10 demo, asymmetric loss


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10"), help="folder with train/test.parquet")
    p.add_argument("--methods", nargs="+", default=["moco"], choices=sorted(CONFIGS))
    p.add_argument("--epochs", type=int, default=200, help="length of the schedule (cosine over these epochs)")
    p.add_argument("--minutes", type=float, default=None,
                   help="training time budget per method: stop early (train.max_minutes) and report the "
                        "curve so far as the first epochs of the --epochs schedule")
    p.add_argument("--output", default="runs/repro_cifar10")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run on a slice of the data; writes nothing to bench/")
    p.add_argument("--no-write", action="store_true", help="print the table only (no plot, nothing appended)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides applied to every method")
    return p.parse_args(argv)


def method_config(method: str, args, out: Path):
    """The method's recipe config + the protocol's evaluation settings (+ the smoke shrinkage)."""
    from mmcl.train import load_config

    data = Path(args.data)
    base = load_config(CONFIGS[method], [f"data.source={data / 'train.parquet'}"])
    n_train, world = 50000, int(os.environ.get("WORLD_SIZE", "1"))
    overrides = [f"data.source={data / 'train.parquet'}", f"data.eval_source={data / 'test.parquet'}",
                 f"output_dir={out / method}", "eval.knn_k=200", "eval.knn_temperature=0.1",
                 "eval.knn_train_samples=null", "eval.max_samples=null", "eval.batch_size=512",
                 "train.trackers=[jsonl]", "checkpoint.resume=null", "checkpoint.every=0"]
    batch = base.train.batch_size * base.train.accumulate
    if args.smoke:
        n_train, batch = SMOKE_SIZES["train"], 32
        overrides += ["train.batch_size=32", "train.accumulate=1", "data.num_workers=0", "moco.queue_size=128",
                      "train.mixed_precision='no'", "optim.warmup_steps=2", "model.batchnorm.splits=1", "eval.batch_size=128"]
    steps_per_epoch = n_train // (batch * world)
    overrides += [f"train.max_steps={steps_per_epoch * args.epochs}", f"train.eval_every={steps_per_epoch}",
                  f"train.log_every={max(1, steps_per_epoch // 4)}"]
    if args.minutes is not None:
        overrides.append(f"train.max_minutes={args.minutes}")
    return load_config(CONFIGS[method], overrides + list(args.overrides)), steps_per_epoch


def smoke_data(src: Path, out: Path) -> Path:
    """Shuffled slices of CIFAR-10 for --smoke: the parquet files are sorted by label, so their
    first rows are a single class (useless for kNN and the probe)."""
    import datasets

    out.mkdir(parents=True, exist_ok=True)
    for split, n in SMOKE_SIZES.items():
        ds = datasets.load_dataset("parquet", data_files=str(src / f"{split}.parquet"))["train"]
        ds.shuffle(seed=0).select(range(n)).to_parquet(str(out / f"{split}.parquet"))
    return out


def knn_curve(out_dir: Path, steps_per_epoch: int) -> list[tuple[float, float]]:
    """(epoch, kNN top-1 %) from the run's metrics.jsonl (periodic evals and the final one)."""
    curve = {}
    for path in out_dir.rglob("metrics.jsonl"):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if "eval/knn_top1" in row and "step" in row:
                curve[row["step"] / steps_per_epoch] = 100 * row["eval/knn_top1"]
    return sorted(curve.items())


def linear_probe_top1(cfg, final_dir: str) -> float:
    """Logistic regression on frozen backbone features (the tower's 512-d output, before the
    projection head), trained on the training images, scored on the test images."""
    import torch

    from mmcl.data import load_eval_dataset, load_source
    from mmcl.eval import linear_probe
    from mmcl.eval.embed import iter_image_batches
    from mmcl.models import DualEncoder

    model = DualEncoder.from_pretrained(final_dir).eval()
    if torch.cuda.is_available():
        model = model.cuda()
    train = load_source(cfg.data.source, cfg.data.split, seed=cfg.seed)
    test = load_eval_dataset(cfg.data, seed=cfg.seed)
    # The protocol uses every image (the runner sets eval.knn_train_samples / max_samples to null).

    @torch.no_grad()
    def features(ds):
        return torch.cat([model.image_tower(pixel_values=x).float().cpu()
                          for x in iter_image_batches(model, ds, batch_size=512)])

    label = cfg.data.label_column or "label"
    return 100 * linear_probe(features(train), torch.as_tensor(train[label]), features(test),
                              torch.as_tensor(test[label]), max_iter=2000)


def run_method(method: str, args, out: Path) -> dict:
    from mmcl.train import fit

    cfg, spe = method_config(method, args, out)
    started = time.perf_counter()
    result = fit(cfg)
    curve = knn_curve(Path(cfg.output_dir), spe)
    probe = linear_probe_top1(cfg, result["final_dir"])
    return {"method": method, "epochs_done": result["step"] / spe, "epochs_planned": args.epochs,
            "curve": curve, "linear_probe": probe,
            "wall_s": time.perf_counter() - started, "train_s": result["train_seconds"], "config": cfg}


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        if run["curve"]:
            ax.plot(*zip(*run["curve"]), marker=".", label=f"mmcl {run['method']}")
        for epochs, acc in PUBLISHED_KNN.get(run["method"], {}).items():
            ax.scatter([epochs], [acc], marker="*", s=80, color="k")
            ax.annotate(f"published {acc}", (epochs, acc), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xlabel("epoch")
    ax.set_ylabel("kNN top-1 (%), k=200, T=0.1")
    ax.set_title("CIFAR-10, CIFAR ResNet-18")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(runs: list[dict], plot_path: str = "bench/moco_cifar10.png") -> str:
    from _results import markdown_table

    rows = []
    for run in runs:
        c = run["config"]
        last = run["curve"][-1] if run["curve"] else (float("nan"), float("nan"))
        best = max((acc for _, acc in run["curve"]), default=float("nan"))
        published = PUBLISHED_KNN.get(run["method"], {})
        ref = ", ".join(f"{v} @ {k} ep" for k, v in published.items()) or "see recipes/README.md"
        rows.append([run["method"], f"{run['epochs_done']:.1f} of {run['epochs_planned']}", f"{last[1]:.2f}", f"{best:.2f}",
                     "-" if run["linear_probe"] is None else f"{run['linear_probe']:.2f}", ref,
                     f"{c.train.batch_size}x{c.train.accumulate}", c.moco.queue_size if run["method"] == "moco" else "-",
                     c.loss.temperature, f"{run['wall_s'] / 60:.1f}"])
    table = markdown_table(["method", "epochs (of schedule)", "kNN top-1 (last)", "kNN best", "linear probe", "published kNN",
                            "batch", "queue", "T", "minutes"], rows)
    return (table + "\n\nkNN: k=200, T=0.1, every training image as the memory bank, every test image; "
            f"linear probe: logistic regression on frozen 512-d backbone features. Curve: {plot_path}.")


def main(argv=None) -> list[dict]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse(argv)
    out = Path(args.output)
    if args.smoke:
        args.epochs, args.output = min(args.epochs, 2), str(out)
    data = Path(args.data)
    if not (data / "train.parquet").is_file() or not (data / "test.parquet").is_file():
        sys.exit(f"error: {data} must hold train.parquet and test.parquet (CIFAR-10 in datasets' parquet layout)")
    if args.smoke:
        args.data = str(smoke_data(data, out / "data"))
    runs = [run_method(m, args, out) for m in args.methods]
    for run in runs:
        print(f"{run['method']}: {run['epochs_done']:.1f} epochs, kNN curve {[(round(e, 2), round(a, 2)) for e, a in run['curve']]}"
              f", linear probe {run['linear_probe']}")
    preview = args.smoke or args.no_write
    plot_path = out / "moco_cifar10_preview.png" if preview else ROOT / "bench/moco_cifar10.png"
    text = report(runs, str(plot_path) if preview else "bench/moco_cifar10.png")
    print(text)
    if preview:
        plot(runs, plot_path)
        return runs
    plot(runs, plot_path)
    from _results import append_section

    append_section("moco_cifar10: MoCo v2 / SimCLR on CIFAR-10 (kNN monitor per epoch)", text)
    return runs


if __name__ == "__main__":
    main()
