"""The `mmcl` command: ask a trained model questions from the shell.

    mmcl zeroshot --model DIR --labels "cat,dog,car" photo1.jpg photo2.png [--json]
    mmcl eval {zeroshot,retrieval,knn,linear} --model DIR --data PATH_OR_DATASET [--plot out.png]
    mmcl embed --model DIR --data PATH --out feats.npy|feats.parquet
    mmcl export --model DIR --to transformers OUT
    mmcl shards --data PATH --out DIR --shard-size N
    mmcl index --embeddings FILE --out DIR;  mmcl search --index DIR --model DIR --text "..."
    mmcl checkpoint verify RUN_DIR

Errors a user can fix (a bad path, an empty label list, an unreadable image) print one line and
exit with status 2; set MMCL_DEBUG=1 to see the traceback instead. Each command imports
what it uses (torch, transformers, datasets) when it runs: `mmcl --help` loads the parser only.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from mmcl.cli_parser import build_parser


class UsageError(Exception):
    """A mistake in the command line or its inputs: reported in one line, exit status 2."""


# --------------------------------------------------------------------------- helpers


def _load_model(args):
    import torch
    import transformers

    from mmcl.models import DualEncoder

    path = Path(args.model)
    if not path.is_dir():
        raise UsageError(f"--model {args.model}: no such directory (give a model saved with save_pretrained)")
    transformers.utils.logging.disable_progress_bar()  # mmcl's own bars show the work that takes time
    device = getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine")
    # from_pretrained reads mmcl, transformers (CLIP / VisionTextDualEncoder) and open_clip directories
    # and raises a ValueError naming what is missing from anything else.
    return DualEncoder.from_pretrained(str(path)).to(device).eval()


def _class_names(value: str | None) -> list[str]:
    if value is None:
        raise UsageError("--labels is required: give class names such as --labels \"cat,dog,car\"")
    if value.startswith("@"):
        text = _read_text(value[1:], "--labels")
        names = [line.strip() for line in text.splitlines()]
    else:
        names = [n.strip() for n in value.split(",")]
    names = [n for n in names if n]
    if not names:
        raise UsageError("--labels: the label list is empty; give class names such as \"cat,dog,car\"")
    return names


def _templates(value: str):
    from mmcl.data.digits import EVAL_TEMPLATES
    from mmcl.eval.zeroshot import TEMPLATE_SETS

    if value in TEMPLATE_SETS:
        return value
    if value == "digits":  # the demo's held-out prompts, disjoint from its training captions
        return list(EVAL_TEMPLATES)
    lines = [t.strip() for t in _read_text(value, "--templates").splitlines() if t.strip()]
    if not lines:
        raise UsageError(f"--templates {value}: the file has no prompts")
    return lines


def _read_text(path: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise UsageError(f"{what} {path}: cannot read file ({err.strerror or err})") from None


def _check_files(paths: list[str]) -> None:
    """Fail before the (slow) model load when an image file is missing or not an image."""
    from mmcl.data.images import load_image

    for p in paths:
        load_image(p)  # ValueError "image file not found: ..." / "cannot read image ...: ..."


def _dataset(args):
    """The --split of --data (--max-samples random rows of it)."""
    from mmcl.data.sources import load_splits, pick_split, subsample

    if not args.data:
        raise UsageError("--data is required")
    splits = load_splits(args.data, image_column=args.image_column)
    return subsample(splits[pick_split(splits, args.split, what="--split")], args.max_samples)


def _print_metrics(metrics: dict, as_json: bool, title: str) -> None:
    if as_json:
        print(json.dumps(metrics))
        return
    print(title)
    for key, value in metrics.items():
        print(f"  {key:<24} {value:.4f}" if isinstance(value, float) else f"  {key:<24} {value}")


# --------------------------------------------------------------------------- commands


def cmd_zeroshot(args) -> None:
    from mmcl.eval.zeroshot import ZeroShotClassifier

    names, templates = _class_names(args.labels), _templates(args.templates)
    _check_files(args.images)
    if args.top < 1:
        raise UsageError("--top must be at least 1")
    model = _load_model(args)
    clf = ZeroShotClassifier(model, names, templates, batch_size=args.batch_size, progress=not args.quiet)
    probs = clf.predict(args.images)
    top = min(args.top, len(names))
    results = []
    for path, row in zip(args.images, probs):
        p, idx = row.topk(top)
        results.append({"image": path, "labels": [names[i] for i in idx.tolist()],
                        "probs": [round(v, 6) for v in p.tolist()]})
    if args.json:
        print(json.dumps(results))
        return
    width = max(len(n) for n in names)
    for r in results:
        print(r["image"])
        for rank, (name, prob) in enumerate(zip(r["labels"], r["probs"]), 1):
            print(f"  {rank:>2}. {name:<{width}}  {prob:6.1%}  {'#' * round(prob * 30)}")


def cmd_eval(args) -> None:
    if args.plot and not Path(args.plot).resolve().parent.is_dir():
        raise UsageError(f"--plot {args.plot}: directory {Path(args.plot).parent} does not exist")
    model = _load_model(args)
    if args.task == "zeroshot":
        metrics, plot = _eval_zeroshot(model, args)
    elif args.task == "retrieval":
        metrics, plot = _eval_retrieval(model, args)
    else:
        metrics, plot = _eval_features(model, args)
    if args.plot:
        plot(args.plot)
    _print_metrics(metrics, args.json, f"{args.task} on {args.data}")


def _eval_zeroshot(model, args):
    from mmcl.data.sources import class_names_of
    from mmcl.eval.plots import plot_confusion_matrix
    from mmcl.eval.zeroshot import ZeroShotClassifier

    ds = _dataset(args)
    if args.label_column not in ds.column_names:
        raise UsageError(f"--label-column {args.label_column!r} is not in the data; columns: {ds.column_names}")
    names = _class_names(args.labels) if args.labels else class_names_of(ds, args.label_column)
    if names is None:
        raise UsageError(f"column {args.label_column!r} has no class names; give them with --labels")
    clf = ZeroShotClassifier(model, names, _templates(args.templates), batch_size=args.batch_size,
                             progress=not args.quiet)
    res = clf.evaluate(ds, image_column=args.image_column, label_column=args.label_column, return_predictions=True)
    labels, preds = res.pop("labels"), res.pop("predictions")
    return res, lambda out: plot_confusion_matrix(labels, preds, names, out, title="zero-shot")


def _eval_retrieval(model, args):
    from mmcl.data.images import load_image
    from mmcl.eval.plots import plot_similarity
    from mmcl.eval.retrieval import evaluate

    ds = _dataset(args)
    res = evaluate(model, ds, image_column=args.image_column, caption_column=args.caption_column,
                   batch_size=args.batch_size, progress=not args.quiet, return_similarity=True)
    sim, owner = res.pop("similarity"), res.pop("text_to_image")

    def plot(out):
        n = min(16, len(ds))
        first = [int((owner == i).nonzero()[0]) for i in range(n)]  # each image's first caption, in order
        captions = ds[args.caption_column]
        texts = [c if isinstance(c, str) else c[0] for c in captions[:n]]
        images = [load_image(x) for x in ds[:n][args.image_column]]
        plot_similarity(sim[:n][:, first], out, texts=texts, images=images, title="image x caption similarity")

    return res, plot


def _eval_features(model, args):
    import torch

    from mmcl.data.sources import class_names_of, holdout_split, load_splits, pick_split, subsample
    from mmcl.eval import embed_images, knn_predict, linear_probe_predict
    from mmcl.eval.plots import plot_confusion_matrix

    splits = load_splits(args.data, image_column=args.image_column)
    test_split = pick_split(splits, args.split)
    train_source = args.train_data or args.data
    train_splits = splits if train_source == args.data else load_splits(train_source, image_column=args.image_column)
    train_split = pick_split(train_splits, args.train_split, default="train", what="--train-split")
    test_ds, train_ds = splits[test_split], train_splits[train_split]
    if train_source == args.data and train_split == test_split:
        print(f"mmcl: note: no separate training split; holding out 20% of {test_split!r} for testing", file=sys.stderr)
        train_ds, test_ds = holdout_split(test_ds)
    train_ds, test_ds = subsample(train_ds, args.max_samples), subsample(test_ds, args.max_samples)
    for ds in (train_ds, test_ds):
        if args.label_column not in ds.column_names:
            raise UsageError(f"--label-column {args.label_column!r} is not in the data; columns: {ds.column_names}")
    names = class_names_of(train_ds, args.label_column)
    raw_train, raw_test = train_ds[args.label_column], test_ds[args.label_column]
    if names is None:  # string or plain integer labels: number them in sorted order
        names = sorted({*raw_train, *raw_test}, key=str)
        index = {v: i for i, v in enumerate(names)}
        raw_train, raw_test = [index[v] for v in raw_train], [index[v] for v in raw_test]
        names = [str(n) for n in names]
    kw = dict(image_column=args.image_column, batch_size=args.batch_size, progress=not args.quiet)
    train_x, test_x = embed_images(model, train_ds, **kw), embed_images(model, test_ds, **kw)
    train_y, test_y = torch.tensor(raw_train), torch.tensor(raw_test)
    if args.task == "knn":
        preds = knn_predict(train_x, train_y, test_x, k=args.k, temperature=args.temperature)
    else:
        preds = linear_probe_predict(train_x, train_y, test_x, C=args.C)
    metrics = {"top1": (preds == test_y).double().mean().item(), "num_train": len(train_ds), "num_test": len(test_ds)}
    return metrics, lambda out: plot_confusion_matrix(test_y, preds, names, out, title=args.task)


def cmd_embed(args) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmcl.eval import embed_images, embed_texts
    from mmcl.eval.retrieval import flatten_captions

    out = Path(args.out)
    if out.suffix not in (".npy", ".parquet"):
        raise UsageError(f"--out {args.out}: the file name must end in .npy or .parquet")
    if not out.parent.resolve().is_dir():
        raise UsageError(f"--out {args.out}: directory {out.parent} does not exist")
    sources = sum(bool(x) for x in (args.images, args.text, args.data))
    if sources != 1:
        raise UsageError("give exactly one input: image files, --text, or --data")
    _check_files(args.images)
    model = _load_model(args)
    progress = not args.quiet
    if args.text:
        ids, feats = list(args.text), embed_texts(model, args.text, progress=progress)
    elif args.images:
        ids, feats = list(args.images), embed_images(model, args.images, batch_size=args.batch_size, progress=progress)
    elif args.caption_column:
        ds = _dataset(args)
        if args.caption_column not in ds.column_names:
            raise UsageError(f"--caption-column {args.caption_column!r} is not in the data; columns: {ds.column_names}")
        texts, owner = flatten_captions(ds[args.caption_column], args.caption_column)
        ids, feats = [str(i) for i in owner], embed_texts(model, texts, progress=progress)
    else:
        ds = _dataset(args)
        ids = [str(i) for i in range(len(ds))]
        feats = embed_images(model, ds, image_column=args.image_column, batch_size=args.batch_size, progress=progress)
    array = feats.numpy().astype(np.float32)
    if out.suffix == ".npy":
        np.save(out, array)
    else:
        column = pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1)), array.shape[1])
        pq.write_table(pa.table({"id": pa.array(ids), "embedding": column}), out)
    print(f"wrote {array.shape[0]} x {array.shape[1]} embeddings to {out}", file=sys.stderr)


def cmd_export(args) -> None:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{args.out}: output directory exists and is not empty")
    model = _load_model(args)
    model.export_to_transformers(str(out))
    print(f"exported {args.model} to {out} (transformers layout)", file=sys.stderr)


def cmd_shards(args) -> None:
    """`mmcl shards`: write --data as img2dataset-style webdataset shards (mmcl.data.shard_writer)."""
    from mmcl.data.shard_writer import write_shards

    if not args.data:
        raise UsageError("--data is required")
    if args.shard_size < 1:
        raise UsageError("--shard-size must be at least 1")
    caption_column = None if args.caption_column.lower() == "none" else args.caption_column
    write_shards(args.data, args.out, shard_size=args.shard_size, image_column=args.image_column,
                 caption_column=caption_column, split=args.split, max_samples=args.max_samples,
                 shuffle=args.shuffle, seed=args.seed, progress=not args.quiet)


def cmd_index(args) -> None:
    import numpy as np
    import pyarrow.parquet as pq

    from mmcl.search import build_index

    path = Path(args.embeddings)
    if not path.is_file():
        raise UsageError(f"--embeddings {args.embeddings}: file not found")
    if path.suffix == ".npy":
        array, ids = np.load(path, allow_pickle=False), None
    elif path.suffix == ".parquet":
        table = pq.read_table(path)
        if "embedding" not in table.column_names:
            raise UsageError(f"--embeddings {args.embeddings}: no 'embedding' column (write it with mmcl embed)")
        array = np.stack(table["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
        ids = table["id"].to_pylist() if "id" in table.column_names else None
    else:
        raise UsageError(f"--embeddings {args.embeddings}: expected a .npy or .parquet file")
    index = build_index(array, ids, kind=args.kind, nlist=args.nlist)
    index.save(args.out)
    print(f"indexed {len(index)} x {index.dim} embeddings ({args.kind}) in {args.out}", file=sys.stderr)


def cmd_search(args) -> None:
    import torch

    from mmcl.eval import embed_images, embed_texts
    from mmcl.search import EmbeddingIndex

    if not args.text and not args.image:
        raise UsageError("give at least one query with --text or --image")
    _check_files(args.image)
    index = EmbeddingIndex.load(args.index)
    model = _load_model(args)
    queries, names = [], []
    if args.text:
        queries.append(embed_texts(model, args.text))
        names += args.text
    if args.image:
        queries.append(embed_images(model, args.image, batch_size=args.batch_size))
        names += args.image
    scores, ids = index.search(torch.cat(queries), k=args.k, nprobe=args.nprobe)
    results = [{"query": q, "ids": row, "scores": [round(v, 6) for v in s]}
               for q, row, s in zip(names, ids, scores.tolist())]
    if args.json:
        print(json.dumps(results))
        return
    for r in results:
        print(r["query"])
        for rank, (i, v) in enumerate(zip(r["ids"], r["scores"]), 1):
            print(f"  {rank:>3}. {v:7.4f}  {i}")


def cmd_checkpoint(args) -> None:
    """`mmcl checkpoint verify DIR`: one line per checkpoint; a damaged one makes the exit status 2."""
    from mmcl.train.checkpoint import list_checkpoints, verify_checkpoint

    path = Path(args.dir)
    if (path / "COMPLETE").is_file():
        found = [path]
    else:
        found = list_checkpoints(path.parent if path.name == "checkpoints" else path)
    if not found:
        raise UsageError(f"{path} holds no complete checkpoint (expected a run's output_dir, its checkpoints/ "
                         "folder or a step_* directory)")
    damaged = []
    for ckpt in found:
        problems, verified = verify_checkpoint(ckpt)
        if problems:
            damaged.append(ckpt.name)
            print(f"{ckpt}: DAMAGED: {'; '.join(problems)}")
        else:
            size = sum(f.stat().st_size for f in ckpt.iterdir() if f.is_file()) / 2**20
            how = "sizes and sha256 verified" if verified else "written without checksums: headers checked only"
            print(f"{ckpt}: ok ({size:.1f} MiB, {how})")
    if damaged:
        raise UsageError(f"{len(damaged)} of {len(found)} checkpoints are damaged: {', '.join(damaged)}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mmcl` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    command = {"zeroshot": cmd_zeroshot, "eval": cmd_eval, "embed": cmd_embed, "export": cmd_export,
               "shards": cmd_shards, "index": cmd_index, "search": cmd_search, "checkpoint": cmd_checkpoint}[args.command]
    try:
        if getattr(args, "batch_size", 1) < 1:
            raise UsageError("--batch-size must be at least 1")
        if getattr(args, "max_samples", None) is not None and args.max_samples < 1:
            raise UsageError("--max-samples must be at least 1")
        command(args)
    except (UsageError, ValueError, TypeError, OSError, ImportError) as err:
        if os.environ.get("MMCL_DEBUG"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"mmcl: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
