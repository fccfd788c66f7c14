"""Configs saved by runs: the flat form the trackers store (`logs/config.json`), and reading it
back, with the keys of earlier versions mapped to today's (mmcl.train.config.RENAMED).

    cfg = load_saved_config("runs/moco_digits")      # a run's output_dir
    cfg.checkpoint.resume = "auto"
    fit(cfg)
"""
from __future__ import annotations

import ast
import json
from pathlib import Path

from mmcl.train.config import RENAMED, Config, set_dotted, from_dict, to_dict


def flat_dict(cfg: Config) -> dict:
    """{"train.max_steps": 1000, ...}: the config as the trackers store it (logs/config.json);
    values other than int / float / str / bool are written as their repr."""
    def flat(d: dict, prefix: str) -> dict:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[prefix + k] = v if isinstance(v, (int, float, str, bool)) else str(v)
        return out

    return flat(to_dict(cfg), "")


def _saved_value(value):
    """A value of a saved flat config: repr strings of None / lists / tuples / dicts back to values."""
    if isinstance(value, str) and (value == "None" or value[:1] in "[({"):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    return value


def upgrade_keys(flat: dict) -> dict:
    """Map the dotted keys of an earlier config to today's (see RENAMED); the two accumulation
    knobs become train.accumulate + train.accumulate_mode."""
    out = dict(flat)
    steps = out.pop("train.grad_accum_steps", None)
    if steps is not None and int(steps) > 1:
        out["train.accumulate"], out["train.accumulate_mode"] = steps, "plain"
    old_size, new_size = out.pop("model.image_size", None), out.get("data.image_size")
    if old_size is not None:
        if new_size is not None and new_size != old_size:
            raise ValueError(f"saved config sets model.image_size={old_size} and data.image_size={new_size}; "
                             "today both are data.image_size")
        out["data.image_size"] = old_size
    for old, new in RENAMED.items():
        if old in out:
            out[new.split(" ")[0]] = out.pop(old)
    return out


def load_saved_config(path) -> Config:
    """The Config of an earlier run from the config.json its trackers wrote (a run's output_dir,
    its logs directory, or the file), with the keys of earlier versions mapped to today's."""
    path = Path(path)
    for candidate in (path, path / "config.json", path / "logs" / "config.json"):
        if candidate.is_file():
            break
    else:
        raise ValueError(f"no saved config.json at {str(path)!r} (nor in its logs/ directory)")
    with open(candidate) as f:
        flat = {k: _saved_value(v) for k, v in json.load(f).items()}
    raw: dict = {}
    for key, value in upgrade_keys(flat).items():
        set_dotted(raw, key, value)
    return from_dict(raw)
