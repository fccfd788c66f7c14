"""Run mmcl.train.fit on webdataset shards (tiny towers, tests/train_helpers.py), logging every
micro-batch's sample keys; optionally SIGKILL itself.

    python tests/scripts/shards_fit.py MODE OUTPUT_DIR TOKENIZER_DIR KILL_AT_STEP [overrides...]

Each process appends ``{"step", "rank", "key"}`` lines to OUTPUT_DIR/keys_<rank>.jsonl as batches
arrive. KILL_AT_STEP > 0: every process kills itself with SIGKILL when step KILL_AT_STEP's batch
arrives (after the previous steps' checkpoints were written), as a preempted job dies.
"""
import json
import os
import signal
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from train_helpers import tiny_overrides  # noqa: E402

from mmcl.train import fit, load_config  # noqa: E402


def main():
    mode, out, tok, kill_at, *extra = sys.argv[1:]
    kill_at, rank = int(kill_at), int(os.environ.get("RANK", "0"))
    os.makedirs(out, exist_ok=True)
    log = open(os.path.join(out, f"keys_{rank}.jsonl"), "a")

    def on_batch(step, batch):
        if kill_at and step == kill_at:
            log.close()
            os.kill(os.getpid(), signal.SIGKILL)
        log.write(json.dumps({"step": step, "rank": rank, "key": batch["key"]}) + "\n")
        log.flush()

    cfg = load_config(None, tiny_overrides(mode, out, tok, dropout=0.1) + ["data.max_samples=null"] + extra)
    fit(cfg, on_batch=on_batch)


if __name__ == "__main__":
    main()
