"""Training configuration: the sections composed, loaded from YAML plus dotted overrides.

    cfg = load_config("recipes/configs/clip_digits.yaml", ["train.max_steps=30", "output_dir=runs/x"])

Each section's dataclass lives beside the code it configures and validates itself (ModelConfig in
builders.py, DataConfig in mmcl/data/config.py, LossConfig in mmcl/methods/base.py, MoCoConfig in
mmcl/methods/moco.py, PCLConfig in mmcl/methods/pcl.py, BYOLConfig in mmcl/methods/byol.py, OptimConfig
in optim.py, CheckpointConfig in checkpoint.py, EvalConfig in evaluation.py); TrainConfig, the loop's own knobs, is here. Override values are parsed as YAML
scalars (`3e-4` → float, `true` → bool, `[a, b]` → list, `null` → None). An unknown key raises a
ValueError naming it and the closest valid keys; a renamed key names its new place.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mmcl.data.config import DataConfig
from mmcl.methods import (  # noqa: F401  (MODES re-exported)
    MODES, BYOLConfig, LossConfig, MoCoConfig, PCLConfig, objective_class,
)
from mmcl.train.builders import ModelConfig
from mmcl.train.checkpoint import CheckpointConfig
from mmcl.data.augment import DEVICE_PRESETS as DEVICE_AUGMENT_PRESETS
from mmcl.train.evaluation import EvalConfig
from mmcl.train.gradcache import ACCUMULATE_MODES
from mmcl.train.optim import OptimConfig
from mmcl.train.trackers import TRACKERS

MIXED_PRECISION = ("no", "fp16", "bf16")  # Accelerate's mixed_precision values

# Keys of earlier configs and where they live now.
RENAMED = {
    "loss.queue_size": "moco.queue_size",
    "loss.momentum": "moco.key_momentum",
    "loss.final_momentum": "moco.final_momentum",
    "loss.shuffle_bn": "moco.shuffle_bn",
    "model.image_size": "data.image_size",
    "model.bn_splits": "model.batchnorm.splits",
    "model.sync_bn": "model.batchnorm.sync",
    "train.save_every": "checkpoint.every",
    "train.keep_checkpoints": "checkpoint.keep",
    "train.resume": "checkpoint.resume",
    "train.resume_allow_changes": "checkpoint.resume_allow_changes",
    "train.grad_accum_steps": "train.accumulate (with train.accumulate_mode=plain)",
    "train.device_augment": "data.augment_on_device",
}


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _int_at_least(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


@dataclass
class TrainConfig:
    """The `train:` section: the loop's own knobs."""

    batch_size: int = 64  # per process, per micro-batch
    max_steps: int = 1000  # optimizer steps
    max_minutes: float | None = None  # stop earlier once training has run this long (checkpoint + final eval)
    accumulate: int = 1  # k micro-batches per optimizer step
    accumulate_mode: str = "cached"  # "cached": GradCache, k micro-batches are ONE contrastive batch of k*B;
    #                                  "plain": k separate losses, gradients summed
    mixed_precision: str = "no"  # one of MIXED_PRECISION (through Accelerate)
    compile: bool = False
    num_threads: int | None = None  # torch intra-op threads; None: torch's default (one per core)
    skip_nonfinite: bool = False  # skip a step with a non-finite loss instead of stopping
    log_every: int = 10
    eval_every: int = 0  # steps; 0: evaluate only at the end
    progress: bool = True
    trackers: list = field(default_factory=lambda: ["tensorboard", "jsonl"])  # + "wandb" when installed
    collective_timeout_s: float = 300.0  # a collective waiting this long ends the run, naming the silent rank

    def validate(self) -> None:
        for name in ("batch_size", "max_steps", "accumulate", "log_every"):
            value = getattr(self, name)
            _check(_int_at_least(value, 1), f"train.{name} must be an int >= 1, got {value!r}")
        _check(_int_at_least(self.eval_every, 0), f"train.eval_every must be an int >= 0, got {self.eval_every!r}")
        _check(self.accumulate_mode in ACCUMULATE_MODES,
               f"train.accumulate_mode must be one of {', '.join(ACCUMULATE_MODES)}, got {self.accumulate_mode!r}")
        mm = self.max_minutes
        _check(mm is None or (isinstance(mm, (int, float)) and not isinstance(mm, bool) and mm > 0),
               f"train.max_minutes must be null or a number > 0, got {mm!r}")
        _check(self.num_threads is None or _int_at_least(self.num_threads, 1),
               f"train.num_threads must be null or an int >= 1, got {self.num_threads!r}")
        _check(self.mixed_precision in MIXED_PRECISION,
               f"train.mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}")
        cts = self.collective_timeout_s
        _check(isinstance(cts, (int, float)) and not isinstance(cts, bool) and cts > 0,
               f"train.collective_timeout_s must be a number > 0, got {cts!r}")
        _check(isinstance(self.trackers, list), f"train.trackers must be a list, got {self.trackers!r}")
        for tr in self.trackers:
            _check(tr in TRACKERS, f"train.trackers: unknown tracker {tr!r} ({', '.join(TRACKERS)})")


@dataclass
class Config:
    mode: str = "clip"  # a key of mmcl.methods.METHODS
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    moco: MoCoConfig = field(default_factory=MoCoConfig)
    pcl: PCLConfig = field(default_factory=PCLConfig)
    byol: BYOLConfig = field(default_factory=BYOLConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs/mmcl"
    seed: int = 0


def validate(cfg: Config) -> None:
    """Every section's own checks, the method's checks, then the rules that span sections."""
    for section in (cfg.model, cfg.data, cfg.loss, cfg.moco, cfg.pcl, cfg.byol, cfg.optim, cfg.train, cfg.checkpoint,
                    cfg.eval):
        section.validate()
    objective_class(cfg).check_config(cfg)
    splits = cfg.model.batchnorm.splits
    _check(splits == 1 or cfg.train.batch_size % splits == 0,
           f"train.batch_size ({cfg.train.batch_size}) must be divisible by model.batchnorm.splits ({splits})")
    aod = cfg.data.augment_on_device
    if aod is not None:
        _check(aod in DEVICE_AUGMENT_PRESETS, f"data.augment_on_device must be one of "
                                              f"{', '.join(DEVICE_AUGMENT_PRESETS)} or null, got {aod!r}")
        _check(cfg.data.augment == "none", "data.augment_on_device augments on the device: set data.augment=none "
                                           f"(got {cfg.data.augment!r})")


# --------------------------------------------------------------------------- merging


def _suggest(key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=3, cutoff=0.5)
    return f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(sorted(valid))}"


def _coerce(path: str, value, hint):
    """Light type checks: ints become floats where floats are expected, lists become tuples."""
    if value is None:
        return value
    allowed = typing.get_args(hint) or (hint,)
    allowed = tuple(typing.get_origin(a) or a for a in allowed if a is not type(None))
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if float in allowed and isinstance(value, str):
        try:  # PyYAML reads "3e-4" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tuple in allowed and isinstance(value, list):
        return tuple(value)
    if str in allowed and not isinstance(value, str) and not any(isinstance(value, a) for a in allowed):
        return str(value)  # e.g. data.split=2017 → "2017"
    if allowed and not any(isinstance(value, a) for a in allowed if isinstance(a, type)):
        names = " | ".join(getattr(a, "__name__", str(a)) for a in allowed)
        raise TypeError(f"config key {path} expects {names}, got {value!r} ({type(value).__name__})")
    return value


def _merge(obj, updates: dict, prefix: str = "") -> None:
    if not isinstance(updates, dict):
        raise TypeError(f"config section {prefix.rstrip('.') or '<root>'} must be a mapping, got {updates!r}")
    hints = typing.get_type_hints(type(obj))
    for key, value in updates.items():
        path = prefix + str(key)
        if path in RENAMED:
            raise ValueError(f"config key {path!r} moved to {RENAMED[path]}")
        if key not in hints:
            raise ValueError(f"unknown config key {path!r}{_suggest(str(key), hints)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, path + ".")
        else:
            setattr(obj, key, _coerce(path, value, hints[key]))


def set_dotted(raw: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {dotted!r}: {part!r} is not a config section")
    node[parts[-1]] = value


def parse_overrides(overrides) -> dict:
    """["a.b=1", "c=x"] → {"a": {"b": 1}, "c": "x"}; values are parsed as YAML scalars/lists."""
    raw: dict = {}
    for item in overrides or []:
        if not isinstance(item, str) or "=" not in item:
            raise ValueError(f"overrides are 'key.sub=value' strings, got {item!r}")
        key, text = item.split("=", 1)
        key = key.strip().lstrip("-")
        if not key:
            raise ValueError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise ValueError(f"override {item!r}: the value is not valid YAML (quote it?): {exc}") from exc
        set_dotted(raw, key, value)
    return raw


# --------------------------------------------------------------------------- loading


def load_config(path=None, overrides=None) -> Config:
    """Build a Config from the defaults, then a YAML file (if `path`), then dotted overrides.

    Args:
        path: a YAML file whose top-level keys are Config fields (mode, model, data, ...), or None.
        overrides: a list of "a.b=c" strings, applied last.
    Raises:
        ValueError: unknown or renamed key (naming close matches / the new key) or an invalid value.
        TypeError: a value of the wrong type.
    """
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        _merge(cfg, raw)
    _merge(cfg, parse_overrides(overrides))
    validate(cfg)
    return cfg


def from_dict(raw: dict) -> Config:
    """A Config from a nested dict (e.g. `to_dict` output); same checks as load_config."""
    cfg = Config()
    _merge(cfg, raw)
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def as_config(config) -> Config:
    """A Config from a Config, a nested dict or a YAML path."""
    if isinstance(config, Config):
        return config
    if isinstance(config, dict):
        return from_dict(config)
    if isinstance(config, (str, Path)):
        return load_config(config)
    raise TypeError(f"config must be an mmcl.train.Config, a dict or a YAML path, got {type(config).__name__}")
