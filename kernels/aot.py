"""Compile the similarity-logsumexp kernels for a GPU architecture without a GPU.

Triton's interpreter (how CI runs the kernels on CPU) never lowers them to PTX, so it cannot see
errors that only compilation finds (e.g. a non-constexpr global read inside a kernel) nor
register spills. `compile_for_target` runs Triton's real compiler for, say, sm_90 (H100/H200)
with the launch configuration the launchers would use, then the bundled `ptxas -v`, and reports
registers and spill bytes per kernel variant. It needs triton with its NVIDIA backend, no driver;
run it in a process where TRITON_INTERPRET is unset.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

import torch

_PTR_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
# Pointer arguments that carry the features (their dtype); every other pointer is fp32.
_FEATURE_PTRS = {"a_ptr", "b_ptr", "da_ptr", "db_ptr", "g_out_ptr"}
# Feature-dim strides of contiguous inputs: Triton specialises an int argument equal to 1.
_UNIT_STRIDES = {"stride_ad", "stride_bd", "stride_dd"}


def _compile(kernel, dtype, constexprs, num_warps, num_stages, arch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs = {}, dict(constexprs)
    for p in kernel.params:
        if p.is_constexpr or p.name in _UNIT_STRIDES:
            signature[p.name] = "constexpr"
            if not p.is_constexpr:
                constexprs[p.name] = 1
        elif p.name.endswith("_ptr"):
            signature[p.name] = _PTR_TYPES[dtype] if p.name in _FEATURE_PTRS else "*fp32"
        else:
            signature[p.name] = "i32"
    # A launch with 16-aligned pointers and sizes/strides divisible by 16 (e.g. D = 768)
    # specialises on that divisibility; without it loads cannot become cp.async copies.
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(kernel.params) if signature[p.name] != "constexpr"}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    gpu_name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        out = subprocess.run([ptxas, "-v", "--gpu-name", gpu_name, ptx, "-o", os.path.join(tmp, "kernel.cubin")],
                             capture_output=True, text=True, check=True)
    regs = re.findall(r"Used (\d+) registers", out.stderr)
    spills = re.findall(r"(\d+) bytes spill stores", out.stderr)
    return {"registers": int(regs[-1]) if regs else None, "spill_bytes": int(spills[-1]) if spills else 0,
            "shared_bytes": compiled.metadata.shared, "pipelined": "async_copy" in compiled.asm["ttgir"]}


def compile_for_target(arch: int = 90, dtypes=(torch.bfloat16, torch.float16, torch.float32), dim: int = 768):
    """Compile every kernel variant the launchers use for features of `dim`, for sm_`arch`.

    Returns a list of dicts: kernel, dtype, variant flags, registers, spill_bytes, shared_bytes,
    pipelined (whether the loads in the D loop became asynchronous copies; the similarity
    kernels' only, the row-dot kernels have no dot to overlap them with).
    """
    import importlib

    sl = importlib.import_module("mmcl.kernels.similarity_lse")
    rd = importlib.import_module("mmcl.kernels.row_dot")
    if sl._interpreted():
        raise RuntimeError("compile_for_target needs TRITON_INTERPRET unset when triton is first imported")
    results = []
    for dtype in dtypes:
        cfg = sl.default_block_sizes(dim, dtype, interpreted=False)
        common = dict(PRECISION=sl._precision(dtype), DOT_FP32=False, BLOCK_D=cfg["BLOCK_D"])
        # CLIP (row + fused column lse), SimCLR (diagonal masked), InfoNCE / MoCo queue (rows only).
        for mask, columns in ((False, True), (True, False), (False, False)):
            flags = dict(MASK_DIAGONAL=mask, COLUMNS=columns, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], **common)
            info = _compile(sl._lse_fwd_kernel, dtype, flags, cfg["num_warps"], cfg["num_stages"], arch)
            results.append({"kernel": "forward", "dtype": str(dtype), "mask_diagonal": mask, "columns": columns,
                            **info})
        # (HAS_A_TERM, HAS_B_TERM, WRITE_DA, WRITE_DSCALE): dQ side of CLIP, dQ side of the
        # row-only losses (InfoNCE, MoCo, SimCLR), their dK side, the scale-only launch.
        for terms in ((True, True, True, True), (True, False, True, True), (False, True, True, False),
                      (True, False, False, True)):
            flags = dict(MASK_DIAGONAL=True, HAS_A_TERM=terms[0], HAS_B_TERM=terms[1], WRITE_DA=terms[2],
                         WRITE_DSCALE=terms[3], BLOCK_M=cfg["BWD_BLOCK_M"], BLOCK_N=cfg["BWD_BLOCK_N"],
                         BLOCK_DOUT=cfg["BLOCK_DOUT"], FLATTEN=cfg["BWD_FLATTEN"], **common)
            info = _compile(sl._lse_bwd_kernel, dtype, flags, cfg["num_warps"], cfg["num_stages"], arch)
            results.append({"kernel": "backward", "dtype": str(dtype), "terms": terms, **info})
        # BWD_MODE="gemm": (HAS_A_TERM, HAS_B_TERM, WRITE_G, WRITE_DSCALE) in the same four roles.
        for terms in ((True, True, True, True), (True, False, True, True), (False, True, True, False),
                      (True, False, False, True)):
            flags = dict(MASK_DIAGONAL=True, HAS_A_TERM=terms[0], HAS_B_TERM=terms[1], WRITE_G=terms[2],
                         WRITE_DSCALE=terms[3], BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], **common)
            info = _compile(sl._grad_tile_kernel, dtype, flags, cfg["num_warps"], cfg["num_stages"], arch)
            results.append({"kernel": "grad_tile", "dtype": str(dtype), "terms": terms, **info})
        # The positive logits' kernels stream rows (no dot to pipeline), launched with defaults.
        blocks = dict(BLOCK_M=rd.BLOCK_ROWS, BLOCK_D=rd.BLOCK_D)
        info = _compile(rd._row_dot_fwd_kernel, dtype, blocks, 4, 3, arch)
        results.append({"kernel": "row_dot_forward", "dtype": str(dtype), **info})
        info = _compile(rd._row_dot_bwd_kernel, dtype, dict(WRITE_DA=True, WRITE_DB=True, **blocks), 4, 3, arch)
        results.append({"kernel": "row_dot_backward", "dtype": str(dtype), **info})
    return results


if __name__ == "__main__":
    import json
    import sys

    arch = int(sys.argv[1]) if len(sys.argv) > 1 else 90
    for row in compile_for_target(arch):
        print(json.dumps(row))
