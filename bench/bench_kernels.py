"""Benchmark mmcl's Triton similarity-softmax kernels against naive torch and open_clip's ClipLoss.

Cases (forward + backward of a loss over the features, requires_grad):

- clip B=N in --sizes at --dim (default 16,384, 65,536, 262,144 at D=768): CLIP's symmetric loss.
- queue: MoCo, 256 queries against a detached 65,536-key queue at D=128 (row lse only).
- local: a rank's 4,096 local rows against 65,536 gathered columns at D=768, row and column
  lse, gradients for both (the block each rank computes under gather).
- siglip: SigLIP's sigmoid loss, B=N in --siglip-sizes (default 16,384, 65,536, 262,144) at
  --dim, with learnable scale and bias (open_clip's SigLipLoss as a third contender).

Each in bf16 and fp32 (--dtypes). Per row: forward, backward and full time (medians), peak
memory above the inputs, the matmul passes of 2·B·N·D the implementation performs and its
TFLOP/s on those, and the floor-normalised TFLOP/s: the floor's FLOPs over the time, with a
floor of 4 passes (8·B·N·D) for clip, local and siglip (forward, recomputation, dQ, dK) and 3 passes
(6·B·N·D) for the queue (no dK). Both are compared with a plain matmul measured in the same run.
Out-of-memory is reported as "OOM". The table is printed and appended to bench/RESULTS.md with
the date and the device.

    python bench/bench_kernels.py                          # needs a CUDA GPU (exit 2 without)
    python bench/bench_kernels.py --cases clip --sizes 16384
    python bench/bench_kernels.py --variants fwd-128x64    # also time alternative launch settings
    python bench/bench_kernels.py --smoke                  # tiny sizes on CPU through TRITON_INTERPRET=1;
                                                           # proves the script runs, writes nothing
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
# Alternative launch settings (block_sizes overrides) the first GPU runs should compare.
VARIANTS = {
    "fwd-128x64": dict(BLOCK_N=64),          # 2 CTAs/SM in the forward instead of the 128x128 tile
    "fwd-64x128-w4": dict(BLOCK_M=64, num_warps=4),  # 2 CTAs/SM of one warpgroup each (m64n128)
    "grad-128x128": dict(BWD_BLOCK_N=128),   # the larger S→G tile at 1 CTA/SM
    "chunk-4096": dict(BWD_CHUNK_ROWS=4096),  # fewer fp32 dK accumulator passes, a bigger G buffer
    "no-split": dict(FWD_SPLITS=1),          # the forward without column splits
    "rows-1cta": dict(fwd_rows_maxnreg=None),  # the row-only forward without its 128-register cap
}
FLOOR_PASSES = {"clip": 4, "local": 4, "queue": 3, "siglip": 4}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=["clip", "queue", "local", "siglip"], choices=sorted(FLOOR_PASSES))
    p.add_argument("--sizes", type=int, nargs="+", default=[16384, 65536, 262144], help="B = N of the clip case")
    p.add_argument("--siglip-sizes", type=int, nargs="+", default=[16384, 65536, 262144], help="B = N of siglip")
    p.add_argument("--dim", type=int, default=768, help="D of the clip and local cases")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    p.add_argument("--fp32-max-size", type=int, default=65536,
                   help="largest clip B=N timed in fp32 (IEEE fp32 dots run on FMAs: slow)")
    p.add_argument("--providers", nargs="+", default=["triton", "naive", "open_clip"],
                   choices=["triton", "naive", "open_clip"], help="open_clip: its ClipLoss (clip) or SigLipLoss (siglip)")
    p.add_argument("--variants", nargs="*", default=[], choices=sorted(VARIANTS),
                   help="also time the kernels with these launch settings, as providers triton:<variant>")
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

from mmcl.kernels import row_dot, sigmoid_pair_loss, similarity_lse  # noqa: E402
from mmcl.losses import clip_loss, siglip_loss  # noqa: E402


# --------------------------------------------------------------------------- the contenders


def _bias(q):
    """SigLIP's bias at its initial value, learnable (a fresh leaf per call)."""
    return torch.full((), -10.0, device=q.device, dtype=torch.promote_types(q.dtype, torch.float32),
                      requires_grad=True)


def naive_loss(kind, q, k, scale):
    """Straightforward torch: materialised logits in the inputs' dtype, fp32 softmax (sigmoid)."""
    logits = (scale * q @ k.T).to(torch.promote_types(q.dtype, torch.float32))
    if kind == "siglip":
        signs = 2 * torch.eye(q.shape[0], device=q.device, dtype=logits.dtype) - 1
        return -F.logsigmoid(signs * (logits + _bias(q))).sum() / q.shape[0]
    if kind == "clip":
        labels = torch.arange(q.shape[0], device=q.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    rows = torch.logsumexp(logits, dim=1).mean()
    return rows if kind == "queue" else rows + torch.logsumexp(logits, dim=0).mean()


def kernel_loss(kind, q, k, scale, block_sizes=None):
    """The same losses from the kernels; clip (siglip) without block_sizes is clip_loss
    (siglip_loss) with impl="triton"."""
    if kind == "siglip":
        if not block_sizes:
            return siglip_loss(q, k, scale, _bias(q), impl="triton")
        positive = torch.arange(q.shape[0], device=q.device)
        return sigmoid_pair_loss(q, k, scale, _bias(q), positive, block_sizes=block_sizes) / q.shape[0]
    if kind == "clip" and not block_sizes:
        return clip_loss(q, k, scale, impl="triton")
    rows, cols = similarity_lse(q, k, scale, columns=kind != "queue", block_sizes=block_sizes)
    if kind == "clip":
        positives = scale * row_dot(q, k)
        return 0.5 * ((rows - positives).mean() + (cols - positives).mean())
    return rows.mean() if kind == "queue" else rows.mean() + cols.mean()


def make_loss(provider, kind):
    if provider == "naive":
        return lambda q, k, s: naive_loss(kind, q, k, s)
    if provider.startswith("triton"):
        overrides = VARIANTS[provider.split(":", 1)[1]] if ":" in provider else None
        return lambda q, k, s: kernel_loss(kind, q, k, s, overrides)
    from open_clip.loss import ClipLoss, SigLipLoss

    if kind == "siglip":
        open_clip_siglip = SigLipLoss()
        return lambda q, k, s: open_clip_siglip(q, k, s, _bias(q))
    open_clip_loss = ClipLoss()
    return lambda q, k, s: open_clip_loss(q, k, s)


def matmul_passes(provider, kind):
    """(forward, backward) matmul passes of 2·B·N·D each implementation performs."""
    if provider.startswith("triton"):  # forward (column lse fused); S→G, dQ and dK unless detached
        return 1, 2 if kind == "queue" else 3
    if provider == "naive":  # logits; dQ (and dK) from the stored logits' gradient
        return 1, 1 if kind == "queue" else 2
    if kind == "siglip":  # open_clip's SigLipLoss: one logit matrix
        return 1, 2
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


def make_inputs(kind, B, N, D, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    q = F.normalize(torch.randn(B, D, device=device, generator=gen), dim=-1).to(dtype).requires_grad_()
    k = F.normalize(torch.randn(N, D, device=device, generator=gen), dim=-1).to(dtype)
    return q, k.requires_grad_(kind != "queue")


def measure(provider, kind, B, N, D, dtype, device, clock, args):
    """{'fwd', 'bwd', 'full' (seconds), 'peak' (bytes above inputs)} or raises OOM."""
    loss_fn = make_loss(provider, kind)
    q, k = make_inputs(kind, B, N, D, dtype, device)
    scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)
    try:
        def clear():
            q.grad = k.grad = scale.grad = None

        def full():
            clear()
            loss_fn(q, k, scale).backward()

        first = clock.time(full)  # warm-up: compilation, allocator
        repeats = max(1, min(args.repeats, int(args.max_seconds / max(first, 1e-9))))
        if clock.cuda:
            clear()
            torch.cuda.empty_cache()
            clock.sync()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        fulls = [clock.time(full) for _ in range(repeats)]
        peak = torch.cuda.max_memory_allocated() - base if clock.cuda else None
        fwds, bwds = [], []
        for _ in range(repeats):
            clear()
            holder = {}

            def forward():
                holder["loss"] = loss_fn(q, k, scale)

            fwds.append(clock.time(forward))
            bwds.append(clock.time(lambda: holder["loss"].backward()))
        return {"fwd": statistics.median(fwds), "bwd": statistics.median(bwds),
                "full": statistics.median(fulls), "peak": peak}
    finally:
        del q, k, scale
        if clock.cuda:
            torch.cuda.empty_cache()


def matmul_rate(D, dtype, device, clock, n=16384) -> float:
    """TFLOP/s of a plain (n, D) @ (D, n) matmul at this dtype (torch's fp32 precision setting)."""
    a = torch.randn(n, D, device=device).to(dtype)
    b = torch.randn(D, n, device=device).to(dtype)
    clock.time(lambda: a @ b)
    seconds = statistics.median(clock.time(lambda: a @ b) for _ in range(5))
    return 2 * n * n * D / seconds / 1e12


# --------------------------------------------------------------------------- main


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def check_correctness(provider, kind, D, dtype, device) -> float:
    """Largest relative error of a kernel provider's loss and gradients against float64 naive
    torch, at a small size: timings of a wrong kernel are worth nothing, so the run stops."""
    B, N = (97, 131) if device.type == "cpu" else (1031, 2053)
    N = B if kind in ("clip", "siglip") else N
    results = []
    for name, cast in ((provider, lambda t: t), ("naive", lambda t: t.double())):
        q, k = (cast(t).detach().requires_grad_(t.requires_grad) for t in make_inputs(kind, B, N, D, dtype, device, 1))
        scale = torch.tensor(1 / 0.07, device=device, dtype=torch.float32 if name != "naive" else torch.float64,
                             requires_grad=True)
        loss = make_loss(name, kind)(q, k, scale)
        wrt = [t for t in (q, k, scale) if t.requires_grad]
        results.append([loss, *torch.autograd.grad(loss, wrt)])
    return max(((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
               for got, ref in zip(*results))


def cases(args):
    """(kind, B, N, D, dtype) of every measurement."""
    out = []
    for name in args.dtypes:
        dtype = getattr(torch, name)
        if args.smoke:
            sizes = {"clip": [(97, 97, 32)], "queue": [(16, 131, 32)], "local": [(40, 97, 32)],
                     "siglip": [(97, 97, 32)]}
        else:
            def square(batches):
                return [(b, b, args.dim) for b in batches if dtype != torch.float32 or b <= args.fp32_max_size]

            sizes = {"clip": square(args.sizes), "queue": [(256, 65536, 128)], "local": [(4096, 65536, args.dim)],
                     "siglip": square(args.siglip_sizes)}
        out += [(kind, B, N, D, dtype) for kind in args.cases for B, N, D in sizes[kind]]
    return out


def run(args) -> list[str]:
    device = torch.device("cpu" if args.smoke else "cuda")
    providers = list(args.providers) + [f"triton:{v}" for v in args.variants]
    todo = cases(args)
    for kind, dim, dtype in sorted({(c[0], c[3], c[4]) for c in todo}, key=str):
        for provider in [p for p in providers if p.startswith("triton")]:
            err = check_correctness(provider, kind, dim, dtype, device)
            print(f"correctness of {provider} ({kind}, D={dim}, {dtype}): max relative error of loss and "
                  f"gradients vs float64 = {err:.2e}", flush=True)
            if not err < 2e-2:  # bf16 gradients carry ~4e-3 relative rounding
                raise SystemExit(f"{provider} is off by {err:.2e}: not benchmarking a wrong kernel")
    clock = Clock(device)
    header = ("| case | B | N | D | dtype | impl | fwd ms | bwd ms | full ms | extra MiB | extra / (in+grad) | "
              "passes | TFLOP/s | floor TFLOP/s | floor % of matmul |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    print(header, flush=True)
    rates = {}
    for kind, B, N, D, dtype in todo:
        if (D, dtype) not in rates:
            n = 256 if args.smoke else 16384
            rates[D, dtype] = matmul_rate(D, dtype, device, clock, n=n)
            row = (f"| matmul | {n} | {n} | {D} | {str(dtype)[6:]} | torch | | | | | | 1 | "
                   f"{rates[D, dtype]:.1f} | | 100 |")
            print(row, flush=True)
            lines.append(row)
        io_bytes = (2 * B * D + (2 if kind != "queue" else 1) * N * D) * torch.finfo(dtype).bits // 8
        for provider in providers:
            if provider == "open_clip" and kind not in ("clip", "siglip"):
                continue
            try:
                r = measure(provider, kind, B, N, D, dtype, device, clock, args)
            except Exception as exc:  # noqa: BLE001 - OOM is a result, anything else is a bug
                if not is_oom(exc):
                    raise
                r = None
            prefix = f"| {kind} | {B} | {N} | {D} | {str(dtype)[6:]} | {provider} |"
            if r is None:  # outside the except block, so the traceback no longer pins tensors
                gc.collect()
                torch.cuda.empty_cache()
                row = prefix + " OOM | OOM | OOM | OOM | | | | | |"
            else:
                fwd_p, bwd_p = matmul_passes(provider, kind)
                flop = 2 * B * N * D
                own = (fwd_p + bwd_p) * flop / r["full"] / 1e12
                floor = FLOOR_PASSES[kind] * flop / r["full"] / 1e12
                peak = "-" if r["peak"] is None else f"{r['peak'] / 2**20:.0f}"
                ratio = "-" if r["peak"] is None else f"{r['peak'] / io_bytes:.2f}"
                row = (prefix + f" {r['fwd'] * 1e3:.2f} | {r['bwd'] * 1e3:.2f} | {r['full'] * 1e3:.2f} | {peak} | "
                       f"{ratio} | {fwd_p}+{bwd_p} | {own:.1f} | {floor:.1f} | {100 * floor / rates[D, dtype]:.0f} |")
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
             f"triton {triton.__version__}, similarity-softmax and sigmoid losses (fwd+bwd)\n\n")
    note = ("\npasses: matmul passes of 2·B·N·D done (forward+backward); TFLOP/s counts those passes. "
            "floor TFLOP/s: 4 passes (clip, local, siglip) or 3 (queue) over the time, whatever the implementation "
            "does; its % is of the plain matmul in the same dtype measured in this run. extra: peak memory "
            "allocated during fwd+bwd above the inputs (gradients included); in+grad: bytes of the inputs "
            "and their gradients. Times are medians.\n")
    with RESULTS.open("a") as f:
        if RESULTS.stat().st_size == 0:
            f.write("# Kernel benchmarks (written by bench/bench_kernels.py)\n")
        f.write(title + "\n".join(lines) + "\n" + note)
    print(f"appended to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
