"""Train with mmcl's clip mode.

    accelerate launch recipes/train_clip.py [--config recipes/configs/NAME.yaml] [key.sub=value ...]
    python recipes/train_clip.py            # the same, one process

Default config: recipes/configs/clip_digits.yaml. See recipes/README.md for every reference run.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import main  # noqa: E402

if __name__ == "__main__":
    main("clip_digits.yaml")
