#!/usr/bin/env bash
# One call on a GPU machine: install the carried wheels, then run the chosen stages, each under a time limit.
#   bash launch/gpu_session.sh STAGE[:SECONDS] ...     stages: env tests kernels kernels_long ring
# Full logs go to $OUT (or ./results); the tail of each is printed. Keeps NCCL_NVLS_ENABLE=0.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export DS_BURST_TRITON_AUTOTUNE=${DS_BURST_TRITON_AUTOTUNE:-0}
OUT=${OUT:-results}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    || exit 1
fi
# No package index there: make `ds_burst.kernels` importable from the checkout itself (setup.py maps it).
[ -e ds_burst/kernels ] || ln -s ../kernels ds_burst/kernels
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}:/tmp/site
ngpu=$(python3 -c 'import torch; print(torch.cuda.device_count())')
echo "autotune=$DS_BURST_TRITON_AUTOTUNE gpus=$ngpu"
for spec in "$@"; do
  stage=${spec%%:*}
  limit=${spec#*:}; [ "$limit" = "$spec" ] && limit=300
  echo "=== stage $stage (limit ${limit}s, $(date -u +%H:%M:%S))"
  case $stage in
    env)
      timeout "$limit" nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
      python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' ;;
    tests)
      timeout "$limit" python3 -m pytest -q -m gpu tests -v --durations=10 >"$OUT/gpu_tests.log" 2>&1
      grep -E "PASSED|FAILED|ERROR|passed|failed" "$OUT/gpu_tests.log" | tail -25 ;;
    kernels)
      timeout "$limit" python3 launch/bench_kernels.py --out "$OUT/kernels.json" --seqs 8192 32768 \
        --iters 3 >"$OUT/kernels.log" 2>&1
      grep -v "^{" "$OUT/kernels.log" | tail -22 ;;
    kernels_long)
      timeout "$limit" python3 launch/bench_kernels.py --out "$OUT/kernels_long.json" --seqs 131072 \
        --head-dims 128 --iters 3 >"$OUT/kernels_long.log" 2>&1
      grep -v "^{" "$OUT/kernels_long.log" | tail -10 ;;
    ring)
      timeout "$limit" torchrun --nproc_per_node "$ngpu" launch/bench_ring.py --out "$OUT/ring.json" --check \
        --kernels triton torch --seqs 32768 131072 262144 --kv-heads 32 8 \
        --schedules ring double_ring ulysses_ring --gpus-per-node $(( ngpu > 1 ? ngpu / 2 : 1 )) >"$OUT/ring.log" 2>&1
      grep -E "CHECK|^method|^ds-burst|^ulysses|^torch-cp|Error|error" "$OUT/ring.log" | tail -45 ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
  echo "=== stage $stage done rc=$? ($(date -u +%H:%M:%S))"
done
