"""`fit(config)`: the training loop on Hugging Face Accelerate.

One call builds the model, data, optimizer and schedule from a Config, resumes from the newest
intact checkpoint when asked, trains for `train.max_steps` optimizer steps (each one batch, or
k micro-batches through GradCache / plain accumulation; `train.max_minutes` stops earlier, after a
checkpoint that `checkpoint.resume=auto` continues from), logs through Accelerate's trackers,
evaluates, checkpoints, and saves the final model with `save_pretrained` to `output_dir/final`.
A `faults.RunGuard` watches the run: SIGTERM / SIGUSR1 end it after a step with a checkpoint.

The loop reads as its steps: _setup → _resume → while (_next_batches → _train_step → _end_step)
→ _finish. All state a step touches is in one `Run`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed

from mmcl import distributed
from mmcl.data import BatchStream, DeviceAugment
from mmcl.data.shards import SKIP_REASONS
from mmcl.data.stream import build_stream
from mmcl.methods import Objective, build_objective
from mmcl.train import checkpoint as ckpt
from mmcl.train import faults
from mmcl.train.accelerator import build_accelerator
from mmcl.train.builders import build_model
from mmcl.train.config import Config, as_config, to_dict
from mmcl.train.evaluation import Evaluator, print_report
from mmcl.train.gradcache import cached_step, plain_step
from mmcl.train.optim import build_optimizer, build_scheduler
from mmcl.train.saved import flat_dict
from mmcl.train.trackers import Progress, log_evaluation

__all__ = ["fit"]


@dataclass
class Run:
    """Everything one training run holds between steps."""

    cfg: Config
    accelerator: Accelerator
    model: torch.nn.Module  # as prepared by Accelerate (DDP-wrapped with several processes)
    unwrapped: torch.nn.Module
    objective: Objective
    stream: BatchStream  # or mmcl.data.ShardBatchStream for a streamed source (same interface)
    device_augment: DeviceAugment | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    evaluator: Evaluator
    params: list
    guard: faults.RunGuard  # stop signals, a lost rank
    step: int = 0
    skipped_images: int = 0
    skipped: dict = field(default_factory=dict)  # streamed data: {reason: count} on this rank
    nonfinite_steps: int = 0
    last_loss: float = float("nan")
    started: float = 0.0
    stopped_early: bool = False
    stop_signal: str | None = None  # the signal that stopped the run after run.step
    progress: Progress | None = None  # the bar and the throughput window


@dataclass
class StepResult:
    """One optimizer step: the loss averaged over ranks, and what the log needs."""

    loss: float
    grad_norm: float | None
    lr: float
    logs: dict
    samples: int  # on this rank, all micro-batches together


def fit(config, *, on_batch=None, on_step_end=None) -> dict:
    """Train a DualEncoder as `config` says and return the final metrics.

    Args:
        config: an mmcl.train.Config (see `load_config`), a nested dict, or a YAML path.
        on_batch: optional `fn(step, batch) -> batch | None` called on every micro-batch before
            the forward pass (step is 1-based); may return a modified batch.
        on_step_end: optional `fn(step, metrics)` called after every optimizer step.

    Returns:
        dict with "step", "loss", evaluation metrics (e.g. "zeroshot_top1", "knn_top1"),
        "skipped_images", "nonfinite_steps", "train_seconds" and "final_dir". The model is saved
        with save_pretrained to `output_dir/final`. After SIGTERM / SIGUSR1: "step", "loss",
        "stopped_early", "stop_signal", "train_seconds" and "final_dir" None (a checkpoint only).

    Raises:
        FloatingPointError: a non-finite loss, naming the step (unless train.skip_nonfinite).
        mmcl.train.checkpoint.CheckpointWriteError: a checkpoint could not be written (full disk).
        mmcl.train.faults.RankFailure: another process of a multi-process run stopped answering.
        ValueError: checkpoint.resume names a damaged checkpoint, or the config changed the run's meaning.
    """
    cfg = as_config(config)
    threads = torch.get_num_threads()
    if cfg.train.num_threads is not None:
        torch.set_num_threads(cfg.train.num_threads)
    closers: list = []
    guard = faults.RunGuard(cfg.output_dir, cfg.train.collective_timeout_s)  # installs the signal handlers
    try:
        return _fit(cfg, on_batch, on_step_end, closers, guard)
    except Exception as exc:  # a failed collective: name the rank that stopped answering
        failure = guard.explain(exc)
        if failure is None:
            raise
        raise failure from exc
    finally:  # the setting is process-wide: leave the caller's as it was
        torch.set_num_threads(threads)
        guard.close()
        for close in closers:  # the data workers stop now, also when training raised
            close()


def _fit(cfg: Config, on_batch, on_step_end, closers: list, guard: faults.RunGuard) -> dict:
    run = _setup(cfg, closers, guard)
    _resume(run)
    run.accelerator.init_trackers("mmcl", config=flat_dict(cfg))
    run.progress = Progress(run.accelerator, cfg.train.max_steps, run.step, f"mmcl {run.objective.name}",
                            show=cfg.train.progress)
    run.started = time.perf_counter()
    run.model.train()
    while run.step < cfg.train.max_steps:
        batches = _next_batches(run, on_batch)
        result = _train_step(run, batches)
        if _end_step(run, result, on_step_end):
            break
    return _finish(run)


# --------------------------------------------------------------------------- setup and resume


def _loader_data_config(cfg: Config, processor):
    """The data config for the loader: when the model's processor already has data.image_size
    (a model built from towers), the loader uses the processor's own preprocessing."""
    size = cfg.data.image_size
    if size is not None and tuple(getattr(processor, "image_size", ())) == (size, size):
        return replace(cfg.data, image_size=None)
    return cfg.data


def _setup(cfg: Config, closers: list, guard: faults.RunGuard) -> Run:
    t = cfg.train
    accelerator = build_accelerator(cfg)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    guard.attach(accelerator)  # the heartbeat of a multi-process run
    set_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    if cfg.model.batchnorm.sync and world > 1 and device.type != "cuda":
        raise ValueError("model.batchnorm.sync=true needs CUDA GPUs (torch's SyncBatchNorm is GPU-only); "
                         "on CPU leave it off (MoCo's moco.shuffle_bn works everywhere)")
    model = build_model(cfg)  # converts to SyncBatchNorm before MoCo copies the key encoder
    objective = build_objective(cfg, model)
    aod = cfg.data.augment_on_device
    stream = build_stream(_loader_data_config(cfg, model.processor), model.processor, text=objective.needs_text,
                          views=objective.needs_views, batch_size=t.batch_size, rank=rank, world_size=world,
                          seed=cfg.seed, device_views=bool(aod))
    device_augment = DeviceAugment(aod, model.processor) if aod else None
    closers.append(stream.close)
    # The method's own trainable modules (BYOL's predictor) are optimised with the model.
    trained = torch.nn.ModuleDict({"model": model, **objective.trainable_modules()})
    optimizer = build_optimizer(trained, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, t.max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    objective.to(device)
    return Run(cfg=cfg, accelerator=accelerator, model=model, unwrapped=accelerator.unwrap_model(model),
               objective=objective, stream=stream, device_augment=device_augment, optimizer=optimizer,
               scheduler=scheduler, evaluator=Evaluator(cfg, objective.eval_kind),
               params=[p for p in trained.parameters() if p.requires_grad], guard=guard)


def _resume(run: Run) -> None:
    """Load the checkpoint checkpoint.resume names (if any, verified) into the run, after checking
    that the config keeps the run's meaning, and seed each rank."""
    cfg, acc = run.cfg, run.accelerator
    path = ckpt.resume_path(cfg.checkpoint.resume, cfg.output_dir, verbose=acc.is_main_process, accelerator=acc)
    if path is None:
        set_seed(cfg.seed, device_specific=True)  # different dropout / shuffle-BN draws per rank
        return
    state = ckpt.read_checkpoint(path, run.unwrapped, run.objective.state_modules())
    faults.check_resume_config(ckpt.read_config(path), to_dict(cfg), int(state.get("world_size", acc.num_processes)),
                               acc.num_processes, cfg.checkpoint.resume_allow_changes, verbose=acc.is_main_process)
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if acc.scaler is not None and state.get("scaler"):
        acc.scaler.load_state_dict(state["scaler"])
    rank = acc.process_index
    run.stream.load_state_dict(ckpt.rank_data_state(state, rank, acc.num_processes))
    run.step = int(state["step"])
    # Seed first: a rank without its own saved RNG state (the world size grew) still gets a
    # fresh but reproducible stream; a saved state then replaces it.
    set_seed(cfg.seed + 7919 * run.step + rank)
    if (path / f"rng_{rank}.json").is_file():
        ckpt.set_rng_state(ckpt.load_state(path, f"rng_{rank}"))
    if acc.is_main_process:
        print(f"mmcl: resumed from {path} at step {run.step}")


def _save(run: Run) -> None:
    """Write a checkpoint of the run (with its config): every rank its RNG state; the main process
    the rest, then renames. A failed write on any rank raises CheckpointWriteError on every rank."""
    acc = run.accelerator
    data = run.stream.state_dict()
    if getattr(run.stream, "per_rank_state", False):  # a stream's workers hold per-rank positions
        data = {"ranks": gather_object([data]) if acc.num_processes > 1 else [data]}
    state = None
    if acc.is_main_process:
        scaler = acc.scaler.state_dict() if acc.scaler is not None else None
        state = {"step": run.step, "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                 "scaler": scaler, "data": data, "world_size": acc.num_processes}
    ckpt.save_checkpoint(acc, run.cfg.output_dir, run.step, run.unwrapped, run.objective.state_modules(), state,
                         run.cfg.checkpoint.keep, config=to_dict(run.cfg))


# --------------------------------------------------------------------------- one step


def _next_batches(run: Run, on_batch) -> list[dict]:
    """The k micro-batches of the next optimizer step, on the device (and augmented there)."""
    batches, device = [], run.accelerator.device
    for _ in range(run.cfg.train.accumulate):
        while True:  # a batch whose every image was unreadable is dropped (on all ranks at once)
            batch = run.stream.next()
            run.skipped_images += int(batch.get("num_skipped", 0))
            for reason, count in batch.pop("skipped", {}).items():
                run.skipped[reason] = run.skipped.get(reason, 0) + int(count)
            if distributed.all_min(run.objective.batch_size(batch), device) > 0:
                break
        if on_batch is not None:
            batch = on_batch(run.step + 1, batch) or batch
        batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        batches.append(run.device_augment(batch) if run.device_augment is not None else batch)
    return batches


def _train_step(run: Run, batches: list[dict]) -> StepResult:
    """Forward, backward, clip, optimizer step (or a skip of a non-finite one), schedule step."""
    acc, t, objective = run.accelerator, run.cfg.train, run.objective
    no_sync = lambda: acc.no_sync(run.model)  # noqa: E731
    if t.accumulate > 1 and t.accumulate_mode == "cached":
        scale_fn = (lambda: run.unwrapped.logit_scale()) if objective.learns_scale else None
        loss, logs, keys = cached_step(run.model, scale_fn, objective, batches, acc.backward, no_sync, acc.device)
    else:
        loss, logs, keys = plain_step(run.model, objective, batches, acc.backward, no_sync)
    loss_value = float(acc.reduce(loss.detach().float().reshape(1), reduction="mean"))
    grad_norm = None
    finite = math.isfinite(loss_value)
    if finite and run.cfg.optim.max_grad_norm:
        grad_norm = float(acc.clip_grad_norm_(run.params, run.cfg.optim.max_grad_norm))
        finite = math.isfinite(grad_norm) or t.mixed_precision == "fp16"  # fp16: the scaler skips
    if finite:
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        objective.after_step(run.unwrapped, keys, run.step)
        run.last_loss = loss_value
    else:
        _skip_nonfinite(run, loss_value, grad_norm)
    lr = run.scheduler.get_last_lr()[0]
    run.scheduler.step()
    run.step += 1
    return StepResult(loss=loss_value, grad_norm=grad_norm, lr=lr, logs=logs,
                      samples=sum(objective.batch_size(b) for b in batches))


def _skip_nonfinite(run: Run, loss_value: float, grad_norm) -> None:
    """Drop the step's gradients; raise unless train.skip_nonfinite."""
    run.optimizer.zero_grad(set_to_none=True)
    step = run.step + 1
    if not run.cfg.train.skip_nonfinite:
        run.progress.close()
        run.accelerator.end_training()
        raise FloatingPointError(
            f"non-finite loss ({loss_value}) or gradient norm ({grad_norm}) at step {step}; "
            "lower optim.lr, check the data, or set train.skip_nonfinite=true to skip such steps")
    run.nonfinite_steps += 1
    if run.accelerator.is_main_process:
        print(f"mmcl: skipped step {step}: non-finite loss ({loss_value}) or gradient norm ({grad_norm})")


def _end_step(run: Run, result: StepResult, on_step_end) -> bool:
    """Everything after an optimizer step: log, evaluate, checkpoint, callback, stop signal, time
    limit. Returns True when training stops before train.max_steps."""
    cfg, t, step = run.cfg, run.cfg.train, run.step
    run.progress.step_done(result.samples * run.accelerator.num_processes)
    if step % t.log_every == 0 or step == t.max_steps:
        _log(run, result)
    if t.eval_every and step % t.eval_every == 0 and step < t.max_steps:
        log_evaluation(run.accelerator, run.evaluator, run.unwrapped, step)
    saved = bool(cfg.checkpoint.every and step % cfg.checkpoint.every == 0)
    if saved:
        _save(run)
    if on_step_end is not None:
        on_step_end(step, {"loss": result.loss})
    if step < t.max_steps and run.guard.stop_requested():  # SIGTERM / SIGUSR1 to any rank: checkpoint, stop
        run.stop_signal = run.guard.received
        if not saved:
            _save(run)
        if run.accelerator.is_main_process:
            print(run.guard.stop_message(step, t.max_steps), flush=True)
        return True
    if step < t.max_steps and _out_of_time(run):
        run.stopped_early = True
        if run.accelerator.is_main_process:
            print(f"mmcl: train.max_minutes={t.max_minutes} reached after {step} of {t.max_steps} steps; "
                  "saving a checkpoint (checkpoint.resume=auto continues from it)")
        if not saved:
            _save(run)
        return True
    return False


def _log(run: Run, result: StepResult) -> None:
    device = run.accelerator.device
    values = {"epoch": run.stream.epoch, "skipped_images": distributed.all_sum(run.skipped_images, device),
              "nonfinite_steps": run.nonfinite_steps, **result.logs}
    if run.skipped or getattr(run.stream, "per_rank_state", False):  # a stream counts skips by reason
        values.update({f"skipped/{r}": distributed.all_sum(run.skipped.get(r, 0), device) for r in SKIP_REASONS})
    if result.grad_norm is not None:
        values["grad_norm"] = result.grad_norm
    run.progress.log(run.step, result.loss, result.lr, values)


def _out_of_time(run: Run) -> bool:
    """Whether this run has trained for train.max_minutes; the main process's clock decides for all ranks."""
    max_minutes = run.cfg.train.max_minutes
    if max_minutes is None:
        return False
    over = time.perf_counter() - run.started >= 60 * max_minutes
    return distributed.broadcast_flag(over, run.accelerator.device)


# --------------------------------------------------------------------------- the end


def _finish(run: Run) -> dict:
    """Final evaluation, the saved model and the report; after a stop signal only the result
    (the checkpoint is written: no final evaluation or model)."""
    acc = run.accelerator
    run.progress.close()
    run.stream.close()
    if run.stop_signal:
        acc.end_training()
        return {"step": run.step, "loss": run.last_loss, "stopped_early": True, "stop_signal": run.stop_signal,
                "train_seconds": time.perf_counter() - run.started, "final_dir": None}
    results = {"step": run.step, "loss": run.last_loss,
               "skipped_images": distributed.all_sum(run.skipped_images, acc.device),
               "nonfinite_steps": run.nonfinite_steps, "train_seconds": time.perf_counter() - run.started,
               "stopped_early": run.stopped_early}
    if acc.num_processes > 1:
        results["ranks_agree"] = distributed.parameters_agree(run.unwrapped, acc.device)
        if acc.is_main_process:
            print(f"mmcl: weights identical on all {acc.num_processes} processes")
    results.update(log_evaluation(acc, run.evaluator, run.unwrapped, run.step))
    final_dir = Path(run.cfg.output_dir) / "final"
    if acc.is_main_process:
        run.unwrapped.save_pretrained(str(final_dir))
        print_report(results, final_dir)
    acc.wait_for_everyone()
    acc.end_training()
    results["final_dir"] = str(final_dir)
    return results
