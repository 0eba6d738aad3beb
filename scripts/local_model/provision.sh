#!/usr/bin/env bash
# Provision a local-tier model into ${TIERGATE_CACHE:-$HOME/.cache/tiergate}/models/.
#   scripts/local_model/provision.sh smollm2-135m          # test model (CI)
#   scripts/local_model/provision.sh qwen2.5-coder-0.5b    # default model
# Creates the pinned conversion venv on first use, then runs provision_model.py (idempotent).
# Extra arguments go to provision_model.py (--force, --quant, --keep-fp32, --no-verify).
# The model directory is printed as the last line of stdout.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${TIERGATE_CACHE:-$HOME/.cache/tiergate}"
venv="$cache/venv-convert"
model="${1:?usage: provision.sh smollm2-135m|qwen2.5-coder-0.5b [provision_model.py options]}"
shift
req_hash="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.requirements.sha256" 2>/dev/null)" != "$req_hash" ]; then
  echo "[provision] creating $venv from requirements.txt" >&2
  mkdir -p "$cache"
  python3 -m venv --clear "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt" >&2
  echo "$req_hash" > "$venv/.requirements.sha256"
fi
exec "$venv/bin/python" "$here/provision_model.py" --model "$model" --cache-dir "$cache" "$@"
