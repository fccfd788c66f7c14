"""What a long run does when something goes wrong around it.

- **Preemption.** `RunGuard` turns SIGTERM / SIGUSR1 (what SLURM and cloud schedulers send before
  they kill a job) into a "stop requested" flag; the loop asks `stop_requested()` at the end of
  every step (all ranks agree), writes a checkpoint and returns. Under `accelerate launch` a
  signal to the launcher reaches the processes through it; the launcher waits 30 s for them.
- **A dead process.** Collectives time out after `train.collective_timeout_s`
  (`process_group_kwargs`). Every rank bumps a counter in the launcher's rendezvous store once a
  second from a background thread; when a collective fails, `RunGuard.explain` looks which
  counters stopped moving and raises `RankFailure` naming those ranks and the last checkpoint.
- **A changed config.** `check_resume_config` compares the configuration stored in a checkpoint
  with the current one, both with today's key names (a config stored under earlier names is
  mapped as `mmcl.train.saved` maps it): keys that change the run's meaning refuse the resume
  (unless `checkpoint.resume_allow_changes`), harmless ones (`HARMLESS_KEYS`) are allowed.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from datetime import timedelta

import torch

from mmcl.train.checkpoint import latest_checkpoint
from mmcl.train.config import Config, to_dict
from mmcl.train.saved import upgrade_keys

__all__ = ["RunGuard", "RankFailure", "process_group_kwargs", "config_changes",
           "check_resume_config", "HARMLESS_KEYS"]

STOP_SIGNALS = ("SIGTERM", "SIGUSR1")
HEARTBEAT_S = 1.0

# Keys (or "section." prefixes) whose change does not change what a resumed run computes: logging,
# evaluation, checkpoint bookkeeping, paths, time limits, throughput settings. Everything else
# (mode, model, data, loss, moco, optim, batch size, train.accumulate / accumulate_mode,
# max_steps = the schedule's length, ...) does.
HARMLESS_KEYS = ("output_dir", "eval.", "checkpoint.", "train.log_every", "train.eval_every", "train.progress",
                 "train.trackers", "train.max_minutes", "train.num_threads", "train.collective_timeout_s",
                 "data.num_workers", "data.eval_source", "data.eval_split")
NOT_COMPARED = ("checkpoint.resume",)  # the resume request itself
GLOBAL_BATCH = "world size x train.batch_size"


class RankFailure(RuntimeError):
    """A multi-process run lost a process: a collective failed or timed out."""


def process_group_kwargs(collective_timeout_s: float):
    """Accelerate's InitProcessGroupKwargs with the collective timeout (seconds, > 0)."""
    from accelerate.utils import InitProcessGroupKwargs

    timeout = timedelta(seconds=float(collective_timeout_s))
    if timeout == InitProcessGroupKwargs().timeout:  # Accelerate drops a value equal to its default
        timeout += timedelta(milliseconds=1)  # (then gloo would wait 30 minutes): keep it explicit
    return InitProcessGroupKwargs(timeout=timeout)


# --------------------------------------------------------------------------- signals and dead ranks


class _Heartbeat(threading.Thread):
    """Adds 1 to `mmcl/alive/{rank}` in the rendezvous store every HEARTBEAT_S seconds."""

    def __init__(self, rank: int):
        super().__init__(name="mmcl-heartbeat", daemon=True)
        self.rank, self.halt = rank, threading.Event()
        self.store = _store_client()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                self.store.add(f"mmcl/alive/{self.rank}", 1)
            except Exception:  # noqa: BLE001 - the store went away: the run is ending anyway
                return
            self.halt.wait(HEARTBEAT_S)


def _store_client(timeout_s: float = 10.0):
    """A client of the store at MASTER_ADDR:MASTER_PORT (the launcher's, under accelerate launch)."""
    import torch.distributed as dist

    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=timeout_s))


def _is_collective_error(exc: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(s in text for s in (
        "gloo", "NCCL", "Connection closed", "Connection reset", "Broken pipe", "Timed out", "timed out"))


class RunGuard:
    """Signal handling and dead-rank diagnosis for one `fit` call.

    Create it before training (it installs SIGTERM / SIGUSR1 handlers from the main thread), call
    `attach(accelerator)` once the processes are up, `stop_requested()` at the end of each step,
    `explain(exc)` on an exception, and `close()` at the end (restores the previous handlers).
    """

    def __init__(self, output_dir: str, collective_timeout_s: float):
        self.output_dir, self.timeout_s = output_dir, collective_timeout_s
        self.received: str | None = None
        self._pid = os.getpid()
        self.accelerator = None
        self._heartbeat: _Heartbeat | None = None
        self._previous: dict = {}
        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked data worker inherited the handler: end as it would have
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        # Acted on at the end of the step (no I/O here). A repeated signal changes nothing: the
        # launcher forwards the one that a scheduler may also send to every process.
        self.received = self.received or signal.Signals(signum).name

    def attach(self, accelerator) -> None:
        """Start the heartbeat of a multi-process run (a no-op for one process)."""
        self.accelerator = accelerator
        if accelerator.num_processes > 1 and "MASTER_ADDR" in os.environ and self._heartbeat is None:
            try:
                self._heartbeat = _Heartbeat(accelerator.process_index)
            except Exception as err:  # noqa: BLE001 - training works without; only the diagnosis is vaguer
                print(f"mmcl: no heartbeat (the store at MASTER_ADDR:MASTER_PORT is unreachable: {err}); "
                      "a lost process will not be named", flush=True)
                return
            self._heartbeat.start()

    def stop_requested(self) -> str | None:
        """The signal that asks this run to stop, agreed by all ranks (a collective), else None."""
        acc = self.accelerator
        if acc is None or acc.num_processes == 1:
            return self.received
        import torch.distributed as dist

        flag = torch.tensor([STOP_SIGNALS.index(self.received) + 1 if self.received else 0], device=acc.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag.item()):  # a signal to any one process stops them all
            self.received = self.received or STOP_SIGNALS[int(flag.item()) - 1]
        return self.received if int(flag.item()) else None

    def stop_message(self, step: int, max_steps: int) -> str:
        return (f"mmcl: {self.received or 'a stop signal'} received: stopped after step {step} of {max_steps} "
                "with a checkpoint; checkpoint.resume=auto continues from it")

    def silent_ranks(self, wait_s: float = 3 * HEARTBEAT_S) -> list[int] | None:
        """Ranks whose heartbeat did not move during `wait_s` seconds; None if the store is gone."""
        acc = self.accelerator
        try:
            store = _store_client(timeout_s=5.0)
            before = [store.add(f"mmcl/alive/{r}", 0) for r in range(acc.num_processes)]
            time.sleep(wait_s)
            after = [store.add(f"mmcl/alive/{r}", 0) for r in range(acc.num_processes)]
        except Exception:  # noqa: BLE001 - unreachable store: the launcher (or rank 0 hosting it) died
            return None
        return [r for r in range(acc.num_processes) if r != acc.process_index and after[r] == before[r]]

    def explain(self, exc: BaseException) -> RankFailure | None:
        """A RankFailure naming the rank(s) that stopped answering when `exc` is a failed collective
        of a multi-process run; None otherwise (the caller re-raises `exc`)."""
        acc = self.accelerator
        if acc is None or acc.num_processes == 1 or not _is_collective_error(exc):
            return None
        silent = self.silent_ranks() if self._heartbeat is not None else []
        me = acc.process_index
        if self._heartbeat is None:
            who = "another process failed or stopped answering (no heartbeat store to tell which)"
        elif silent is None:
            who = "the launcher's rendezvous store stopped answering (the launcher or rank 0 died)"
        elif silent:
            who = (f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} stopped answering "
                   "(no heartbeat; its own output says why)")
        else:  # every rank still answers: not a lost process, let the error speak for itself
            return None
        last = latest_checkpoint(self.output_dir)
        resume = f"the last checkpoint is {last}; checkpoint.resume=auto continues from it" if last else "no checkpoint yet"
        return RankFailure(f"mmcl: {who}; rank {me} stops (train.collective_timeout_s={self.timeout_s}); "
                           f"{resume}. The collective's error: {' '.join(str(exc).split())[:300]}")

    def _restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def close(self) -> None:
        """Stop the heartbeat and restore the signal handlers that were there before."""
        if self._heartbeat is not None:
            self._heartbeat.halt.set()
            self._heartbeat = None
        if threading.current_thread() is threading.main_thread():
            self._restore()


# --------------------------------------------------------------------------- a changed config


def _section_paths(obj, prefix: str = "") -> set[str]:
    """Dotted paths of the config's sections: "model", "model.batchnorm", "train", ..."""
    paths = set()
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            paths |= {prefix + f.name} | _section_paths(value, f"{prefix}{f.name}.")
    return paths


def _flat(d: dict, sections: set[str], prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = prefix + k
        if isinstance(v, dict) and key in sections:  # dict-valued fields (a tower config) stay whole
            out.update(_flat(v, sections, key + "."))
        else:
            out[key] = json.loads(json.dumps(v, default=str))  # tuples → lists, as stored
    return out


def _comparable(saved: dict, current: dict) -> tuple[dict, dict]:
    """Both configs flat under today's key names: the stored one's earlier names mapped as the
    saved-config loader maps them, keys it lacks (added since) at today's defaults."""
    sections = _section_paths(Config())
    defaults = _flat(to_dict(Config()), sections)
    return {**defaults, **upgrade_keys(_flat(saved, sections))}, _flat(current, sections)


def _harmless(key: str) -> bool:
    return any(key == h or (h.endswith(".") and key.startswith(h)) for h in HARMLESS_KEYS)


def config_changes(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """Differences between two `to_dict` configs as "key: old -> new" lines, under today's key
    names (`saved` may use earlier ones; keys it lacks count as today's defaults).

    Returns:
        (meaning_changing, harmless): the first refuse a resume, the second do not.
    """
    a, b = _comparable(saved, current)
    changed, harmless = [], []
    for key in sorted((set(a) | set(b)) - set(NOT_COMPARED)):
        old, new = a.get(key, "<absent>"), b.get(key, "<absent>")
        if old != new:
            (harmless if _harmless(key) else changed).append(f"{key}: {old!r} -> {new!r}")
    return changed, harmless


def check_resume_config(saved: dict | None, current: dict, saved_world: int, world: int, allow: bool,
                        verbose: bool = True) -> list[str]:
    """Refuse to resume with settings that change the run's meaning.

    Args:
        saved: the config stored in the checkpoint (None: an older checkpoint without one).
        current: `to_dict` of the config of this run.
        saved_world, world: the number of processes then and now (the global batch is world × batch).
        allow: checkpoint.resume_allow_changes: log the differences instead of refusing.
    Returns:
        the meaning-changing differences (allowed, or empty).
    Raises:
        ValueError: listing the differences, when there are any and `allow` is false.
    """
    if saved is None:
        if verbose:
            print("mmcl: the checkpoint stores no config (written by an older mmcl): resuming unchecked", flush=True)
        return []
    saved = {**saved, GLOBAL_BATCH: saved_world * saved["train"]["batch_size"]}
    current = {**current, GLOBAL_BATCH: world * current["train"]["batch_size"]}
    changed, harmless = config_changes(saved, current)
    if changed and not allow:
        raise ValueError("resuming with settings that change the run's meaning:\n  " + "\n  ".join(changed) +
                         "\nrestore them, start a new output_dir, or set checkpoint.resume_allow_changes=true")
    if verbose and changed:
        print("mmcl: resuming with changed settings (checkpoint.resume_allow_changes=true): " + "; ".join(changed),
              flush=True)
    if verbose and harmless:
        print("mmcl: resuming with changed harmless settings: " + "; ".join(harmless), flush=True)
    return changed
