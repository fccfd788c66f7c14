"""Accelerate trackers: a JSON-lines file tracker, and the default tracker list."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import time

from accelerate.tracking import GeneralTracker

TRACKERS = ("tensorboard", "jsonl", "wandb")


class JsonlTracker(GeneralTracker):
    """Appends one JSON object per `log` call to `logging_dir/metrics.jsonl` (main process only).

    Each line is {"step": int, "time": unix seconds, **values}; non-finite floats are written as
    strings so that every line stays valid JSON. `store_init_configuration` writes `config.json`.
    """

    name = "jsonl"
    requires_logging_directory = True

    def __init__(self, run_name: str, logging_dir: str):
        super().__init__()
        self.run_name = run_name
        self.logging_dir = str(logging_dir)
        self.path = os.path.join(self.logging_dir, "metrics.jsonl")
        self._file = None

    def start(self):
        os.makedirs(self.logging_dir, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)  # line-buffered: survives a kill mid-run

    @property
    def tracker(self):
        return self._file

    def store_init_configuration(self, values: dict):
        os.makedirs(self.logging_dir, exist_ok=True)
        with open(os.path.join(self.logging_dir, "config.json"), "w") as f:
            json.dump(values, f, indent=2, default=str)

    def log(self, values: dict, step: int | None = None, **kwargs):
        if self._file is None:
            self.start()
        row = {"step": step, "time": time.time()}
        for k, v in values.items():
            if hasattr(v, "item"):
                v = v.item()
            if isinstance(v, float) and not math.isfinite(v):
                v = str(v)
            row[k] = v
        self._file.write(json.dumps(row) + "\n")

    def finish(self):
        if self._file is not None:
            self._file.close()
            self._file = None


def build_trackers(names, logging_dir: str, run_name: str = "mmcl") -> list:
    """Accelerate `log_with` list: "tensorboard" → Accelerate's own, "jsonl" → JsonlTracker,
    "wandb" → Accelerate's own, silently dropped when wandb is not installed."""
    out = []
    for name in names:
        if name == "jsonl":
            out.append(JsonlTracker(run_name, logging_dir))
        elif name == "wandb":
            if importlib.util.find_spec("wandb") is not None:
                out.append("wandb")
        elif name == "tensorboard":
            out.append("tensorboard")
        else:
            raise ValueError(f"train.trackers: unknown tracker {name!r} ({', '.join(TRACKERS)})")
    return out
