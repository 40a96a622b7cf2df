#!/usr/bin/env bash
# Issue 17 / issue 12 item 4 on one H200 (the extension already built, PYTHONPATH=python):
#  1. benchmarks/bench_train_model.py eager: ours vs bf16 Llama (transformers), 370M and 1.3B,
#     batch 4 x 2048, AdamW, bf16 params: tokens/s and peak memory;
#  2. `mmfree train` on the shipped 370M and 1.3B configs (bf16, eager), synthetic tokens,
#     40 / 30 steps: tokens/s (after the first log window) and peak memory, to set beside 1.;
#     then 370M on packed ~1000-token documents (cu_seqlens: the varlen scan path);
#  3. the same benchmark with the loss under torch.compile (fullgraph for ours);
#  4. (COMPILE=1) `mmfree train --train.compile true` on both configs.
# Each step is time-boxed (at most 300 s in all without COMPILE=1; compiling four models may not all
# fit in 100 s: each case is saved as it finishes); logs and JSON go to $OUT/train.tgz.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mmfree-out}
LOG=/tmp/mmfree-train; rm -rf "$LOG"; mkdir -p "$LOG" "$OUT"
export PYTHONPATH=python${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
run() {  # run <seconds> <name> <command...>
  local secs=$1 name=$2; shift 2
  echo "=== $name ($(date +%T))"
  timeout "$secs" "$@" > "$LOG/$name.log" 2>&1
  echo "rc=$?" >> "$LOG/$name.log"
  grep -v -E "Warning|warn\(" "$LOG/$name.log" | tail -${TAIL:-25}
  tar czf "$OUT/train.tgz" -C "$LOG" .
}
train() {  # train <seconds> <size> <steps> <name> [flags...]
  local secs=$1 size=$2 steps=$3 name=$4; shift 4
  run "$secs" "$name" python3 -m mmfree_ext train "python/mmfree_ext/train/configs/$size.toml" \
    --data.source synthetic --data.synthetic_tokens 4000000 --train.steps "$steps" \
    --train.out_dir "$LOG/run_$name" --optim.warmup_steps 5 --checkpoint.every 0 --checkpoint.at_end false \
    --checkpoint.export false --log.progress false --log.every 10 --log.print_every 10 "$@"
}
if ! ls python/mmfree_ext/_C*.so >/dev/null 2>&1; then
  echo "no built extension in python/mmfree_ext/: build first (about 90 s), e.g."
  echo "  cmake -S . -B build/gpu -G Ninja -DPython_EXECUTABLE=\$(command -v python3) -DMMFREE_CUDA_ARCHS=90 \\"
  echo "        -DMMFREE_COPY_TO_SOURCE=ON && cmake --build build/gpu -j 16"
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
TAIL=12 run 75 bench_eager python3 benchmarks/bench_train_model.py --device cuda --modes eager \
  --json "$LOG/bench_train_model_eager.json"
train 40 370M 40 train_370M
train 50 1.3B 30 train_1.3B
# packed documents of ~1000 tokens: cu_seqlens through the varlen scan (cost of the resets)
train 35 370M 30 train_370M_varlen --data.synthetic_doc_len 1000
TAIL=12 run 100 bench_compiled python3 benchmarks/bench_train_model.py --device cuda --modes compiled \
  --json "$LOG/bench_train_model_compiled.json"
if [ "${COMPILE:-0}" = 1 ]; then
  train 120 370M 40 train_370M_compiled --train.compile true
  train 150 1.3B 30 train_1.3B_compiled --train.compile true
fi
cp "$LOG"/*.json "$OUT"/ 2>/dev/null
tar czf "$OUT/train.tgz" -C "$LOG" .
