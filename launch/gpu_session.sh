#!/usr/bin/env bash
# One call on a GPU machine: install the carried wheels, then run the chosen stages, each under a time limit.
#   bash launch/gpu_session.sh STAGE[:SECONDS] ...
# Stages: env tests tests_triton tests_hopper tests_kernels tests_new overhead documents tiles ring ring_sched ring_long kernels
# equiv attn_mem llama8b train_burst train_ulysses memory calibrate e2e e2e_trainer header kernels_small kernels_before
# max_logit tile_rates emulate alst_memory alst_max launch kernels_softcap emulate_host.
# Kernel changes, before/after (the same files and options on both trees; run it on each, compare kernels.json and
# tiles.json): bash launch/gpu_session.sh env tests_kernels:900 kernels:900 tiles:600
# Full logs go to $OUT (or ./results); the tail of each is printed. Keeps NCCL_NVLS_ENABLE=0.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export DS_BURST_TRITON_AUTOTUNE=${DS_BURST_TRITON_AUTOTUNE:-0} WANDB_MODE=offline
OUT=${OUT:-results}
OUT=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
export DS_BURST_KERNEL_CACHE=$OUT/kernel_choice.json
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    || exit 1
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}:/tmp/site
export PATH=/tmp/site/bin:$PATH
ngpu=$(python3 -c 'import torch; print(torch.cuda.device_count())')
echo "autotune=$DS_BURST_TRITON_AUTOTUNE gpus=$ngpu"
ring() {  # ring benchmark on every GPU: ring <name> <args...>
  local name=$1; shift
  timeout "$limit" torchrun --nproc_per_node "$ngpu" launch/bench_ring.py --out "$OUT/$name.json" "$@" \
    >"$OUT/$name.log" 2>&1
  echo "rc=$?"
  grep -E "CHECK|^method|^ds-burst|^ulysses|^torch-cp|Error|error" "$OUT/$name.log" | tail -40
}
train() {  # train <name> <overrides...>
  local name=$1; shift
  timeout "$limit" python3 -m deepspeed.launcher.runner --num_gpus "$ngpu" launch/train.py \
    --config "${TRAIN_CONFIG:-configs/h200x2_llama_128k.json}" --override "train.output_dir=$OUT/$name" "$@" \
    >"$OUT/$name.log" 2>&1
  echo "rc=$?"
  grep -vE "^\[|Warning|warn" "$OUT/$name.log" | tail -25
}
for spec in "$@"; do
  stage=${spec%%:*}
  limit=${spec#*:}; [ "$limit" = "$spec" ] && limit=300
  echo "=== stage $stage (limit ${limit}s, $(date -u +%H:%M:%S))"
  case $stage in
    env)
      timeout "$limit" nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
      python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' ;;
    tests)
      timeout "$limit" python3 -m pytest -q -m gpu -v --durations=15 tests/test_gpu_ring.py \
        tests/test_gpu_schedules.py tests/test_sdpa_kernel.py >"$OUT/gpu_tests.log" 2>&1
      grep -E "PASSED|FAILED|ERROR|passed|failed|Error" "$OUT/gpu_tests.log" | tail -40 ;;
    tests_triton)
      timeout "$limit" python3 -m pytest -q -m gpu -v tests/test_triton_kernels.py >"$OUT/gpu_tests_triton.log" 2>&1
      grep -E "PASSED|FAILED|ERROR|passed|failed" "$OUT/gpu_tests_triton.log" | tail -20 ;;
    tests_hopper)  # the Gluon Hopper tiles against float64 (forward and backward, every mask case)
      timeout "$limit" python3 -m pytest -q -m gpu -v tests/test_hopper_kernels.py ${HOPPER_K:+-k "$HOPPER_K"} \
        >"$OUT/gpu_tests_hopper.log" 2>&1
      grep -E "FAILED|ERROR|passed|failed" "$OUT/gpu_tests_hopper.log" | tail -20 ;;
    max_logit)  # the maximum logit (QK-clip): the GPU tests of every path, then its cost (each under the limit)
      timeout "$limit" python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_max_logit_kernels.py \
        tests/test_max_logit.py >"$OUT/max_logit_tests.log" 2>&1; echo "rc=$?"
      grep -E "FAILED|ERROR|passed|failed" "$OUT/max_logit_tests.log" | tail -20 | cut -c1-300
      timeout "$limit" python3 launch/bench_max_logit.py --out "$OUT/max_logit.json" --methods hopper tl sdpa call \
        >"$OUT/max_logit_bench.log" 2>&1; echo "rc=$?"; grep -vE "^\{" "$OUT/max_logit_bench.log" | tail -40 ;;
    tests_kernels)  # the gpu cases of every kernel test file, then the conformance suite and layering check on CUDA
      timeout "$limit" python3 -m pytest -q -v -m gpu tests/test_triton_kernels.py tests/test_triton_variants.py \
        tests/test_hopper_kernels.py tests/test_sdpa_kernel.py tests/test_attention_variants.py tests/test_hot_path.py \
        >"$OUT/gpu_tests_kernels.log" 2>&1; echo "rc=$?"
      timeout "$limit" python3 -m pytest -q tests/test_kernel_conformance.py tests/test_layers.py \
        >>"$OUT/gpu_tests_kernels.log" 2>&1; echo "rc=$?"
      grep -E "FAILED|ERROR|passed|failed" "$OUT/gpu_tests_kernels.log" | tail -30 ;;
    tiles)  # ring-step tile kinds: Hopper tiles against the tl tiles and cuDNN, forward and backward
      timeout "$limit" python3 launch/bench_tiles.py --out "$OUT/tiles.json" --seqs 16384 32768 65536 --iters 2 \
        >"$OUT/tiles.log" 2>&1
      echo "rc=$?"; tail -20 "$OUT/tiles.log" ;;
    ring)  # flat ring, both fast kernels, against every peer, 128K and 256K
      ring ring --check --kernels triton sdpa --schedules ring --seqs 131072 262144 --kv-heads 32 8 ;;
    ring_sched)  # topology-aware schedules (2 GPUs = 2 nodes x 1 GPU)
      ring ring_sched --no-peers --kernels triton sdpa --schedules double_ring ulysses_ring --gpus-per-node 1 \
        --seqs 131072 262144 --kv-heads 32 8 ;;
    ring_long)  # 512K and 1M: the flat ring against Ulysses with cuDNN
      ring ring_long --kernels sdpa --schedules ring --peers ulysses-cudnn --seqs 524288 1048576 \
        --kv-heads 8 --iters 1 ;;
    tests_new)  # GPU tests of this round's features (bf16 Triton/sdpa paths of variants and documents)
      timeout "$limit" python3 -m pytest -q -m gpu -v --durations=15 ${NEW_GPU_TESTS:-tests/test_hot_path.py} \
        >"$OUT/gpu_tests_new.log" 2>&1
      grep -E "PASSED|FAILED|ERROR|passed|failed|Error" "$OUT/gpu_tests_new.log" | tail -60 ;;
    overhead)  # per-call cost at P=1: ds-burst fwd+bwd against raw SDPA cuDNN, host time per call
      timeout "$limit" python3 launch/bench_overhead.py --out "$OUT/overhead.json" ${OVERHEAD_ARGS:-} \
        >"$OUT/overhead.log" 2>&1
      echo "rc=$?"; tail -22 "$OUT/overhead.log" ;;
    documents)  # packed documents on one GPU: ds-burst's local kernels against FlexAttention and cuDNN per document
      timeout "$limit" python3 launch/bench_documents.py --out "$OUT/documents.json" >"$OUT/documents.log" 2>&1
      echo "rc=$?"; tail -30 "$OUT/documents.log" ;;
    kernels)
      timeout "$limit" python3 launch/bench_kernels.py --out "$OUT/kernels.json" --seqs 8192 32768 131072 \
        --head-dims 64 128 --iters 2 >"$OUT/kernels.log" 2>&1
      grep -v "^{" "$OUT/kernels.log" | tail -40 ;;
    equiv)  # ZeRO-3 bf16: SP=2 on 2 GPUs against SP=1 on 1 GPU, 3 steps, checkpointing off/torch/deepspeed
      python3 -c "import numpy as np; from ds_burst.training.data import write_token_file; \
write_token_file('$OUT/equiv_tokens.bin', np.random.default_rng(0).integers(0, 1024, size=1 << 16))"
      for sp in 1 2; do
        timeout "$limit" python3 -m deepspeed.launcher.runner --num_gpus $sp tests/ds_equivalence_worker.py --gpu \
          --sp $sp --mbs 2 --seq-len 8192 --data "$OUT/equiv_tokens.bin" --out "$OUT/equiv_sp$sp.pt" \
          >"$OUT/equiv_sp$sp.log" 2>&1; echo "sp=$sp rc=$?"
      done
      python3 tests/ds_equivalence_worker.py --compare "$OUT/equiv_sp1.pt" "$OUT/equiv_sp2.pt" | tee "$OUT/equiv.txt"
      rm -f "$OUT"/equiv_sp*.pt "$OUT/equiv_tokens.bin" ;;
    attn_mem)  # attention alone, forward+backward peak: ds-burst (auto; Triton at 128K) against Ulysses
      for s in 131072 524288; do
        timeout "$limit" torchrun --nproc_per_node "$ngpu" launch/bench_memory.py --out "$OUT/attn_mem_$s.json" \
          --seq $s --skip-model >"$OUT/attn_mem_$s.log" 2>&1; echo "S=$s rc=$?"
        grep -E "^attention" "$OUT/attn_mem_$s.log" | tail -4
      done
      timeout "$limit" torchrun --nproc_per_node "$ngpu" launch/bench_memory.py --out "$OUT/attn_mem_triton.json" \
        --seq 131072 --skip-model --kernel triton --no-peers >"$OUT/attn_mem_triton.log" 2>&1; echo "triton rc=$?"
      grep -E "^attention" "$OUT/attn_mem_triton.log" | tail -3 ;;
    llama8b)  # whole Llama-8B-shaped training jobs, ZeRO-3 + optimizer offload: RUNS="ds-burst:128K ..." STEPS=2
      PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout "$limit" python3 launch/bench_train_memory.py \
        --config configs/h200x2_llama8b.json --gpus "$ngpu" --runs ${RUNS:-ds-burst:128K ulysses:128K} \
        --steps "${STEPS:-2}" --timeout "${JOB_TIMEOUT:-420}" --workdir "${WORKDIR:-$OUT/llama8b}" \
        --out "$OUT/${NAME:-llama8b}.json" >"$OUT/${NAME:-llama8b}.log" 2>&1
      echo "rc=$?"; grep -vE "^\[|Warning|warn" "$OUT/${NAME:-llama8b}.log" | tail -12
      for f in "${WORKDIR:-$OUT/llama8b}"/*/log.txt; do echo "--- $f"; grep -E "\[train\] (step|summary)|Error" "$f" | tail -3
      done ;;
    train_burst) train train_burst ;;
    train_ulysses) train train_ulysses train.attention=ulysses ;;
    memory)  # 128K: every memory option; 512K: the main ones (Llama-8B-shaped layers, 2 of them)
      timeout "$limit" torchrun --nproc_per_node "$ngpu" launch/bench_memory.py --out "$OUT/memory.json" \
        --seq 131072 --layers 2 >"$OUT/memory.log" 2>&1
      echo "rc=$?"; grep -v "^W1\|^\[" "$OUT/memory.log" | tail -25
      timeout "$limit" torchrun --nproc_per_node "$ngpu" launch/bench_memory.py --out "$OUT/memory_512k.json" \
        --seq 524288 --layers 2 --variants ckpt keep_half offload >"$OUT/memory_512k.log" 2>&1
      echo "rc=$?"; grep -v "^W1\|^\[" "$OUT/memory_512k.log" | tail -15 ;;
    calibrate)
      timeout "$limit" torchrun --nproc_per_node "$ngpu" -m ds_burst.plan calibrate --out "$OUT/calibration.json" \
        >"$OUT/calibrate.log" 2>&1
      echo "rc=$?"; tail -15 "$OUT/calibrate.log" ;;
    e2e)  # one GPU, every user path, bf16 (docs: tests/test_gpu_e2e.py): launch/train.py plain + packed under the
          # DeepSpeed launcher (ZeRO-3, wandb offline), then the GPU tests: HF families with packed documents three ways
          # + shard_batch, HF Trainer / TRL vs sdpa, DistributedAttention, torch.compile; writes e2e_train.log,
          # e2e_tests.log and e2e.json (measured errors, losses, train summaries) to $OUT. E2E_TRAIN_OVERRIDES: more
          # launch/train.py --override entries (e.g. "train.steps=2 train.seq_len=256" for a CPU dry run). About 400 s on
          # one H100 (train jobs ~100 s, tests ~290 s)
      t0=$(date +%s); left() { echo $((limit - ($(date +%s) - t0) - ${1:-0})); }
      export DS_BURST_E2E_JSON=$OUT/e2e.json; rm -f "$DS_BURST_E2E_JSON" "$OUT/e2e_train.log"
      for name in tiny packed; do
        rm -rf "/tmp/e2e_train_$name"
        jl=$(left 200); [ "$jl" -gt 150 ] && jl=150
        timeout "$jl" python3 -m deepspeed.launcher.runner --num_gpus 1 launch/train.py --config "configs/gpu1_$name.json" \
          --override "train.output_dir=/tmp/e2e_train_$name" ${E2E_TRAIN_OVERRIDES:-} >"/tmp/e2e_train_$name.log" 2>&1
        rc=$?; echo "train $name rc=$rc"
        { echo "=== train $name rc=$rc"; cat "/tmp/e2e_train_$name.log"; } >>"$OUT/e2e_train.log"
        grep -E "\[train\] (step [0-9]+/|packed documents)|Error|error:" "/tmp/e2e_train_$name.log" | grep -v "^\[20" \
          | tail -5 | cut -c1-220
      done
      timeout "$(left 15)" python3 -m pytest -q -m gpu -v -rs --durations=10 -p no:cacheprovider tests/test_gpu_e2e.py \
        >"$OUT/e2e_tests.log" 2>&1
      echo "pytest rc=$?"
      grep -E "FAILED|ERROR|SKIPPED|passed|failed|deselected|Timeout" "$OUT/e2e_tests.log" | tail -25 | cut -c1-250
      python3 launch/e2e_summary.py "$DS_BURST_E2E_JSON" --train tiny=/tmp/e2e_train_tiny packed=/tmp/e2e_train_packed ;;
    e2e_trainer)  # only the Trainer / TRL tests of the e2e stage (HF Trainer and TRL SFTTrainer with packing vs sdpa)
      export DS_BURST_E2E_JSON=$OUT/e2e_trainer.json; rm -f "$DS_BURST_E2E_JSON"
      timeout "$limit" python3 -m pytest -q -m gpu -v -rs -p no:cacheprovider tests/test_gpu_e2e.py -k trainer \
        >"$OUT/e2e_trainer.log" 2>&1
      echo "pytest rc=$?"; grep -E "FAILED|ERROR|passed|failed|Timeout" "$OUT/e2e_trainer.log" | tail -8 | cut -c1-250 ;;
    header)  # host cost of the per-call header round on gloo ranks of this host (CPU only)
      timeout "$limit" python3 launch/bench_header.py --worlds 2 4 8 --iters 300 --out "$OUT/header.json" \
        >"$OUT/header.log" 2>&1
      echo "rc=$?"; tail -5 "$OUT/header.log" ;;
    kernels_small|kernels_before)  # one shape set of bench_kernels; _before: the tree carried in .before/
      root=$PWD; [ "$stage" = kernels_before ] && root=$PWD/.before
      PYTHONPATH=$root:$PYTHONPATH timeout "$limit" python3 "$root/launch/bench_kernels.py" --out "$OUT/$stage.json" \
        --seqs 8192 32768 --head-dims 128 --methods ds-burst-triton sdpa-cudnn --iters 3 >"$OUT/$stage.log" 2>&1
      echo "rc=$?"; grep -v "^{" "$OUT/$stage.log" | tail -8 ;;
    tile_rates)  # the cost model's kernel term: rates against tile length, D 128 and 64 (calibrate --tiles)
      timeout "$limit" python3 -m ds_burst.plan calibrate --tiles --head-dims ${TILE_HEAD_DIMS:-128 64} \
        --out "$OUT/tiles.json" >"$OUT/tiles_calib.log" 2>&1
      echo "rc=$?"; tail -20 "$OUT/tiles_calib.log" | cut -c1-250 ;;
    emulate)  # one rank of a P-rank group on one GPU (fake process group) beside a Ulysses rank's cuDNN, for every
      # schedule at P 2..32 (8 GPUs per node), S 128K and 512K, the model's compute term from the tile table
      tiles=$OUT/tiles.json; [ -f "$tiles" ] || tiles=${TILES:-}
      timeout "$limit" python3 launch/bench_emulate.py --world 2 4 8 16 32 --seqs 131072 524288 --kv-heads 8 32 \
        --max-seq-kv 131072 --schedules ${EMU_SCHEDULES:-auto ring ulysses double_ring ulysses_ring} --gpus-per-node 8 \
        --kernels triton --iters 1 --warmup 0 ${tiles:+--tiles "$tiles"} --out "$OUT/emulate.json" \
        >"$OUT/emulate.log" 2>&1
      echo "rc=$?"; grep -v "^{" "$OUT/emulate.log" | tail -60 | cut -c1-260 ;;
    alst_memory)  # memory against DeepSpeed ALST on one GPU, a 3B Llama, ZeRO-3 + optimizer offload (issue 28)
      timeout "$limit" python3 launch/bench_alst_memory.py --model llama-3.2-3b --seqs ${ALST_SEQS:-4K 8K 16K} \
        ${ALST_METHODS:+--methods $ALST_METHODS} ${ALST_ARGS:-} \
        --steps 2 --timeout ${ALST_RUN_TIMEOUT:-110} --out "$OUT/alst_memory.json" >"$OUT/alst_memory.log" 2>&1
      echo "rc=$?"; grep -vE "^\[|Warning|warn" "$OUT/alst_memory.log" | tail -40 | cut -c1-260 ;;
    alst_max)  # one ds-burst step at the planner's longest sequence for this card and host (issue 28), the offload
      # planned the same way (ALST_HOST_FIXED: the process's own host memory in GiB; the rows of 2026-12-08 show 16.7-18)
      S=$(python3 -c "import sys, torch; sys.path.insert(0, 'launch'); import bench_alst_memory as b
total = torch.cuda.get_device_properties(0).total_memory / 2**30
print(b.planned_longest(b.model_shape('llama-3.2-3b', None), 2, total * (1 - b.MARGIN_FRACTION), b.host_total_gib(),
                        ${ALST_HOST_FIXED:-18})[0])")
      echo "planned longest sequence: $S"
      timeout "$limit" python3 launch/bench_alst_memory.py --model llama-3.2-3b --seqs "$S" --methods ds-burst --steps 1 \
        --timeout $((limit - 10)) --host-fixed-gib "${ALST_HOST_FIXED:-18}" --out "$OUT/alst_max.json" \
        >"$OUT/alst_max.log" 2>&1
      echo "rc=$?"; grep -vE "^\[|Warning|warn|BENCH_ALST_RESULT" "$OUT/alst_max.log" | tail -12 | cut -c1-260 ;;
    kernels_softcap)  # softcap against the plain kernel and cuDNN, D=128, 8K and 32K (issue 26)
      timeout "$limit" python3 launch/bench_kernels.py --out "$OUT/kernels_softcap.json" --seqs ${KS_SEQS:-8192 32768} \
        --head-dims 128 --methods ds-burst-triton ds-burst-triton-softcap sdpa-cudnn --iters 3 --hopper-softcap \
        >"$OUT/kernels_softcap.log" 2>&1
      echo "rc=$?"; grep -v "^{" "$OUT/kernels_softcap.log" | tail -16 | cut -c1-250 ;;
    emulate_host)  # the host-bound cells: one rank of P=16/32 at 128K, flat ring, Hkv=8, 3 timed iterations, with
      # the light launch and without it (DS_BURST_FAST_LAUNCH=0), each under half the limit (the two differ only
      # once fast_launch.TRITON_RELEASES declares the light launch for this triton)
      for fast in 1 0; do
        DS_BURST_FAST_LAUNCH=$fast timeout $((limit / 2)) python3 launch/bench_emulate.py --world 16 32 --seqs 131072 \
          --kv-heads 8 --schedules ring --gpus-per-node 8 --kernels triton --iters 3 --warmup 1 \
          --out "$OUT/emulate_host_fast$fast.json" >"$OUT/emulate_host_fast$fast.log" 2>&1
        echo "light launch $fast: rc=$?"; grep -v "^{" "$OUT/emulate_host_fast$fast.log" | tail -6 | cut -c1-260
      done ;;
    launch)  # host time of one Hopper kernel launch and where it goes (issue 26's light launch)
      timeout "$limit" python3 launch/bench_launch.py --out "$OUT/launch.json" ${LAUNCH_ARGS:-} >"$OUT/launch.log" 2>&1
      echo "rc=$?"; head -12 "$OUT/launch.log" | cut -c1-250 ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
  echo "=== stage $stage done ($(date -u +%H:%M:%S))"
done
