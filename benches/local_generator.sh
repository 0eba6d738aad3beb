#!/usr/bin/env bash
# The local generator side by side with the plain Python onnxruntime KV-cache greedy loop
# (scripts/local_model/python_greedy.py): same model file, same prompts, same process
# conditions, alternating runs so that both see the same machine load.
#
#   benches/local_generator.sh [ROUNDS] [MODEL ...]
#
# ROUNDS (default 3) alternations per model; MODEL names under $TIERGATE_CACHE/models
# (default: every provisioned one of smollm2-135m-instruct, qwen2.5-coder-0.5b-instruct).
#
# By default each round runs every prompt of benches/local_prompts.jsonl (PROMPTS=FILE for
# others): the generic bench prompt (64 decoded tokens, EOS ignored) and gateway prompts
# from examples/workloads/mixed.jsonl (FAQ with context, extraction, translation, bullet
# points, code; up to 128 tokens, ending at EOS), once on each side. The engine runs each
# prompt plain (one token per step) and with prompt-lookup speculation (DRAFT tokens,
# default 8), and prints the drafted/accepted counts. At the end,
# benches/local_generator_summary.py tabulates decode ratios (engine / Python) per prompt
# and round, and their medians. Odd rounds run the engine first, even rounds Python.
#
# MODE=generic runs the older bench instead: the generic prompt only, prefill best of 3,
# decode median of 3, TTFT, RSS and throughput at 1, 2, 4, 8 concurrent requests.
# SPIN=0 turns ONNX Runtime's thread spinning off on both sides. Needs
# `python3 scripts/provision.py --test` (and `--only default-model` for Qwen).
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${TIERGATE_CACHE:-$HOME/.cache/tiergate}"
py="$cache/venv-convert/bin/python"
rounds="${1:-3}"
spin=()
[ "${SPIN:-1}" = 0 ] && spin=(--no-spin)
draft=()
[ -n "${DRAFT:-}" ] && draft=(--draft "$DRAFT")
prompts="${PROMPTS:-benches/local_prompts.jsonl}"
log="$(mktemp /tmp/local_generator.XXXXXX.log)"
shift || true
models=("$@")
if [ ${#models[@]} -eq 0 ]; then
  for m in smollm2-135m-instruct qwen2.5-coder-0.5b-instruct; do
    [ -f "$cache/models/$m/model.onnx" ] && models+=("$m")
  done
fi
bin="$(cargo bench --locked --bench local_generator --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\))$/\1/p' | tail -1)"
[ -x "$bin" ] || { echo "could not build the benchmark" >&2; exit 1; }
echo "# $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
engine() {
  echo "== $m round $r: tiergate (loadavg $(cut -d' ' -f1-3 /proc/loadavg))"
  if [ "${MODE:-prompts}" = generic ]; then
    "$bin" "$dir" --repeat 3 "${spin[@]}" --draft "${DRAFT:-0}"
  else
    "$bin" "$dir" --prompts "$prompts" "${spin[@]}" "${draft[@]}" | sed "s/^RESULT /RESULT model=$m round=$r /"
  fi
}
python() {
  echo "== $m round $r: python (loadavg $(cut -d' ' -f1-3 /proc/loadavg))"
  if [ "${MODE:-prompts}" = generic ]; then
    "$py" scripts/local_model/python_greedy.py "$dir" --bench --repeat 3 "${spin[@]}"
  else
    "$py" scripts/local_model/python_greedy.py "$dir" --prompts "$prompts" "${spin[@]}" \
      | sed "s/^RESULT /RESULT model=$m round=$r /"
  fi
}
for r in $(seq 1 "$rounds"); do
  for m in "${models[@]}"; do
    dir="$cache/models/$m"
    # Odd rounds run the engine first, even rounds Python first, so a load that rises or
    # falls during a round does not favour one side.
    if [ $((r % 2)) = 1 ]; then engine; python; else python; engine; fi
  done
done | tee "$log"
[ "${MODE:-prompts}" = generic ] || python3 benches/local_generator_summary.py "$log"
echo "# log: $log"
