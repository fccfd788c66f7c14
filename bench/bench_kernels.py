"""Benchmark CLIP's symmetric loss: mmcl's Triton kernels vs naive torch vs open_clip's ClipLoss.

For B = N in --sizes and D in --dims (bf16 features, requires_grad), it measures the forward,
backward and full (forward + backward) time, the peak GPU memory above the inputs, and the
achieved TFLOP/s, counting 2·B·N·D per matmul pass each implementation does, against the
rate of a plain bf16 matmul measured in the same run. Out-of-memory is reported as "OOM".
The table is printed and appended to bench/RESULTS.md with the date and the device.

    python bench/bench_kernels.py                      # needs a CUDA GPU
    python bench/bench_kernels.py --sizes 4096 16384   # a subset
    python bench/bench_kernels.py --smoke              # tiny sizes on CPU through TRITON_INTERPRET=1;
                                                       # proves the script runs, writes nothing
"""
from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
PROVIDERS = ("triton", "triton-gemm", "naive", "open_clip", "chunked")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 65536, 262144], help="B = N values")
    p.add_argument("--dims", type=int, nargs="+", default=[512, 768], help="feature dims D")
    p.add_argument("--providers", nargs="+", default=["triton", "triton-gemm", "naive", "open_clip"],
                   choices=PROVIDERS, help="triton: clip_loss(impl='triton') with the default backward "
                   "($MMCL_TRITON_BWD or fused); triton-gemm: the same with BWD_MODE=gemm; "
                   "also: chunked (mmcl's tiled torch path)")
    p.add_argument("--gemm-rows", type=int, nargs="*", default=[],
                   help="also time the gemm backward with these BWD_GEMM_ROWS (rows of G per launch), "
                        "as providers triton-gemm-r<rows>")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median reported)")
    p.add_argument("--max-seconds", type=float, default=20.0,
                   help="fewer repeats (at least 1) when one iteration would exceed this budget")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU via the Triton interpreter")
    p.add_argument("--no-write", action="store_true", help="print only, do not append to RESULTS.md")
    return p.parse_args(argv)


ARGS = parse_args()
if ARGS.smoke:
    # Must precede importing triton (through mmcl.kernels): the kernels are decorated at import.
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mmcl.kernels.row_dot import row_dot_triton  # noqa: E402
from mmcl.kernels.similarity_lse import (  # noqa: E402
    backward_mode, default_block_sizes, similarity_lse_triton)
from mmcl.losses import clip_loss  # noqa: E402


# --------------------------------------------------------------------------- the contenders


def naive_clip_loss(img, txt, scale):
    """Straightforward torch: materialised bf16 logits, fp32 cross-entropy both ways."""
    logits = scale * img @ txt.T
    labels = torch.arange(img.shape[0], device=img.device)
    return 0.5 * (F.cross_entropy(logits.float(), labels) + F.cross_entropy(logits.T.float(), labels))


def composed_clip_loss(img, txt, scale, **block_sizes):
    """clip_loss(impl="triton")'s computation from the kernels, with explicit block sizes."""
    rows, cols = similarity_lse_triton(img, txt, scale, columns=True, block_sizes=block_sizes)
    positives = scale * row_dot_triton(img, txt)
    return 0.5 * ((rows - positives).mean() + (cols - positives).mean())


def make_loss(provider):
    if provider.startswith("triton-gemm"):  # triton-gemm, or triton-gemm-r<rows>
        rows = int(provider.removeprefix("triton-gemm-r")) if provider.startswith("triton-gemm-r") else None
        return lambda img, txt, scale: composed_clip_loss(img, txt, scale, BWD_MODE="gemm", BWD_GEMM_ROWS=rows)
    if provider == "triton":
        return lambda img, txt, scale: clip_loss(img, txt, scale, impl="triton")
    if provider == "naive":
        return naive_clip_loss
    if provider == "chunked":  # mmcl's tiled torch path (fp32 tiles of the logits, cuBLAS matmuls)
        return lambda img, txt, scale: clip_loss(img, txt, scale, impl="chunked")
    from open_clip.loss import ClipLoss

    open_clip_loss = ClipLoss()
    return lambda img, txt, scale: open_clip_loss(img, txt, scale)


def matmul_passes(provider, dim, dtype, interpreted):
    """(forward, backward) matmul passes of size 2·B·N·D each implementation performs."""
    if provider.startswith("triton-gemm") or (provider == "triton" and backward_mode() == "gemm"):
        return 1, 4  # backward per side: S once (Triton, writes G), G·K or Gᵀ·Q (cuBLAS)
    if provider == "triton":
        # forward: one pass (column lse's fused in). backward: per side (dQ, dK) one
        # recomputation of S per D slice plus the G·K (or Gᵀ·Q) product.
        slices = math.ceil(dim / default_block_sizes(dim, dtype, interpreted)["BLOCK_DOUT"])
        return 1, 2 * (slices + 1)
    if provider in ("naive", "chunked"):
        return 1, 3 if provider == "chunked" else 2  # chunked recomputes each logit tile in backward
    return 2, 4  # open_clip computes image@text.T and text@image.T separately


# --------------------------------------------------------------------------- timing


class Clock:
    """Wall time of a callable: CUDA events on a GPU, perf_counter on CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def measure(provider, B, D, dtype, device, clock, args):
    """{'fwd', 'bwd', 'full' (seconds), 'peak' (bytes above inputs)} or raises OOM."""
    loss_fn = make_loss(provider)
    gen = torch.Generator(device=device).manual_seed(0)
    img = F.normalize(torch.randn(B, D, device=device, generator=gen), dim=-1).to(dtype).requires_grad_()
    txt = F.normalize(torch.randn(B, D, device=device, generator=gen), dim=-1).to(dtype).requires_grad_()
    scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)
    try:
        def full():
            img.grad = txt.grad = scale.grad = None
            loss_fn(img, txt, scale).backward()

        first = clock.time(full)  # warm-up: compilation, allocator
        repeats = max(1, min(args.repeats, int(args.max_seconds / max(first, 1e-9))))
        if clock.cuda:
            img.grad = txt.grad = scale.grad = None
            torch.cuda.empty_cache()
            clock.sync()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        fulls = [clock.time(full) for _ in range(repeats)]
        peak = torch.cuda.max_memory_allocated() - base if clock.cuda else None
        fwds, bwds = [], []
        for _ in range(repeats):
            img.grad = txt.grad = scale.grad = None
            holder = {}

            def forward():
                holder["loss"] = loss_fn(img, txt, scale)

            fwds.append(clock.time(forward))
            bwds.append(clock.time(lambda: holder["loss"].backward()))
        return {"fwd": statistics.median(fwds), "bwd": statistics.median(bwds),
                "full": statistics.median(fulls), "peak": peak}
    finally:
        del img, txt, scale
        if clock.cuda:
            torch.cuda.empty_cache()


def matmul_rate(B, D, dtype, device, clock) -> float:
    """TFLOP/s of a plain (B, D) @ (D, B) matmul at this dtype, B capped at 16384 for memory."""
    n = min(B, 16384)
    a = torch.randn(n, D, device=device).to(dtype)
    b = torch.randn(D, n, device=device).to(dtype)
    clock.time(lambda: a @ b)
    seconds = statistics.median(clock.time(lambda: a @ b) for _ in range(5))
    return 2 * n * n * D / seconds / 1e12


# --------------------------------------------------------------------------- main


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def check_correctness(D, dtype, device, provider="triton", n=None) -> float:
    """Largest relative error of a Triton provider's loss and gradients against float64, at a
    small size: timings of a wrong kernel are worth nothing, so the run stops when it is off."""
    n = n or (97 if device.type == "cpu" else 1031)
    gen = torch.Generator(device=device).manual_seed(1)
    feats = [F.normalize(torch.randn(n, D, device=device, generator=gen), dim=-1).to(dtype) for _ in range(2)]
    errors = []
    results = []
    kernel_loss = make_loss(provider)
    for impl, cast in (("triton", lambda t: t), ("naive", lambda t: t.double())):
        img, txt = (cast(f).detach().requires_grad_() for f in feats)
        scale = torch.tensor(1 / 0.07, device=device, dtype=img.dtype if impl == "naive" else torch.float32,
                             requires_grad=True)
        loss = kernel_loss(img, txt, scale) if impl == "triton" else clip_loss(img, txt, scale, impl="naive")
        results.append([loss, *torch.autograd.grad(loss, (img, txt, scale))])
    for got, ref in zip(*results):
        errors.append(((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item())
    return max(errors)


def run(args) -> list[str]:
    providers = list(args.providers) + [f"triton-gemm-r{rows}" for rows in args.gemm_rows]
    if args.smoke:
        device, dtype = torch.device("cpu"), torch.bfloat16
        sizes, dims = [64, 97], [32]
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
        sizes, dims = args.sizes, args.dims
    for D in dims:
        for provider in [p for p in providers if p.startswith("triton")]:
            err = check_correctness(D, dtype, device, provider)
            print(f"correctness of {provider} at D={D}: max relative error of loss and gradients vs float64 "
                  f"= {err:.2e}", flush=True)
            if not err < 2e-2:  # bf16 gradients carry ~4e-3 relative rounding
                raise SystemExit(f"{provider} is off by {err:.2e} at D={D}: not benchmarking a wrong kernel")
    clock = Clock(device)
    header = ("| B=N | D | impl | fwd ms | bwd ms | full ms | extra MiB | extra / (in+grad) | passes | "
              "TFLOP/s | % of matmul |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    print(lines[0], flush=True)
    for D in dims:
        rate = matmul_rate(max(sizes), D, dtype, device, clock)
        print(f"(bf16 matmul, 16384 x {D} x 16384: {rate:.1f} TFLOP/s)", flush=True)
        lines.append(f"| matmul | {D} | torch bf16 16384x{D}x16384 | | | | | | 1 | {rate:.1f} | 100 |")
        for B in sizes:
            io_bytes = 2 * 2 * B * D * torch.finfo(dtype).bits // 8  # two inputs and their gradients
            for provider in providers:
                try:
                    r = measure(provider, B, D, dtype, device, clock, args)
                except Exception as exc:  # noqa: BLE001 - OOM is a result, anything else is a bug
                    if not is_oom(exc):
                        raise
                    r = None
                if r is None:  # outside the except block, so the traceback no longer pins tensors
                    gc.collect()
                    torch.cuda.empty_cache()
                    row = f"| {B} | {D} | {provider} | OOM | OOM | OOM | OOM | | | | |"
                else:
                    fwd_p, bwd_p = matmul_passes(provider, D, dtype, args.smoke)
                    tflops = (fwd_p + bwd_p) * 2 * B * B * D / r["full"] / 1e12
                    peak = "-" if r["peak"] is None else f"{r['peak'] / 2**20:.0f}"
                    ratio = "-" if r["peak"] is None else f"{r['peak'] / io_bytes:.2f}"
                    row = (f"| {B} | {D} | {provider} | {r['fwd'] * 1e3:.2f} | {r['bwd'] * 1e3:.2f} | "
                           f"{r['full'] * 1e3:.2f} | {peak} | {ratio} | {fwd_p}+{bwd_p} | {tflops:.1f} | "
                           f"{100 * tflops / rate:.0f} |")
                print(row, flush=True)
                lines.append(row)
    return lines


def main(argv=None) -> int:
    args = ARGS if argv is None else parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU (none is visible). Run with --smoke to check the script "
              "itself on CPU through the Triton interpreter.", file=sys.stderr)
        return 2
    lines = run(args)
    if args.smoke:
        print("smoke mode: interpreter timings are meaningless; nothing written to RESULTS.md")
        return 0
    if args.no_write:
        return 0
    import triton

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = (f"\n## {stamp} — {torch.cuda.get_device_name()}, torch {torch.__version__}, "
             f"triton {triton.__version__}, bf16, CLIP symmetric loss (fwd+bwd)\n\n")
    note = ("\npasses: matmul passes of 2·B·N·D done (forward+backward); TFLOP/s counts those passes. "
            "extra: peak memory allocated during fwd+bwd above the inputs (gradients included); "
            "in+grad: bytes of the two inputs and their gradients. Times are medians.\n")
    with RESULTS.open("a") as f:
        if RESULTS.stat().st_size == 0:
            f.write("# Kernel benchmarks (written by bench/bench_kernels.py)\n")
        f.write(title + "\n".join(lines) + "\n" + note)
    print(f"appended to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
