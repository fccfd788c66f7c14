"""The command line shared by the training recipes: `--config PATH` plus dotted overrides, then `fit`.

    # recipes/train_clip.py
    DEFAULT_CONFIG = str(Path(__file__).parent / "configs" / "clip_digits.yaml")
    if __name__ == "__main__":
        recipe_main(DEFAULT_CONFIG)

    accelerate launch recipes/train_clip.py [--config recipes/configs/NAME.yaml] [key.sub=value ...]

`fit` prints the run's summary (`mmcl: zero-shot top-1 ...`, `mmcl: kNN top-1 ...`) on the main
process. The recipe scripts set HF_HUB_OFFLINE=1 before importing this module: huggingface_hub reads
it once, when it is first imported.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mmcl.train import fit, load_config


def parse_recipe_args(default_config, argv=None) -> tuple[str, list[str]]:
    """(config path, overrides) from `argv` (sys.argv[1:] when None).

    Args:
        default_config: the YAML file used when `--config` is not given (str or Path).
        argv: e.g. `["--config", "x.yaml", "train.max_steps=30", "output_dir=runs/x"]`.
    Raises:
        TypeError: `default_config` is not a str or Path.
        SystemExit: bad arguments (argparse prints the usage, status 2).
    """
    if not isinstance(default_config, (str, os.PathLike)):
        raise TypeError(f"default_config must be a path (str or Path), got {type(default_config).__name__}")
    name = Path(default_config).name
    parser = argparse.ArgumentParser(description=f"mmcl training recipe (default config: {name})")
    parser.add_argument("--config", default=str(default_config), help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=30 output_dir=runs/x")
    args = parser.parse_args(argv)
    return args.config, args.overrides


def recipe_main(default_config, argv=None) -> dict:
    """Load `--config` (default `default_config`) with the dotted overrides of `argv`, train, and
    return `fit`'s result dict (step, loss, the final evaluation's metrics, ...).

    A config error (unknown key, bad value or type, missing file) exits with `error: ...` on
    stderr and status 1 instead of a traceback.
    """
    path, overrides = parse_recipe_args(default_config, argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the data loader's workers fork
    try:
        config = load_config(path, overrides)
    except (ValueError, TypeError) as exc:
        sys.exit(f"error: {exc}")
    return fit(config)
