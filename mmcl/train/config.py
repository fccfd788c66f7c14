"""Training configuration: nested dataclasses, one per concern, loaded from YAML plus dotted overrides.

    cfg = load_config("recipes/configs/clip_digits.yaml", ["train.max_steps=30", "output_dir=runs/x"])

Override values are parsed as YAML scalars (`3e-4` → float, `true` → bool, `[a, b]` → list,
`null` → None). An unknown key raises a ValueError naming it and the closest valid keys.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mmcl.data.config import DataConfig

MODES = ("clip", "simclr", "moco", "clip+simclr")


@dataclass
class ModelConfig:
    """Which towers to build. A tower is a local dir / hub id / "timm:NAME" / "open_clip:NAME" /
    "torchvision:NAME", or `*_config`: a dict of transformers config fields (with `model_type`) for
    a randomly initialised tower. "pkg:PACKAGE/sub/dir" names a directory inside an installed package.
    `pretrained`: a directory written by DualEncoder.save_pretrained (overrides the towers)."""

    image_tower: str | None = None
    image_tower_config: dict | None = None
    text_tower: str | None = None
    text_tower_config: dict | None = None
    pretrained: str | None = None
    tokenizer: str | None = None  # a tokenizer directory for a text tower built from a config
    image_size: int | None = None  # override the image processor's size / mean / std
    image_mean: list | None = None
    image_std: list | None = None
    projection_dim: int = 512
    projection: str = "linear"  # "linear" | "mlp"
    init_temperature: float = 0.07
    lock_image: bool = False
    lock_image_unlocked_layers: int = 0
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0
    gradient_checkpointing: bool = False
    cache_text_features: bool = False  # LiT: memoise a fully locked text tower's features per caption
    sync_bn: bool = False  # convert BatchNorm to SyncBatchNorm in multi-process runs
    bn_splits: int = 1  # > 1: BatchNorm2d statistics per 1/bn_splits of the batch (one GPU acting as several)


@dataclass
class LossConfig:
    """Loss settings. CLIP learns its temperature (model.logit_scale); image-only losses use a fixed one."""

    impl: str = "auto"  # "auto" | "naive" | "chunked" | "triton"
    local_loss: bool = True  # multi-process: each rank scores its own rows against all gathered columns
    temperature: float = 0.2  # simclr / moco
    simclr_weight: float = 1.0  # clip+simclr: weight of the image-image term (SLIP uses 1.0)
    simclr_temperature: float = 0.1  # clip+simclr: temperature of the image-image term
    queue_size: int = 65536  # moco
    momentum: float = 0.999  # moco key encoder EMA
    final_momentum: float | None = None  # moco: cosine ramp of the momentum to this value
    shuffle_bn: bool = True  # moco: shuffle the key batch across ranks (MoCo's shuffling BN)


@dataclass
class OptimConfig:
    name: str = "adamw"  # "adamw" | "lars" | "sgd"
    lr: float = 5e-4
    weight_decay: float = 0.1  # never applied to norms, biases, the temperature (or 1-D params)
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-6
    momentum: float = 0.9  # lars / sgd
    trust_coefficient: float = 0.001  # lars
    schedule: str = "cosine"  # "cosine" | "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of lr
    max_grad_norm: float | None = 3.0  # None or 0: no clipping


@dataclass
class TrainConfig:
    batch_size: int = 64  # per process, per micro-batch
    max_steps: int = 1000  # optimizer steps
    max_minutes: float | None = None  # stop earlier once training has run this long (checkpoint + final eval)
    accumulate: int = 1  # GradCache: k micro-batches form ONE contrastive batch of k*B
    grad_accum_steps: int = 1  # plain accumulation: k separate losses, gradients summed
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16" (through Accelerate)
    compile: bool = False
    num_threads: int | None = None  # torch intra-op threads; None: torch's default (one per core)
    save_every: int = 0  # steps; 0: only the final model
    keep_checkpoints: int = 2
    resume: str | None = None  # None | "auto" | a checkpoint directory
    skip_nonfinite: bool = False  # skip a step with a non-finite loss instead of stopping
    log_every: int = 10
    eval_every: int = 0  # steps; 0: evaluate only at the end
    progress: bool = True
    trackers: list = field(default_factory=lambda: ["tensorboard", "jsonl"])  # + "wandb" when installed
    device_augment: str | None = None  # simclr/moco: "mocov2" | "simclr" | "moco_cifar" views made on the device
    # faults (mmcl.train.faults): a dead rank ends the run after this long; refuse meaning-changing resumes
    collective_timeout_s: float = 300.0
    resume_allow_changes: bool = False  # resume although the config changed the run's meaning (logged)


@dataclass
class EvalConfig:
    enabled: bool = True
    max_samples: int | None = None  # held-out samples used by evaluation
    templates: str | list | None = "eval"  # "eval": mmcl.data's EVAL_TEMPLATES; a list; None: zeroshot default
    class_names: list | None = None  # None: from the digits / the label column's ClassLabel names
    knn_k: int = 20
    knn_temperature: float = 0.1
    knn_train_samples: int | None = 5000  # training images in the kNN memory bank; null: all of them
    batch_size: int = 128


@dataclass
class Config:
    mode: str = "clip"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs/mmcl"
    seed: int = 0


# --------------------------------------------------------------------------- loading


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


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
    hints = _hints(type(obj))
    for key, value in updates.items():
        path = prefix + str(key)
        if key not in hints:
            raise ValueError(f"unknown config key {path!r}{_suggest(str(key), hints)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, path + ".")
        else:
            setattr(obj, key, _coerce(path, value, hints[key]))


def _set_dotted(raw: dict, dotted: str, value) -> None:
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
        _set_dotted(raw, key, value)
    return raw


def load_config(path=None, overrides=None) -> Config:
    """Build a Config from the defaults, then a YAML file (if `path`), then dotted overrides.

    Args:
        path: a YAML file whose top-level keys are Config fields (mode, model, data, ...), or None.
        overrides: a list of "a.b=c" strings, applied last.
    Raises:
        ValueError: unknown key (naming it and close matches) or an invalid value.
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


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def validate(cfg: Config) -> None:
    """Raise a ValueError naming the key when a value is impossible."""
    from mmcl.data.config import validate_config

    validate_config(cfg.data)
    t, o, lo, m = cfg.train, cfg.optim, cfg.loss, cfg.model
    _check(cfg.mode in MODES, f"mode must be one of {MODES}, got {cfg.mode!r}")
    for name in ("batch_size", "max_steps", "accumulate", "grad_accum_steps", "log_every", "keep_checkpoints"):
        value = getattr(t, name)
        _check(isinstance(value, int) and value >= 1, f"train.{name} must be an int >= 1, got {value!r}")
    _check(not (t.accumulate > 1 and t.grad_accum_steps > 1),
           "train.accumulate (GradCache) and train.grad_accum_steps cannot both be > 1")
    _check(t.max_minutes is None or (isinstance(t.max_minutes, (int, float)) and not isinstance(t.max_minutes, bool)
                                     and t.max_minutes > 0),
           f"train.max_minutes must be null or a number > 0, got {t.max_minutes!r}")
    _check(t.num_threads is None or (isinstance(t.num_threads, int) and t.num_threads >= 1),
           f"train.num_threads must be null or an int >= 1, got {t.num_threads!r}")
    for name in ("save_every", "eval_every"):
        value = getattr(t, name)
        _check(isinstance(value, int) and value >= 0, f"train.{name} must be an int >= 0, got {value!r}")
    _check(t.mixed_precision in ("no", "fp16", "bf16"),
           f"train.mixed_precision must be 'no', 'fp16' or 'bf16', got {t.mixed_precision!r}")
    _check(o.name in ("adamw", "lars", "sgd"), f"optim.name must be 'adamw', 'lars' or 'sgd', got {o.name!r}")
    _check(o.schedule in ("cosine", "constant"), f"optim.schedule must be 'cosine' or 'constant', got {o.schedule!r}")
    _check(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    _check(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    _check(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    _check(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    _check(len(o.betas) == 2, f"optim.betas must hold two floats, got {o.betas!r}")
    _check(o.max_grad_norm is None or o.max_grad_norm >= 0, f"optim.max_grad_norm must be >= 0 or null, got {o.max_grad_norm}")
    _check(lo.temperature > 0 and lo.simclr_temperature > 0, "loss.temperature and loss.simclr_temperature must be > 0")
    _check(lo.impl in ("auto", "naive", "chunked", "triton"), f"loss.impl must be auto|naive|chunked|triton, got {lo.impl!r}")
    _check(isinstance(lo.queue_size, int) and lo.queue_size >= 1, f"loss.queue_size must be an int >= 1, got {lo.queue_size!r}")
    _check(0 <= lo.momentum < 1, f"loss.momentum must be in [0, 1), got {lo.momentum}")
    _check(lo.simclr_weight >= 0, f"loss.simclr_weight must be >= 0, got {lo.simclr_weight}")
    _check(isinstance(m.bn_splits, int) and m.bn_splits >= 1, f"model.bn_splits must be an int >= 1, got {m.bn_splits!r}")
    _check(m.bn_splits == 1 or t.batch_size % m.bn_splits == 0,
           f"train.batch_size ({t.batch_size}) must be divisible by model.bn_splits ({m.bn_splits})")
    kts = cfg.eval.knn_train_samples
    _check(kts is None or (isinstance(kts, int) and kts >= 1), f"eval.knn_train_samples must be null or an int >= 1, got {kts!r}")
    _check(m.projection in ("linear", "mlp"), f"model.projection must be 'linear' or 'mlp', got {m.projection!r}")
    _check(isinstance(m.projection_dim, int) and m.projection_dim >= 1, f"model.projection_dim must be an int >= 1, got {m.projection_dim!r}")
    has_image = m.pretrained or m.image_tower or m.image_tower_config
    _check(bool(has_image), "model: set model.image_tower, model.image_tower_config or model.pretrained")
    if cfg.mode in ("clip", "clip+simclr"):
        has_text = m.pretrained or m.text_tower or m.text_tower_config
        _check(bool(has_text), f"mode {cfg.mode!r} needs a text tower: set model.text_tower or model.text_tower_config")
    _check(t.resume is None or isinstance(t.resume, str), f"train.resume must be null, 'auto' or a path, got {t.resume!r}")
    _check(isinstance(t.trackers, list), f"train.trackers must be a list, got {t.trackers!r}")
    _check(isinstance(t.collective_timeout_s, (int, float)) and not isinstance(t.collective_timeout_s, bool)
           and t.collective_timeout_s > 0, f"train.collective_timeout_s must be a number > 0, got {t.collective_timeout_s!r}")
    if t.device_augment is not None:
        from mmcl.train.device_augment import PRESETS

        _check(t.device_augment in PRESETS, f"train.device_augment must be one of {', '.join(PRESETS)} or null, "
                                            f"got {t.device_augment!r}")
        _check(cfg.mode in ("simclr", "moco"), f"train.device_augment needs mode simclr or moco, got {cfg.mode!r}")
        _check(cfg.data.augment == "none", "train.device_augment augments on the device: set data.augment=none "
                                           f"(got {cfg.data.augment!r})")
    for tr in t.trackers:
        _check(tr in ("tensorboard", "jsonl", "wandb"), f"train.trackers: unknown tracker {tr!r} (tensorboard, jsonl, wandb)")
