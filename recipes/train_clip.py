"""Train with mmcl's clip mode.

    accelerate launch recipes/train_clip.py [--config recipes/configs/NAME.yaml] [key.sub=value ...]
    python recipes/train_clip.py            # the same, one process

See recipes/README.md for every reference run.
"""
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # towers and data are local files: never reach a hub

from mmcl.train.recipe import recipe_main  # noqa: E402

DEFAULT_CONFIG = str(Path(__file__).resolve().parent / "configs" / "clip_digits.yaml")

if __name__ == "__main__":
    recipe_main(DEFAULT_CONFIG)
