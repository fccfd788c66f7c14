"""Run under `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU):

    dist_resume_verify.py OUTPUT_DIR RESULT_JSON

The main process writes two real checkpoints (steps 2 and 4) in OUTPUT_DIR. Each rank counts the
files it hashes while resuming, as one machine (the real Accelerator: rank 0 is the machine's
only local main process) and as two machines (both ranks their machine's local main process,
the second machine's copy of step 4's model.safetensors reading differently); RESULT_JSON gets
one entry per rank.
"""
import contextlib
import io
import sys
import types
from pathlib import Path

import torch
from _dist_results import write_all_ranks
from accelerate import Accelerator

from mmcl.train import checkpoint as ckpt
from mmcl.train import integrity

STEPS = (2, 4)


def _write_checkpoints(out) -> None:
    """Two real checkpoints (a small Linear's weights, a state, markers with sha256) in `out`."""
    torch.manual_seed(0)
    for step in STEPS:
        tmp = ckpt.begin_checkpoint(out, step)
        ckpt.finish_checkpoint(tmp, out, step, torch.nn.Linear(5, 3), {}, {"step": step}, keep=len(STEPS))


def _resume(resume, out, accelerator) -> dict:
    """resume_path's answer (or error) on this rank, what it printed and which files it hashed."""
    hashed.clear()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        try:
            answer = {"path": ckpt.resume_path(resume, out, verbose=accelerator.is_main_process,
                                               accelerator=accelerator).name}
        except ValueError as err:
            answer = {"error": str(err)}
    return {**answer, "printed": printed.getvalue(), "hashed": sorted(hashed)}


hashed: list = []
damaged_copy = {"on": False}  # this machine's copy of step 4's model reads differently


def _counting_file_record(path):
    path = Path(path)
    hashed.append(f"{path.parent.name}/{path.name}")
    record = _real_file_record(path)
    if damaged_copy["on"] and path.parent.name == "step_00000004" and path.name == "model.safetensors":
        record = {**record, "sha256": "0" * 64}
    return record


_real_file_record = integrity.file_record


def main(out: str, result: str) -> None:
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    if accelerator.is_main_process:
        _write_checkpoints(out)
    accelerator.wait_for_everyone()
    integrity.file_record = _counting_file_record  # what verify_checkpoint hashes with
    summary = {"rank": rank, "one_machine": _resume("auto", out, accelerator),
               "one_machine_explicit": _resume(str(ckpt.checkpoint_dir(out, 4)), out, accelerator)}
    # Two machines: each rank reads its own machine's copy; the second machine's step 4 differs.
    machine = types.SimpleNamespace(is_local_main_process=True, is_main_process=accelerator.is_main_process,
                                    process_index=rank, device=accelerator.device)
    damaged_copy["on"] = rank == 1
    summary["two_machines"] = _resume("auto", out, machine)
    summary["two_machines_explicit"] = _resume(str(ckpt.checkpoint_dir(out, 4)), out, machine)
    damaged_copy["on"] = False
    # Processes that list different checkpoints are refused before any hashing.
    found = ckpt.list_checkpoints(out)
    try:
        integrity.same_checkpoints_on_ranks(found if rank == 0 else found[:1], accelerator)
        summary["different_listing"] = "accepted"
    except ValueError as err:
        summary["different_listing"] = str(err)
    write_all_ranks(accelerator, result, summary)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
