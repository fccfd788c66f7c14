"""Run mmcl.train.fit on a tiny config, alone or under `accelerate launch`; optionally lose a rank.

    python tests/scripts/faults_fit.py MODE OUTPUT_DIR TOKENIZER_DIR KILL_RANK KILL_STEP [overrides...]

Prints "mmcl-test: step N done" after every step (main process) and pauses 0.3 s there, so a
test can send a signal while the run is at a known step; each rank writes its pid to
OUTPUT_DIR/pid_RANK. KILL_RANK >= 0: that rank writes the time to OUTPUT_DIR/killed_at and
SIGKILLs itself when step KILL_STEP's batch arrives.
"""
import os
import signal
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from train_helpers import tiny_overrides  # noqa: E402

from mmcl.train import fit, load_config  # noqa: E402


def main():
    mode, out, tok, kill_rank, kill_step, *extra = sys.argv[1:]
    kill_rank, kill_step = int(kill_rank), int(kill_step)
    rank = int(os.environ.get("RANK", "0"))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"pid_{rank}"), "w") as f:
        f.write(str(os.getpid()))

    def on_batch(step, batch):
        if rank == kill_rank and step == kill_step:
            with open(os.path.join(out, "killed_at"), "w") as f:
                f.write(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)

    def on_step_end(step, logs):
        if rank == 0:
            print(f"mmcl-test: step {step} done", flush=True)
            time.sleep(0.3)

    cfg = load_config(None, tiny_overrides(mode, out, tok, dropout=0.1, samples=40) + extra)
    result = fit(cfg, on_batch=on_batch, on_step_end=on_step_end)
    if rank == 0:
        print(f"mmcl-test: finished at step {result['step']}, stopped_early={result.get('stopped_early')}", flush=True)


if __name__ == "__main__":
    main()
