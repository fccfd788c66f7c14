"""Run mmcl.train.fit on a tiny config (tests/train_helpers.py); optionally SIGKILL itself.

    python tests/scripts/train_fit.py MODE OUTPUT_DIR TOKENIZER_DIR KILL_AT_STEP [overrides...]

KILL_AT_STEP > 0: the process kills itself with SIGKILL when step KILL_AT_STEP's batch arrives
(after the previous steps' checkpoints were written), as a crashed or preempted job would die.
"""
import os
import signal
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from train_helpers import tiny_overrides  # noqa: E402

from mmcl.train import fit, load_config  # noqa: E402


def main():
    mode, out, tok, kill_at, *extra = sys.argv[1:]
    kill_at = int(kill_at)

    def on_batch(step, batch):
        if kill_at and step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    cfg = load_config(None, tiny_overrides(mode, out, tok, dropout=0.1, samples=40) + extra)
    fit(cfg, on_batch=on_batch)


if __name__ == "__main__":
    main()
