"""`fit(config)`: the training loop on Hugging Face Accelerate.

One call builds the model, data, optimizer and schedule from a Config, resumes from the newest
complete checkpoint when asked, trains for `train.max_steps` optimizer steps (each one batch, or
k micro-batches through GradCache / plain accumulation; `train.max_minutes` stops earlier, after a
checkpoint that `train.resume=auto` continues from), logs through Accelerate's trackers,
evaluates, checkpoints, and saves the final model with `save_pretrained` to `output_dir/final`.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

from mmcl.train import checkpoint as ckpt
from mmcl.train import faults
from mmcl.train.config import Config, from_dict, load_config, to_dict
from mmcl.train.gradcache import cached_step, plain_step

__all__ = ["fit"]


def _as_config(config) -> Config:
    if isinstance(config, Config):
        return config
    if isinstance(config, dict):
        return from_dict(config)
    if isinstance(config, (str, Path)):
        return load_config(config)
    raise TypeError(f"config must be an mmcl.train.Config, a dict or a YAML path, got {type(config).__name__}")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _make_accelerator(cfg: Config):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    from mmcl.train.trackers import build_trackers

    out = Path(cfg.output_dir)
    # `accelerate launch --multi_gpu` on a machine without GPUs starts the processes but Accelerate
    # would then run each alone; with cpu=True they form one gloo group (multi-CPU training).
    cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(
        cpu=cpu,
        mixed_precision=cfg.train.mixed_precision,
        log_with=build_trackers(cfg.train.trackers, str(out / "logs")) or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        dynamo_backend="inductor" if cfg.train.compile else "no",
        # Towers may hold parameters that a given loss never reaches (a pooler next to mean pooling).
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True),
                         faults.process_group_kwargs(cfg.train.collective_timeout_s)],  # faults: no hang
    )


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
        ValueError: train.resume names a damaged checkpoint, or the config changed the run's meaning.
    """
    cfg = _as_config(config)
    threads = torch.get_num_threads()
    if cfg.train.num_threads is not None:
        torch.set_num_threads(cfg.train.num_threads)
    closers: list = []
    guard = faults.RunGuard(cfg.output_dir, cfg.train.collective_timeout_s)  # faults: signals, dead ranks
    try:
        return _fit(cfg, on_batch, on_step_end, closers, guard)
    except Exception as exc:  # faults: a failed collective names the rank that stopped answering
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
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from mmcl.data import build_dataloader
    from mmcl.train.builders import build_model
    from mmcl.train.evaluation import Evaluator
    from mmcl.train.objectives import build_objective
    from mmcl.train.optim import build_optimizer, build_scheduler
    from mmcl.train.stream import BatchStream

    t, out = cfg.train, Path(cfg.output_dir)
    accelerator = _make_accelerator(cfg)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    main = accelerator.is_main_process
    guard.attach(accelerator)  # faults: heartbeat

    set_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    if cfg.model.sync_bn and world > 1 and device.type != "cuda":
        raise ValueError("model.sync_bn=true needs CUDA GPUs (torch's SyncBatchNorm is GPU-only); "
                         "on CPU leave it off (MoCo's loss.shuffle_bn works everywhere)")
    model = build_model(cfg)  # converts to SyncBatchNorm before MoCo copies the key encoder
    objective = build_objective(cfg.mode, cfg.loss, model, t.max_steps)
    loader = build_dataloader(cfg.data, model.processor, mode=cfg.mode, batch_size=t.batch_size, seed=cfg.seed,
                              **({"device_views": True} if t.device_augment else {}))
    device_augment = None
    if t.device_augment:
        from mmcl.train.device_augment import DeviceAugment

        device_augment = DeviceAugment(t.device_augment, model.processor)
    stream = BatchStream(loader, t.batch_size, rank, world, seed=cfg.seed)
    closers.append(stream.close)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, t.max_steps)
    if getattr(accelerator.state, "deepspeed_plugin", None) is not None:
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = t.batch_size
    if t.accumulate > 1 and accelerator.distributed_type.value in ("DEEPSPEED", "FSDP"):
        raise ValueError(f"train.accumulate (GradCache) is not supported with {accelerator.distributed_type.value}: "
                         "its backward passes bypass the engine; use DDP (multi_gpu) or train.grad_accum_steps")
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    if hasattr(objective, "to"):
        objective.to(device)
    extra = objective.modules()
    params = [p for p in model.parameters() if p.requires_grad]

    step = 0
    resume_from = ckpt.resume_path(cfg.train.resume, cfg.output_dir, verbose=main)  # faults: verified
    if resume_from is not None:
        state = ckpt.read_checkpoint(resume_from, unwrapped, extra)
        faults.check_resume_config(ckpt.read_config(resume_from), to_dict(cfg), int(state.get("world_size", world)),
                                   world, t.resume_allow_changes, verbose=main)  # faults: a changed config
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if accelerator.scaler is not None and state.get("scaler"):
            accelerator.scaler.load_state_dict(state["scaler"])
        stream.load_state_dict(state["data"])
        step = int(state["step"])
        rng_name = f"rng_{rank}" if (resume_from / f"rng_{rank}.json").is_file() else None
        set_seed(cfg.seed + 7919 * step + rank)  # world size changed: a fresh but reproducible stream
        if rng_name:
            ckpt.set_rng_state(ckpt.load_state(resume_from, rng_name))
        if main:
            print(f"mmcl: resumed from {resume_from} at step {step}")
    else:
        set_seed(cfg.seed, device_specific=True)  # different dropout / shuffle-BN draws per rank

    accelerator.init_trackers("mmcl", config=_flat(to_dict(cfg)))
    evaluator = Evaluator(cfg)
    k = max(t.accumulate, t.grad_accum_steps)
    no_sync = lambda: accelerator.no_sync(model)  # noqa: E731
    scale_fn = (lambda: unwrapped.logit_scale()) if objective.learns_scale else None
    metrics: dict = {}
    skipped_images = nonfinite_steps = 0
    last_loss = float("nan")
    pbar = tqdm(total=t.max_steps, initial=step, disable=not (accelerator.is_local_main_process and t.progress),
                desc=f"mmcl {cfg.mode}", dynamic_ncols=True)
    started = window_start = time.perf_counter()
    window_samples = 0
    stopped_early = False
    model.train()
    while step < t.max_steps:
        batches = []
        for _ in range(k):
            while True:  # a batch whose every image was unreadable is dropped (on all ranks at once)
                batch = stream.next()
                skipped_images += int(batch.get("num_skipped", 0))
                if _min_over_ranks(accelerator, batch[objective.batch_keys[0]].shape[0]) > 0:
                    break
            if on_batch is not None:
                batch = on_batch(step + 1, batch) or batch
            batch = _to_device(batch, device)
            batches.append(device_augment(batch) if device_augment is not None else batch)
        if t.accumulate > 1:
            loss, logs, keys = cached_step(model, scale_fn, objective, batches, accelerator.backward, no_sync, device)
        else:
            loss, logs, keys = plain_step(model, objective, batches, accelerator.backward, no_sync)
        loss_value = float(accelerator.reduce(loss.detach().float().reshape(1), reduction="mean"))
        grad_norm = None
        finite = math.isfinite(loss_value)
        if finite and cfg.optim.max_grad_norm:
            grad_norm = float(accelerator.clip_grad_norm_(params, cfg.optim.max_grad_norm))
            finite = math.isfinite(grad_norm) or t.mixed_precision == "fp16"  # fp16: the scaler skips
        if not finite:
            optimizer.zero_grad(set_to_none=True)
            if not t.skip_nonfinite:
                pbar.close()
                accelerator.end_training()
                raise FloatingPointError(
                    f"non-finite loss ({loss_value}) or gradient norm ({grad_norm}) at step {step + 1}; "
                    "lower optim.lr, check the data, or set train.skip_nonfinite=true to skip such steps")
            nonfinite_steps += 1
            if main:
                print(f"mmcl: skipped step {step + 1}: non-finite loss ({loss_value}) or gradient norm ({grad_norm})")
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            objective.after_step(unwrapped, keys, step)
            last_loss = loss_value
        lr_used = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1
        window_samples += sum(b[objective.batch_keys[0]].shape[0] for b in batches) * world
        pbar.update(1)
        if step % t.log_every == 0 or step == t.max_steps:
            now = time.perf_counter()
            metrics = {"loss": loss_value, "lr": lr_used,
                       "samples_per_s": window_samples / max(now - window_start, 1e-9),
                       "epoch": stream.epoch, "skipped_images": _sum_over_ranks(accelerator, skipped_images),
                       "nonfinite_steps": nonfinite_steps, **logs}
            if grad_norm is not None:
                metrics["grad_norm"] = grad_norm
            accelerator.log(metrics, step=step)
            pbar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{metrics['lr']:.2e}")
            window_start, window_samples = now, 0
        if t.eval_every and step % t.eval_every == 0 and step < t.max_steps:
            _log_eval(accelerator, evaluator, unwrapped, step)
        if t.save_every and step % t.save_every == 0:
            _save(accelerator, cfg, step, unwrapped, extra, optimizer, scheduler, stream)
        if on_step_end is not None:
            on_step_end(step, {"loss": loss_value})
        if step < t.max_steps and guard.stop_requested():  # faults: SIGTERM / SIGUSR1 → checkpoint, return
            if not (t.save_every and step % t.save_every == 0):  # not saved just above
                _save(accelerator, cfg, step, unwrapped, extra, optimizer, scheduler, stream)
            if main:
                print(guard.stop_message(step, t.max_steps), flush=True)
            pbar.close()
            accelerator.end_training()
            return {"step": step, "loss": last_loss, "stopped_early": True, "stop_signal": guard.received,
                    "train_seconds": time.perf_counter() - started, "final_dir": None}
        if step < t.max_steps and _out_of_time(accelerator, started, t.max_minutes):
            stopped_early = True
            if main:
                print(f"mmcl: train.max_minutes={t.max_minutes} reached after {step} of {t.max_steps} steps; "
                      "saving a checkpoint (train.resume=auto continues from it)")
            if not (t.save_every and step % t.save_every == 0):  # not saved just above
                _save(accelerator, cfg, step, unwrapped, extra, optimizer, scheduler, stream)
            break
    pbar.close()
    stream.close()
    train_seconds = time.perf_counter() - started

    results = {"step": step, "loss": last_loss, "skipped_images": _sum_over_ranks(accelerator, skipped_images),
               "nonfinite_steps": nonfinite_steps, "train_seconds": train_seconds, "stopped_early": stopped_early}
    if world > 1:
        results["ranks_agree"] = _ranks_agree(accelerator, unwrapped)
    results.update(_log_eval(accelerator, evaluator, unwrapped, step))
    final_dir = out / "final"
    if main:
        unwrapped.save_pretrained(str(final_dir))
        _report(results, final_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    results["final_dir"] = str(final_dir)
    return results


def _out_of_time(accelerator, started: float, max_minutes) -> bool:
    """Whether this run has trained for max_minutes; the main process's clock decides for all ranks."""
    if max_minutes is None:
        return False
    over = time.perf_counter() - started >= 60 * max_minutes
    if accelerator.num_processes == 1:
        return over
    import torch.distributed as dist

    flag = torch.tensor([int(over)], device=accelerator.device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def _min_over_ranks(accelerator, count: int) -> int:
    if accelerator.num_processes == 1:
        return count
    import torch.distributed as dist

    t = torch.tensor([count], device=accelerator.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def _sum_over_ranks(accelerator, count: int) -> int:
    """Images skipped by all processes together (each reads its own shard)."""
    if accelerator.num_processes == 1:
        return count
    return int(accelerator.reduce(torch.tensor([count], device=accelerator.device), reduction="sum").item())


def _log_eval(accelerator, evaluator, model, step: int) -> dict:
    """Evaluate on the main process (the others wait), log, and return the metrics everywhere."""
    from accelerate.utils import broadcast_object_list

    box = [evaluator(model) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(box, from_process=0)
    result = box[0] or {}
    if result:
        accelerator.log({f"eval/{k}": v for k, v in result.items()}, step=step)
    return result


def _save(accelerator, cfg, step, model, extra, optimizer, scheduler, stream) -> None:
    """Every rank writes its RNG state; the main process writes the rest and renames."""
    state = None
    if accelerator.is_main_process:
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "scaler": scaler, "data": stream.state_dict(), "world_size": accelerator.num_processes}
    ckpt.save_checkpoint(accelerator, cfg.output_dir, step, model, extra, state, cfg.train.keep_checkpoints,
                         config=to_dict(cfg))  # faults: checksums, the config, a failed write cleaned up


@torch.no_grad()
def _ranks_agree(accelerator, model) -> bool:
    """Every rank must end with the same weights (DDP / the manual all-reduce keep them in step):
    compare a float64 checksum of all parameters across ranks; raise if they diverged."""
    sums = torch.stack([sum(p.double().sum() for p in model.parameters()),
                        sum(p.double().square().sum() for p in model.parameters())]).to(accelerator.device)
    gathered = accelerator.gather(sums[None]).cpu()
    if not bool((gathered == gathered[0]).all()):
        raise RuntimeError(f"the {accelerator.num_processes} processes ended with different weights: {gathered.tolist()}")
    if accelerator.is_main_process:
        print(f"mmcl: weights identical on all {accelerator.num_processes} processes")
    return True


def _report(results: dict, final_dir: Path) -> None:
    if "zeroshot_top1" in results:
        print(f"mmcl: zero-shot top-1 {results['zeroshot_top1']:.4f} (top-5 {results['zeroshot_top5']:.4f}) "
              f"on held-out data after {results['step']} steps, {results['train_seconds']:.0f} s of training")
    if "retrieval_mean_recall" in results:
        recalls = ", ".join(f"{k.removeprefix('retrieval_')} {v:.3f}" for k, v in results.items()
                            if k.startswith("retrieval_") and "R@" in k)
        print(f"mmcl: retrieval on held-out data after {results['step']} steps: {recalls}")
    if "knn_top1" in results:
        print(f"mmcl: kNN top-1 {results['knn_top1']:.4f} on held-out data after {results['step']} steps")
    print(f"mmcl: model saved to {final_dir} (load it with mmcl.DualEncoder.from_pretrained)")
