#!/usr/bin/env bash
# One call on a GPU machine: install the carried wheels and ds-burst, then run the chosen stages.
#   bash launch/gpu_session.sh STAGE [STAGE ...]     stages: env tests kernels ring
# Results and logs go to $OUT (or ./results). Keeps NCCL_NVLS_ENABLE=0 (NVLink multicast off).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-results}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
  || { cat "$OUT/install.log"; exit 1; }
ngpu=$(python3 -c 'import torch; print(torch.cuda.device_count())')
for stage in "$@"; do
  echo "=== stage $stage ($(date -u +%H:%M:%S))"
  case $stage in
    env)
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
      python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
      ;;
    tests)
      python3 -m pytest -q -m gpu tests -x 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
      ;;
    kernels)
      python3 launch/bench_kernels.py --out "$OUT/kernels.json" --iters 3 2>&1 | tee "$OUT/kernels.log" | tail -40
      ;;
    ring)
      torchrun --nproc_per_node "$ngpu" launch/bench_ring.py --out "$OUT/ring.json" --check \
        --kernels triton torch --seqs 32768 131072 262144 --kv-heads 32 8 2>&1 | tee "$OUT/ring.log" \
        | grep -v -E "^\{|Warning|warn" | tail -45
      ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
