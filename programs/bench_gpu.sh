#!/usr/bin/env bash
# The GPU half of the many-conversations benchmarks (issue 10): bench_sessions (generation, weights)
# and bench_weights_step on a randomly initialised model of Qwen2.5-1.5B's shape in bfloat16.
#
# Made for a lent GPU machine that has python3 with a CUDA torch but no network and no DSPy: the
# Python packages it lacks travel as .device/site312.tar.xz (built by programs/bench_gpu_pack.sh) and
# the tokenizer as .device/tokenizer.tar.xz (the embedded model's; see programs/random_model.py).
# Results: results/bench_sessions_gpu.json, results/bench_weights_step_gpu.json (copied to $OUT).
# The main-job part of bench_sessions is not run by default: with a random model its conversations are
# noise (every answer and refinement runs to its token limit, nothing is ever solved), so only its
# timings mean something. PARTS=main MAIN_TASKS=2 times it on the first 2 of the config's tasks.
set -u
OUT=${OUT:-results}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 LITELLM_LOCAL_MODEL_COST_MAP=True ROSA2_CACHE_DIR=/tmp/rosa2-cache
python3 - <<'EOF'
import sys, tarfile, torch
print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU", flush=True)
tarfile.open(".device/site312.tar.xz").extractall("/tmp/site")
if sys.version_info[:2] == (3, 13):  # the compiled packages for 3.13 replace those for 3.12
    tarfile.open(".device/site313-overlay.tar.xz").extractall("/tmp/site")
tarfile.open(".device/tokenizer.tar.xz").extractall("/tmp/tokenizer")
EOF
export PYTHONPATH=/tmp/site:$PWD
MODEL=${MODEL:-random:qwen2.5-1.5b} DEVICE=${DEVICE:-cuda}
ARGS="--model $MODEL --tokenizer /tmp/tokenizer --device $DEVICE --dtype bfloat16"
python3 -c "import dspy, transformers, peft; print('dspy', dspy.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
timeout "${SESSIONS_TIMEOUT:-240}" python3 -m programs.bench_sessions $ARGS --parts ${PARTS:-generation,weights} \
  --conversations 1,2,4,8,16,32,64 --max-batch 64 --max-new-tokens 128 ${MAIN_TASKS:+--main-tasks $MAIN_TASKS} \
  --name bench_sessions_gpu 2>&1 \
  | grep -v -i warn | tee "$OUT/bench_sessions_gpu.log"
cp results/bench_sessions_gpu.json "$OUT/" 2>/dev/null
[ "${SKIP_WEIGHTS_STEP:-0}" = 1 ] || timeout "${WEIGHTS_TIMEOUT:-150}" python3 -m programs.bench_weights_step $ARGS --ttt-max-steps 200 \
  --name bench_weights_step_gpu 2>&1 | grep -v -i warn | tee "$OUT/bench_weights_step_gpu.log"
cp results/bench_weights_step_gpu.json "$OUT/" 2>/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
true
