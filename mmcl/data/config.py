"""Configuration of the data pipeline: where the data lives and how it is augmented."""
from __future__ import annotations

from dataclasses import dataclass

from mmcl.data.augment import AUGMENT_PRESETS


@dataclass
class DataConfig:
    """Where training data comes from and how each sample becomes tensors.

    ``source`` is ``"digits"`` (scikit-learn's handwritten digits, built in), a local parquet / CSV /
    JSON file, an image-folder directory (with an optional ``metadata.csv``/``metadata.jsonl``), a
    directory written by ``datasets.Dataset.save_to_disk``, or a ``datasets`` name found in the local
    cache. ``caption_column`` may hold one string or a list of strings per row; with a list, one
    caption is drawn per sample and epoch (deterministically from the seed).

    ``source`` may also be webdataset shards: a brace pattern (``shards/{00000..00099}.tar``), a
    glob, or a list of ``.tar`` paths, in img2dataset's layout (``KEY.jpg|png|webp`` with ``KEY.txt``
    and/or ``KEY.json``). Shards are always streamed (``mmcl.data.shards``). With ``streaming: true``
    every other source is streamed too: parquet / CSV / JSON / arrow files (one file, a glob or a
    list) one file per shard, and any other source (digits, image folder, ``save_to_disk``
    directory, cached datasets name) as row ranges of its ``split`` (``mmcl.data.ranges``:
    ``min(1000, ceil(R / 64))`` rows each).
    """

    source: str | list = "digits"
    split: str = "train"  # the split to train on (image folder train/ test/ folders, DatasetDict, cached name)
    image_column: str = "image"
    caption_column: str = "caption"
    label_column: str | None = None
    augment: str = "clip"  # one of AUGMENT_PRESETS (CPU transforms in the loader's workers)
    # Views made on the training device instead (a preset of mmcl's device augmenter; image-only
    # modes, with augment: none so that the loader only decodes, resizes and crops).
    augment_on_device: str | None = None
    # The image side for training and for the model: a model built from towers gets a processor of
    # this size; None: the processor's own size.
    image_size: int | None = None
    # Probability that a sample is CutMix-ed within its batch (i-Mix): the two views, or the image of
    # an image-text batch.
    cutmix: float = 0.0
    max_samples: int | None = None
    num_workers: int = 0
    eval_source: str | list | None = None
    eval_split: str = "test"
    max_text_length: int | None = None  # None: the processor's own default
    # Stream any source (shards always stream): data files one per shard, other sources as row ranges;
    # data.max_samples must then be null, data.eval_source gives at most eval_max_samples rows.
    streaming: bool = False
    resampled: bool = False  # streams: draw shards with replacement (needed when shards < ranks x workers)
    shuffle_buffer: int = 1000  # streams: samples in the seeded shuffle buffer of each worker (1: no shuffle)
    eval_max_samples: int = 5000  # a streamed eval_source (or kNN bank) is read up to this many samples
    # (the first ones of shards / files; seeded random rows of a row-range source)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError/TypeError naming the field when a value is impossible."""
        validate_config(self)


def validate_config(cfg: DataConfig) -> None:
    """Raise ValueError/TypeError naming the field when ``cfg`` holds an impossible value."""
    aod = cfg.augment_on_device
    if aod is not None and (not isinstance(aod, str) or not aod):
        raise ValueError(f"DataConfig.augment_on_device must be a preset name or None, got {aod!r}")
    for name in ("source", "eval_source"):
        value = getattr(cfg, name)
        if value is None and name == "eval_source":
            continue
        if isinstance(value, (list, tuple)):
            if not value or not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"DataConfig.{name} as a list must hold non-empty path strings, got {value!r}")
        elif not isinstance(value, str) or not value:
            raise ValueError(f"DataConfig.{name} must be a non-empty string or a list of shard paths, got {value!r}")
    for name in ("streaming", "resampled"):
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"DataConfig.{name} must be true or false, got {getattr(cfg, name)!r}")
    for name in ("shuffle_buffer", "eval_max_samples"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"DataConfig.{name} must be an int >= 1, got {value!r}")
    if cfg.augment not in AUGMENT_PRESETS:
        raise ValueError(f"DataConfig.augment must be one of {AUGMENT_PRESETS}, got {cfg.augment!r}")
    if cfg.image_size is not None and (not isinstance(cfg.image_size, int) or cfg.image_size < 1):
        raise ValueError(f"DataConfig.image_size must be a positive int or None, got {cfg.image_size!r}")
    if not isinstance(cfg.cutmix, (int, float)) or not 0.0 <= float(cfg.cutmix) <= 1.0:
        raise ValueError(f"DataConfig.cutmix is a probability in [0, 1], got {cfg.cutmix!r}")
    if cfg.max_samples is not None and (not isinstance(cfg.max_samples, int) or cfg.max_samples < 1):
        raise ValueError(f"DataConfig.max_samples must be a positive int or None, got {cfg.max_samples!r}")
    if not isinstance(cfg.num_workers, int) or cfg.num_workers < 0:
        raise ValueError(f"DataConfig.num_workers must be an int >= 0, got {cfg.num_workers!r}")
    if cfg.max_text_length is not None and (
        not isinstance(cfg.max_text_length, int) or cfg.max_text_length < 2
    ):
        raise ValueError(f"DataConfig.max_text_length must be an int >= 2 or None, got {cfg.max_text_length!r}")
    for name in ("image_column", "caption_column", "split", "eval_split"):
        if not isinstance(getattr(cfg, name), str) or not getattr(cfg, name):
            raise ValueError(f"DataConfig.{name} must be a non-empty string, got {getattr(cfg, name)!r}")
    if cfg.label_column is not None and (not isinstance(cfg.label_column, str) or not cfg.label_column):
        raise ValueError(f"DataConfig.label_column must be a non-empty string or None, got {cfg.label_column!r}")
