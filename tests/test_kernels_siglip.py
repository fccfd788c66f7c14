"""The Triton SigLIP kernels against a float64 reference that materialises the logits: the summed
loss and its gradients (query, key, scale, bias) on awkward sizes, positives at an offset and
missing, split column ranges, backward row chunks, strided and mixed-dtype inputs, 16-bit
inputs against torch's own error, and siglip_loss end to end with impl="triton".

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest before triton is imported);
on a CUDA machine the same comparisons run compiled, plus larger bf16 shapes.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cuda

from mmcl.kernels import sigmoid_pair_loss
from mmcl.losses import siglip_loss
from mmcl.losses.siglip import _siglip_sum_reference

# e^x of a large logit overflows to inf on purpose (σ(−x) is then 0); the interpreter's numpy warns.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")

F64 = torch.float64
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sigmoid_reference(query, key, scale, bias, positive):
    """Σ_ij −log σ(z_ij (scale q_i·k_j + bias)), z = +1 at (i, positive[i]) (-1: no positive)."""
    logits = scale * (query @ key.T) + bias
    signs = -torch.ones_like(logits)
    rows = torch.nonzero(positive >= 0).flatten()
    signs[rows, positive[rows]] = 1.0
    return -F.logsigmoid(signs * logits).sum()


def _features(n, d, dtype=torch.float32, normalize=True):
    x = torch.randn(n, d, dtype=F64)
    return (F.normalize(x, dim=-1) if normalize else x).to(dtype).to(DEVICE)


def _grads(fn, query, key, scale, bias, positive, *, key_grad=True, **kw):
    """The loss of fn and its gradients w.r.t. (query, key or None, scale, bias)."""
    leaves = [query.detach().clone().requires_grad_(), key.detach().clone().requires_grad_(key_grad),
              scale.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()]
    loss = fn(*leaves, positive, **kw)
    wanted = [t for t in leaves if t.requires_grad]
    grads = iter(torch.autograd.grad(loss, wanted))
    return loss, [next(grads) if t.requires_grad else None for t in leaves]


def _check(query, key, scale, bias, positive, rtol, **kw):
    """Kernel loss and gradients within rtol (relative to each reference's largest entry; for a
    16-bit gradient its dtype's eps) of the float64 reference on the same inputs."""
    loss, grads = _grads(sigmoid_pair_loss, query, key, scale, bias, positive, **kw)
    kw.pop("block_sizes", None)
    ref, ref_grads = _grads(sigmoid_reference, query.double(), key.double(), scale.double(), bias.double(),
                            positive, **kw)
    assert loss.dtype == torch.float32
    errors = {"loss": ((loss.double() - ref).abs() / ref.abs()).item()}
    for name, g, r in zip(("query", "key", "scale", "bias"), grads, ref_grads):
        if r is None:
            assert g is None, name
            continue
        assert g.dtype == {"query": query, "key": key}.get(name, scale).dtype, name
        diff = (g.double() - r).abs()
        errors[name] = (diff.max() / r.abs().max()).item()
        where = np.unravel_index(int(diff.argmax()), tuple(diff.shape)) if diff.dim() else ()
        tol = max(rtol, torch.finfo(g.dtype).eps)  # a 16-bit gradient is rounded once to its dtype
        assert errors[name] < tol, f"d / d {name}: relative error {errors[name]:.3e} at {where}"
    assert errors["loss"] < rtol, errors
    return errors


_T = lambda v=10.0: torch.tensor(v, device=DEVICE)  # noqa: E731


@pytest.mark.parametrize("B,N,D", [(1, 1, 32), (37, 37, 48), (67, 31, 32), (3, 5, 768)])
def test_fp32_matches_float64_on_awkward_sizes(B, N, D):
    """1, primes, above the 32-row interpreter tile, D ∈ {32, 48, 768}; SigLIP's initial bias."""
    positive = torch.arange(B, device=DEVICE) % N
    _check(_features(B, D), _features(N, D), _T(10.0), _T(-10.0), positive, rtol=2e-6)


def test_positives_at_an_offset_missing_rows_and_large_logits():
    """A rank's rows against all ranks' columns (positives at offset 20), rows without a pair,
    unnormalised features at scale 30 (logits of ±100s, both softplus branches saturated)."""
    B, N = 41, 70
    positive = torch.arange(20, 20 + B, device=DEVICE)
    positive[::5] = -1
    errors = _check(_features(B, 32, normalize=False), _features(N, 32, normalize=False), _T(30.0), _T(3.0),
                    positive, rtol=5e-6)
    assert errors["bias"] < 5e-6


def test_split_columns_backward_chunks_and_a_detached_key():
    """The forward's column split (FWD_SPLITS) and several backward row chunks (BWD_CHUNK_ROWS)
    give the same loss and gradients; a key without grad gets none (its product is skipped)."""
    q, k = _features(70, 32), _features(100, 32)
    positive = torch.arange(70, device=DEVICE)
    sizes = {"FWD_SPLITS": 3, "BWD_CHUNK_ROWS": 32}
    _check(q, k, _T(), _T(-10.0), positive, rtol=2e-6, block_sizes=sizes)
    _check(q, k, _T(), _T(-10.0), positive, rtol=2e-6, block_sizes=sizes, key_grad=False)


def test_strided_and_mixed_dtype_inputs():
    """Non-contiguous views (a transposed buffer, every other feature) and a bf16 query with an
    fp32 key (promoted; the query's gradient comes back in bf16)."""
    q = _features(48, 33).T.contiguous().T  # column-major storage
    k = _features(39, 66)[:, ::2]
    assert not q.is_contiguous() and not k.is_contiguous()
    positive = torch.arange(48, device=DEVICE) % 39
    _check(q, k, _T(), _T(-10.0), positive, rtol=2e-6)
    _check(q.to(torch.bfloat16), k, _T(), _T(-10.0), positive, rtol=2e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_error_at_most_twice_torch(dtype):
    """16-bit inputs: fp32 accumulation, G in the inputs' dtype. The kernel's error against float64
    (on the same rounded inputs) is at most 2x that of torch's naive loss in that dtype (+ eps)."""
    B, N, D = 40, 70, 48
    q, k = _features(B, D, dtype), _features(N, D, dtype)
    scale, bias = _T(10.0), _T(-10.0)
    positive = torch.arange(B, device=DEVICE)
    loss, grads = _grads(sigmoid_pair_loss, q, k, scale, bias, positive)
    torch_loss, torch_grads = _grads(_siglip_sum_reference, q, k, scale, bias, positive)
    ref, ref_grads = _grads(sigmoid_reference, q.double(), k.double(), scale.double(), bias.double(), positive)

    def err(x, r):
        return ((x.double() - r).abs().max() / r.abs().max()).item()

    eps = torch.finfo(dtype).eps
    assert err(loss, ref) <= 2 * err(torch_loss, ref) + 1e-6
    for name, g, t, r in zip(("query", "key", "scale", "bias"), grads, torch_grads, ref_grads):
        assert err(g, r) <= 2 * err(t, r) + eps, f"d / d {name}: kernel {err(g, r):.3e}, torch {err(t, r):.3e}"


def test_siglip_loss_with_impl_triton_matches_the_reference():
    img, txt = _features(45, 48), _features(45, 48)
    scale = torch.tensor(8.0, device=DEVICE, requires_grad=True)
    bias = torch.tensor(-5.0, device=DEVICE, requires_grad=True)
    ours = siglip_loss(img, txt, scale, bias, impl="triton")
    ref = siglip_loss(img.double(), txt.double(), scale.double(), bias.double(), impl="naive")
    assert abs(ours.item() - ref.item()) < 1e-6 * ref.item()
    (g_bias,) = torch.autograd.grad(ours, [bias])
    (r_bias,) = torch.autograd.grad(ref, [bias])
    assert abs(g_bias.item() - r_bias.item()) < 1e-6 * abs(r_bias.item())


@pytest.mark.parametrize("call,error,message", [
    (lambda q: sigmoid_pair_loss(q.double(), q.double(), _T(), _T(), torch.arange(4, device=DEVICE)), TypeError,
     "query must be float32, float16 or bfloat16"),
    (lambda q: sigmoid_pair_loss(q, q, 10.0, _T(), torch.arange(4, device=DEVICE)), TypeError, "scale must be a 0-dim"),
    (lambda q: sigmoid_pair_loss(q, q, _T(), torch.zeros(2, device=DEVICE), torch.arange(4, device=DEVICE)),
     TypeError, "bias must be a 0-dim"),
    (lambda q: sigmoid_pair_loss(q, q, _T(), _T(), torch.arange(4, device=DEVICE).int()), TypeError,
     "positive must be an int64 tensor"),
    (lambda q: sigmoid_pair_loss(q, q, _T(), _T(), torch.arange(3, device=DEVICE)), ValueError,
     r"positive must have shape \(4,\)"),
    (lambda q: sigmoid_pair_loss(q, q, _T(), _T(), torch.arange(1, 5, device=DEVICE)), ValueError,
     r"column indices in \[0, 4\)"),
])
def test_bad_inputs_raise_clear_errors(call, error, message):
    with pytest.raises(error, match=message):
        call(_features(4, 32))


# --------------------------------------------------------------------------- CUDA only


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_large_awkward_shapes_against_float64(dtype):
    """Compiled kernels with the real tiles, column splits and several backward chunks."""
    B, N, D = 4099, 5003, 768
    q, k = _features(B, D, dtype), _features(N, D, dtype)
    positive = torch.arange(B, device=DEVICE)
    _check(q, k, _T(10.0), _T(-10.0), positive, rtol=2e-6 if dtype == torch.float32 else 2e-2)


@requires_cuda
def test_cuda_memory_stays_within_inputs_and_gradients():
    """B = N = 32,768, D = 768, bf16: the loss's peak extra memory (forward + backward) is at most
    2x the inputs plus their gradients, far below the 4 GiB of one fp32 logit matrix."""
    B, D = 32768, 768
    q = _features(B, D, torch.bfloat16).requires_grad_()
    k = _features(B, D, torch.bfloat16).requires_grad_()
    scale, bias = _T(10.0).requires_grad_(), _T(-10.0).requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    siglip_loss(q, k, scale, bias, impl="triton").backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= 2 * 2 * (q.numel() + k.numel()) * q.element_size(), extra


@pytest.mark.slow
def test_bench_kernels_siglip_smoke_mode():
    """bench/bench_kernels.py --cases siglip end to end on CPU (interpreter, tiny size): the
    correctness check first, then Triton, naive torch and open_clip's SigLipLoss in both dtypes."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root, "bench", "bench_kernels.py"), "--smoke", "--repeats", "1",
                           "--cases", "siglip"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "correctness of triton (siglip, D=32, torch.float32)" in proc.stdout
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| siglip")]
    got = sorted((r[4].strip(), r[5].strip(), r[11].strip()) for r in rows)
    assert got == sorted((d, p, "1+3" if p == "triton" else "1+2") for d in ("bfloat16", "float32")
                         for p in ("triton", "naive", "open_clip")), proc.stdout


_AOT_SCRIPT = """
import json, torch
from mmcl.kernels.aot import compile_for_target
print(json.dumps(compile_for_target(90, dims=(128, 768), row_dot=False, lse_kernels=False, siglip=True)))
"""


@pytest.mark.slow
def test_siglip_kernels_compile_for_sm90_without_spills():
    """Triton's real compiler (sm_90, no GPU needed) with each dtype's launch configuration: both
    SigLIP kernels compile without register spills, their 16-bit S tiles run on wgmma at least n64
    wide, the forward's column-tile and D loops are one pipelined loop, and the S→G kernel's loads
    are async with two CTAs per SM."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted({(r["kernel"], r["dtype"]) for r in rows}) == sorted(
        (k, d) for k in ("siglip_forward", "sigmoid_grad") for d in ("torch.bfloat16", "torch.float16", "torch.float32"))
    for row in rows:
        assert row["registers"] is not None and row["spill_bytes"] == 0 and row["pipelined"], row
        if row["kernel"] == "siglip_forward":
            assert row["pipelined_across_tiles"], row
        else:
            assert row["ctas_per_sm"] >= 2, row
        if row["dtype"] != "torch.float32":
            widths = [int(shape.split("n")[1].split("k")[0]) for shape in row["wgmma"]]
            assert widths and min(widths) >= 64, row
