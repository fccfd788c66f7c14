"""Argument parser of the `mmcl` command (the commands themselves live in mmcl.cli)."""
from __future__ import annotations

import argparse

EXAMPLES = """examples:
  mmcl zeroshot --model runs/clip/final --labels "cat,dog,car" photo.jpg
  mmcl eval zeroshot --model runs/clip/final --data ../shared/data/cifar10/test.parquet --plot cm.png
  mmcl eval retrieval --model runs/clip/final --data flickr8k/dev_500.parquet --caption-column captions
  mmcl eval knn --model runs/simclr/final --data digits
  mmcl embed --model runs/clip/final --data images/ --out embeddings.parquet
  mmcl export --model runs/clip/final --to transformers hf_model/
  mmcl shards --data flickr8k/train_2000.parquet --caption-column captions --out shards/ --shard-size 1000
  mmcl index --embeddings embeddings.parquet --out photos.index          # needs faiss-cpu
  mmcl search --index photos.index --model runs/clip/final --text "a dog on a beach"
  mmcl checkpoint verify runs/clip                                        # sizes + sha256 of each checkpoint
"""


def _common(p: argparse.ArgumentParser, data: bool = True) -> None:
    p.add_argument("--model", required=True, metavar="DIR",
                   help="model directory written by save_pretrained / mmcl training")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    if data:
        p.add_argument("--data", metavar="PATH_OR_DATASET",
                       help="parquet/CSV/JSON file, image folder, save_to_disk directory, or 'digits'")
        p.add_argument("--split", default=None, help="split to evaluate (default: the only one, else test)")
        p.add_argument("--image-column", default="image", help="column holding images (default: image)")
        p.add_argument("--max-samples", type=int, default=None,
                       help="use N random rows (seeded; for knn/linear, N of each of train and test)")
        p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")


def _labels_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--labels", help='comma-separated class names, e.g. "cat,dog,car", or @FILE with one per line')
    p.add_argument("--templates", default="default",
                   help="prompt set: default (CLIP's 7), imagenet (CLIP's 80), digits (the demo's held-out "
                        "prompts), none (bare names), or a file with one prompt per line containing {} "
                        "(default: default)")


def _shards_parser(sub) -> None:
    sh = sub.add_parser("shards", help="write a dataset as webdataset tar shards (img2dataset layout)",
                        description="Write any source mmcl reads as webdataset shards: KEY.jpg|png|webp + "
                                    "KEY.txt + KEY.json per sample, sizes.json beside the shards.")
    sh.add_argument("--data", required=True, metavar="PATH_OR_DATASET",
                    help="parquet/CSV/JSON file, image folder, save_to_disk directory, or 'digits'")
    sh.add_argument("--out", required=True, metavar="DIR", help="directory to write (new, or without shards)")
    sh.add_argument("--shard-size", type=int, required=True, metavar="N", help="samples per shard")
    sh.add_argument("--split", default=None, help="split to write (default: the only one, else train)")
    sh.add_argument("--image-column", default="image", help="column holding images (default: image)")
    sh.add_argument("--caption-column", default="caption",
                    help="caption string or list column, or 'none' for image-only shards (default: caption)")
    sh.add_argument("--max-samples", type=int, default=None, help="write N random rows (seeded)")
    sh.add_argument("--shuffle", action="store_true", help="write the rows in a seeded random order")
    sh.add_argument("--seed", type=int, default=0, help="seed of --max-samples and --shuffle (default 0)")
    sh.add_argument("--quiet", action="store_true", help="no progress bar or summary line")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmcl", description="Zero-shot classification, retrieval, evaluation and export for mmcl models.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    zs = sub.add_parser("zeroshot", help="rank class names for each image",
                        description="Classify images among the given labels with no training (CLIP-style).")
    _common(zs, data=False)
    _labels_args(zs)
    zs.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    zs.add_argument("--top", type=int, default=5, help="labels shown per image (default 5)")
    zs.add_argument("--json", action="store_true", help="print JSON instead of a table")

    ev = sub.add_parser("eval", help="evaluate a model on a dataset",
                        description="Evaluate on a local dataset: zero-shot top-1/top-5, retrieval recall@k, "
                                    "or kNN / linear-probe top-1 on frozen image features.")
    kinds = ev.add_subparsers(dest="task", required=True, metavar="TASK")
    for name, text in (("zeroshot", "zero-shot top-1/top-5 over the label column's classes"),
                       ("retrieval", "image<->text recall@1/5/10"),
                       ("knn", "weighted kNN (k=200, T=0.1) top-1 on image features"),
                       ("linear", "logistic-regression probe top-1 on image features")):
        p = kinds.add_parser(name, help=text, description=text)
        _common(p)
        p.add_argument("--plot", metavar="FILE.png", help="save a confusion matrix (or similarity heat-map) here")
        if name == "retrieval":
            p.add_argument("--caption-column", default="captions",
                           help="caption string or list column (default: captions)")
        else:
            p.add_argument("--label-column", default="label", help="integer/ClassLabel or string label column")
        if name == "zeroshot":
            _labels_args(p)
        if name in ("knn", "linear"):
            p.add_argument("--train-data", default=None, help="labelled reference set (default: --data)")
            p.add_argument("--train-split", default=None, help="its split (default: train; 80/20 hold-out if "
                                                                "it is the same data as --data/--split)")
        if name == "knn":
            p.add_argument("--k", type=int, default=200, help="neighbours (default 200)")
            p.add_argument("--temperature", type=float, default=0.1, help="vote weight exp(cos/T) (default 0.1)")
        if name == "linear":
            p.add_argument("--C", type=float, default=1.0, help="inverse L2 penalty of the probe (default 1.0)")

    em = sub.add_parser("embed", help="write image or text embeddings to .npy or .parquet",
                        description="Embed images (files or a dataset column) or texts and save them.")
    _common(em)
    em.add_argument("images", nargs="*", metavar="IMAGE", help="image files (instead of --data)")
    em.add_argument("--text", action="append", default=None, help="a text to embed (repeatable)")
    em.add_argument("--caption-column", default=None, help="with --data: embed this text column instead of images")
    em.add_argument("--out", required=True, metavar="FILE", help="output .npy (N, P) or .parquet (id, embedding)")

    ex = sub.add_parser("export", help="save a model in plain transformers layout",
                        description="Write the model as a transformers VisionTextDualEncoderModel directory.")
    ex.add_argument("--model", required=True, metavar="DIR", help="model directory")
    ex.add_argument("--to", required=True, choices=["transformers"], help="target format")
    ex.add_argument("out", metavar="OUT", help="output directory")

    _shards_parser(sub)

    ix = sub.add_parser("index", help="build a FAISS index over saved embeddings (needs faiss-cpu)",
                        description="Index the embeddings written by `mmcl embed` for fast cosine search.")
    ix.add_argument("--embeddings", required=True, metavar="FILE", help=".parquet (id, embedding) or .npy (N, P)")
    ix.add_argument("--out", required=True, metavar="DIR", help="index directory to write")
    ix.add_argument("--kind", choices=["flat", "ivf"], default="flat",
                    help="flat: exact; ivf: clustered, for millions of rows (default: flat)")
    ix.add_argument("--nlist", type=int, default=None, help="ivf lists (default about 4 sqrt(N))")

    se = sub.add_parser("search", help="find the indexed items nearest to texts or images",
                        description="Embed queries with the model and search an index built by `mmcl index`.")
    _common(se, data=False)
    se.add_argument("--index", required=True, metavar="DIR", help="directory written by `mmcl index`")
    se.add_argument("--text", action="append", default=[], help="a text query (repeatable)")
    se.add_argument("--image", action="append", default=[], help="an image file query (repeatable)")
    se.add_argument("--k", type=int, default=10, help="results per query (default 10)")
    se.add_argument("--nprobe", type=int, default=None, help="ivf lists scanned per query")
    se.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _checkpoint_parser(sub)
    return parser


def _checkpoint_parser(sub) -> None:
    ck = sub.add_parser("checkpoint", help="check a training run's checkpoints",
                        description="Inspect the checkpoints that mmcl training writes.")
    actions = ck.add_subparsers(dest="action", required=True, metavar="ACTION")
    ve = actions.add_parser("verify", help="check every file's size and sha256 against its COMPLETE marker",
                            description="Verify checkpoints; exit status 2 if any is damaged.")
    ve.add_argument("dir", metavar="DIR", help="a run's output_dir, its checkpoints/ folder, or one step_* directory")
