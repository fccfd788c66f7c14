"""Forward+backward time and extra peak memory of CLIP's loss (mmcl naive, mmcl chunked,
open_clip's ClipLoss) and of SigLIP's sigmoid loss (mmcl naive, mmcl chunked, open_clip's
SigLipLoss, and SigLipLoss's chunked form: its per-rank text chunks, here 1,024-row shards
replayed in one process), fp32 on CPU.

Each measurement runs in a fresh subprocess so that its peak resident memory (ru_maxrss) belongs
to that loss alone: extra peak = peak RSS during forward+backward − RSS with the inputs allocated.

    python bench/bench_losses.py                  # B ∈ {1024, 4096, 16384}, D=256; appends to RESULTS.md
    python bench/bench_losses.py --losses siglip --batch 512 --no-write
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

IMPLS = {"clip": ("open_clip", "naive", "chunked"), "siglip": ("open_clip", "open_clip_chunked", "naive", "chunked")}
SHARD = 1024  # rows per shard of open_clip_chunked


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _loss_function(loss: str, impl: str):
    """loss_fn(img, txt, scale, bias) -> scalar for one (loss, impl) cell."""
    from mmcl.losses import clip_loss, siglip_loss

    if loss == "clip":
        if impl == "open_clip":
            from open_clip.loss import ClipLoss

            return lambda img, txt, scale, bias: ClipLoss()(img, txt, scale)
        return lambda img, txt, scale, bias: clip_loss(img, txt, scale, impl=impl)
    if impl.startswith("open_clip"):
        from open_clip.loss import SigLipLoss

        siglip = SigLipLoss()
        if impl == "open_clip":
            return lambda img, txt, scale, bias: siglip(img, txt, scale, bias)

        def sharded(img, txt, scale, bias):
            # What W = B / SHARD ranks compute with world_size=W (shard i's images against every
            # text shard, negatives only off the diagonal), done in turn; autograd keeps every
            # shard's logits for backward. The mean over the W rank losses is the global loss.
            shards = max(1, img.shape[0] // SHARD)
            imgs, txts = img.chunk(shards), txt.chunk(shards)
            total = sum(siglip._loss(a, b, scale, bias, negative_only=i != j)
                        for i, a in enumerate(imgs) for j, b in enumerate(txts))
            return total / shards

        return sharded
    return lambda img, txt, scale, bias: siglip_loss(img, txt, scale, bias, impl=impl)


def worker(loss: str, impl: str, batch: int, dim: int, repeats: int) -> dict:
    import torch

    torch.manual_seed(0)
    normalize = torch.nn.functional.normalize
    img = normalize(torch.randn(batch, dim), dim=-1).requires_grad_()
    txt = normalize(torch.randn(batch, dim), dim=-1).requires_grad_()
    scale = torch.tensor(1 / 0.07 if loss == "clip" else 10.0, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    fn = _loss_function(loss, impl)
    loss_fn = lambda: fn(img, txt, scale, bias)  # noqa: E731

    # Warm up on a tiny problem so thread pools and lazy initialisation are not counted.
    small = [t[:8].detach().clone().requires_grad_() for t in (img, txt)]
    fn(*small, scale, bias).backward()
    # The gradient buffers are outputs, not loss workspace: allocate them before the baseline.
    for t in (img, txt, scale, bias):
        t.grad = torch.zeros_like(t)
    baseline = max(_rss_mib(), _peak_mib())
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        out = loss_fn()
        out.backward()
        times.append(time.perf_counter() - start)
        del out
    return {
        "loss": loss, "impl": impl, "batch": batch, "dim": dim, "value": float(fn(img, txt, scale, bias)),
        "time_s": statistics.median(times[1:]) if repeats else times[0],
        "extra_peak_mib": max(_peak_mib() - baseline, 0.0),
    }


def measure(loss: str, impl: str, batch: int, dim: int, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", loss, impl, "--batch", str(batch), "--dim", str(dim),
           "--repeats", str(repeats)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"impl": impl, "batch": batch, "dim": dim, "error": out.stderr.strip().splitlines()[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--losses", nargs="+", default=["clip", "siglip"], choices=sorted(IMPLS))
    p.add_argument("--batch", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2, help="timed runs after one untimed first run")
    p.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    p.add_argument("--worker", nargs=2, metavar=("LOSS", "IMPL"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.batch[0], args.dim, args.repeats)))
        return
    for loss in args.losses:
        run_table(loss, args)


def run_table(loss: str, args) -> None:
    """Measure every impl of `loss` at every batch size; print the table and append it."""
    from _results import append_section, markdown_table

    impls = IMPLS[loss]
    headers = ["B", "impl", "loss value", "fwd+bwd s", "time vs open_clip", "extra peak MiB", "memory vs open_clip"]
    rows = []
    for batch in args.batch:
        results = {impl: measure(loss, impl, batch, args.dim, args.repeats) for impl in impls}
        base = results["open_clip"]
        for impl in impls:
            r = results[impl]
            if "error" in r:
                rows.append([batch, impl, "failed", "", "", r["error"][:60], ""])
                continue
            time_ratio = f"{r['time_s'] / base['time_s']:.2f}x" if "time_s" in base else "n/a"
            mem_ratio = (f"{100 * r['extra_peak_mib'] / base['extra_peak_mib']:.1f}%"
                         if base.get("extra_peak_mib") else "n/a")
            rows.append([batch, impl, f"{r['value']:.6f}", f"{r['time_s']:.3f}", time_ratio,
                         f"{r['extra_peak_mib']:.0f}", mem_ratio])
            print(f"{loss} B={batch:6d} {impl:18s} {r['time_s']:8.3f} s {r['extra_peak_mib']:9.0f} MiB", flush=True)
    table = markdown_table(headers, rows)
    print(table)
    if not args.no_write:
        name = "CLIP loss" if loss == "clip" else "SigLIP sigmoid loss (scale 10, bias -10)"
        shards = (f"; open_clip_chunked: SigLipLoss's per-rank text chunks over {SHARD}-row shards in one process"
                  if loss == "siglip" else "")
        append_section(
            f"bench_losses.py — {name} forward+backward, fp32, D={args.dim}",
            f"Median of {args.repeats} timed runs after one warm-up; extra peak = peak RSS during forward+backward "
            f"minus RSS with inputs and gradient buffers allocated (fresh process per cell){shards}.\n\n{table}",
        )


if __name__ == "__main__":
    main()
