#!/usr/bin/env bash
# Baseline benchmark of the Python onnxruntime greedy loop on provisioned models.
#   scripts/local_model/bench.sh [ROUNDS]     (default 3)
# Runs python_greedy.py --bench (~50-token chat prompt, 64 decoded tokens, 2 intra-op threads)
# ROUNDS times per model, alternating models, with and without ORT thread spinning, and prints
# every run: on a shared 2-core machine the best run is the closest to an idle machine.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${TIERGATE_CACHE:-$HOME/.cache/tiergate}"
py="$cache/venv-convert/bin/python"
rounds="${1:-3}"
for r in $(seq 1 "$rounds"); do
  for m in smollm2-135m-instruct qwen2.5-coder-0.5b-instruct; do
    [ -d "$cache/models/$m" ] || continue
    for spin in "" "--no-spin"; do
      echo "== $m round $r ${spin:-spin} (loadavg $(cut -d' ' -f1-3 /proc/loadavg))"
      "$py" "$here/python_greedy.py" "$cache/models/$m" --bench --repeat 3 $spin | grep -E '^(prompt_tokens|  prefill runs)'
    done
  done
done
