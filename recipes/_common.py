"""Shared command line of the recipes: `--config PATH` plus dotted overrides."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent / "configs"


def parse(default_config: str, argv=None):
    """(config path, overrides) from argv; `train.max_steps=30` style overrides may follow."""
    parser = argparse.ArgumentParser(description=f"mmcl training recipe (default config: {default_config})")
    parser.add_argument("--config", default=str(CONFIGS / default_config), help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=30 output_dir=runs/x")
    args = parser.parse_args(argv)
    return args.config, args.overrides


def main(default_config: str, argv=None) -> dict:
    # Nothing here may reach a hub: towers and data come from local files and installed packages.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from mmcl.train import fit, load_config

    path, overrides = parse(default_config, argv)
    try:
        config = load_config(path, overrides)
    except (ValueError, TypeError) as exc:
        sys.exit(f"error: {exc}")
    return fit(config)
