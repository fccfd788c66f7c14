"""Accelerate trackers (a JSON-lines file tracker, the default tracker list) and what a training
run logs to them: `Progress` (the progress bar, the training metrics and their throughput) and
`log_evaluation` (the held-out metrics)."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import time

from accelerate.tracking import GeneralTracker
from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm

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


# --------------------------------------------------------------------------- what a run logs


class Progress:
    """A run's progress bar and the throughput window between two logged steps; the bar shows on
    each machine's local main process when `show`."""

    def __init__(self, accelerator, total: int, initial: int, desc: str, show: bool):
        self.accelerator = accelerator
        self.bar = tqdm(total=total, initial=initial, desc=desc,
                        disable=not (accelerator.is_local_main_process and show), dynamic_ncols=True)
        self.window_start, self.window_samples = time.perf_counter(), 0

    def step_done(self, samples: int) -> None:
        """One optimizer step is done; it trained on `samples` (all processes together)."""
        self.window_samples += samples
        self.bar.update(1)

    def log(self, step: int, loss: float, lr: float, values: dict) -> None:
        """Log loss, lr, samples_per_s since the previous log and `values` at `step`; show loss and
        lr on the bar."""
        now = time.perf_counter()
        metrics = {"loss": loss, "lr": lr,
                   "samples_per_s": self.window_samples / max(now - self.window_start, 1e-9), **values}
        self.accelerator.log(metrics, step=step)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        self.window_start, self.window_samples = now, 0

    def close(self) -> None:
        self.bar.close()


def log_evaluation(accelerator, evaluator, model, step: int) -> dict:
    """Evaluate `model` with `evaluator` on the main process (the others wait), log the metrics as
    eval/NAME at `step`, and return them on every process ({} when there is nothing to evaluate)."""
    box = [evaluator(model) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(box, from_process=0)
    result = box[0] or {}
    if result:
        accelerator.log({f"eval/{k}": v for k, v in result.items()}, step=step)
    return result
