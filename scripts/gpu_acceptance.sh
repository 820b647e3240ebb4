#!/usr/bin/env bash
# GPU acceptance in one command (docs/VLM.md, "GPU acceptance"): on a GPU machine with this repository
# and its environment already installed (no network there: nothing is installed, nothing downloaded).
#
#   bash scripts/gpu_acceptance.sh                          # ~5-8 min on one H100
#   STAGE2_QWEN_VL_DIR=/ckpt/Qwen3-VL-2B bash scripts/gpu_acceptance.sh   # + the real-checkpoint invariants
#
# Runs, each under its own time cap (the caps sum to under 8 minutes):
#   gpu_tests        pytest -m gpu (weight-sync buckets on CUDA, NCCL with 2 GPUs, CUDA-vLLM colocate parity)
#   hf_qwen3_bf16    20 steps of smoke/vlm_qwen3_ab_mixed (tiny Qwen3-VL, DoRA) in bf16, HF rollouts
#   colocate_qwen3   the same 20 steps with vLLM colocate            (needs a CUDA build of vLLM)
#   server_qwen3     the same 20 steps with a vLLM server, NCCL sync  (needs CUDA vLLM and 2 GPUs)
#   real_checkpoint  tests/vlm/test_real_checkpoint.py on STAGE2_QWEN_VL_DIR (needs the variable)
# and prints one table: check | result | seconds | tok/s (mean rollout/gen_tokens_per_s of the B steps).
# A check that cannot run here is listed as SKIP with the reason; the exit code is 1 when any check FAILs.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=$(command -v python3 || command -v python); fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
unset DS_ACCELERATOR  # DeepSpeed picks CUDA itself
OUT=${STAGE2_ACCEPTANCE_DIR:-$(mktemp -d /tmp/stage2_acceptance.XXXXXX)}
mkdir -p "$OUT"
PROFILE=smoke/vlm_qwen3_ab_mixed
ROWS=()

row() { ROWS+=("$(printf '%-16s | %-6s | %7s | %8s | %s' "$1" "$2" "$3" "$4" "$5")"); }

# mean rollout/gen_tokens_per_s over the rows of a metrics.jsonl that have it ("-" when none)
tok_s() {
  "$PY" - "$1" <<'EOF' 2>/dev/null || echo "-"
import json, sys
vals = [r["rollout/gen_tokens_per_s"] for r in map(json.loads, open(sys.argv[1])) if "rollout/gen_tokens_per_s" in r]
print(f"{sum(vals) / len(vals):.0f}" if vals else "-")
EOF
}

# run NAME CAP_S KIND CMD...: time it under a cap, log to $OUT/NAME.log, add a row (tok/s from
# $OUT/NAME/metrics.jsonl); KIND pytest|train (a pytest run where nothing passed is a SKIP, reasons shown)
run() {
  local name=$1 cap=$2 kind=$3; shift 3
  local t0=$SECONDS
  timeout --kill-after=15 "$cap" "$@" >"$OUT/$name.log" 2>&1
  local rc=$? secs=$((SECONDS - t0)) result=PASS note="log: $OUT/$name.log"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then result=FAIL note="timed out after ${cap}s; $note"
  elif [ $rc -eq 5 ] && [ "$kind" = pytest ]; then result=SKIP note="no test collected; $note"
  elif [ $rc -ne 0 ]; then result=FAIL note="exit $rc; $note"
  elif [ "$kind" = pytest ] && ! grep -qE '[0-9]+ passed' "$OUT/$name.log"; then
    result=SKIP note="every test skipped: $(grep -m1 -oE 'SKIPPED.*' "$OUT/$name.log" | cut -c1-80); $note"
  fi
  local tps="-"
  [ -f "$OUT/$name/metrics.jsonl" ] && tps=$(tok_s "$OUT/$name/metrics.jsonl")
  row "$name" "$result" "$secs" "$tps" "$note"
}

train_sets() {  # the 20-step bf16 run of the smoke profile, output under $OUT/$1
  echo --set model.torch_dtype=bfloat16 --set rollout_matching.vllm.dtype=bfloat16 --set training.max_steps=20 \
       --set training.eval_steps=20 --set training.save_steps=20 --set "training.output_dir=$OUT/$1" \
       --set "training.logging_dir=$OUT/$1/tb"
}

# ---- what this machine has ------------------------------------------------------------------------------
read -r NGPU CUDA_VLLM < <("$PY" - <<'EOF' 2>/dev/null || echo "0 no"
import importlib.util
import torch
n = torch.cuda.device_count() if torch.cuda.is_available() else 0
cuda_vllm = "no"
if n and importlib.util.find_spec("vllm") is not None:
    try:
        from vllm.platforms import current_platform
        cuda_vllm = "yes" if current_platform.is_cuda() else "no"
    except Exception:
        cuda_vllm = "no"
print(n, cuda_vllm)
EOF
)
echo "gpu_acceptance: $NGPU CUDA device(s), CUDA vLLM: $CUDA_VLLM, python: $PY, logs: $OUT" >&2

if [ "${NGPU:-0}" -lt 1 ]; then
  for c in gpu_tests hf_qwen3_bf16 colocate_qwen3 server_qwen3 real_checkpoint; do
    row "$c" SKIP - - "no CUDA device visible to torch (torch.cuda.is_available() is False)"
  done
else
  run gpu_tests 80 pytest "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider tests/rollout_vllm/test_gpu.py tests/launch/test_gpu_placement.py

  # shellcheck disable=SC2046  # train_sets prints separate words on purpose
  run hf_qwen3_bf16 80 train "$PY" -m toolkit.train --profile "$PROFILE" $(train_sets hf_qwen3_bf16) \
      --set rollout_matching.rollout_backend=hf

  if [ "$CUDA_VLLM" = yes ]; then
    # shellcheck disable=SC2046
    run colocate_qwen3 110 train "$PY" -m toolkit.train --profile "$PROFILE" $(train_sets colocate_qwen3) \
        --set rollout_matching.rollout_backend=vllm --set rollout_matching.vllm.mode=colocate \
        --set rollout_matching.vllm.gpu_memory_utilization=0.3
  else
    row colocate_qwen3 SKIP - - "vLLM is not importable as a CUDA build here (vllm missing or the CPU build)"
  fi

  if [ "$CUDA_VLLM" = yes ] && [ "$NGPU" -ge 2 ]; then
    # shellcheck disable=SC2046
    run server_qwen3 140 train "$PY" -c "from launchers.cli import main; main()" launch --profile "$PROFILE" \
        --gpus 0 --server-gpus 1 $(train_sets server_qwen3) \
        --set rollout_matching.rollout_backend=vllm --set rollout_matching.vllm.mode=server
  elif [ "$CUDA_VLLM" = yes ]; then
    row server_qwen3 SKIP - - "one GPU: the server's NCCL weight-sync group cannot share the learner's device (docs/VLLM.md)"
  else
    row server_qwen3 SKIP - - "vLLM is not importable as a CUDA build here (vllm missing or the CPU build)"
  fi

  if [ -n "${STAGE2_QWEN_VL_DIR:-}" ]; then
    run real_checkpoint 60 pytest "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider tests/vlm/test_real_checkpoint.py
  else
    row real_checkpoint SKIP - - "STAGE2_QWEN_VL_DIR is not set (a local Qwen2-VL/Qwen2.5-VL/Qwen3-VL checkpoint folder)"
  fi
fi

# ---- the table ------------------------------------------------------------------------------------------
printf '%-16s | %-6s | %7s | %8s | %s\n' check result seconds "tok/s" note
printf '%s\n' "-----------------+--------+---------+----------+------------------------------------------"
printf '%s\n' "${ROWS[@]}"
for r in "${ROWS[@]}"; do
  [[ $r == *"| FAIL |"* ]] && exit 1
done
exit 0
