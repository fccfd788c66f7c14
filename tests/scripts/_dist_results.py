"""What the 2-process loss scripts share: relative errors and writing every rank's results."""
from __future__ import annotations

import json

import torch


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (0-safe)."""
    return (got - want).abs().max().item() / max(want.abs().max().item(), 1e-300)


def write_all_ranks(accelerator, out: str, summary: dict) -> None:
    """Gather every rank's `summary`, write the list as JSON to `out` on the main process, then
    leave the process group (left alive, gloo's threads abort the interpreter at exit)."""
    all_results = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(all_results, summary)
    if accelerator.is_main_process:
        with open(out, "w") as f:
            json.dump(all_results, f)
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()
