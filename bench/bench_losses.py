"""Forward+backward time and extra peak memory of CLIP's loss: mmcl naive, mmcl chunked and
open_clip's ClipLoss, fp32 on CPU.

Each measurement runs in a fresh subprocess so that its peak resident memory (ru_maxrss) belongs
to that loss alone: extra peak = peak RSS during forward+backward − RSS with the inputs allocated.

    python bench/bench_losses.py                  # B ∈ {1024, 4096, 16384}, D=256; appends to RESULTS.md
    python bench/bench_losses.py --batch 512 --no-write
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

IMPLS = ("open_clip", "naive", "chunked")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(impl: str, batch: int, dim: int, repeats: int) -> dict:
    import torch

    from mmcl.losses import clip_loss

    torch.manual_seed(0)
    normalize = torch.nn.functional.normalize
    img = normalize(torch.randn(batch, dim), dim=-1).requires_grad_()
    txt = normalize(torch.randn(batch, dim), dim=-1).requires_grad_()
    scale = torch.tensor(1 / 0.07, requires_grad=True)
    if impl == "open_clip":
        from open_clip.loss import ClipLoss

        open_clip_loss = ClipLoss()
        loss_fn = lambda: open_clip_loss(img, txt, scale)  # noqa: E731
    else:
        loss_fn = lambda: clip_loss(img, txt, scale, impl=impl)  # noqa: E731

    # Warm up on a tiny problem so thread pools and lazy initialisation are not counted.
    small = [t[:8].detach().clone().requires_grad_() for t in (img, txt)]
    (clip_loss(*small, scale, impl="naive") if impl == "open_clip" else clip_loss(*small, scale, impl=impl)).backward()
    # The gradient buffers are outputs, not loss workspace: allocate them before the baseline.
    for t in (img, txt, scale):
        t.grad = torch.zeros_like(t)
    baseline = max(_rss_mib(), _peak_mib())
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        times.append(time.perf_counter() - start)
        del loss
    return {
        "impl": impl, "batch": batch, "dim": dim,
        "time_s": statistics.median(times[1:]) if repeats else times[0],
        "extra_peak_mib": max(_peak_mib() - baseline, 0.0),
    }


def measure(impl: str, batch: int, dim: int, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--batch", str(batch), "--dim", str(dim), "--repeats", str(repeats)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"impl": impl, "batch": batch, "dim": dim, "error": out.stderr.strip().splitlines()[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2, help="timed runs after one untimed first run")
    p.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    p.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch[0], args.dim, args.repeats)))
        return

    from _results import append_section, markdown_table

    headers = ["B", "impl", "fwd+bwd s", "time vs open_clip", "extra peak MiB", "memory vs open_clip"]
    rows = []
    for batch in args.batch:
        results = {impl: measure(impl, batch, args.dim, args.repeats) for impl in IMPLS}
        base = results["open_clip"]
        for impl in IMPLS:
            r = results[impl]
            if "error" in r:
                rows.append([batch, impl, "failed", "", r["error"][:60], ""])
                continue
            time_ratio = f"{r['time_s'] / base['time_s']:.2f}x" if "time_s" in base else "n/a"
            mem_ratio = (f"{100 * r['extra_peak_mib'] / base['extra_peak_mib']:.1f}%"
                         if base.get("extra_peak_mib") else "n/a")
            rows.append([batch, impl, f"{r['time_s']:.3f}", time_ratio, f"{r['extra_peak_mib']:.0f}", mem_ratio])
            print(f"B={batch:6d} {impl:10s} {r['time_s']:8.3f} s {r['extra_peak_mib']:9.0f} MiB", flush=True)
    table = markdown_table(headers, rows)
    print(table)
    if not args.no_write:
        append_section(
            f"bench_losses.py — CLIP loss forward+backward, fp32, D={args.dim}",
            f"Median of {args.repeats} timed runs after one warm-up; extra peak = peak RSS during forward+backward "
            f"minus RSS with inputs and gradient buffers allocated (fresh process per cell).\n\n{table}",
        )


if __name__ == "__main__":
    main()
