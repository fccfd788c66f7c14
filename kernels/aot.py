"""Compile the similarity-logsumexp (and SigLIP) kernels for a GPU architecture without a GPU.

Triton's interpreter (how CI runs the kernels on CPU) never lowers them to PTX, so it cannot see
errors that only compilation finds (e.g. a non-constexpr global read inside a kernel), register
spills, or the tensor-core shapes the dots became. `compile_for_target` runs Triton's real
compiler for, say, sm_90 (H100/H200) with the launch configuration the launchers use, then the
bundled `ptxas -v`, and reports per kernel variant: registers, spill bytes, shared memory, the
wgmma shapes of the dots (from the PTX), CTAs per SM, and whether the main loop is pipelined.
It needs triton with its NVIDIA backend, no driver; run it where TRITON_INTERPRET is unset:

    python -m mmcl.kernels.aot [arch]        # one JSON line per (dtype, D, kernel variant), SigLIP's too

D is a runtime argument: every D with the same launch configuration runs the same binary, so
each distinct configuration is compiled once and reported for every D that uses it.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

import torch

_PTR_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
# Pointer arguments that carry the features (their dtype); excl_ptr holds int64 columns.
_FEATURE_PTRS = {"a_ptr", "b_ptr", "da_ptr", "db_ptr", "g_out_ptr"}
# Feature-dim strides of contiguous inputs: Triton specialises an int argument equal to 1.
_UNIT_STRIDES = {"stride_ad", "stride_bd"}
DIMS = (128, 512, 768, 1024)
# sm_90: 64K 32-bit registers, 228 KB shared memory (1 KB of it reserved per CTA), 2048 threads.
_SM90 = dict(registers=65536, shared=233472, reserved=1024, threads=2048, ctas=32)


def _ctas_per_sm(registers: int, shared: int, num_warps: int) -> int:
    """Resident CTAs per SM from registers (allocated per warp in units of 256), shared memory
    and threads, the occupancy calculator's rule for sm_90."""
    per_warp = -(-registers * 32 // 256) * 256
    by_regs = _SM90["registers"] // (per_warp * num_warps) if registers else _SM90["ctas"]
    by_smem = _SM90["shared"] // (shared + _SM90["reserved"])
    return min(by_regs, by_smem, _SM90["threads"] // (32 * num_warps), _SM90["ctas"])


def _innermost_loops(ttgir: str) -> list[str]:
    """The bodies of the scf.for loops of a TTGIR module that contain no further loop."""
    loops, stack = [], []  # stack: [first line, depth at entry, has a nested loop]
    depth = 0
    lines = ttgir.splitlines()
    for i, line in enumerate(lines):
        if "scf.for " in line and line.rstrip().endswith("{"):
            if stack:
                stack[-1][2] = True
            stack.append([i, depth, False])
        depth += line.count("{") - line.count("}")
        while stack and depth <= stack[-1][1]:
            start, _, nested = stack.pop()
            if not nested:
                loops.append("\n".join(lines[start:i + 1]))
    return loops


def _pipelining(ttgir: str) -> tuple[bool, bool]:
    """(loads pipelined, pipelined across column tiles). The first: some innermost loop issues
    async copies and waits on them inside the loop (prefetched a stage ahead). The second: that
    loop also holds the softmax (exp2) and its running max, i.e. the column-tile loop and the D
    loop were flattened into one pipelined loop, so the next column tile's loads are in flight
    during this tile's softmax epilogue instead of the pipeline draining at every tile."""
    loads = across = False
    for body in _innermost_loops(ttgir):
        if "async_copy_global_to_local" in body and "async_wait" in body:
            loads = True
            across = across or ("math.exp2" in body and "arith.maxnumf" in body)
    return loads, across


def _compile(kernel, dtype, constexprs, num_warps, num_stages, arch, maxnreg=None):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs = {}, dict(constexprs)
    for p in kernel.params:
        if p.is_constexpr or p.name in _UNIT_STRIDES:
            signature[p.name] = "constexpr"
            if not p.is_constexpr:
                constexprs[p.name] = 1
        elif p.name in ("excl_ptr", "pos_ptr"):
            signature[p.name] = "*i64"
        elif p.name.endswith("_ptr"):
            signature[p.name] = _PTR_TYPES[dtype] if p.name in _FEATURE_PTRS else "*fp32"
        else:
            signature[p.name] = "i32"
    # A launch with 16-aligned pointers and sizes/strides divisible by 16 (e.g. D = 768)
    # specialises on that divisibility; without it loads cannot become cp.async copies.
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(kernel.params) if signature[p.name] != "constexpr"}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages,
                                           **({"maxnreg": maxnreg} if maxnreg else {})))
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    gpu_name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    ptx_text = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(ptx_text)
        out = subprocess.run([ptxas, "-v", "--gpu-name", gpu_name, ptx, "-o", os.path.join(tmp, "kernel.cubin")],
                             capture_output=True, text=True, check=True)
    regs = re.findall(r"Used (\d+) registers", out.stderr)
    spills = re.findall(r"(\d+) bytes spill stores", out.stderr)
    registers = int(regs[-1]) if regs else None
    shared = compiled.metadata.shared
    loads, across = _pipelining(compiled.asm["ttgir"])
    wgmma = sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx_text)))
    return {"registers": registers, "spill_bytes": int(spills[-1]) if spills else 0, "shared_bytes": shared,
            "wgmma": wgmma, "ctas_per_sm": _ctas_per_sm(registers or 0, shared, num_warps),
            "num_warps": num_warps, "num_stages": num_stages, "maxnreg": maxnreg, "pipelined": loads,
            "pipelined_across_tiles": across}


# (variant name, kernel-specific constexprs): CLIP (row + fused column lse), the row-only losses
# with an excluded column (SimCLR, SupCon; InfoNCE and MoCo are the same code without it).
_FORWARD_VARIANTS = (("clip", dict(HAS_EXCLUDE=False, COLUMNS=True)),
                     ("rows_exclude", dict(HAS_EXCLUDE=True, COLUMNS=False)))
_GRAD_VARIANTS = (("clip", dict(HAS_EXCLUDE=False, ROW_TERM=True, COL_TERM=True, WRITE_G=True, WRITE_DSCALE=True)),
                  ("rows_exclude", dict(HAS_EXCLUDE=True, ROW_TERM=True, COL_TERM=False, WRITE_G=True,
                                        WRITE_DSCALE=True)))


def _lse_variants(lse, dtype, dim):
    """(kernel name, variant, kernel, constexprs, num_warps, num_stages, maxnreg) the launchers
    use at `dim`."""
    cfg = lse.default_block_sizes(dim, dtype, interpreted=False)
    common = dict(PRECISION=lse._precision(dtype), DOT_FP32=False, BLOCK_D=cfg["BLOCK_D"])
    for name, flags in _FORWARD_VARIANTS:
        yield ("forward", name, lse._lse_fwd_kernel, dict(flags, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                                                           FLATTEN=cfg["FLATTEN"], **common),
               cfg["num_warps"], cfg["num_stages"], None if flags["COLUMNS"] else cfg["fwd_rows_maxnreg"])
    for name, flags in _GRAD_VARIANTS:
        yield ("softmax_grad", name, lse._softmax_grad_kernel,
               dict(flags, BLOCK_M=cfg["BWD_BLOCK_M"], BLOCK_N=cfg["BWD_BLOCK_N"], **common),
               cfg["bwd_num_warps"], cfg["bwd_num_stages"], None)


def _siglip_variants(siglip, lse, dtype, dim):
    """The SigLIP kernels as `_lse_variants` yields them: its forward (per-row sums over the
    similarity forward's tiles) and its S→G kernel (G, d scale and d bias from one tile)."""
    cfg = lse.default_block_sizes(dim, dtype, interpreted=False)
    common = dict(PRECISION=lse._precision(dtype), DOT_FP32=False, BLOCK_D=cfg["BLOCK_D"])
    yield ("siglip_forward", "siglip", siglip._sigmoid_fwd_kernel,
           dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], FLATTEN=cfg["FLATTEN"], **common),
           cfg["num_warps"], cfg["num_stages"], None)
    yield ("sigmoid_grad", "siglip", siglip._sigmoid_grad_kernel,
           dict(WRITE_G=True, WRITE_DSCALE=True, WRITE_DBIAS=True, BLOCK_M=cfg["BWD_BLOCK_M"],
                BLOCK_N=cfg["BWD_BLOCK_N"], **common),
           cfg["bwd_num_warps"], cfg["bwd_num_stages"], None)


def compile_for_target(arch: int = 90, dtypes=(torch.bfloat16, torch.float16, torch.float32), dims=DIMS,
                       row_dot: bool = True, lse_kernels: bool = True, siglip: bool = False):
    """Compile every kernel variant the launchers use for each dtype and feature dim, for sm_`arch`.

    Returns a list of dicts: kernel, variant, dtype, dim (None for the D-independent row-dot
    kernels), registers, spill_bytes, shared_bytes, wgmma (shapes such as "m64n128k16"),
    ctas_per_sm, num_warps, num_stages, maxnreg (the register cap passed to ptxas, if any), pipelined and pipelined_across_tiles (see `_pipelining`;
    the second only for the forward: the S→G kernel owns one tile and has a D loop only).
    `lse_kernels`, `row_dot` and `siglip` choose the kernel families (SigLIP's forward and
    S→G kernel: kernel "siglip_forward" and "sigmoid_grad").
    """
    import importlib

    from mmcl.kernels._common import interpreted

    lse = importlib.import_module("mmcl.kernels.lse")
    dot = importlib.import_module("mmcl.kernels.dot")
    sig = importlib.import_module("mmcl.kernels.siglip")
    if interpreted():
        raise RuntimeError("compile_for_target needs TRITON_INTERPRET unset when triton is first imported")
    results, cache = [], {}
    for dtype in dtypes:
        for dim in dims:
            variants = [*(_lse_variants(lse, dtype, dim) if lse_kernels else ()),
                        *(_siglip_variants(sig, lse, dtype, dim) if siglip else ())]
            for kname, variant, kernel, flags, warps, stages, maxnreg in variants:
                key = (kname, dtype, tuple(sorted(flags.items())), warps, stages, maxnreg)
                if key not in cache:
                    cache[key] = _compile(kernel, dtype, flags, warps, stages, arch, maxnreg)
                results.append({"kernel": kname, "variant": variant, "dtype": str(dtype), "dim": dim, **cache[key]})
        if row_dot:  # the positive logits' kernels stream rows (no dot to pipeline), launched with defaults
            blocks = dict(BLOCK_M=dot.BLOCK_ROWS, BLOCK_D=dot.BLOCK_D)
            for kname, kernel, flags in (("row_dot_forward", dot._row_dot_fwd_kernel, blocks),
                                         ("row_dot_backward", dot._row_dot_bwd_kernel,
                                          dict(WRITE_DA=True, WRITE_DB=True, **blocks))):
                info = _compile(kernel, dtype, flags, 4, 3, arch)
                results.append({"kernel": kname, "variant": "", "dtype": str(dtype), "dim": None, **info})
    return results


if __name__ == "__main__":
    import json
    import sys

    for row in compile_for_target(int(sys.argv[1]) if len(sys.argv) > 1 else 90, siglip=True):
        print(json.dumps(row))
