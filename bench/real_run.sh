#!/usr/bin/env bash
# The real run behind BENCHMARKS.md ("Trade-off on recorded traces"): record full traces once, then
# replay every policy on them (sweep, calibrate, dynamics figure, HTML report).
# Re-running resumes the recordings where they stopped (done questions are skipped).
# Model: the qwen2.5-coder-0.5b preset (Qwen2.5-Coder-0.5B-Instruct Q4_K_M) on llama.cpp, 2 CPU cores.
# It is NOT a reasoning model: it writes one chain-of-thought answer; blank lines are its steps.
set -euo pipefail
cd "$(dirname "$0")/.."
R=bench/results
MODEL=${MODEL:-qwen2.5-coder-0.5b}
GSM8K_N=${GSM8K_N:-200}
MATH_N=${MATH_N:-100}
DATA=${CODESTOP_SHARED_DATA:-../shared/data}
SAMPLING=(--temperature 0.7 --top-p 0.8 --top-k 20 --seed 0)

# 1. traces: no stopping, a probe at every step boundary, a 1024-token cap (SKIP_RECORD=1: analyse
#    the traces already there)
if [ "${SKIP_RECORD:-0}" != 1 ]; then
codestop record --dataset gsm8k --data "$DATA/gsm8k_test.jsonl" --limit "$GSM8K_N" \
  --model "$MODEL" --engine llamacpp --max-reasoning-tokens 1024 --probe-interval 1 "${SAMPLING[@]}" \
  --out "$R/gsm8k-$MODEL.traces.jsonl"
if [ "${WITH_MATH:-0}" = 1 ]; then
  codestop record --dataset math500 --data "$DATA/math500_test.jsonl" --limit "$MATH_N" \
    --model "$MODEL" --engine llamacpp --max-reasoning-tokens 1024 --probe-interval 1 "${SAMPLING[@]}" \
    --out "$R/math500-$MODEL.traces.jsonl"
fi
fi

# 2. the trade-off, from the traces alone (seconds)
for T in "$R"/*-"$MODEL".traces.jsonl; do
  B=${T%.traces.jsonl}
  codestop sweep "$T" --method codestop,deer,consistency --tau 0.25:16:0.25 --out "$B.sweep"
  codestop calibrate "$T" --max-accuracy-drop 0.01 --tau 0.25:16:0.25 --json > "$B.calibrate.json"
  codestop plot dynamics "$T" --out "$B.dynamics.png" > "$B.auroc.md"
done
python bench/compare.py "$R" > "$R/comparison.md"
codestop report "$R" --title "codestop: trade-off on recorded traces ($MODEL, not a reasoning model)"
