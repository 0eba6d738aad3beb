#!/usr/bin/env bash
# The local generator side by side with the plain Python onnxruntime KV-cache greedy loop
# (scripts/local_model/python_greedy.py --bench): same model file, same prompt, same
# process conditions, alternating runs so that both see the same machine load.
#
#   benches/local_generator.sh [ROUNDS] [MODEL ...]
#
# ROUNDS (default 3) alternations per model; MODEL names under $TIERGATE_CACHE/models
# (default: every provisioned one of smollm2-135m-instruct, qwen2.5-coder-0.5b-instruct).
# Each run prints prefill ms (best of 3 after a warm-up), decode tok/s over 64 tokens
# (median of 3), and RSS; the Rust side also prints time to first token and throughput at
# 1, 2, 4, 8 concurrent requests. SPIN=0 turns ONNX Runtime's thread spinning off on both
# sides. Needs `python3 scripts/provision.py --test` (and `--only default-model` for Qwen).
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${TIERGATE_CACHE:-$HOME/.cache/tiergate}"
py="$cache/venv-convert/bin/python"
rounds="${1:-3}"
spin=()
[ "${SPIN:-1}" = 0 ] && spin=(--no-spin)
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
for r in $(seq 1 "$rounds"); do
  for m in "${models[@]}"; do
    dir="$cache/models/$m"
    echo "== $m round $r: tiergate (loadavg $(cut -d' ' -f1-3 /proc/loadavg))"
    "$bin" "$dir" --repeat 3 "${spin[@]}"
    echo "== $m round $r: python (loadavg $(cut -d' ' -f1-3 /proc/loadavg))"
    "$py" scripts/local_model/python_greedy.py "$dir" --bench --repeat 3 "${spin[@]}"
  done
done
