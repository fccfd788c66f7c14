"""The run's Accelerator, built from the training config (what ``mmcl.train.loop.fit`` trains with)."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, ProjectConfiguration

from mmcl.train import faults
from mmcl.train.config import Config
from mmcl.train.trackers import build_trackers

__all__ = ["build_accelerator"]


def build_accelerator(cfg: Config) -> Accelerator:
    """The run's Accelerator from the config: mixed precision, trackers, project dirs, dynamo, DDP
    with unused parameters allowed, the collective timeout; a multi-process CPU launch is one gloo group."""
    out = Path(cfg.output_dir)
    # `accelerate launch --multi_gpu` on a machine without GPUs starts the processes but Accelerate
    # would then run each alone; with cpu=True they form one gloo group (multi-CPU training).
    cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=cfg.train.mixed_precision,
        log_with=build_trackers(cfg.train.trackers, str(out / "logs")) or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        dynamo_backend="inductor" if cfg.train.compile else "no",
        # Towers may hold parameters that a given loss never reaches (a pooler next to mean pooling).
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True),
                         faults.process_group_kwargs(cfg.train.collective_timeout_s)],  # a dead rank: no hang
    )
    _say_if_engine_dropped(accelerator)
    if getattr(accelerator.state, "deepspeed_plugin", None) is not None:
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
    t = cfg.train
    if t.accumulate > 1 and t.accumulate_mode == "cached" and accelerator.distributed_type in (
            DistributedType.DEEPSPEED, DistributedType.FSDP):
        raise ValueError(f"train.accumulate_mode=cached (GradCache) is not supported with "
                         f"{accelerator.distributed_type.value}: its backward passes bypass the engine; "
                         "use DDP (multi_gpu) or train.accumulate_mode=plain")
    return accelerator


def _say_if_engine_dropped(accelerator: Accelerator) -> None:
    """One line when the launch asked for FSDP or DeepSpeed but Accelerate runs plain data
    parallelism (it does on CPU processes): the run then holds full replicas, not shards."""
    for env, engine in (("ACCELERATE_USE_FSDP", DistributedType.FSDP),
                        ("ACCELERATE_USE_DEEPSPEED", DistributedType.DEEPSPEED)):
        if os.environ.get(env, "false").lower() == "true" and accelerator.distributed_type != engine:
            if accelerator.is_main_process:
                print(f"mmcl: warning: the launch asked for {engine.value} ({env}=true) but Accelerate runs "
                      f"{accelerator.distributed_type.value} here ({engine.value} needs GPUs): every process holds "
                      "the whole model and optimizer state", flush=True)
