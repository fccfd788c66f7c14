#!/usr/bin/env bash
# The GPU checks of mmcl in one call on a lent GPU machine (H100/H200 with its own torch and
# triton, no network): the CUDA tests of the kernels and of the device augmentation, the kernel
# benchmark (against naive torch and open_clip, then alternative launch settings), then a
# time-boxed MoCo v2 run on CIFAR-10. Logs, bench/RESULTS.md and bench/moco_cifar10.png are copied to $OUT.
#
# Prepare on the CPU machine, from the repository root (the folders are git-ignored):
#
#   bash bench/gpu_session.sh --prepare      # wheels the GPU image lacks -> .whl/, CIFAR-10 -> .device_data/
#
# then run it there with `.whl` and `.device_data` carried. One command may run 10 minutes, so
# the two parts go in two calls, the second while the machine is still warm:
#
#   bash bench/gpu_session.sh kernels                  # CUDA tests + bench_kernels, <= 9 min (expect ~5)
#   MOCO_MINUTES=3 bash bench/gpu_session.sh moco      # MoCo v2, 3 min of training + kNN/probe, <= 6 min
#   bash bench/gpu_session.sh siglip                   # SigLIP kernels: CUDA tests + bench, <= 6 min
#   METHODS_EPOCHS=1 bash bench/gpu_session.sh methods # bench_methods --gpu: 7 CIFAR-10 rows, <= 9 min
#
# and before lending a GPU, on the CPU machine: `bash bench/gpu_session.sh dry` (the same setup;
# the tests collect, bench_kernels runs tiny through the interpreter and exits 2 without CUDA).
#
# With 15 minutes of GPU time in all (a machine's start included), MOCO_MINUTES=3 fits after the
# kernel part; with the kernels already measured, one `moco` call can take MOCO_MINUTES=7.
# Each step has its own timeout, so a failing step leaves the later ones their time.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
        webdataset==1.0.2 braceexpand==0.1.7)

PART="${1:-all}"
if [[ "$PART" == "--prepare" ]]; then
    mkdir -p .whl .device_data
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .whl "${WHEELS[@]}" || exit 1
    src="${CIFAR10:-../shared/data/cifar10}"
    [[ -f "$src/train.parquet" && -f "$src/test.parquet" ]] || { echo "no CIFAR-10 parquet files in $src" >&2; exit 1; }
    mkdir -p .device_data/cifar10 && cp "$src"/train.parquet "$src"/test.parquet .device_data/cifar10/
    du -sh .whl .device_data
    echo "prepared: carry .whl and .device_data"
    exit 0
fi

OUT="${OUT:-/tmp/mmcl_gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
MOCO_MINUTES="${MOCO_MINUTES:-3}"
status=0
step() {  # step NAME TIMEOUT_S CMD...: run with a timeout, log to $OUT/NAME.log, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
    [[ $rc == 0 ]] || status=1
}

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# mmcl from this tree without installing it (nothing to build, the image's torch and triton are what
# we measure): a package of links, with kernels/ as mmcl.kernels the way pyproject.toml maps it.
rm -rf /tmp/mmcl_tree && mkdir -p /tmp/mmcl_tree/mmcl || exit 1
for entry in "$PWD"/mmcl/*; do ln -s "$entry" /tmp/mmcl_tree/mmcl/; done
ln -s "$PWD/kernels" /tmp/mmcl_tree/mmcl/kernels
export PYTHONPATH="/tmp/mmcl_tree${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONSAFEPATH=1  # no ./ on sys.path: ./mmcl (without kernels) must not hide the links
python3 -c "import mmcl.kernels, mmcl.losses" || exit 1

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    date -u +"%Y-%m-%d %H:%M UTC"
} 2>&1 | tee "$OUT/device.txt"

if [[ "$PART" == dry ]]; then
    # The CPU dry run: the same setup, then what can run without a GPU. The tests must collect,
    # the benchmark runs tiny through the interpreter and, without --smoke, exits 2 (no CUDA).
    step dry_collect 120 python3 -m pytest -q -p no:cacheprovider --collect-only tests/test_kernels.py \
        tests/test_kernels_siglip.py tests/test_gpu_augment.py
    step dry_bench_smoke 240 python3 bench/bench_kernels.py --smoke --repeats 1 --cases clip queue \
        --dtypes bfloat16 --variants no-split
    echo "=== dry_bench_no_cuda: expecting exit 2"
    CUDA_VISIBLE_DEVICES="" python3 bench/bench_kernels.py --repeats 3 --max-seconds 8 >/dev/null 2>&1
    rc=$?
    echo "=== dry_bench_no_cuda: exit $rc"
    [[ $rc == 2 ]] || status=1
    step dry_moco_help 60 python3 bench/moco_cifar10.py --help
    echo "=== dry_methods_no_cuda: expecting exit 2"
    CUDA_VISIBLE_DEVICES="" python3 bench/bench_methods.py --gpu --data .device_data/cifar10 --no-write >/dev/null 2>&1
    rc=$?
    echo "=== dry_methods_no_cuda: exit $rc"
    [[ $rc == 2 ]] || status=1
    echo "=== dry run: exit $status"
    exit $status
fi
if [[ "$PART" == all || "$PART" == kernels ]]; then
    step tests 170 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_gpu_augment.py
    # CLIP at B=N 16k/64k/262k (fp32 up to 64k), the MoCo queue and a rank's local block, bf16 and fp32.
    step bench_kernels 270 python3 bench/bench_kernels.py --cases clip queue local --repeats 3 --max-seconds 8
    # The launch settings a measurement should decide: forward tile, S→G tile, G chunk rows, column splits.
    step bench_variants 110 python3 bench/bench_kernels.py --cases clip queue --sizes 65536 --dtypes bfloat16 \
        --providers triton --variants fwd-128x64 fwd-64x128-w4 grad-128x128 chunk-4096 no-split rows-1cta \
        --repeats 3 --max-seconds 3
fi
if [[ "$PART" == all || "$PART" == siglip ]]; then
    step siglip_tests 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_siglip.py
    # SigLIP's sigmoid loss at B=N 16k/64k/262k, D=768, bf16: Triton, naive torch, open_clip's SigLipLoss.
    step bench_siglip 220 python3 bench/bench_kernels.py --cases siglip --dtypes bfloat16 --repeats 3 --max-seconds 8
fi
if [[ "$PART" == all || "$PART" == moco ]]; then
    if [[ -f .device_data/cifar10/train.parquet ]]; then
        limit=$(awk -v m="$MOCO_MINUTES" 'BEGIN { printf "%d", m * 60 + 180 }')  # minutes may be fractional
        step moco_cifar10 "$limit" python3 bench/moco_cifar10.py --data .device_data/cifar10 \
            --methods moco --epochs 200 --minutes "$MOCO_MINUTES"
    else
        echo "=== moco_cifar10 skipped: .device_data/cifar10 was not carried"
        status=1
    fi
fi
if [[ "$PART" == methods ]]; then  # not in "all": the 15 minutes of a session hold kernels + one of these
    if [[ -f .device_data/cifar10/train.parquet ]]; then
        step methods_cifar10 540 python3 bench/bench_methods.py --gpu --data .device_data/cifar10 \
            --gpu-epochs "${METHODS_EPOCHS:-1}"
    else
        echo "=== methods_cifar10 skipped: .device_data/cifar10 was not carried"
        status=1
    fi
fi
cp bench/RESULTS.md "$OUT/" 2>/dev/null
cp bench/moco_cifar10.png "$OUT/" 2>/dev/null
exit $status
