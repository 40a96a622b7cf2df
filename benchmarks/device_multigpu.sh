#!/usr/bin/env bash
# Issue 19 on a machine with N >= 2 GPUs (device kinds nvidia-h200-x2/x4/x8): `mmfree train`
# under torchrun with FSDP2 over NCCL, NVLink multicast off in every process.
#  1. build (sm_90, ~90 s), unless python/mmfree_ext/_C*.so exists;
#  2. weak scaling per size: 1 GPU at 4 rows x 2048 per step, then N GPUs at 4 rows per GPU:
#     tokens/s per GPU, scaling efficiency, peak memory per GPU (FSDP shards the optimizer state);
#  3. the 370M loss curve over STEPS steps at one global batch (8 rows) on 1 GPU (micro-batch 4,
#     accumulation 2) and on 2 GPUs (4 rows each), the 2-GPU run checkpointing halfway;
#  4. that checkpoint resumed on 1 GPU to the end: its curve against the 2-GPU run's;
#  5. benchmarks/compare_train_runs.py prints the table (JSON to $OUT).
#   SIZES="370M 1.3B" STEPS=200 WEAK_STEPS=60 bash benchmarks/device_multigpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mmfree-out}
RUNS=/tmp/mmfree-multigpu; rm -rf "$RUNS"; mkdir -p "$RUNS" "$OUT"
export PYTHONPATH=python${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# Never NVLink multicast on these shared hosts (the trainer sets the same; torchrun's workers
# inherit this environment too).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
SIZES=${SIZES:-"370M 1.3B"}
STEPS=${STEPS:-200}
WEAK_STEPS=${WEAK_STEPS:-60}
NGPU=$(nvidia-smi -L | wc -l)
echo "GPUs: $NGPU"; nvidia-smi topo -m 2>/dev/null | head -$((NGPU + 1))
[ "$NGPU" -ge 2 ] || { echo "needs 2 or more GPUs"; exit 2; }

if ! ls python/mmfree_ext/_C*.so >/dev/null 2>&1; then
  cmake -S . -B build/gpu -G Ninja -DPython_EXECUTABLE="$(command -v python3)" -DMMFREE_CUDA_ARCHS=90 \
    -DMMFREE_COPY_TO_SOURCE=ON > "$OUT/build.log" 2>&1 && cmake --build build/gpu -j 16 >> "$OUT/build.log" 2>&1 \
    || { tail -40 "$OUT/build.log"; exit 1; }
fi

train() {  # train <gpus> <size> <name> <steps> [flags...]
  local gpus=$1 size=$2 name=$3 steps=$4; shift 4
  echo "=== $name: $gpus GPU(s), $size, $steps steps ($(date +%T))"
  timeout "${RUN_TIMEOUT:-600}" torchrun --standalone --nproc_per_node="$gpus" -m mmfree_ext train \
    "python/mmfree_ext/train/configs/$size.toml" --train.out_dir "$RUNS/$name" --train.steps "$steps" \
    --optim.warmup_steps 20 --log.progress false --log.every 10 --log.print_every 50 \
    --checkpoint.export false "$@" > "$RUNS/$name.log" 2>&1
  echo "rc=$?"; grep -v -i warn "$RUNS/$name.log" | tail -3
}

for size in $SIZES; do
  synth=(--data.source synthetic --data.synthetic_tokens 20000000 --checkpoint.every 0 --checkpoint.at_end false)
  train 1 "$size" "${size}_1gpu" "$WEAK_STEPS" "${synth[@]}" --train.global_batch 4
  train "$NGPU" "$size" "${size}_${NGPU}gpu" "$WEAK_STEPS" "${synth[@]}" --train.global_batch $((4 * NGPU))
  python3 benchmarks/compare_train_runs.py --ref "1gpu=$RUNS/${size}_1gpu:1" \
    --run "${NGPU}gpu=$RUNS/${size}_${NGPU}gpu:$NGPU" --json "$OUT/scaling_${size}.json"
done

# Loss curves at one global batch (the demo corpus: real text, so the curve moves).
curve=(--data.source stdlib --train.global_batch 8 --train.micro_batch 4)
train 1 370M curve_1gpu "$STEPS" "${curve[@]}" --checkpoint.every 0 --checkpoint.at_end false
train 2 370M curve_2gpu "$STEPS" "${curve[@]}" --checkpoint.every $((STEPS / 2)) --checkpoint.keep 0 \
  --checkpoint.at_end false
ckpt=$(ls -d "$RUNS"/curve_2gpu/checkpoints/step_* 2>/dev/null | head -1)
if [ -n "$ckpt" ]; then
  train 1 370M resume_1gpu "$STEPS" "${curve[@]}" --checkpoint.resume "$ckpt" --checkpoint.every 0 \
    --checkpoint.at_end false
fi
python3 benchmarks/compare_train_runs.py --ref "1gpu=$RUNS/curve_1gpu:1" --run "2gpu=$RUNS/curve_2gpu:2" \
  --skip 20 --json "$OUT/curve_370M.json"
[ -n "$ckpt" ] && python3 benchmarks/compare_train_runs.py --ref "2gpu=$RUNS/curve_2gpu:2" \
  --run "resumed_1gpu=$RUNS/resume_1gpu:1" --skip 20 --json "$OUT/resume_370M.json"
tar czf "$OUT/multigpu_runs.tgz" -C "$RUNS" --exclude checkpoints .
