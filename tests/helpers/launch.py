"""Multi-process runs for the tests: `accelerate launch --multi_gpu --num_processes N` on CPU (gloo).

    from helpers.launch import accelerate_launch, load_script
    proc = accelerate_launch(SCRIPTS / "dist_queue.py", str(out))          # 2 processes
    script = load_script("dist_queue")                                     # its constants / builders
"""
from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "tests" / "scripts"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now: parallel launches must not fight over accelerate's default."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(script, *args: str, processes: int = 2, env: dict | None = None) -> tuple[list, dict]:
    """(argv, environment) of `accelerate launch [--multi_gpu] --num_processes {processes} script
    *args` on the CPU (gloo), offline, one thread per process; run it with cwd=REPO (as
    `accelerate_launch` does, or with subprocess.Popen to signal the processes while they run).

    Args:
        script: path of the Python script (absolute, or relative to the repository root).
        args: the script's own arguments.
        processes: number of processes (>= 1; --multi_gpu when more than one).
        env: extra environment variables (e.g. {"TRITON_INTERPRET": "1"}), applied last.
    Raises:
        ValueError: `processes` is not a positive int.
    """
    if not isinstance(processes, int) or processes < 1:
        raise ValueError(f"processes must be a positive int, got {processes!r}")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *(["--multi_gpu"] if processes > 1 else []),
           "--num_processes", str(processes), "--num_machines", "1", "--main_process_port", str(free_port()),
           "--mixed_precision", "no", "--dynamo_backend", "no", str(script), *map(str, args)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return cmd, full_env


def accelerate_launch(script, *args: str, processes: int = 2, timeout: float = 300,
                      env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `launch_command(script, *args, processes=..., env=...)` from the repository root and
    return the finished process (stdout and stderr as text).

    Raises:
        ValueError: `processes` is not a positive int.
        AssertionError: the launch exited non-zero; the message holds the tails of its output.
    """
    cmd, full_env = launch_command(script, *args, processes=processes, env=env)
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"accelerate launch {Path(script).name} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def load_script(name: str):
    """tests/scripts/{name}.py as a module (its `if __name__ == "__main__"` block does not run), for
    the constants and input builders a test shares with the script it launched."""
    path = SCRIPTS / f"{name}.py"
    if not path.is_file():
        raise ValueError(f"no test script {path}")
    spec = importlib.util.spec_from_file_location(f"_script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
