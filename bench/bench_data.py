"""Images per second that the two-view training stream delivers: CPU augmentation vs device views.

For MoCo/SimCLR on small images the data pipeline, not the network, sets the pace. This measures
mmcl's training stream (mmcl.data.BatchStream over mmcl.data.build_dataset, as `fit`
builds it) on CIFAR-10 with the recipe's processor (32x32), for

- `cpu-mocov2`: both views augmented on the CPU, per sample (PIL + torchvision, `data.augment=mocov2`);
- `device-views`: the loader only decodes and crops one uint8 view per sample; the views are made
  batched by `data.augment_on_device` (mmcl.data.DeviceAugment, timed here on the CPU
  too, so the column is an upper bound of what the training device spends on it).

Each row: images/s of the stream alone over whole batches after the first (workers started),
of the augmentation alone, of both in series, and the ratio to `cpu-mocov2` measured in the same
run. Appends a dated table to bench/RESULTS.md.

    python bench/bench_data.py                          # ../shared/data/cifar10, 2 workers, 40 batches of 512
    python bench/bench_data.py --data data/cifar10 --workers 8 --batches 100
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10"), help="folder with train.parquet")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--batches", type=int, default=40, help="timed batches per path (after one warm-up batch)")
    p.add_argument("--no-write", action="store_true", help="print only")
    return p.parse_args(argv)


def measure(path: str, args) -> dict:
    import torch

    from mmcl.data import BatchStream, DeviceAugment, build_dataset
    from mmcl.train import load_config
    from mmcl.train.builders import build_model

    overrides = [f"data.source={Path(args.data) / 'train.parquet'}", f"data.num_workers={args.workers}"]
    if path == "cpu-mocov2":
        overrides += ["data.augment=mocov2", "data.augment_on_device=null"]
    cfg = load_config(ROOT / "recipes/configs/moco_v2_cifar10.yaml", overrides)
    torch.manual_seed(0)
    model = build_model(cfg)
    device_views = path == "device-views"
    dataset, collate_fn = build_dataset(cfg.data, model.processor, text=False, views=True, seed=0,
                                        device_views=device_views)
    augment = DeviceAugment(cfg.data.augment_on_device, model.processor) if device_views else None
    stream = BatchStream(dataset, collate_fn, args.batch_size, num_workers=cfg.data.num_workers, seed=0)
    stream.next()  # workers started, first batch out
    t0 = time.perf_counter()
    for _ in range(args.batches):  # the stream alone: what the training loop waits for
        batch = stream.next()
    load_s = time.perf_counter() - t0
    stream.close()
    augment_s = 0.0
    if augment is not None:  # then the batched augmentation alone, on the last batch
        t0 = time.perf_counter()
        for _ in range(args.batches):
            out = augment(batch)
        augment_s = time.perf_counter() - t0
        batch = out
    images = args.batches * args.batch_size
    assert batch["view1"].shape == (args.batch_size, 3, 32, 32) and batch["view1"].dtype == torch.float32
    return {"path": path, "load_ips": images / load_s, "augment_ips": images / augment_s if augment else None,
            "total_ips": images / (load_s + augment_s), "view_bytes": 2 * 3 * 32 * 32 * (1 if device_views else 4)}


def main(argv=None) -> None:
    from _results import append_section, markdown_table

    args = parse(argv)
    if not (Path(args.data) / "train.parquet").is_file():
        sys.exit(f"error: {args.data} must hold train.parquet (CIFAR-10 in datasets' parquet layout)")
    runs = [measure(path, args) for path in ("cpu-mocov2", "device-views")]
    base = runs[0]["total_ips"]
    rows = [[r["path"], f"{r['load_ips']:.0f}", "-" if r["augment_ips"] is None else f"{r['augment_ips']:.0f}",
             f"{r['total_ips']:.0f}", f"{r['total_ips'] / base:.2f}", r["view_bytes"]] for r in runs]
    table = markdown_table(["path", "stream images/s", "augment images/s (CPU)", "images/s, both", "vs cpu-mocov2",
                            "bytes per sample (2 views)"], rows)
    text = (f"{table}\n\nCIFAR-10 train.parquet, batch {args.batch_size}, {args.workers} DataLoader workers, "
            f"{args.batches} timed batches per path. stream and augmentation timed apart; `images/s, both` "
            "puts them in series, as one CPU process would; in a GPU run the augmentation runs on the device.")
    print(text)
    if not args.no_write:
        append_section("bench_data: two-view stream, CPU augmentation vs device views (MoCo v2, CIFAR-10)", text)


if __name__ == "__main__":
    main()
