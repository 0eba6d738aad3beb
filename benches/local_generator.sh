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
# points, code; up to 128 tokens, ending at EOS), once on each side. Both sides stay loaded
# and benches/local_generator_paired.py alternates them prompt by prompt (the side going
# first alternates too). The engine runs each prompt plain (one token per step), with
# prompt-lookup speculation alone (DRAFT tokens, default 8; only when the model has a draft
# head) and speculative as served (lookup, and the draft head's guesses where lookup has
# none), and prints the drafted/accepted and guessed/right counts. At the end, benches/local_generator_summary.py tabulates decode ratios
# (engine / Python) per prompt and round, and their medians.
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
  "$bin" "$dir" --repeat 3 "${spin[@]}" --draft "${DRAFT:-0}"
}
python() {
  echo "== $m round $r: python (loadavg $(cut -d' ' -f1-3 /proc/loadavg))"
  "$py" scripts/local_model/python_greedy.py "$dir" --bench --repeat 3 "${spin[@]}"
}
if [ "${MODE:-prompts}" = generic ]; then
  for r in $(seq 1 "$rounds"); do
    for m in "${models[@]}"; do
      dir="$cache/models/$m"
      # Odd rounds run the engine first, even rounds Python first, so a load that rises or
      # falls during a round does not favour one side.
      if [ $((r % 2)) = 1 ]; then engine; python; else python; engine; fi
    done
  done
  exit 0
fi
for m in "${models[@]}"; do
  python3 benches/local_generator_paired.py --engine "$bin" --python "$py" --model-dir "$cache/models/$m" \
    --prompts "$prompts" --rounds "$rounds" "${spin[@]}" ${DRAFT:+--draft "$DRAFT"}
done | tee "$log"
python3 benches/local_generator_summary.py "$log"
echo "# log: $log"
